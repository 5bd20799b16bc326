"""kubectl's READY, STATUS and RESTARTS columns of `get pods`, computed from a pod's status
the way kubectl's printer computes them (kubectl printers.go printPod): the phase, unless an
init container is not done (Init:<reason>, or Init:<done>/<all>), or a container waits or ended
(its reason: ContainerCreating, CrashLoopBackOff, Completed, Error...). Pure.
"""

from __future__ import annotations


def columns(status: dict) -> tuple[str, str, int]:
    """(READY "n/m", STATUS, RESTARTS) of a pod status as the kubelet publishes it."""
    containers = status.get("containerStatuses", [])
    inits = status.get("initContainerStatuses", [])
    reason = status.get("phase", "Pending")
    restarts = sum(c.get("restartCount", 0) for c in inits)
    initializing = False
    for i, c in enumerate(inits):
        state = c.get("state", {})
        if "terminated" in state and state["terminated"].get("exitCode") == 0:
            continue
        initializing = True
        if "terminated" in state:
            ended = state["terminated"]
            reason = "Init:" + (ended.get("reason") or f"ExitCode:{ended.get('exitCode')}")
        elif state.get("waiting", {}).get("reason", "PodInitializing") != "PodInitializing":
            reason = "Init:" + state["waiting"]["reason"]
        else:
            reason = f"Init:{i}/{len(inits)}"
        break
    ready = 0
    if not initializing:
        restarts = 0
        running = False
        for c in reversed(containers):
            restarts += c.get("restartCount", 0)
            state = c.get("state", {})
            if state.get("waiting", {}).get("reason"):
                reason = state["waiting"]["reason"]
            elif "terminated" in state:
                ended = state["terminated"]
                reason = ended.get("reason") or f"ExitCode:{ended.get('exitCode')}"
            elif "running" in state and c.get("ready"):
                running = True
                ready += 1
        if reason == "Completed" and running:
            reason = "Running" if status.get("ready") else "NotReady"
    return f"{ready}/{len(containers)}", reason, restarts
