"""IP allocation with the on-disk layout of the CNI host-local plugin.

<data_dir>/<network>/ holds one file per allocated IP, named by the IP, containing
"<containerID>\\r\\n<ifname>"; last_reserved_ip.0 holds the last IP handed out (allocation goes
round robin after it); `lock` is flock-ed for every change, so separate processes (a runtime
calling the plugin in parallel) never hand out the same address.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from ipaddress import IPv4Address as IPAddress
from ipaddress import IPv4Network

from netsim.errors import NetsimError


class IpamError(NetsimError):
    """The range is exhausted or a requested address cannot be had."""


class HostLocal:
    def __init__(
        self,
        data_dir: str,
        network: str,
        subnet: str,
        gateway: str | None = None,
        range_start: str | None = None,
        range_end: str | None = None,
        skip_gateway: bool = True,
    ):
        self.dir = os.path.join(data_dir, network)
        self.subnet = IPv4Network(subnet, strict=False)
        self.gateway = IPAddress(gateway) if gateway else self.subnet.network_address + 1
        self.skip_gateway = skip_gateway  # Calico's blocks have none: every address is a pod's
        self.start = IPAddress(range_start) if range_start else self.subnet.network_address + 1
        self.end = IPAddress(range_end) if range_end else self.subnet.broadcast_address - 1
        self._taken: set[IPAddress] | None = None
        self._last_ip: IPAddress | None = None  # last_reserved_ip.0 as this session knows it

    @contextlib.contextmanager
    def session(self) -> Iterator[HostLocal]:
        """Hold the store's lock across several allocations or releases."""
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._taken = {IPAddress(name) for name in os.listdir(self.dir) if _is_ip(name)}
            self._last_ip = recorded = self._last()
            try:
                yield self
            finally:
                # last_reserved_ip.0 is written once a session: only the last one counts
                if self._last_ip != recorded:
                    _overwrite(self._path("last_reserved_ip.0"), str(self._last_ip))
        finally:
            self._taken = self._last_ip = None
            os.close(fd)

    def _path(self, ip: IPAddress | str) -> str:
        return os.path.join(self.dir, str(ip))

    def _last(self) -> IPAddress | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(self._path("last_reserved_ip.0")) as fh:
                return IPAddress(fh.read().strip())
        return None

    def allocate(self, container_id: str, ifname: str, requested: str | None = None) -> str:
        assert self._taken is not None, "allocate() needs an open session()"
        if requested:
            ip = IPAddress(requested)
            if not self.start <= ip <= self.end or (self.skip_gateway and ip == self.gateway):
                raise IpamError(f"requested IP {ip} is outside the range {self.start}-{self.end}")
            if ip in self._taken:
                raise IpamError(f"requested IP {ip} is already allocated")
        else:
            ip = self._next()
        with open(self._path(ip), "x", newline="") as fh:
            fh.write(f"{container_id}\r\n{ifname}")
        self._taken.add(ip)
        self._last_ip = ip
        return str(ip)

    def _next(self) -> IPAddress:
        size = int(self.end) - int(self.start) + 1
        last = self._last_ip
        offset = (int(last) - int(self.start) + 1) if last and self.start <= last <= self.end else 0
        for step in range(size):
            ip = self.start + (offset + step) % size
            if (ip != self.gateway or not self.skip_gateway) and ip not in self._taken:
                return ip
        raise IpamError(f"no IP addresses available in range {self.start}-{self.end}")

    def allocations(self) -> list[tuple[str, str, str]]:
        """Every allocation as (ip, containerID, ifname)."""
        assert self._taken is not None, "allocations() needs an open session()"
        found = []
        for ip in sorted(self._taken):
            with contextlib.suppress(FileNotFoundError), open(self._path(ip), newline="") as fh:
                owner = fh.read().split("\r\n") + [""]
                found.append((str(ip), owner[0].strip(), owner[1].strip()))
        return found

    def release_ip(self, ip: str) -> None:
        assert self._taken is not None, "release_ip() needs an open session()"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(ip))
        self._taken.discard(IPAddress(ip))

    def release(self, container_id: str, ifname: str) -> list[str]:
        """Free every IP held by this attachment; nothing held is not an error."""
        assert self._taken is not None, "release() needs an open session()"
        freed = []
        for ip in list(self._taken):
            try:
                with open(self._path(ip), newline="") as fh:
                    owner = fh.read().split("\r\n")
            except FileNotFoundError:
                continue
            if owner[0] == container_id and (len(owner) < 2 or owner[1] == ifname):
                os.unlink(self._path(ip))
                self._taken.discard(ip)
                freed.append(str(ip))
        return freed


def _overwrite(path: str, text: str) -> None:
    """Replace a small file's content in place. Opening with O_TRUNC would make ext4 flush the
    file (its auto_da_alloc guard against truncate-then-write), about 1 ms every allocation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        data = text.encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _is_ip(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)
