"""A pod's containers as the kubelet runs them, inside the node's agent: the init containers
one after another, each to completion, then the containers; an exit restarted as the pod's
restartPolicy says (Always, OnFailure, Never) after the kubelet's back-off (at once the first
time, then 10 s doubling to 5 minutes; reset after 10 minutes of running); readiness probes
(httpGet, tcpSocket, exec) deciding whether a container is ready. Each container's output goes
to its own log, one file per run (<logs>/<container>/<restart>.log, as the kubelet keeps
/var/log/pods/...), so `netsim logs --previous` has the run before.

Statuses are shaped as the API's containerStatuses (state running/waiting/terminated,
lastState, restartCount, ready), so kubectl's STATUS column can be computed from them
(netsim/podstatus.py). Event-driven: the agent's loop tells it of exits (pidfd) and timers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

BACKOFF_START, BACKOFF_MAX, BACKOFF_RESET = 10.0, 300.0, 600.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def timestamp(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def _waiting(reason: str, message: str = "") -> dict:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


class PodContainers:
    """The init containers and containers of one pod; `host` is the agent (later, post,
    watch_exit, spawn, unwatch); `changed` is told whenever a status changed."""

    def __init__(
        self,
        name: str,
        spec: dict,
        logs: str,
        host,
        changed: Callable[[str], None],
        environment: Callable[[], dict[str, str]],
        serve_builtin: Callable[[], None],
    ):
        self.name, self.spec, self.logs, self.host = name, spec, logs, host
        self.changed, self.environment, self.serve_builtin = changed, environment, serve_builtin
        self.init: list[dict] = spec.get("init", [])
        self.main: list[dict] = spec.get("containers", [])
        self.policy = spec.get("restartPolicy", "Always")
        self.step = 0  # init containers completed
        self.failed = False  # an init container failed and the policy is Never
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.delay: dict[str, float] = {}  # the back-off a next crash waits
        self.timers: list = []
        self.probes: dict[str, list[int]] = {}  # container -> [successes, failures] in a row
        first = "PodInitializing" if self.init else "ContainerCreating"
        self.status: dict[str, dict] = {
            c["name"]: {
                "name": c["name"],
                "state": _waiting(first),
                "lastState": {},
                "restartCount": 0,
                "ready": False,
                "started": False,
            }
            for c in [*self.init, *self.main]
        }
        self.stopped = False
        self.namespace = spec.get("namespace", "default")

    # -- the lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self.init:
            self._run(self.init[0])
        else:
            self._start_main()

    def _start_main(self) -> None:
        self.serve_builtin()
        for container in self.main:
            if container.get("argv") is None:  # the agent's hostname server: up already
                self.status[container["name"]] |= {
                    "state": {"running": {"startedAt": timestamp()}},
                    "started": True,
                    "ready": True,
                }
            else:
                self._run(container)

    def _run(self, container: dict) -> None:
        name = container["name"]
        status = self.status[name]
        folder = os.path.join(self.logs, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{status['restartCount']}.log")
        stale = os.path.join(folder, f"{status['restartCount'] - 2}.log")
        if os.path.exists(stale):
            os.unlink(stale)
        hostname = self.spec.get("hostname", self.name)
        env = {"PATH": PATH, "HOME": "/root", "HOSTNAME": hostname}
        env |= self.environment() | container.get("env", {})
        # netsim's agnhost says when it listens (netsim/agnhost.py `started`)
        signals = list(container["argv"][1:3]) == ["-m", "netsim.agnhost"]
        keep: tuple[int, ...] = ()
        if signals:
            signal_read, signal_write = os.pipe()
            env["NETSIM_STARTED_FD"] = str(signal_write)
            keep = (signal_write,)
        try:
            proc = self.host.spawn(
                container["argv"], env, path, self.spec["netns"], hostname, self.namespace, keep
            )
        except (OSError, subprocess.SubprocessError) as exc:
            with open(path, "a") as log:
                log.write(f"failed to start container {name}: {exc}\n")
            self._ended(container, 128, "StartError", time.time(), str(exc))
            return
        finally:
            if signals:
                os.close(signal_write)
        self.procs[name], self.started[name] = proc, time.time()
        ready = container.get("readiness") is None and container in self.main
        status |= {
            "state": {"running": {"startedAt": timestamp()}},
            "started": True,
            "ready": ready and not signals,
        }
        if signals:
            self.host.watch_fd(
                signal_read, lambda up, c=container, p=proc: self._up(c, p, up, ready)
            )
        self.host.watch_exit(proc, lambda code, c=container: self._exited(c, code))
        if container.get("readiness") and container in self.main:
            self.probes[name] = [0, 0]
            self._later(container["readiness"].get("initialDelaySeconds", 0), container)
        self.changed(self.name)

    def _up(self, container: dict, proc, up: bool, ready: bool) -> None:
        """The container's program listens: ready now (without a readiness probe)."""
        name = container["name"]
        if up and ready and self.procs.get(name) is proc and not self.stopped:
            self.status[name]["ready"] = True
            self.changed(self.name)

    def _exited(self, container: dict, code: int) -> None:
        name = container["name"]
        self.procs.pop(name, None)
        if self.stopped:
            return
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        self._ended(container, code, "Completed" if code == 0 else "Error", self.started[name])

    def _ended(
        self, container: dict, code: int, reason: str, started: float, message: str = ""
    ) -> None:
        name = container["name"]
        status = self.status[name]
        terminated = {
            "exitCode": code,
            "reason": reason,
            "startedAt": timestamp(started),
            "finishedAt": timestamp(),
            **({"message": message} if message else {}),
        }
        status |= {"state": {"terminated": terminated}, "ready": False}
        self.probes.pop(name, None)
        if container in self.init:
            if code == 0:
                self.step += 1
                if self.step < len(self.init):
                    self._run(self.init[self.step])
                else:
                    self._start_main()
                self.changed(self.name)
                return
            again = self.policy != "Never"
            self.failed = not again
        else:
            again = self.policy == "Always" or (self.policy == "OnFailure" and code != 0)
        if again:
            if time.time() - started >= BACKOFF_RESET:
                self.delay.pop(name, None)
            wait = self.delay.get(name, 0.0)
            self.delay[name] = min(BACKOFF_MAX, max(BACKOFF_START, wait * 2))
            status["lastState"] = status["state"]
            if wait:
                message = f"back-off {wait:.0f}s restarting failed container={name} pod={self.name}"
                status["state"] = _waiting("CrashLoopBackOff", message)
                self.timers.append(self.host.later(wait, lambda: self._restart(container)))
            else:
                self._restart(container)
                return
        self.changed(self.name)

    def _restart(self, container: dict) -> None:
        """Run it again: the restart counts once it happens, as the kubelet counts it."""
        self.status[container["name"]]["restartCount"] += 1
        self._run(container)

    # -- readiness -----------------------------------------------------------------------------

    def _later(self, delay: float, container: dict) -> None:
        self.timers.append(self.host.later(delay, lambda: self._probe(container)))

    def _probe(self, container: dict) -> None:
        name = container["name"]
        if self.stopped or name not in self.procs:
            return
        probe = container["readiness"]
        threading.Thread(
            target=lambda: self._probed(container, self._check(probe)), daemon=True
        ).start()

    def _probed(self, container: dict, ok: bool) -> None:
        """(A probe's thread.) Its result, handed to the agent's loop."""

        def record() -> None:
            name = container["name"]
            counts = self.probes.get(name)
            if self.stopped or counts is None:
                return
            probe = container["readiness"]
            counts[0 if ok else 1] += 1
            counts[1 if ok else 0] = 0
            ready = self.status[name]["ready"]
            if ok and counts[0] >= probe.get("successThreshold", 1):
                ready = True
            elif not ok and counts[1] >= probe.get("failureThreshold", 3):
                ready = False
            if ready != self.status[name]["ready"]:
                self.status[name]["ready"] = ready
                self.changed(self.name)
            self._later(probe.get("periodSeconds", 10), container)

        self.host.post(record)

    def _check(self, probe: dict) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        if probe["kind"] == "exec":
            from netsim.kernel import netns as nsmod

            try:
                return (
                    subprocess.run(
                        probe["command"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=timeout,
                        preexec_fn=lambda: nsmod.enter_as_container(
                            self.spec["netns"], self.spec.get("hostname", self.name), self.namespace
                        ),
                    ).returncode
                    == 0
                )
            except (OSError, subprocess.SubprocessError):
                return False
        from netsim.kernel import netns as nsmod

        if not self.host.netns:  # never from the host's own namespace
            return False
        try:  # httpGet and tcpSocket: from the node's namespace to the pod's address, as the
            # kubelet probes (the socket is made in the node's namespace and stays there; the
            # agent's own threads are not in it)
            with nsmod.entered(self.host.netns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with sock:
                sock.settimeout(timeout)
                sock.connect((self.spec["ip"], probe["port"]))
                if probe["kind"] != "httpGet":
                    return True
                path = probe.get("path", "/")
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n".encode()
                )
                head = sock.recv(64).split(b" ", 2)
                return len(head) > 1 and head[1].isdigit() and 200 <= int(head[1]) < 400
        except OSError:  # KernelError too: the node's namespace is gone
            return False

    # -- what the kubelet reads ----------------------------------------------------------------

    def phase(self) -> str:
        if self.failed:
            return "Failed"
        if self.step < len(self.init):
            return "Pending"
        states = [self.status[c["name"]]["state"] for c in self.main]
        if any("terminated" not in s for s in states):
            return "Running"
        codes = [s["terminated"]["exitCode"] for s in states]
        return "Succeeded" if not any(codes) else "Failed"

    def pod_status(self) -> dict:
        phase = self.phase()
        ready = phase == "Running" and all(self.status[c["name"]]["ready"] for c in self.main)
        return {
            "phase": phase,
            "ready": ready,
            "initContainerStatuses": [self.status[c["name"]] for c in self.init],
            "containerStatuses": [self.status[c["name"]] for c in self.main],
        }

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs.values()]

    def stop(self) -> list[subprocess.Popen]:
        """Stop reacting; the running processes, for the agent to end."""
        self.stopped = True
        for timer in self.timers:
            timer.cancel()
        procs = list(self.procs.values())
        for proc in procs:
            self.host.unwatch(proc)
        self.procs.clear()
        return procs
