"""The rtnetlink requests netsim sends per pod and per peer, packed with struct.

pyroute2's message classes encode any message, at about half a millisecond each; a cluster of
10,000 pods sends over 100,000. These are the few shapes on that path (veth, link up/delete,
hairpin, alias, address, route, neighbour, FDB entry), packed directly: the kernel's own
structures (linux/rtnetlink.h, if_link.h, neighbour.h) and attributes, byte for byte what
pyroute2 encodes for the same request (tests/test_rtpack.py compares them).
"""

from __future__ import annotations

import socket
import struct

AF_INET, AF_BRIDGE = socket.AF_INET, socket.AF_BRIDGE
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 18, 20, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope,
#                                       type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_ATTR = struct.Struct("=HH")


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute: length, type, payload, padded to 4 bytes."""
    return _ATTR.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def text(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def ipv4(kind: int, address: str) -> bytes:
    return attr(kind, socket.inet_aton(address))


def mac(kind: int, address: str) -> bytes:
    return attr(kind, bytes.fromhex(address.replace(":", "")))


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HEADER.pack(16 + len(body), kind, flags, seq, 0) + body


def ifinfo(index: int, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFINFO.pack(family, 0, index, flags, change)


def ifaddr(index: int, prefixlen: int, scope: int = 0) -> bytes:
    return _IFADDR.pack(AF_INET, prefixlen, 0, scope, index)


def rtmsg(dst_len: int, table: int, proto: int, scope: int, kind: int, flags: int) -> bytes:
    return _RTMSG.pack(AF_INET, dst_len, 0, 0, table & 0xFF, proto, scope, kind, flags)


def ndmsg(family: int, index: int, state: int, flags: int) -> bytes:
    return _NDMSG.pack(family, index, state, flags, 0)
