"""`netsim logs POD [-c CONTAINER] [-f] [--previous]`: what a container printed, as kubectl
logs shows it. The kubelet (netsim/containers.py) keeps each run of a container in its own
file, <node>/logs/<pod>/<container>/<restart>.log; --previous is the run before the last.
"""

from __future__ import annotations

import os
import sys
import time

from netsim import state
from netsim.errors import NetsimError
from netsim.record import Record


def folder(record: Record, pod: str) -> str:
    entry = record.pods.get(pod)
    if entry is None:
        raise NetsimError(f'pods "{pod}" not found; `netsim get pods` lists them')
    return os.path.join(state.node_dir(record.cluster, entry.node), "logs", pod)


def container_of(record: Record, pod: str, wanted: str | None) -> str:
    """The container asked for, or the pod's first (kubectl's default, said on stderr)."""
    spec = record.pods[pod].pod
    main = [c.name for c in spec.containers]
    init = [c.name for c in spec.init_containers]
    if wanted is None:
        if len(main) + len(init) > 1:
            others = ", ".join(main + [f"{n} (init)" for n in init])
            print(f'Defaulted container "{main[0]}" out of: {others}', file=sys.stderr)
        return main[0]
    if wanted not in main + init:
        raise NetsimError(
            f"container {wanted} is not valid for pod {pod}: use one of {', '.join(main + init)}"
        )
    return wanted


def runs(path: str) -> list[int]:
    """The runs of a container that have a log, oldest first."""
    found = [int(f[:-4]) for f in os.listdir(path) if f.endswith(".log") and f[:-4].isdigit()]
    return sorted(found) if os.path.isdir(path) else []


def show(record: Record, pod: str, container: str | None, previous: bool, follow: bool) -> int:
    name = container_of(record, pod, container)
    path = os.path.join(folder(record, pod), name)
    done = runs(path) if os.path.isdir(path) else []
    if previous:
        if len(done) < 2:
            raise NetsimError(f'previous terminated container "{name}" in pod "{pod}" not found')
        done = done[:-1]
    if not done:
        from netsim.images import workload

        spec = record.pods[pod].pod
        found = next(c for c in (*spec.containers, *spec.init_containers) if c.name == name)
        if workload(found).argv is None:
            return 0  # served by the agent's hostname server: it prints nothing
        waiting = "PodInitializing" if spec.init_containers else "ContainerCreating"
        raise NetsimError(f'container "{name}" in pod "{pod}" is waiting to start: {waiting}')
    log = os.path.join(path, f"{done[-1]}.log")
    with open(log, "rb") as fh:
        sys.stdout.buffer.write(fh.read())
        sys.stdout.flush()
        if not follow or previous:
            return 0
        try:
            while True:  # until interrupted, or the container runs again (a new file)
                chunk = fh.read()
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                elif runs(path)[-1:] != done[-1:]:
                    return 0
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return 0
