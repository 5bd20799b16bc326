"""Userspace encapsulators: a TUN device plus a socket, for the two data planes whose real system
(or this host's kernel) carries packets in a process.

- ``ipip``: Calico IPIP when the kernel has no ``ipip`` module and eBPF is unavailable. TUN
  ``tunl0`` (MTU underlay - 20) and a raw ``IPPROTO_IPIP`` socket bound to the node IP. The outer
  header is written here (IP_HDRINCL) the way the kernel's fallback tunl0 writes it: TTL
  inherited from the inner packet, the inner ECN bits and DF copied, protocol 4, source the node
  IP; the kernel fills in the ID, total length and checksum. So the wire format is RFC 2003 and
  matches the kernel device. Received packets are accepted only from a known peer node IP.
- ``udp``: flannel's legacy udp backend. TUN ``flannel0`` (MTU underlay - 28) and a UDP socket
  on node IP port 8285; the datagram payload is the raw inner IP packet, as flannel sends it.

The peers table maps a CIDR (a Calico block or a flannel subnet) to the node IP that owns it; the
outer destination is the longest-prefix match of the inner destination (a TUN cannot see the
route's gateway, which the kernel tunl0 would use).

Hosting, two ways (choose one per tunnel):
- ``start()``: two daemon threads, one per direction, each blocking in poll() on its own fd and
  a wake-up pipe. This is what the agent should use: its control socket handler may block
  while a request is served, and the threads keep forwarding meanwhile (the GIL is released in
  every read, write and poll, so the two directions overlap).
- ``fds()`` + ``handle_ready(fd)``: register both fds in an existing selector; each call moves
  at most ``BATCH`` packets, so one loop can serve several tunnels and other sockets fairly.

Every fd is close-on-exec, so a pod command the agent starts cannot keep the TUN alive; closing
the TUN fd (``close()``) removes the non-persistent device.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import fcntl
import ipaddress
import os
import select
import socket
import struct
import threading
from typing import Literal

from netsim.errors import KernelError
from netsim.kernel import netns as nsmod
from netsim.kernel import sysctl
from netsim.kernel.netlink import Rtnl

Kind = Literal["ipip", "udp"]

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU = 0x8913, 0x8914, 0x8922
IFF_UP = 0x1
IPPROTO_IPIP = 4
FLANNEL_UDP_PORT = 8285
OVERHEAD = {"ipip": 20, "udp": 28}  # default MTU = underlay MTU - overhead
BATCH = 64  # packets per handle_ready() call: keeps a shared selector loop fair
_THREAD_BATCH = 1024  # packets per wake-up in thread mode, before polling again
_SOCKBUF = 4 << 20  # socket buffers: absorb bursts the single Python thread cannot
_CACHE_MAX = 65536  # destinations remembered by the route cache before it is reset
_OUTER = struct.Struct("!BBHHHBBH4s4s")  # an IPv4 header without options
_BUF = 65536 + _OUTER.size


def default_mtu(kind: Kind, underlay_mtu: int = 1500) -> int:
    """The device MTU the real system uses: 1480 for tunl0, 1472 for flannel0 on 1500."""
    return underlay_mtu - OVERHEAD[kind]


class Tunnel:
    """One TUN device and its carrier socket inside a node's namespace; see the module text."""

    def __init__(self, netns: str, kind: Kind, name: str, local_ip: str, mtu: int):
        self.netns, self.kind, self.name, self.local_ip, self.mtu = netns, kind, name, local_ip, mtu
        self._local = socket.inet_aton(local_ip)
        self._tun = -1
        self._sock: socket.socket | None = None
        self._routes: list[tuple[int, int, tuple[str, bytes]]] = []
        self._cache: dict[bytes, tuple[str, bytes] | None] = {}
        self._peer_ips: frozenset[str] = frozenset()
        self._peer_raw: frozenset[bytes] = frozenset()
        self._threads: list[threading.Thread] = []
        self._wake: tuple[int, int] | None = None
        self._tx_buf = bytearray(_BUF)
        self._rx_buf = bytearray(_BUF)
        # counters, updated once per batch: packets each way and packets dropped, by reason
        self.stats = {
            "tx": 0,
            "rx": 0,
            "no_route": 0,
            "unknown_peer": 0,
            "malformed": 0,
            "send_error": 0,
        }
        self.error: OSError | None = None  # why a forwarding thread stopped, if it did

    # -- life cycle ----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        netns: str,
        kind: Kind,
        name: str,
        local_ip: str,
        mtu: int,
        peers: dict[str, str],
        address: str | None = None,
    ) -> Tunnel:
        """Create the TUN `name` in `netns`, set its MTU, bring it up, add `address` (CIDR, e.g.
        the tunnel IP "192.168.1.64/32" or flannel's "10.244.1.0/16") if given, and open the
        carrier socket bound to `local_ip`. Nothing is forwarded until `start()` or
        `handle_ready()`. On failure everything made so far is closed again."""
        if kind not in OVERHEAD:
            raise ValueError(f"tunnel kind must be 'ipip' or 'udp', not {kind!r}")
        tunnel = cls(netns, kind, name, local_ip, mtu)
        tunnel.update_peers(peers)  # validate before the first kernel change
        try:
            tunnel._create(address)
        except BaseException:
            tunnel.close()
            raise
        return tunnel

    def _create(self, address: str | None) -> None:
        with nsmod.entered(self.netns):
            self._tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            ifr = struct.pack("16sH22x", self.name.encode(), IFF_TUN | IFF_NO_PI)
            try:
                fcntl.ioctl(self._tun, TUNSETIFF, ifr)
            except OSError as exc:
                raise KernelError(
                    exc.errno,
                    f"create TUN {self.name} (a device of that name may already exist)",
                    self.netns,
                ) from None
            # A TUN (ARPHRD_NONE) gets an IPv6 link-local address and sends MLD and router
            # solicitations; the kernel's tunl0 has neither. Turn IPv6 off before it comes up.
            with contextlib.suppress(FileNotFoundError):  # IPv6 disabled on this host
                sysctl.set_in(None, {f"net.ipv6.conf.{self.name}.disable_ipv6": "1"})
            if self.kind == "ipip":
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPIP)
            else:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock = self._sock
        with ctl:
            name = self.name.encode()
            try:
                fcntl.ioctl(ctl, SIOCSIFMTU, struct.pack("16si20x", name, self.mtu))
                flags = struct.unpack_from(
                    "16sH", fcntl.ioctl(ctl, SIOCGIFFLAGS, struct.pack("16sH22x", name, 0))
                )[1]
                fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | IFF_UP))
            except OSError as exc:
                raise KernelError(
                    exc.errno, f"set {self.name} mtu {self.mtu} up", self.netns
                ) from None
        if address:
            iface = ipaddress.ip_interface(address)
            with Rtnl(self.netns) as rtnl:
                link = rtnl.link(self.name)
                if link is None:
                    raise KernelError(errnos.ENODEV, f"find {self.name}", self.netns)
                rtnl.address(link["index"], str(iface.ip), iface.network.prefixlen, self.name)
                rtnl.commit()
        for opt_force, opt in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
            try:  # *BUFFORCE (root) passes net.core.[rw]mem_max; the plain option is capped
                sock.setsockopt(socket.SOL_SOCKET, opt_force, _SOCKBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        try:
            if self.kind == "ipip":
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
                sock.bind((self.local_ip, 0))  # receive only protocol 4 addressed to this node
            else:
                sock.bind((self.local_ip, FLANNEL_UDP_PORT))
        except OSError as exc:
            raise KernelError(
                exc.errno, f"bind {self.kind} socket to {self.local_ip}", self.netns
            ) from None

    def start(self) -> None:
        """Forward in two daemon threads (TUN -> network, network -> TUN) until `close()`."""
        if self._threads:
            return
        self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        assert self._sock is not None
        for fd, what in ((self._tun, "tx"), (self._sock.fileno(), "rx")):
            thread = threading.Thread(
                target=self._serve, args=(fd,), daemon=True, name=f"{self.name}-{what}@{self.netns}"
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self, fd: int) -> None:
        assert self._wake is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        wake = self._wake[0]
        move = self._tun_to_net if fd == self._tun else self._net_to_tun
        try:
            while True:
                events = poller.poll()
                if any(ready == wake for ready, _ in events):
                    return
                while move(_THREAD_BATCH) == _THREAD_BATCH:
                    pass
        except OSError as exc:  # the device or namespace went away under us (EBADFD, EIO)
            self.error = exc

    def close(self) -> None:
        """Stop the threads, close the socket and the TUN fd, which removes the device.
        Safe to call twice and after a failed `open()`."""
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
            for thread in self._threads:
                thread.join(timeout=5)
            for fd in self._wake:
                os.close(fd)
            self._wake, self._threads = None, []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tun >= 0:
            os.close(self._tun)
            self._tun = -1

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- peers ---------------------------------------------------------------------------------

    def update_peers(self, peers: dict[str, str]) -> None:
        """Replace the peers table {CIDR: peer node IP}; takes effect from the next batch.
        Safe to call from another thread: every structure is replaced, never mutated."""
        routes = []
        for cidr, node_ip in peers.items():
            net = ipaddress.IPv4Network(cidr)
            peer = str(ipaddress.IPv4Address(node_ip))
            routes.append(
                (int(net.netmask), int(net.network_address), (peer, socket.inet_aton(peer)))
            )
        routes.sort(key=lambda r: r[0], reverse=True)  # longest prefix first
        self._routes = routes
        self._peer_ips = frozenset(r[2][0] for r in routes)
        self._peer_raw = frozenset(r[2][1] for r in routes)
        self._cache = {}

    def _lookup(self, dst: bytes) -> tuple[str, bytes] | None:
        """Longest-prefix match of an inner destination; remembered per destination."""
        value = int.from_bytes(dst, "big")
        found = next((peer for mask, net, peer in self._routes if value & mask == net), None)
        cache = self._cache
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[dst] = found
        return found

    # -- forwarding ----------------------------------------------------------------------------

    def fds(self) -> tuple[int, int]:
        """(TUN fd, socket fd), to register for reading in a selector; see handle_ready()."""
        assert self._sock is not None
        return self._tun, self._sock.fileno()

    def handle_ready(self, fd: int, limit: int = BATCH) -> int:
        """Move up to `limit` packets from the ready fd; returns how many were read. OSError
        means the device is gone (its namespace was deleted): close() the tunnel."""
        return self._tun_to_net(limit) if fd == self._tun else self._net_to_tun(limit)

    def _tun_to_net(self, limit: int) -> int:
        """TUN -> peer. ipip: the packet is read 20 bytes into the buffer and the outer header
        written in front of it, so one sendto() carries both with no copy."""
        buf = self._tx_buf
        view = memoryview(buf)
        ipip = self.kind == "ipip"
        start = _OUTER.size if ipip else 0
        into = [view[start:]]
        tun, sock, local = self._tun, self._sock, self._local
        cache, lookup, pack = self._cache, self._lookup, _OUTER.pack_into
        port = 0 if ipip else FLANNEL_UDP_PORT
        count = no_route = malformed = errors = 0
        while count < limit:
            try:
                n = os.readv(tun, into)
            except BlockingIOError:
                break
            count += 1
            if n < 20 or buf[start] >> 4 != 4:
                malformed += 1  # not IPv4 (a TUN can carry IPv6): neither carrier takes it
                continue
            dst = bytes(view[start + 16 : start + 20])
            peer = cache[dst] if dst in cache else lookup(dst)
            if peer is None:
                no_route += 1
                continue
            if ipip:  # tos: inner ECN bits; frag: inner DF; ttl inherited; proto 4
                pack(
                    buf,
                    0,
                    0x45,
                    buf[21] & 3,
                    0,
                    0,
                    (buf[26] & 0x40) << 8,
                    buf[28],
                    IPPROTO_IPIP,
                    0,
                    local,
                    peer[1],
                )
            try:
                sock.sendto(view[: start + n], (peer[0], port))
            except OSError:
                errors += 1  # e.g. EMSGSIZE or ENETUNREACH: a kernel device would drop it too
        stats = self.stats
        stats["tx"] += count - no_route - malformed - errors
        stats["no_route"] += no_route
        stats["malformed"] += malformed
        stats["send_error"] += errors
        return count

    def _net_to_tun(self, limit: int) -> int:
        """Peer -> TUN, for packets from known peer node IPs only."""
        buf = self._rx_buf
        view = memoryview(buf)
        tun, sock = self._tun, self._sock
        assert sock is not None
        dontwait = socket.MSG_DONTWAIT
        count = unknown = malformed = 0
        if self.kind == "ipip":
            peers = self._peer_raw
            recv = sock.recv_into
            while count < limit:
                try:
                    n = recv(buf, _BUF, dontwait)
                except BlockingIOError:
                    break
                count += 1
                if bytes(view[12:16]) not in peers:
                    unknown += 1
                    continue
                head = (buf[0] & 15) << 2  # the kernel hands raw sockets the outer header
                if n < head + 20 or buf[head] >> 4 != 4:
                    malformed += 1
                    continue
                try:
                    os.write(tun, view[head:n])
                except OSError:
                    malformed += 1  # the TUN refused it (device going down): a drop
        else:
            names = self._peer_ips
            recvfrom = sock.recvfrom_into
            while count < limit:
                try:
                    n, (src, _) = recvfrom(buf, _BUF, dontwait)
                except BlockingIOError:
                    break
                count += 1
                if src not in names:
                    unknown += 1
                    continue
                if n < 20 or buf[0] >> 4 != 4:
                    malformed += 1
                    continue
                try:
                    os.write(tun, view[:n])
                except OSError:
                    malformed += 1
        stats = self.stats
        stats["rx"] += count - unknown - malformed
        stats["unknown_peer"] += unknown
        stats["malformed"] += malformed
        return count
