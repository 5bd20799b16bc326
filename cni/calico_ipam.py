"""Calico's IPAM, kept in etcd under Calico's own keys and values (libcalico-go's etcdv3 backend).

An IP pool is cut into blocks (a /26 by default) with affinity to nodes. A node allocates from
its own blocks and claims the next free block of the pool when they are full; every address of
a block is usable (there is no gateway: pods route via 169.254.1.1).

  /calico/ipam/v2/assignment/ipv4/block/<net>-<len>   AllocationBlock: cidr, affinity
      "host:<node>", allocations (per ordinal: an index into attributes, or null), unallocated
      (the free ordinals, in the order they are handed out), attributes ({handle_id,
      secondary}), sequenceNumber, sequenceNumberForAllocation, deleted
  /calico/ipam/v2/host/<node>/ipv4/block/<net>-<len>  the affinity, {"state":"confirmed",...}
  /calico/ipam/v2/handle/<id>                         {"block":{"<cidr>":<addresses>},...}
  /calico/ipam/v2/config                              written once, by the first claim

Claiming a block is one transaction that succeeds only while the block's key does not exist,
and writes the block and its affinity: two nodes claiming at once get different blocks. A block
changes by compare-and-swap on its mod_revision.

Speed (10,000 pods: 100 nodes building at once, one session each): a session reads a node's
blocks once, when it first touches the node, works on them in memory, and writes every changed
block and handle when it ends, in one transaction per 128 keys. On a conflict it reads those
keys again and replays its own changes on them; an address it handed out is never changed
afterwards, so a replay that finds one taken by another writer fails with IpamError.
Changes for one node are serialised across processes by a flock per node, as Calico's CNI
plugin holds /var/run/calico/ipam.lock on its host: two pods of one node added at once (by
parallel CNI ADDs, or by netsim and the plugin) never pick the same free ordinal.

Calico records no interface name: a handle is one attachment (its CNI plugin's handle is
"<network>.<containerID>"), so release() frees every address the handle holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from cni.ipam import IpamError
from netsim.errors import NetsimError
from netsim.store.client import (
    MAX_TXN_OPS,
    KeyValue,
    Store,
    absent,
    delete_op,
    put_op,
    range_op,
    ranged,
    unchanged,
)

PREFIX = "/calico/ipam/v2"
BLOCKS = f"{PREFIX}/assignment/ipv4/block/"
HOSTS = f"{PREFIX}/host/"
HANDLES = f"{PREFIX}/handle/"
CONFIG = f"{PREFIX}/config"
IPAM_CONFIG = {"strict_affinity": False, "auto_allocate_blocks": True, "maxBlocksPerHost": 0}
AFFINITY = {"state": "confirmed", "deleted": False}
LOCK_DIR = "/run/calico"  # one flock per node, where Calico keeps its ipam.lock (/var/run/calico)
RETRIES = 20  # compare-and-swap attempts before a write gives up


def block_name(block: str) -> str:
    """10.244.1.0/26 -> 10.244.1.0-26, as Calico spells a block in its keys."""
    return block.replace("/", "-")


def block_key(block: str) -> str:
    return BLOCKS + block_name(block)


def affinity_key(node: str, block: str) -> str:
    return f"{HOSTS}{node}/ipv4/block/{block_name(block)}"


def pod_handle(network: str, container_id: str) -> str:
    """Calico's handle for a pod's addresses: "<network>.<containerID>"."""
    return f"{network}.{container_id}"


def handle_key(handle: str) -> str:
    return HANDLES + handle


def _dump(value) -> str:
    return json.dumps(value, separators=(",", ":"))  # as Go's json.Marshal writes it


def _order(block: str) -> tuple[int, int]:
    net = IPv4Network(block)
    return int(net.network_address), net.prefixlen


def new_block(cidr: IPv4Network, node: str) -> dict:
    """An AllocationBlock with every ordinal free, affine to the node."""
    size = cidr.num_addresses
    return {
        "cidr": str(cidr),
        "affinity": f"host:{node}",
        "affinityClaimTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "allocations": [None] * size,
        "unallocated": list(range(size)),
        "attributes": [],
        "sequenceNumber": 0,
        "sequenceNumberForAllocation": {},
        "deleted": False,
    }


def _assign(data: dict, ordinal: int, attribute: dict) -> None:
    attributes = data["attributes"]
    try:
        index = attributes.index(attribute)  # Calico shares one entry between equal owners
    except ValueError:
        index = len(attributes)
        attributes.append(attribute)
    data["allocations"][ordinal] = index
    data["unallocated"].remove(ordinal)
    if data.get("sequenceNumberForAllocation") is None:
        data["sequenceNumberForAllocation"] = {}
    data["sequenceNumberForAllocation"][str(ordinal)] = data.get("sequenceNumber", 0)


def _holder(data: dict, ordinal: int) -> str | None:
    index = data["allocations"][ordinal]
    return None if index is None else data["attributes"][index].get("handle_id") or ""


def _free(data: dict, ordinal: int) -> None:
    """Free the ordinal (it goes to the end of unallocated) and drop unused attributes."""
    data["allocations"][ordinal] = None
    data["unallocated"].append(ordinal)
    (data.get("sequenceNumberForAllocation") or {}).pop(str(ordinal), None)
    used = sorted({i for i in data["allocations"] if i is not None})
    if len(used) != len(data["attributes"]):
        renumber = {old: new for new, old in enumerate(used)}
        data["attributes"] = [data["attributes"][i] for i in used]
        data["allocations"] = [None if i is None else renumber[i] for i in data["allocations"]]


@dataclass
class _Block:
    """A block as this session read it (kv), its value with the session's changes (data), and
    those changes, to replay on a newer value when the compare-and-swap loses."""

    cidr: IPv4Network
    kv: KeyValue | None
    data: dict
    journal: list[tuple[str, int, object]] = field(default_factory=list)

    def ip(self, ordinal: int) -> str:
        return str(self.cidr.network_address + ordinal)

    def ordinal(self, ip: str) -> int | None:
        address = IPv4Address(ip)
        return int(address) - int(self.cidr.network_address) if address in self.cidr else None

    def assign(self, ordinal: int, attribute: dict) -> None:
        _assign(self.data, ordinal, attribute)
        self.journal.append(("assign", ordinal, attribute))

    def free(self, ordinal: int) -> str | None:
        """Free the ordinal; the handle that held it."""
        holder = _holder(self.data, ordinal)
        if holder is not None:
            _free(self.data, ordinal)
            self.journal.append(("free", ordinal, holder))
        return holder

    def value(self, kv: KeyValue | None) -> str:
        """The block to write over `kv`: the session's, or its changes replayed on a newer one."""
        if not (kv and self.kv and kv.mod_revision == self.kv.mod_revision):
            if kv is None:
                raise IpamError(f"block {self.cidr} was deleted while this node was using it")
            data = kv.json()
            for change, ordinal, what in self.journal:
                holder = _holder(data, ordinal)
                if change == "assign" and holder is None:
                    _assign(data, ordinal, what)
                elif change == "assign" and holder != what["handle_id"]:
                    raise IpamError(
                        f"{self.ip(ordinal)} was given to {holder} by another writer while "
                        f"this one gave it to {what['handle_id']}: try again"
                    )
                elif change == "free" and holder == what:
                    _free(data, ordinal)
            self.data = data
        self.data["sequenceNumber"] = self.data.get("sequenceNumber", 0) + 1
        return _dump(self.data)


def _handle_value(deltas: dict[str, int], kv: KeyValue | None) -> str | None:
    """The handle with its per-block counts changed by deltas; None when it holds nothing."""
    counts = dict((kv.json().get("block") or {}) if kv else {})
    for block, delta in deltas.items():
        left = counts.get(block, 0) + delta
        if left > 0:
            counts[block] = left
        else:
            counts.pop(block, None)
    return _dump({"block": counts, "deleted": False}) if counts else None


@dataclass
class _Session:
    locks: dict[str, int] = field(default_factory=dict)  # node -> its flock-ed fd
    nodes: dict[str, list[str]] = field(default_factory=dict)  # node -> its blocks, pool order
    blocks: dict[str, _Block] = field(default_factory=dict)
    handles: dict[str, dict[str, int]] = field(default_factory=dict)  # handle -> block -> delta
    handle_kvs: dict[str, KeyValue | None] = field(default_factory=dict)
    affinity: dict[str, str] | None = None  # every block -> its node, read once
    taken: set[str] | None = None  # every block that exists, read at the first claim


class BlockStore:
    """The cluster's Calico IPAM in its etcd."""

    def __init__(self, store: Store, pool: str, block_size: int, lock_dir: str = LOCK_DIR):
        self.store = store
        self.pool = IPv4Network(pool)
        self.block_size = block_size
        self.lock_dir = lock_dir
        self._session: _Session | None = None
        self._configured = False

    # -- sessions ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[BlockStore]:
        """Read each node's blocks once, at its first use; write the changes when it ends (also
        when the block raised: what it released must not stay held, and what it allocated its
        caller undoes)."""
        if self._session is not None:  # inside one already: that one writes
            yield self
            return
        self._session = _Session()
        try:
            try:
                yield self
            except BaseException:
                with contextlib.suppress(NetsimError):
                    self._flush()
                raise
            self._flush()
        finally:
            for fd in self._session.locks.values():
                os.close(fd)
            self._session = None

    def _open(self) -> _Session:
        assert self._session is not None, "this needs an open session()"
        return self._session

    def _lock(self, node: str) -> int:
        os.makedirs(self.lock_dir, exist_ok=True)
        store = hashlib.sha1(" ".join(self.store.endpoints).encode()).hexdigest()[:12]
        path = os.path.join(self.lock_dir, f"{store}-{node}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _node(self, node: str) -> list[str]:
        """The node's blocks, read (with the node's lock taken) at the session's first use."""
        s = self._open()
        if node not in s.nodes:
            s.locks[node] = self._lock(node)
            prefix = f"{HOSTS}{node}/ipv4/block/"
            names = self.store.range(prefix, prefix=True, keys_only=True)
            blocks = sorted((kv.key[len(prefix) :].replace("-", "/") for kv in names), key=_order)
            found = self.store.get_many([block_key(b) for b in blocks])
            for block in blocks:
                kv = found[block_key(block)]
                if kv is not None:
                    s.blocks[block] = _Block(IPv4Network(block), kv, kv.json())
            s.nodes[node] = [b for b in blocks if b in s.blocks]
        return s.nodes[node]

    # -- blocks --------------------------------------------------------------------------------

    def affinity(self) -> dict[str, str]:
        """Every claimed block -> the node it is affine to, in pool order."""
        s = self._session
        if s is not None and s.affinity is not None:
            return dict(s.affinity)
        found = {}
        for kv in self.store.range(HOSTS, prefix=True, keys_only=True):
            parts = kv.key[len(HOSTS) :].split("/")  # <node>/ipv4/block/<net>-<len>
            if len(parts) == 4 and parts[1:3] == ["ipv4", "block"]:
                found[parts[3].replace("-", "/")] = parts[0]
        found = dict(sorted(found.items(), key=lambda item: _order(item[0])))
        if s is not None:
            s.affinity = found
        return dict(found)

    def blocks_of(self, node: str) -> list[str]:
        if self._session is not None:
            return list(self._node(node))
        return [b for b, n in self.affinity().items() if n == node]

    def claim(self, node: str) -> str:
        """The pool's first free block, now affine to the node: one transaction that puts the
        block and its affinity only while the block does not exist; the next block if it does."""
        with self._auto():
            s = self._open()
            self._node(node)
            if not self._configured:
                self.store.create(CONFIG, _dump(IPAM_CONFIG))
                self._configured = True
            if s.taken is None:
                existing = self.store.range(BLOCKS, prefix=True, keys_only=True)
                s.taken = {kv.key[len(BLOCKS) :].replace("-", "/") for kv in existing}
            step = 1 << (32 - self.block_size)
            base = int(self.pool.network_address)
            for start in range(base, base + self.pool.num_addresses, step):
                block = f"{IPv4Address(start)}/{self.block_size}"
                if block in s.taken:
                    continue
                s.taken.add(block)
                data = new_block(IPv4Network(block), node)
                text = _dump(data)
                claimed = self.store.txn(
                    [absent(block_key(block))],
                    [
                        put_op(block_key(block), text),
                        put_op(affinity_key(node, block), _dump(AFFINITY)),
                    ],
                )
                if not claimed["succeeded"]:
                    continue  # another node took it first
                revision = int(claimed["header"]["revision"])
                kv = KeyValue(block_key(block), text.encode(), revision, revision)
                s.blocks[block] = _Block(IPv4Network(block), kv, data)
                s.nodes[node] = sorted(s.nodes[node] + [block], key=_order)
                if s.affinity is not None:
                    s.affinity[block] = node
                    s.affinity = dict(sorted(s.affinity.items(), key=lambda i: _order(i[0])))
                return block
        raise IpamError(f"IP pool {self.pool} has no free /{self.block_size} block left")

    # -- addresses -----------------------------------------------------------------------------

    def allocate(
        self,
        node: str,
        handle: str,
        ifname: str,
        requested: str | None = None,
        attrs: dict[str, str] | None = None,
    ) -> tuple[str, str]:
        """(ip, block): the first free address of the node's blocks in order, claiming a new
        block when all are full. `attrs` are Calico's secondary attributes (namespace, pod,
        timestamp; type for a tunnel address); the node is always among them."""
        with self._auto():
            s = self._open()
            blocks = [s.blocks[b] for b in self._node(node)]
            secondary = dict(sorted({**(attrs or {}), "node": node}.items()))
            attribute = {"handle_id": handle, "secondary": secondary}
            if requested:
                try:
                    owner = [b for b in blocks if b.ordinal(requested) is not None]
                except ValueError:
                    raise IpamError(f"requested IP {requested!r} is not an IPv4 address") from None
                if not owner:
                    raise IpamError(
                        f"requested IP {requested} is not in a block of node {node} "
                        f"({', '.join(str(b.cidr) for b in blocks) or 'none yet'})"
                    )
                block, ordinal = owner[0], owner[0].ordinal(requested)
                if _holder(block.data, ordinal) is not None:
                    raise IpamError(f"requested IP {requested} is already allocated")
            else:
                block = next((b for b in blocks if b.data["unallocated"]), None)
                if block is None:
                    block = s.blocks[self.claim(node)]
                ordinal = block.data["unallocated"][0]
            block.assign(ordinal, attribute)
            self._count(handle, str(block.cidr), 1)
            return block.ip(ordinal), str(block.cidr)

    def release(self, node: str, handle: str, ifname: str) -> list[str]:
        """Free every address the handle holds on the node (Calico keeps no interface name: a
        handle is one attachment); nothing held is not an error."""
        freed = []
        with self._auto():
            s = self._open()
            for name in self._node(node):
                block = s.blocks[name]
                held = [
                    o
                    for o in range(len(block.data["allocations"]))
                    if _holder(block.data, o) == handle
                ]
                for ordinal in held:
                    block.free(ordinal)
                    self._count(handle, name, -1)
                    freed.append(block.ip(ordinal))
        return freed

    def forget_node(self, node: str) -> list[str]:
        """A node that left the cluster: its blocks, their affinities and the handles still
        holding addresses in them (its tunnel address) deleted, as Calico's IPAM garbage
        collection does for a deleted node; the blocks."""
        prefix = f"{HOSTS}{node}/"
        affinities = [kv.key for kv in self.store.range(prefix, prefix=True, keys_only=True)]
        blocks = [k.rsplit("/", 1)[1].replace("-", "/") for k in affinities if "/block/" in k]
        handles = set()
        for kv in self.store.get_many([block_key(b) for b in blocks]).values():
            if kv is not None:
                handles |= {a["handle_id"] for a in kv.json().get("attributes", []) if a}
        self.store.delete_all(
            affinities + [block_key(b) for b in blocks] + [handle_key(h) for h in sorted(handles)]
        )
        return blocks

    def allocations(self, node: str) -> list[tuple[str, str]]:
        """Every address of the node's blocks in use, as (ip, handle)."""
        found = []
        with self._auto():
            s = self._open()
            for name in self._node(node):
                block = s.blocks[name]
                for ordinal in range(len(block.data["allocations"])):
                    holder = _holder(block.data, ordinal)
                    if holder is not None:
                        found.append((block.ip(ordinal), holder))
        return found

    def release_ip(self, node: str, ip: str) -> None:
        with self._auto():
            s = self._open()
            for name in self._node(node):
                block = s.blocks[name]
                ordinal = block.ordinal(ip)
                if ordinal is not None:
                    holder = block.free(ordinal)
                    if holder is not None:
                        self._count(holder, name, -1)

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _auto(self) -> Iterator[None]:
        """The open session, or one of its own for this call."""
        if self._session is not None:
            yield
            return
        with self.session():
            yield

    def _count(self, handle: str, block: str, delta: int) -> None:
        counts = self._open().handles.setdefault(handle, {})
        counts[block] = counts.get(block, 0) + delta

    def _flush(self) -> None:
        """Write every changed block, then every changed handle."""
        s = self._open()
        writes: dict[str, Callable[[KeyValue | None], str | None]] = {}
        known: dict[str, KeyValue | None] = {}
        for name, block in s.blocks.items():
            if block.journal:
                writes[block_key(name)], known[block_key(name)] = block.value, block.kv
        for handle, deltas in s.handles.items():
            deltas = {b: n for b, n in deltas.items() if n}
            if deltas:
                key = handle_key(handle)
                writes[key] = functools.partial(_handle_value, deltas)
                known[key] = s.handle_kvs.get(key)  # unknown: taken to be absent until refused
        s.handles = {}
        keys = list(writes)
        for start in range(0, len(keys), MAX_TXN_OPS):
            self._swap(keys[start : start + MAX_TXN_OPS], writes, known)

    def _swap(
        self,
        keys: list[str],
        writes: dict[str, Callable[[KeyValue | None], str | None]],
        current: dict[str, KeyValue | None],
    ) -> None:
        """One compare-and-swap transaction for the keys; when it loses, the keys as they are
        come back in the same answer, and it is tried again on them."""
        for _ in range(RETRIES):
            values = {k: writes[k](current[k]) for k in keys}
            compare = [unchanged(current[k]) if current[k] else absent(k) for k in keys]
            ops = [put_op(k, v) if v is not None else delete_op(k) for k, v in values.items()]
            result = self.store.txn(compare, ops, [range_op(k) for k in keys])
            if result["succeeded"]:
                self._written(values, current, int(result["header"]["revision"]))
                return
            fresh = {kv.key: kv for kv in ranged(result)}
            current = {k: fresh.get(k) for k in keys}
        raise IpamError(
            f"Calico IPAM: {len(keys)} keys under {PREFIX} kept changing under this node's "
            f"writes ({RETRIES} tries): try again"
        )

    def _written(self, values: dict, before: dict, revision: int) -> None:
        s = self._open()
        for key, value in values.items():
            old = before[key]
            kv = (
                KeyValue(key, value.encode(), revision, old.create_revision if old else revision)
                if value is not None
                else None
            )
            if key.startswith(BLOCKS):
                block = s.blocks[key[len(BLOCKS) :].replace("-", "/")]
                block.kv, block.journal = kv, []
            else:
                s.handle_kvs[key] = kv
