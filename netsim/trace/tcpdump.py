"""tcpdump processes inside namespaces, started and ended by PID."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod

LISTEN_TIMEOUT = 3.0  # seconds for a tcpdump to report that it listens

# Every tcpdump this process started, in order: tests check by PID that none is left running.
STARTED_PIDS: list[int] = []


# -- tcpdump --------------------------------------------------------------------------------


def tcpdump_binary() -> str:
    binary = shutil.which("tcpdump")
    if binary is None:
        raise NetsimError("tcpdump not found: apt-get install tcpdump")
    return binary


class Tcpdump:
    """One tcpdump inside a namespace, writing a pcap; ended by its PID."""

    def __init__(
        self, netns: str, iface: str, out: str, registry: list[Tcpdump], count: int | None = None
    ):
        self.netns, self.iface, self.out = netns, iface, out
        argv = [
            tcpdump_binary(),
            "-i",
            iface,
            "-n",
            "-Z",
            "root",
            "--immediate-mode",
            "-U",
            "-s",
            "262144",
            "-w",
            out,
        ]
        if count is not None:
            argv[1:1] = ["-c", str(count)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
            preexec_fn=lambda: nsmod.enter_for_exec(netns),
        )
        registry.append(self)  # at once: whoever holds the registry stops it
        STARTED_PIDS.append(self.proc.pid)
        self.listening = False
        self.message = ""

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM (tcpdump flushes and closes its file), SIGKILL after the grace; reaped."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace)
        if self.proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                self.message += self.proc.stderr.read().decode(errors="replace")
            self.proc.stderr.close()


def wait_listening(dumps: list[Tcpdump], timeout: float = LISTEN_TIMEOUT) -> None:
    """Until every tcpdump has said "listening on"; a tcpdump that fails is an error."""
    waiting = {d.proc.stderr.fileno(): d for d in dumps if d.proc.stderr is not None}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(waiting), [], [], deadline - time.monotonic())
        for fd in ready:
            dump = waiting[fd]
            chunk = os.read(fd, 4096).decode(errors="replace")
            dump.message += chunk
            if "listening on" in dump.message:
                dump.listening = True
                del waiting[fd]
            elif not chunk:  # tcpdump exited
                del waiting[fd]
    for dump in dumps:
        if not dump.listening:
            problem = dump.message.strip().splitlines()
            raise NetsimError(
                f"tcpdump on {dump.iface} in {dump.netns} did not start: "
                + (problem[-1] if problem else f"silent for {timeout:.0f} s")
            )


@contextlib.contextmanager
def running(specs: list[tuple[str, str, str]]) -> Iterator[list[Tcpdump]]:
    """Start one tcpdump per (netns, iface, file); every one is stopped and reaped on the way
    out, whatever happened (errors, KeyboardInterrupt)."""
    dumps: list[Tcpdump] = []
    try:
        for netns, iface, out in specs:
            Tcpdump(netns, iface, out, dumps)
        wait_listening(dumps)
        yield dumps
    finally:
        for dump in dumps:
            if dump.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    dump.proc.send_signal(signal.SIGTERM)
        for dump in dumps:
            dump.stop()
