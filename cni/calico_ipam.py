"""Calico's IPAM: an IP pool cut into blocks (a /26 by default) with affinity to nodes.

A node allocates from its own blocks and claims the next free block of the pool when they are
full; every address of a block is usable (there is no gateway: pods route via 169.254.1.1).
The store is shared by the cluster's nodes, as Calico's datastore is:
<dir>/blocks/<block with - for />  holds the name of the node the block is affine to, and each
block's addresses live in <dir>/<block>/ in host-local's layout (one file per IP holding
"<handle>\\r\\n<ifname>"). One flock-ed <dir>/lock serialises every change across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
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

    @contextlib.contextmanager
    def session(self) -> Iterator[BlockStore]:
        os.makedirs(os.path.join(self.dir, "blocks"), exist_ok=True)
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._locked = True
            yield self
        finally:
            self._locked = False
            os.close(fd)

    def affinity(self) -> dict[str, str]:
        """Every claimed block -> the node it is affine to, in pool order."""
        found = {}
        for name in os.listdir(os.path.join(self.dir, "blocks")):
            with open(os.path.join(self.dir, "blocks", name)) as fh:
                found[name.replace("-", "/")] = fh.read().strip()
        return dict(sorted(found.items(), key=lambda kv: IPv4Network(kv[0])))

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
                return str(block)
        raise IpamError(f"IP pool {self.pool} has no free /{self.block_size} block left")

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
            store = self._block(block)
            with store.session():
                try:
                    return store.allocate(handle, ifname, requested), block
                except IpamError:
                    if requested:
                        raise
        block = self.claim(node)
        store = self._block(block)
        with store.session():
            return store.allocate(handle, ifname), block

    def release(self, node: str, handle: str, ifname: str) -> list[str]:
        assert self._locked, "release() needs an open session()"
        freed = []
        for block in self.blocks_of(node):
            store = self._block(block)
            with store.session():
                freed += store.release(handle, ifname)
        return freed

    def allocations(self, node: str) -> list[tuple[str, str, str]]:
        found = []
        for block in self.blocks_of(node):
            store = self._block(block)
            with store.session():
                found += store.allocations()
        return found

    def release_ip(self, node: str, ip: str) -> None:
        for block in self.blocks_of(node):
            if IPv4Network(f"{ip}/32").subnet_of(IPv4Network(block)):
                store = self._block(block)
                with store.session():
                    store.release_ip(ip)
