"""rtnetlink inside one namespace: changes compiled with pyroute2's message classes and sent as
one batch, queries through pyroute2's IPRoute.

pyroute2's request layer costs about half a millisecond per call; a pod needs six changes and a
cluster hundreds of pods. So changes are encoded with pyroute2's own message classes (ifinfmsg,
ifaddrmsg, rtmsg, ndmsg), queued, written to the socket together, and every ack is checked: a
failure raises KernelError with the errno, the kernel's extended-ack text and the object. Links
are created with explicit interface indexes (see IFINDEX) so later messages of the same batch
can name them without a lookup.
"""

from __future__ import annotations

import socket
import struct
from socket import AF_BRIDGE, AF_INET

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netsim.errors import KernelError
from netsim.kernel import netns as nsmod
from netsim.kernel import pyroute2_light, rtpack

IFF_UP = 0x1
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTPROT_BOOT, RTPROT_STATIC = 3, 4
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS = 1, 3, 4, 10, 18, 20
IFLA_INFO_KIND = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
SOL_NETLINK, NETLINK_EXT_ACK = 270, 11
SO_RCVBUFFORCE = 33
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
ENOENT, ESRCH = 2, 3
NLMSGERR_ATTR_MSG = 1
_CHUNK = 48 * 1024  # bytes of requests per send
# requests per send: the kernel queues one ack per request as its own skb (truesize ~1 KiB, far
# above the 36 bytes it carries), so a send of thousands of small requests overflows even a
# large receive buffer (ENOBUFS) unless the acks are read between sends
_CHUNK_MESSAGES = 256
_RCVBUF = 4 << 20  # the socket's receive buffer: room for a chunk's acks and error echoes


class IFINDEX:
    """Interface indexes netsim assigns, so one batch can create a link and then use it."""

    LO = 1
    ETH0 = 2  # a node's underlay interface and a pod's eth0
    TUNNEL = 3  # flannel.1, vxlan.calico, tunl0
    BRIDGE = 4  # cni0
    FIRST_DYNAMIC = 100  # pod veths on a node, node ports on an underlay bridge


class _Request:
    __slots__ = ("seq", "data", "what", "tolerate")

    def __init__(self, seq: int, data: bytes, what: str, tolerate: tuple[int, ...] = ()):
        self.seq, self.data, self.what, self.tolerate = seq, data, what, tolerate


class Rtnl:
    """Queue changes, then `commit()` sends them; `link()`, `addresses()`, `routes()` and
    pyroute2's `ipr` answer queries."""

    def __init__(self, netns: str | None, replace: bool = False):
        self.netns = netns  # a name under /run/netns, a netns path, or None for this namespace
        self.replace = replace  # adds of routes, neighbours, FDB entries replace what is there
        self._pending: list[_Request] = []
        self._ipr = None
        self._seq = 0
        with nsmod.entered(self.netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        try:  # root may exceed net.core.rmem_max; others get what the host allows
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        self._sock.bind((0, 0))

    @property
    def ipr(self):
        """A pyroute2 IPRoute in the same namespace, opened on first use."""
        if self._ipr is None:
            pyroute2 = pyroute2_light.full()
            with nsmod.entered(self.netns):
                self._ipr = pyroute2.IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
        if self._sock is not None:
            self._sock.close()
        self._ipr = self._sock = None

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- encoding ------------------------------------------------------------------------------

    def _queue(self, msg, kind: int, flags: int, what: str, tolerate=()) -> None:
        self._seq += 1
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        msg["header"]["sequence_number"] = self._seq
        msg["header"]["pid"] = 0
        msg.encode()
        self._pending.append(_Request(self._seq, bytes(msg.data), what, tuple(tolerate)))

    def _queue_raw(self, kind: int, flags: int, body: bytes, what: str, tolerate=()) -> None:
        """Queue a request packed by rtpack (the hot path: see netsim/kernel/rtpack.py)."""
        self._seq += 1
        data = rtpack.message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, self._seq, body)
        self._pending.append(_Request(self._seq, data, what, tuple(tolerate)))

    @staticmethod
    def _link_head(index: int, flags: int = 0, ifname: str | None = None) -> bytes:
        """ifinfomsg, and the name when index 0 means "find the link by name"."""
        head = rtpack.ifinfo(index, flags, IFF_UP if flags & IFF_UP else 0)
        return head + rtpack.text(rtpack.IFLA_IFNAME, ifname) if ifname and not index else head

    @staticmethod
    def _link(index: int, flags: int = 0, family: int = 0, ifname: str | None = None) -> ifinfmsg:
        """A link message; index 0 with a name lets the kernel find the link by name."""
        msg = ifinfmsg()
        msg["family"] = family
        msg["index"] = index
        msg["flags"] = flags
        msg["change"] = IFF_UP if flags & IFF_UP else 0
        msg["attrs"] = [("IFLA_IFNAME", ifname)] if ifname and not index else []
        return msg

    def _add_link(
        self,
        index: int,
        ifname: str,
        kind: int | None,
        info,
        up: bool,
        what: str,
        mtu: int | None = None,
        mac: str | None = None,
        master: int | None = None,
        alias: str | None = None,
    ) -> None:
        msg = self._link(index, IFF_UP if up else 0)
        attrs = [("IFLA_IFNAME", ifname)]
        if mtu:
            attrs.append(("IFLA_MTU", mtu))
        if mac:
            attrs.append(("IFLA_ADDRESS", mac))
        if master:
            attrs.append(("IFLA_MASTER", master))
        attrs.append(("IFLA_LINKINFO", {"attrs": info}))
        msg["attrs"] = attrs
        self._queue(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL | (kind or 0), what)
        if alias:  # the kernel ignores IFLA_IFALIAS when it creates a link: set it after
            alias_msg = self._link(index, ifname=ifname)
            alias_msg["attrs"].append(("IFLA_IFALIAS", alias))
            self._queue(alias_msg, RTM_NEWLINK, 0, f"set alias of {ifname}")

    # -- links ---------------------------------------------------------------------------------

    def veth(
        self,
        ifname: str,
        index: int,
        peer_ifname: str,
        peer_index: int,
        peer_netns_fd: int,
        mtu: int,
        master: int | None = None,
        alias: str | None = None,
        peer_mac: str | None = None,
        mac: str | None = None,
    ) -> None:
        """A veth pair whose peer is created directly in the other namespace. This end comes up;
        the peer must be set up from its own namespace (this kernel refuses IFF_UP on a veth
        peer at creation with ENOTCONN, as `ip link add ... peer name x up` shows)."""
        p = rtpack
        peer = (
            p.ifinfo(peer_index)
            + p.text(p.IFLA_IFNAME, peer_ifname)
            + p.u32(p.IFLA_MTU, mtu)
            + p.u32(p.IFLA_NET_NS_FD, peer_netns_fd)
            + (p.mac(p.IFLA_ADDRESS, peer_mac) if peer_mac else b"")
        )
        info = p.text(p.IFLA_INFO_KIND, "veth") + p.attr(
            p.IFLA_INFO_DATA, p.attr(p.VETH_INFO_PEER, peer)
        )
        body = (
            p.ifinfo(index, IFF_UP, IFF_UP)
            + p.text(p.IFLA_IFNAME, ifname)
            + p.u32(p.IFLA_MTU, mtu)
            + (p.mac(p.IFLA_ADDRESS, mac) if mac else b"")
            + (p.u32(p.IFLA_MASTER, master) if master else b"")
            + p.attr(p.IFLA_LINKINFO, info)
        )
        self._queue_raw(
            RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"add veth {ifname}/{peer_ifname}"
        )
        if alias:
            self.alias(index, ifname, alias)

    def alias(self, index: int, ifname: str, alias: str) -> None:
        """The kernel ignores IFLA_IFALIAS when it creates a link: it is set after."""
        self._queue_raw(
            RTM_NEWLINK,
            0,
            self._link_head(index, ifname=ifname) + rtpack.text(rtpack.IFLA_IFALIAS, alias),
            f"set alias of {ifname}",
        )

    def bridge(
        self, ifname: str, index: int, mtu: int | None = None, mac: str | None = None
    ) -> None:
        self._add_link(
            index,
            ifname,
            None,
            [("IFLA_INFO_KIND", "bridge")],
            True,
            f"add bridge {ifname}",
            mtu=mtu,
            mac=mac,
        )

    def vxlan(
        self,
        ifname: str,
        index: int,
        vni: int,
        local: str,
        link: int,
        port: int,
        mtu: int,
        mac: str,
    ) -> None:
        """A VXLAN device with learning off: peers are programmed as static ARP and FDB entries."""
        # no outer UDP checksum: flannel and Calico create their devices through the netlink
        # library with UDPCSum false, which is what `ip -d link` shows on a real node
        data = [
            ("IFLA_VXLAN_ID", vni),
            ("IFLA_VXLAN_LOCAL", local),
            ("IFLA_VXLAN_LINK", link),
            ("IFLA_VXLAN_PORT", port),
            ("IFLA_VXLAN_LEARNING", 0),
            ("IFLA_VXLAN_UDP_CSUM", 0),
        ]
        info = [("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": data})]
        self._add_link(
            index, ifname, None, info, True, f"add vxlan {ifname} (VNI {vni})", mtu=mtu, mac=mac
        )

    def link_up(self, index: int, what: str) -> None:
        """Set a link up, by index, or by name (`what`) with index 0."""
        self._queue_raw(
            RTM_NEWLINK, 0, self._link_head(index, IFF_UP, ifname=what), f"set {what} up"
        )

    def link_set(self, index: int, ifname: str, mtu: int | None = None, up: bool = True) -> None:
        """Change an existing link (by index, or by name with index 0): MTU, then up or down."""
        msg = self._link(index, IFF_UP if up else 0, ifname=ifname)
        msg["change"] = IFF_UP  # down is flags 0: with a change mask of 0 too, nothing changes
        if mtu:
            msg["attrs"].append(("IFLA_MTU", mtu))
        self._queue(msg, RTM_NEWLINK, 0, f"set {ifname}" + (f" mtu {mtu}" if mtu else ""))

    def link_delete(self, index: int, what: str) -> None:
        """Delete a link (by index, or by name with index 0); one already gone is no error."""
        self._queue_raw(
            RTM_DELLINK, 0, self._link_head(index, ifname=what), f"delete {what}", tolerate=(19,)
        )  # ENODEV

    def hairpin(self, index: int, what: str) -> None:
        """Let a bridge port send a frame back out where it came in (pod -> own Service)."""
        p = rtpack
        slave = p.text(p.IFLA_INFO_SLAVE_KIND, "bridge") + p.attr(
            p.IFLA_INFO_SLAVE_DATA, p.attr(p.IFLA_BRPORT_MODE, b"\1")
        )
        self._queue_raw(
            RTM_NEWLINK,
            0,
            self._link_head(index, ifname=what) + p.attr(p.IFLA_LINKINFO, slave),
            f"hairpin on {what}",
        )

    # -- addresses, routes, neighbours ---------------------------------------------------------

    def address(self, index: int, ip: str, prefixlen: int, what: str) -> None:
        p = rtpack
        body = p.ifaddr(index, prefixlen) + p.ipv4(p.IFA_LOCAL, ip) + p.ipv4(p.IFA_ADDRESS, ip)
        self._queue_raw(
            RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add address {ip}/{prefixlen} on {what}"
        )

    def route(
        self,
        dst: str,
        oif: int,
        gateway: str | None = None,
        onlink: bool = False,
        scope: int | None = None,
        proto: int = RTPROT_BOOT,
        kind: int = RTN_UNICAST,
        table: int = 254,
        replace: bool = False,
    ) -> None:
        """`ip route add DST [via GW] dev OIF [onlink]`; DST in CIDR form, 'default' allowed;
        with replace, `ip route replace` (what a daemon that resyncs sends)."""
        p = rtpack
        net, _, plen = ("0.0.0.0/0" if dst == "default" else dst).partition("/")
        dst_len = int(plen or 32)
        if scope is None:
            scope = RT_SCOPE_UNIVERSE if gateway or kind != RTN_UNICAST else RT_SCOPE_LINK
        body = (
            p.rtmsg(dst_len, table, proto, scope, kind, RTNH_F_ONLINK if onlink else 0)
            + p.u32(p.RTA_TABLE, table)
            + (p.ipv4(p.RTA_DST, net) if dst_len else b"")
            + (p.ipv4(p.RTA_GATEWAY, gateway) if gateway else b"")
            + (p.u32(p.RTA_OIF, oif) if kind == RTN_UNICAST else b"")
        )
        via = f" via {gateway}" if gateway else ""
        self._queue_raw(
            RTM_NEWROUTE,
            _create(replace or self.replace),
            body,
            f"{'replace' if replace else 'add'} route {dst}{via}{' onlink' if onlink else ''}",
        )

    def route_delete(self, dst: str, table: int = 254) -> None:
        """`ip route del DST`; one already gone is fine."""
        p = rtpack
        net, _, plen = dst.partition("/")
        body = (
            p.rtmsg(int(plen or 32), table, 0, 0, 0, 0)
            + p.u32(p.RTA_TABLE, table)
            + p.ipv4(p.RTA_DST, net)
        )
        self._queue_raw(RTM_DELROUTE, 0, body, f"delete route {dst}", tolerate=(ESRCH, ENOENT))

    def neighbour(self, index: int, ip: str, mac: str, what: str, replace: bool = False) -> None:
        """A permanent ARP entry: `ip neigh add|replace IP lladdr MAC dev X nud permanent`."""
        p = rtpack
        body = (
            p.ndmsg(AF_INET, index, NUD_PERMANENT, 0)
            + p.ipv4(p.NDA_DST, ip)
            + p.mac(p.NDA_LLADDR, mac)
        )
        self._queue_raw(
            RTM_NEWNEIGH,
            _create(replace or self.replace),
            body,
            f"add neighbour {ip} lladdr {mac} on {what}",
        )

    def neighbour_delete(self, index: int, ip: str, what: str) -> None:
        """`ip neigh del IP dev X`; one already gone is fine."""
        body = rtpack.ndmsg(AF_INET, index, 0, 0) + rtpack.ipv4(rtpack.NDA_DST, ip)
        self._queue_raw(RTM_DELNEIGH, 0, body, f"delete neighbour {ip} on {what}", (ENOENT,))

    def fdb_delete(self, index: int, mac: str, dst: str, what: str) -> None:
        """`bridge fdb del MAC dev X dst IP self`; one already gone is fine."""
        p = rtpack
        body = (
            p.ndmsg(AF_BRIDGE, index, 0, NTF_SELF)
            + p.mac(p.NDA_LLADDR, mac)
            + p.ipv4(p.NDA_DST, dst)
        )
        self._queue_raw(RTM_DELNEIGH, 0, body, f"delete fdb {mac} on {what}", (ENOENT,))

    def fdb(self, index: int, mac: str, dst: str, what: str, replace: bool = False) -> None:
        """A permanent FDB entry: `bridge fdb add|replace MAC dev X dst IP self permanent`."""
        p = rtpack
        body = (
            p.ndmsg(AF_BRIDGE, index, NUD_PERMANENT, NTF_SELF)
            + p.mac(p.NDA_LLADDR, mac)
            + p.ipv4(p.NDA_DST, dst)
        )
        self._queue_raw(
            RTM_NEWNEIGH,
            _create(replace or self.replace),
            body,
            f"add fdb {mac} dst {dst} on {what}",
        )

    # -- queries -------------------------------------------------------------------------------

    def _dump(self, msg, kind: int, cls, flags: int = NLM_F_DUMP) -> list:
        """Send one request; every answer decoded with pyroute2's message class, or raw."""
        self._seq += 1
        seq = self._seq
        msg["header"]["type"], msg["header"]["flags"] = kind, NLM_F_REQUEST | flags
        msg["header"]["sequence_number"], msg["header"]["pid"] = seq, 0
        msg.encode()
        self._sock.send(bytes(msg.data))
        found = []
        while True:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, _, mseq, _ = struct.unpack_from("=IHHII", data, offset)
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return found
                    if mtype == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, offset + 16)[0]
                        if err == 19:  # ENODEV: asked by name for a link that is not there
                            return found
                        if err:
                            raise KernelError(err, "query", self.netns)
                        return found
                    if cls is None:
                        found.append(data[offset : offset + length])
                    else:
                        answer = cls(data[offset : offset + length])
                        answer.decode()
                        found.append(answer)
                    if not flags & NLM_F_DUMP:
                        return found
                offset += (length + 3) & ~3

    def link(self, ifname: str) -> dict | None:
        """The link with this name: index, mac, mtu, up, master, kind; None if absent."""
        msg = ifinfmsg()
        msg["family"], msg["index"] = 0, 0
        msg["attrs"] = [("IFLA_IFNAME", ifname)]
        msg["attrs"].append(("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS))
        found = self._dump(msg, RTM_GETLINK, None, flags=0)
        return _link_dict(found[0]) if found else None

    def links(self) -> list[dict]:
        """Every link, as `link()` describes one."""
        msg = ifinfmsg()
        msg["family"] = 0
        msg["attrs"] = [("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS)]
        return [_link_dict(answer) for answer in self._dump(msg, RTM_GETLINK, None)]

    def addresses(self) -> list[tuple[int, str, int]]:
        """Every IPv4 address as (ifindex, address, prefixlen)."""
        msg = ifaddrmsg()
        msg["family"] = AF_INET
        return [
            (a["index"], a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in self._dump(msg, RTM_GETADDR, ifaddrmsg)
        ]

    def routes(self, table: int = 254) -> list[dict]:
        """IPv4 routes of a table as {dst ('a.b.c.d/n' or 'default'), gateway, oif, scope,
        type (RTN_*), proto (RTPROT_*: who made it)}."""
        msg = rtmsg()
        msg["family"] = AF_INET
        found = []
        for r in self._dump(msg, RTM_GETROUTE, rtmsg):
            if (r.get_attr("RTA_TABLE") or r["table"]) != table:
                continue
            dst = f"{r.get_attr('RTA_DST')}/{r['dst_len']}" if r["dst_len"] else "default"
            found.append(
                {
                    "dst": dst,
                    "gateway": r.get_attr("RTA_GATEWAY"),
                    "oif": r.get_attr("RTA_OIF"),
                    "scope": r["scope"],
                    "type": r["type"],
                    "proto": r["proto"],
                }
            )
        return found

    def neighbours(self, index: int, family: int = AF_INET) -> list[tuple[str | None, str]]:
        """(IP or FDB destination, MAC) of each entry on one link: ARP (AF_INET) or FDB
        (AF_BRIDGE) entries."""
        msg = ndmsg()
        msg["family"], msg["ifindex"] = family, index
        found = []
        for n in self._dump(msg, RTM_GETNEIGH, ndmsg):
            if n["ifindex"] == index and n.get_attr("NDA_LLADDR"):
                found.append((n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")))
        return found

    # -- sending -------------------------------------------------------------------------------

    def commit(self) -> int:
        """Send every queued change; raise KernelError for the first one the kernel refused."""
        pending, self._pending = self._pending, []
        sent = 0
        while sent < len(pending):
            chunk, size = [], 0
            while sent < len(pending) and (
                not chunk
                or (size + len(pending[sent].data) <= _CHUNK and len(chunk) < _CHUNK_MESSAGES)
            ):
                chunk.append(pending[sent])
                size += len(pending[sent].data)
                sent += 1
            try:
                self._sock.send(b"".join(r.data for r in chunk))
                self._collect({r.seq: r for r in chunk})
            except OSError as exc:  # the socket itself failed, not one request
                raise KernelError(
                    exc.errno or 0,
                    f"netlink batch of {len(pending)} requests (at {chunk[0].what})",
                    self.netns,
                ) from None
        return len(pending)

    def _collect(self, waiting: dict[int, _Request]) -> None:
        failure: KernelError | None = None
        while waiting:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_ERROR and seq in waiting:
                    request = waiting.pop(seq)
                    err = -struct.unpack_from("=i", data, offset + 16)[0]
                    if err and err not in request.tolerate and failure is None:
                        failure = KernelError(
                            err, request.what, self.netns, _extack(data, offset, length, flags)
                        )
                offset += (length + 3) & ~3
        if failure is not None:
            raise failure


def _create(replace: bool) -> int:
    return NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)


def _link_dict(data: bytes) -> dict:
    """The few facts netsim reads from an RTM_NEWLINK answer, parsed directly: pyroute2's full
    decode of every nested attribute costs more than the rest of a CNI ADD."""
    index, flags = struct.unpack_from("=iI", data, 20)
    attrs = dict(_attributes(data, 32, len(data)))
    info = (
        dict(_attributes(attrs[IFLA_LINKINFO], 0, len(attrs[IFLA_LINKINFO])))
        if IFLA_LINKINFO in attrs
        else {}
    )

    def text(raw: bytes | None) -> str | None:
        return raw.rstrip(b"\0").decode() if raw is not None else None

    def u32(raw: bytes | None) -> int | None:
        return struct.unpack("=I", raw)[0] if raw is not None else None

    mac = attrs.get(IFLA_ADDRESS)
    return {
        "index": index,
        "name": text(attrs.get(IFLA_IFNAME)),
        "mac": ":".join(f"{b:02x}" for b in mac) if mac is not None else None,
        "mtu": u32(attrs.get(IFLA_MTU)),
        "up": bool(flags & IFF_UP),
        "master": u32(attrs.get(IFLA_MASTER)),
        "alias": text(attrs.get(IFLA_IFALIAS)),
        "kind": text(info.get(IFLA_INFO_KIND)),
    }


def _attributes(data: bytes, pos: int, end: int):
    """(type, payload) of each netlink attribute in data[pos:end]."""
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            return
        yield atype & 0x3FFF, data[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3


def _extack(data: bytes, offset: int, length: int, flags: int) -> str:
    """The kernel's extended-ack message, if it sent one."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    inner = 16 if flags & NLM_F_CAPPED else struct.unpack_from("=I", data, offset + 20)[0]
    pos, end = offset + 20 + ((inner + 3) & ~3), offset + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype == NLMSGERR_ATTR_MSG:
            return data[pos + 4 : pos + alen].rstrip(b"\0").decode(errors="replace")
        pos += (alen + 3) & ~3
    return ""
