"""An nftables table's changing part as data — chains of rules, named sets and verdict maps
with their elements — and the one nf_tables batch that turns one such table into another,
touching only what differs (netsim.kernel.nftnl sends it). Felix's policy table is made this
way; each rule carries its nft text, its bytecode and a comment.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from netsim.kernel import nftnl


@dataclass(frozen=True)
class Rule:
    """One rule: the text `nft list` prints, and (built when a netlink batch needs it) the
    bytecode nft emits for that text; a comment nft keeps with it."""

    text: str
    bytecode: Callable[[], bytes] = field(compare=False, repr=False)
    comment: str = ""

    @property
    def code(self) -> bytes:
        return self.bytecode()


@dataclass(frozen=True)
class SetType:
    """What a named set holds: its key type and length, whether it maps to verdicts, its
    flags and timeout, and the metadata nft keeps with it (how `nft list` prints it)."""

    key_type: int
    key_len: int
    verdict_map: bool = False
    flags: int = 0
    timeout_ms: int | None = None
    userdata: bytes = b""


IPV4 = SetType(nftnl.TYPE_IPADDR, 4)
IPV4_PROTO_PORT = SetType(
    nftnl.concat_type(nftnl.TYPE_IPADDR, nftnl.TYPE_INET_PROTO, nftnl.TYPE_INET_SERVICE), 12
)
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}


@dataclass
class Table:
    chains: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    sets: dict[str, SetType] = field(default_factory=dict)
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)  # key -> verdict


# -- expressions both tables use (the bytecode nft emits for the same text) -----------------


def addr_match(offset: int, cidr: str, op: int = nftnl.CMP_EQ) -> bytes:
    """`ip saddr|daddr [!=] CIDR` (offset 12 or 16): nft compares the prefix's whole bytes, or
    masks the address when the prefix is not byte-aligned."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.prefixlen % 8 == 0:
        prefix = net.network_address.packed[: net.prefixlen // 8]
        if not prefix:  # 0.0.0.0/0: every address
            return b""
        return nftnl.payload(nftnl.NETWORK_HEADER, offset, len(prefix)) + nftnl.cmp(op, prefix)
    return (
        nftnl.payload(nftnl.NETWORK_HEADER, offset, 4)
        + nftnl.bitwise(net.netmask.packed)
        + nftnl.cmp(op, net.network_address.packed)
    )


def l4proto(proto: str) -> bytes:
    return nftnl.meta(nftnl.META_L4PROTO) + nftnl.cmp(nftnl.CMP_EQ, bytes([PROTOCOLS[proto]]))


def key_bytes(text: str, kind: SetType) -> bytes:
    """An element's key as the kernel holds it: each part of a concatenation fills whole
    4-byte registers (an address; a protocol in host order; a port in network order)."""
    if kind.key_type == nftnl.TYPE_IFNAME:
        return text.encode().ljust(nftnl.IFNAMSIZ, b"\0")
    if kind.key_type == nftnl.TYPE_INTEGER:  # e.g. numgen's value: host order
        return struct.pack("=I", int(text))
    parts = []
    for part in text.split(" . "):
        if part in PROTOCOLS:
            parts.append(struct.pack("=I", PROTOCOLS[part]))
        elif "." in part:
            parts.append(socket.inet_aton(part))
        else:
            parts.append(struct.pack("!H", int(part)) + b"\0\0")
    return b"".join(parts)


def verdict_of(text: str) -> tuple[int, str | None]:
    """ "goto C", "jump C", "drop" or "accept" as (code, chain)."""
    word, _, chain = text.partition(" ")
    codes = {"goto": nftnl.GOTO, "jump": nftnl.JUMP, "drop": nftnl.DROP, "accept": nftnl.ACCEPT}
    return (codes[word], chain or None)


def difference(table: str, old: Table, new: Table) -> nftnl.Batch:
    """The batch that turns `old` into `new`. Order matters within the transaction: what
    refers (rules, map elements) goes before what it refers to is deleted, and what is
    referred to is made before what refers to it."""
    batch = nftnl.Batch(table)
    # a set whose type or timeout changed is made again, so the rules naming it go first
    retyped = [n for n, t in new.sets.items() if n in old.sets and old.sets[n] != t]
    naming = tuple(f"@{name} " for name in retyped)
    changed = [
        n
        for n, rules in new.chains.items()
        if old.chains.get(n) != rules
        or (naming and any(ref in r.text + " " for r in rules for ref in naming))
    ]
    removed = [n for n in old.chains if n not in new.chains]
    for name in changed + removed:
        if name in old.chains:
            batch.flush_chain(name)
    for name, before in old.elements.items():
        if name in new.sets and name not in retyped:
            after = new.elements.get(name, {})
            gone = [k for k, v in before.items() if k not in after or after[k] != v]
            if gone:
                batch.delete_elements(name, [key_bytes(k, old.sets[name]) for k in gone])
    for name in [n for n in old.sets if n not in new.sets] + retyped:
        batch.delete_set(name)
    for name in removed:
        batch.delete_chain(name)
    for name in changed:
        if name not in old.chains:
            batch.add_chain(name)
    for name, kind in new.sets.items():
        if name not in old.sets or name in retyped:
            batch.add_set(
                name,
                kind.key_type,
                kind.key_len,
                kind.flags,
                kind.timeout_ms,
                kind.verdict_map,
                kind.userdata,
            )
    for name, after in new.elements.items():
        fresh = name not in old.sets or name in retyped
        before = {} if fresh else old.elements.get(name, {})
        added = [(k, v) for k, v in after.items() if k not in before or before[k] != v]
        if added:
            kind = new.sets[name]
            batch.add_elements(
                name, [(key_bytes(k, kind), verdict_of(v) if v else None) for k, v in added]
            )
    for name in changed:
        for rule in new.chains[name]:
            batch.add_rule(name, rule.code, rule.text, rule.comment)
    return batch
