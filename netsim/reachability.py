"""Who reaches whom, probed as the upstream NetworkPolicy e2e tests probe it (`agnhost
connect`): a TCP connection that opens, or a UDP datagram that is answered, from inside the
source pod's namespace. Every probe of a matrix runs at once (non-blocking sockets made in
each source's namespace, one selector over all), so a matrix of hundreds costs one timeout;
the result prints as the e2e tests' truth table (`.` reached, `X` not)."""

from __future__ import annotations

import errno
import itertools
import selectors
import socket
import time
from dataclasses import dataclass

from netsim.kernel import netns as nsmod


@dataclass(frozen=True)
class Probe:
    source: str  # who sends (a pod's key)
    target: str  # whom it means to reach (a pod's key, named in the table)
    address: str  # where it sends: the pod's address, or its Service's ClusterIP
    port: int
    protocol: str = "TCP"  # TCP | UDP


def run(probes: list[Probe], netns: dict[str, str], timeout: float = 1.0) -> dict[Probe, bool]:
    """Each probe's outcome. `netns`: each source's namespace."""
    result = dict.fromkeys(probes, False)
    by_source: dict[str, list[Probe]] = {}
    for probe in probes:
        by_source.setdefault(probe.source, []).append(probe)
    selector = selectors.DefaultSelector()
    sockets = []
    try:
        for source, mine in by_source.items():
            with nsmod.entered(netns[source]):  # a socket stays in the namespace it was made in
                made = [(p, _socket(p)) for p in mine]
            for probe, sock in made:
                sockets.append(sock)
                _start(probe, sock, selector)
        deadline = time.monotonic() + timeout
        pending = len(selector.get_map())
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                probe, sock = key.data
                result[probe] = _finished(probe, sock)
                selector.unregister(sock)
                pending -= 1
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    return result


_PORTS = itertools.cycle(range(20000, 60000))


def _socket(probe: Probe) -> socket.socket:
    """A probe's socket. A UDP one gets the next source port of a cycle: a flow conntrack
    still holds as established (120 s after an answer) would pass any policy made since, so
    matrices that follow each other never reuse one (a TCP flow starts anew with its SYN)."""
    kind = socket.SOCK_STREAM if probe.protocol == "TCP" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.setblocking(False)
    if kind == socket.SOCK_DGRAM:
        for _ in range(100):
            try:
                sock.bind(("0.0.0.0", next(_PORTS)))
                break
            except OSError:  # taken in this namespace: the next one
                continue
    return sock


def _start(probe: Probe, sock: socket.socket, selector: selectors.BaseSelector) -> None:
    code = sock.connect_ex((probe.address, probe.port))
    if probe.protocol == "TCP":
        if code in (0, errno.EINPROGRESS):
            selector.register(sock, selectors.EVENT_WRITE, (probe, sock))
        return
    if code == 0:
        try:
            sock.send(b"hostname")
        except OSError:
            return
        selector.register(sock, selectors.EVENT_READ, (probe, sock))


def _finished(probe: Probe, sock: socket.socket) -> bool:
    if probe.protocol == "TCP":
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    try:
        return bool(sock.recv(512))
    except OSError:  # ECONNREFUSED: the port is closed
        return False


def table(result: dict[Probe, bool], names: list[str]) -> str:
    """The truth table of one port and protocol: rows are sources, columns targets; `.` is
    reached, `X` is not, `?` was not probed."""
    cells = {(p.source, p.target): ok for p, ok in result.items()}
    width = max(len(n) for n in names)
    lines = ["-".ljust(width) + "  " + " ".join(n.ljust(width) for n in names)]
    for src in names:
        row = []
        for dst in names:
            ok = cells.get((src, dst))
            row.append(("?" if ok is None else "." if ok else "X").ljust(width))
        lines.append(src.ljust(width) + "  " + " ".join(row))
    return "\n".join(lines)
