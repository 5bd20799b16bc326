"""Processes netsim starts: recorded by PID and start time, ended by PID, never by pattern."""

from __future__ import annotations

import os
import select
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


def spawn(
    argv: list[str],
    log: str,
    netns: str | None = None,
    pass_fds: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[int, int]:
    """Start a detached process (own session), optionally inside a namespace, with `env`
    added to netsim's environment."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=pass_fds,
            preexec_fn=(lambda: nsmod.enter_for_exec(netns)) if netns else None,
        )
    return proc.pid, start_time(proc.pid) or 0


def in_child(work) -> None:
    """Run work() in a forked child and wait for it: what it allocates goes when it exits.
    The child runs only the calling thread, so work must take no lock another thread may hold
    (no print, no import of a module not yet loaded); its failure is written to stderr and
    raised here as RuntimeError."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            die_with_parent(parent)
            work()
        except BaseException:
            import traceback

            os.write(2, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status:
        raise RuntimeError(f"child {pid} failed (wait status {status}): see the log above")


def die_with_parent(parent: int) -> None:
    """SIGKILL this child when the thread that forked it ends (PR_SET_PDEATHSIG), as when its
    agent is stopped mid-sync: nothing of a cluster outlives it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it ended before the prctl took hold
        os._exit(1)


def alive(pid: int, started: int) -> bool:
    return start_time(pid) == started and _state(pid) not in ("Z", "X", None)


def wait_listening(process: tuple[int, int], port: int, timeout: float = 10.0) -> bool:
    """Until the process's network namespace has a TCP socket listening on ``port``
    (read from /proc/PID/net, which shows that namespace); False if the process ended or the
    time ran out."""
    pid, started = process
    wanted = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid, started):
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{pid}/net/{table}") as fh:
                    next(fh)  # the header
                    for line in fh:
                        local, state = line.split()[1:4:2]
                        if local.endswith(wanted) and state == "0A":  # 0A: TCP_LISTEN
                            return True
            except (FileNotFoundError, ProcessLookupError):
                return False
        time.sleep(0.01)
    return False


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def stop(processes: list[tuple[int, int]], grace: float = 2.0) -> None:
    """SIGTERM to each (pid, start time) that is still the process we started, then SIGKILL
    what is left after the grace period."""
    finish(terminate(processes), grace)


def terminate(
    processes: list[tuple[int, int]], how: signal.Signals = signal.SIGTERM
) -> dict[int, int]:
    """SIGTERM (or `how`) to each (pid, start time) that is still the process we started; the
    pidfds of those signalled, for `finish`."""
    # a pidfd names exactly this process, even if the PID is reused later, and polls readable
    # when it exits: no sleeping loop, no signal to a stranger
    fds = {}
    for pid, started in processes:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        if alive(pid, started):
            fds[fd] = pid
            signal.pidfd_send_signal(fd, how)
        else:
            os.close(fd)
    return fds


def finish(fds: dict[int, int], grace: float = 2.0) -> None:
    """Wait for the signalled processes to exit; SIGKILL what is left after the grace."""
    _wait_exit(fds, grace)
    for fd in list(fds):
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    _wait_exit(fds, grace)
    for fd, pid in fds.items():
        os.close(fd)
        _reap(pid)


def _wait_exit(fds: dict[int, int], timeout: float) -> None:
    """Wait until every pidfd in `fds` reports exit (those are removed) or the time is up."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while fds and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            poller.unregister(fd)
            _reap(fds.pop(fd))
            os.close(fd)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def parent(pid: int) -> int | None:
    """The process's parent PID (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
