"""Calico's IPAM: an IP pool cut into blocks (a /26 by default) with affinity to nodes.

A node allocates from its own blocks and claims the next free block of the pool when they are
full; every address of a block is usable (there is no gateway: pods route via 169.254.1.1).
The store is shared by the cluster's nodes, as Calico's datastore is:
<dir>/blocks/<block with - for />  holds the name of the node the block is affine to, and each
block's addresses live in <dir>/<block>/ in host-local's layout (one file per IP holding
"<handle>\\r\\n<ifname>"). One flock-ed <dir>/lock serialises every change across processes;
while a session holds it, the affinities and the open blocks are read once, not per address
(a 10,000-pod cluster has 200 blocks: reading them all for every pod was two million opens).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack
from ipaddress import IPv4Network

from cni.ipam import HostLocal, IpamError


def block_key(block: str) -> str:
    return block.replace("/", "-")


class BlockStore:
    def __init__(self, directory: str, pool: str, block_size: int):
        self.dir = directory
        self.pool = IPv4Network(pool)
        self.block_size = block_size
        self._locked = False
        self._affinity: dict[str, str] | None = None  # read once per session
        self._open: dict[str, HostLocal] = {}  # blocks whose session is open, by block
        self._blocks: ExitStack | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[BlockStore]:
        os.makedirs(os.path.join(self.dir, "blocks"), exist_ok=True)
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._locked = True
            with ExitStack() as blocks:
                self._blocks = blocks
                yield self
        finally:
            self._locked, self._affinity, self._open, self._blocks = False, None, {}, None
            os.close(fd)

    def affinity(self) -> dict[str, str]:
        """Every claimed block -> the node it is affine to, in pool order."""
        if self._affinity is not None:
            return dict(self._affinity)
        found = {}
        for name in os.listdir(os.path.join(self.dir, "blocks")):
            with open(os.path.join(self.dir, "blocks", name)) as fh:
                found[name.replace("-", "/")] = fh.read().strip()
        found = dict(sorted(found.items(), key=lambda kv: IPv4Network(kv[0])))
        if self._locked:
            self._affinity = found
        return dict(found)

    def blocks_of(self, node: str) -> list[str]:
        return [b for b, n in self.affinity().items() if n == node]

    def claim(self, node: str) -> str:
        """The pool's first free block, now affine to the node."""
        assert self._locked, "claim() needs an open session()"
        taken = set(self.affinity())
        for block in self.pool.subnets(new_prefix=self.block_size):
            if str(block) not in taken:
                with open(os.path.join(self.dir, "blocks", block_key(str(block))), "x") as fh:
                    fh.write(node)
                self._affinity = None  # read again, in pool order, when next asked
                return str(block)
        raise IpamError(f"IP pool {self.pool} has no free /{self.block_size} block left")

    def _session_of(self, block: str) -> HostLocal:
        """The block's host-local store with its session open until this session ends."""
        if block not in self._open:
            assert self._blocks is not None, "blocks are opened inside a session()"
            self._open[block] = self._blocks.enter_context(self._block(block).session())
        return self._open[block]

    @contextlib.contextmanager
    def _store(self, block: str) -> Iterator[HostLocal]:
        """The block's store: the session's own inside one, a session of its own outside."""
        if self._locked:
            yield self._session_of(block)
            return
        with self._block(block).session() as store:
            yield store

    def _block(self, block: str) -> HostLocal:
        net = IPv4Network(block)
        return HostLocal(
            self.dir,
            block_key(block),
            block,
            gateway=None,
            range_start=str(net.network_address),
            range_end=str(net.broadcast_address),
            skip_gateway=False,
        )

    def allocate(
        self, node: str, handle: str, ifname: str, requested: str | None = None
    ) -> tuple[str, str]:
        """(ip, block): from the node's blocks in order, claiming a new block when all are full."""
        assert self._locked, "allocate() needs an open session()"
        blocks = self.blocks_of(node)
        if requested:
            owner = [b for b in blocks if IPv4Network(f"{requested}/32").subnet_of(IPv4Network(b))]
            if not owner:
                raise IpamError(
                    f"requested IP {requested} is not in a block of node {node} "
                    f"({', '.join(blocks) or 'none yet'})"
                )
            blocks = owner
        for block in blocks:
            try:
                return self._session_of(block).allocate(handle, ifname, requested), block
            except IpamError:
                if requested:
                    raise
        block = self.claim(node)
        return self._session_of(block).allocate(handle, ifname), block

    def release(self, node: str, handle: str, ifname: str) -> list[str]:
        assert self._locked, "release() needs an open session()"
        freed = []
        for block in self.blocks_of(node):
            freed += self._session_of(block).release(handle, ifname)
        return freed

    def allocations(self, node: str) -> list[tuple[str, str, str]]:
        found = []
        for block in self.blocks_of(node):
            with self._store(block) as store:
                found += store.allocations()
        return found

    def release_ip(self, node: str, ip: str) -> None:
        for block in self.blocks_of(node):
            if IPv4Network(f"{ip}/32").subnet_of(IPv4Network(block)):
                with self._store(block) as store:
                    store.release_ip(ip)
