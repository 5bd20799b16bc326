"""nf_tables over netlink, in-process: one atomic batch of chains, rules, sets and elements.

Why not `nft -f` for everything: before it sends anything, nft 1.0.x reads every chain and set
of the table into its cache, which for kube-proxy's thousands of per-endpoint chains costs tens
of milliseconds on every call, however small the change. The kernel needs none of it: names in
a batch are resolved by the kernel, so a batch built here touches only what it names. The
expressions are the ones nft itself emits for the same rule text (`nft --debug=netlink`), so
`nft list ruleset` prints these rules exactly as if nft had loaded them.

Only what kube-proxy's per-service objects use is here; the table's fixed part, with its hooks,
is still loaded by `nft -f`.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NFPROTO_IPV4 = 2

# enum nf_tables_msg_types
NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM = 9, 11, 12, 14

# verdicts (signed, sent big-endian)
DROP, ACCEPT, JUMP, GOTO, RETURN = 0, 1, -3, -4, -5
DATA_VERDICT = 0xFFFFFF00  # NFT_DATA_VERDICT: a map whose values are verdicts

# set flags and key types
SET_MAP, SET_TIMEOUT, SET_EVAL = 0x8, 0x10, 0x20
TYPE_INTEGER, TYPE_IPADDR, TYPE_INET_PROTO, TYPE_INET_SERVICE, TYPE_IFNAME = 4, 7, 12, 13, 41
IFNAMSIZ = 16


def concat_type(*types: int) -> int:
    """The key type nft gives a concatenation (`ipv4_addr . inet_proto . inet_service`)."""
    value = 0
    for kind in types:
        value = (value << 6) | kind
    return value


# payload bases, meta keys, comparison operators
NETWORK_HEADER, TRANSPORT_HEADER = 1, 2
META_MARK, META_IIFNAME, META_OIFNAME, META_L4PROTO, META_NFTRACE = 3, 6, 7, 16, 17
CT_STATE = 0
CMP_EQ, CMP_NEQ = 0, 1
NAT_DNAT = 1
NAT_RANGE_PROTO_SPECIFIED = 0x2
DYNSET_OP_UPDATE = 1
NG_INCREMENTAL = 0
REG_VERDICT, REG_1, REG_2 = 0, 1, 2
REG32_01, REG32_02 = 9, 10  # the 32-bit registers after reg 1's first word: concatenations


_HEADER = struct.Struct("=HH").pack  # compiled once: tens of thousands of attributes a table
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _HEADER(length, kind) + payload + _PAD[length & 3]


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | 0x8000, b"".join(attrs))  # NLA_F_NESTED


def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!I", value))


def _i32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!i", value))


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nested(1, _str(1, name), _nested(2, *attrs))  # NFTA_LIST_ELEM{NAME, DATA}


def _verdict(code: int, chain: str | None) -> bytes:
    if chain:
        return _last(_verdict_to, (code,), chain.encode() + b"\0")
    return _nested(2, _i32(1, code))  # NFTA_DATA_VERDICT{CODE}


def _verdict_to(code: int, name: bytes) -> bytes:
    return _nested(2, _i32(1, code), _attr(2, name))  # NFTA_DATA_VERDICT{CODE, CHAIN}


_HEADS: dict[tuple, bytes] = {}


def _last(build, args: tuple, data: bytes) -> bytes:
    """build(*args, data), where `data` is the last attribute at every level of nesting: what
    comes before it depends only on its length, so it is built once per length and the data
    appended (a table's ten thousand endpoint addresses and chain names cost a join each)."""
    key = (build, args, len(data))
    head = _HEADS.get(key)
    if head is None:
        whole = build(*args, bytes(len(data)))
        head = _HEADS[key] = whole[: len(whole) - len(data) - len(_PAD[len(data) & 3])]
    return head + data + _PAD[len(data) & 3]


# -- expressions (the bytecode nft emits for the same rule text) -------------------------------
# each is cached: a table of thousands of rules is made of a few dozen distinct expressions


@functools.lru_cache(maxsize=1 << 15)
def payload(base: int, offset: int, length: int, dreg: int = REG_1) -> bytes:
    return _expr("payload", _u32(1, dreg), _u32(2, base), _u32(3, offset), _u32(4, length))


def cmp(op: int, data: bytes, sreg: int = REG_1) -> bytes:
    return _last(_cmp, (op, sreg), data)


def _cmp(op: int, sreg: int, data: bytes) -> bytes:
    return _expr("cmp", _u32(1, sreg), _u32(2, op), _nested(3, _attr(1, data)))


@functools.lru_cache(maxsize=1 << 15)
def bitwise(mask: bytes, sreg: int = REG_1, dreg: int = REG_1, xor: bytes = b"") -> bytes:
    """reg = (reg & mask) ^ xor, as nft writes `& m`, `| v` (mask ~v, xor v) and `^ v`."""
    return _expr(
        "bitwise",
        _u32(1, sreg),
        _u32(2, dreg),
        _u32(3, len(mask)),
        _nested(4, _attr(1, mask)),
        _nested(5, _attr(1, xor or bytes(len(mask)))),
    )


@functools.lru_cache(maxsize=1 << 15)
def meta_set(key: int, sreg: int = REG_1) -> bytes:
    """`meta KEY set <reg>`, e.g. the packet's mark."""
    return _expr("meta", _u32(2, key), _u32(3, sreg))


@functools.lru_cache(maxsize=1 << 15)
def ct(key: int, dreg: int = REG_1) -> bytes:
    return _expr("ct", _u32(1, dreg), _u32(2, key))


def range_eq(first: bytes, last: bytes, sreg: int = REG_1) -> bytes:
    """`... first-last`: the register lies in the inclusive range."""
    return _expr(
        "range",
        _u32(1, sreg),
        _u32(2, CMP_EQ),
        _nested(3, _attr(1, first)),
        _nested(4, _attr(1, last)),
    )


def log(prefix: str) -> bytes:
    return _expr("log", _str(2, prefix))


@functools.lru_cache(maxsize=1 << 15)
def meta(key: int, dreg: int = REG_1) -> bytes:
    return _expr("meta", _u32(1, dreg), _u32(2, key))


def immediate(data: bytes, dreg: int) -> bytes:
    return _last(_immediate, (dreg,), data)


def _immediate(dreg: int, data: bytes) -> bytes:
    return _expr("immediate", _u32(1, dreg), _nested(2, _attr(1, data)))


def verdict(code: int, chain: str | None = None) -> bytes:
    if chain:
        return _last(_verdict_expr, (code,), chain.encode() + b"\0")
    return _expr("immediate", _u32(1, REG_VERDICT), _nested(2, _verdict(code, None)))


def _verdict_expr(code: int, name: bytes) -> bytes:
    return _expr("immediate", _u32(1, REG_VERDICT), _nested(2, _verdict_to(code, name)))


@functools.lru_cache(maxsize=1 << 15)
def lookup(set_name: str, sreg: int = REG_1, dreg: int | None = None) -> bytes:
    attrs = [_str(1, set_name), _u32(2, sreg)]
    if dreg is not None:
        attrs.append(_u32(3, dreg))
    return _expr("lookup", *attrs)


@functools.lru_cache(maxsize=1 << 15)
def dynset_update(set_name: str, sreg: int = REG_1) -> bytes:
    return _expr("dynset", _str(1, set_name), _u32(3, DYNSET_OP_UPDATE), _u32(4, sreg))


@functools.lru_cache(maxsize=1 << 15)
def dnat(addr_reg: int, proto_reg: int) -> bytes:
    return _expr(
        "nat",
        _u32(1, NAT_DNAT),
        _u32(2, NFPROTO_IPV4),
        _u32(3, addr_reg),
        _u32(5, proto_reg),
        _u32(7, NAT_RANGE_PROTO_SPECIFIED),
    )


FIB_RESULT_ADDRTYPE, FIB_F_SADDR = 3, 1
RTN_LOCAL = 2


def fib_saddr_type(dreg: int = REG_1) -> bytes:
    """`fib saddr type`: the route type of the packet's source address (local: this host)."""
    return _expr("fib", _u32(1, dreg), _u32(2, FIB_RESULT_ADDRTYPE), _u32(3, FIB_F_SADDR))


@functools.lru_cache(maxsize=1 << 15)
def numgen_inc(modulus: int, dreg: int = REG_1) -> bytes:
    return _expr("numgen", _u32(1, dreg), _u32(2, modulus), _u32(3, NG_INCREMENTAL), _u32(4, 0))


# -- the batch ---------------------------------------------------------------------------------


class Batch:
    """Messages for one nf_tables transaction in one table; `commit` sends them atomically."""

    def __init__(self, table: str, family: int = NFPROTO_IPV4):
        self.table = table
        self.family = family
        self._messages: list[tuple[int, int, bytes]] = []
        self._what: list[str] = []  # per message, for errors
        self._table_attr = _str(1, table)
        self._set_id = 0
        self._encoded: tuple[bytes, int] | None = None  # one batch may go to many nodes

    def __len__(self) -> int:
        return len(self._messages)

    def _add(self, msg_type: int, flags: int, body: bytes, what: str) -> None:
        self._encoded = None
        self._messages.append((msg_type, flags, body))
        self._what.append(what)

    def add_chain(self, name: str) -> None:
        self._add(NEWCHAIN, NLM_F_CREATE, self._table_attr + _str(3, name), f"add chain {name}")

    def flush_chain(self, name: str) -> None:
        self._add(DELRULE, 0, self._table_attr + _str(2, name), f"flush chain {name}")

    def delete_chain(self, name: str) -> None:
        self._add(DELCHAIN, 0, self._table_attr + _str(3, name), f"delete chain {name}")

    def add_rule(self, chain: str, exprs: bytes, text: str = "", comment: str = "") -> None:
        """A rule at the chain's end; `comment` is kept as nft keeps one (the rule's user
        data), so `nft list` and `nft monitor trace` print it."""
        body = self._table_attr + _str(2, chain) + _nested(4, exprs)
        if comment:
            note = comment.encode()[:127] + b"\0"
            body += _attr(7, bytes([0, len(note)]) + note)  # NFTA_RULE_USERDATA: TLV comment
        self._add(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body, f"add rule {chain} {text}".rstrip())

    def add_set(
        self,
        name: str,
        key_type: int,
        key_len: int,
        flags: int = 0,
        timeout_ms: int | None = None,
        verdict_map: bool = False,
        userdata: bytes = b"",
    ) -> None:
        self._set_id += 1
        attrs = [
            self._table_attr,
            _str(2, name),
            _u32(3, flags | (SET_MAP if verdict_map else 0)),
            _u32(4, key_type),
            _u32(5, key_len),
        ]
        if verdict_map:
            attrs += [_u32(6, DATA_VERDICT), _u32(7, 0)]
        attrs.append(_u32(10, self._set_id))
        if timeout_ms is not None:
            attrs.append(_attr(11, struct.pack("!Q", timeout_ms)))
        if userdata:
            attrs.append(_attr(13, userdata))
        self._add(NEWSET, NLM_F_CREATE, b"".join(attrs), f"add set {name}")

    def delete_set(self, name: str) -> None:
        self._add(DELSET, 0, self._table_attr + _str(2, name), f"delete set {name}")

    def add_elements(
        self, set_name: str, elements: list[tuple[bytes, tuple[int, str] | None]]
    ) -> None:
        """Elements as (key, verdict) pairs; verdict is (JUMP|GOTO, chain) for a verdict map,
        None for a plain set."""
        items = []
        for key, value in elements:
            attrs = [_nested(1, _attr(1, key))]
            if value is not None:
                attrs.append(_nested(2, _verdict(*value)))
            items.append(_nested(1, *attrs))
        self._elements(NEWSETELEM, NLM_F_CREATE, set_name, items, f"add element {set_name}")

    def delete_elements(self, set_name: str, keys: list[bytes]) -> None:
        items = [_nested(1, _nested(1, _attr(1, key))) for key in keys]
        self._elements(DELSETELEM, 0, set_name, items, f"delete element {set_name}")

    def _elements(
        self, msg_type: int, flags: int, set_name: str, items: list[bytes], what: str
    ) -> None:
        """As many messages as the elements need: a netlink attribute holds at most 64 KiB."""
        head = _str(1, self.table) + _str(2, set_name)
        chunk: list[bytes] = []
        size = 0
        for item in items + [b""]:
            if chunk and (not item or size + len(item) > 60000):
                self._add(msg_type, flags, head + _nested(3, *chunk), what)
                chunk, size = [], 0
            chunk.append(item)
            size += len(item)

    def _encode(self) -> tuple[bytes, int]:
        """The batch as one buffer, and the sequence number of its last real message."""
        parts = []
        seq = 1

        def message(msg_type: int, flags: int, family: int, res_id: int, body: bytes) -> None:
            nonlocal seq
            header = struct.pack(
                "=IHHII", 16 + 4 + len(body), msg_type, NLM_F_REQUEST | flags, seq, 0
            )
            parts.append(header + struct.pack("=BBH", family, 0, socket.htons(res_id)) + body)
            seq += 1

        message(NFNL_MSG_BATCH_BEGIN, 0, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")
        last = len(self._messages)
        for index, (msg_type, flags, body) in enumerate(self._messages, start=1):
            message(
                (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                flags | (NLM_F_ACK if index == last else 0),
                self.family,
                0,
                body,
            )
        message(NFNL_MSG_BATCH_END, 0, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")
        return b"".join(parts), last + 1

    def commit(self, netns: str | None) -> None:
        """Send the batch inside the namespace; the kernel applies all of it or none of it.
        Raises NetsimError naming the first command the kernel refused."""
        if not self._messages:
            return
        if self._encoded is None:
            self._encoded = self._encode()
        data, last_seq = self._encoded
        with nsmod.entered(netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, 32, len(data) + 65536)  # SO_SNDBUFFORCE
            sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 20)  # SO_RCVBUFFORCE
            sock.bind((0, 0))
            sock.settimeout(10)
            sock.send(data)
            errors = self._replies(sock, last_seq)
        finally:
            sock.close()
        if errors:
            seq, code = errors[0]
            what = self._what[seq - 2] if 2 <= seq < last_seq + 1 else "the batch"
            raise NetsimError(
                f"nf_tables in netns {netns} refused {what!r}: "
                f"{os.strerror(code)} ({errno.errorcode.get(code, code)}); "
                "nothing was changed"
            )

    @staticmethod
    def _replies(sock: socket.socket, last_seq: int) -> list[tuple[int, int]]:
        """(seq, errno) of every refused message, read until the last message's ack (the
        kernel acks it whether or not the batch was applied, after any errors)."""
        errors: list[tuple[int, int]] = []
        while True:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                if errors:
                    return errors
                raise NetsimError("nf_tables did not answer the batch within 10 s") from None
            except OSError as exc:  # ENOBUFS: more refusals than the socket holds
                if exc.errno != errno.ENOBUFS:
                    raise
                sock.settimeout(1)  # read what is left; the final ack may have been dropped
                continue
            offset = 0
            while offset + 16 <= len(data):
                length, msg_type, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    if code:
                        errors.append((seq, -code))
                    elif seq == last_seq:
                        return errors
                offset += (length + 3) & ~3
