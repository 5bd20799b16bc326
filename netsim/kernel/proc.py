"""Processes netsim starts: recorded by PID and start time, ended by PID, never by pattern."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from netsim.kernel import netns as nsmod


def start_time(pid: int) -> int | None:
    """The kernel's start time of a PID (field 22 of /proc/PID/stat), to detect PID reuse."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def spawn(argv: list[str], log: str, netns: str | None = None,
          pass_fds: tuple[int, ...] = ()) -> tuple[int, int]:
    """Start a detached process (own session), optionally inside a namespace."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, pass_fds=pass_fds,
            preexec_fn=(lambda: nsmod.enter_for_exec(netns)) if netns else None)
    return proc.pid, start_time(proc.pid) or 0


def alive(pid: int, started: int) -> bool:
    return start_time(pid) == started and _state(pid) not in ("Z", "X", None)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def stop(processes: list[tuple[int, int]], grace: float = 2.0) -> None:
    """SIGTERM to each (pid, start time) that is still the process we started, then SIGKILL
    what is left after the grace period."""
    running = [(pid, t) for pid, t in processes if alive(pid, t)]
    for pid, _ in running:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        for pid, _ in running:
            _reap(pid)
        running = [(pid, t) for pid, t in running if alive(pid, t)]
        if running:
            time.sleep(0.005)
    for pid, t in running:
        if alive(pid, t):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
