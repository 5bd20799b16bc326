"""The hot path's packed requests are byte for byte what pyroute2's message classes encode for
the same request (the reference below builds them the way netsim did before rtpack)."""

from __future__ import annotations

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netsim.kernel import netlink
from netsim.kernel.netlink import IFF_UP, RTN_BLACKHOLE, Rtnl


def _queued(call) -> list[bytes]:
    """What one Rtnl method queues, without a socket."""
    rt = Rtnl.__new__(Rtnl)
    rt._pending, rt._seq, rt.netns, rt.replace = [], 0, None, False
    call(rt)
    return [r.data for r in rt._pending]


def _encode(msg, kind: int, flags: int, seq: int = 1) -> bytes:
    msg["header"].update(
        type=kind, flags=NLM_F_REQUEST | NLM_F_ACK | flags, sequence_number=seq, pid=0
    )
    msg.encode()
    return bytes(msg.data)


def _link(index: int, flags: int = 0, ifname: str | None = None) -> ifinfmsg:
    msg = ifinfmsg()
    msg["family"], msg["index"], msg["flags"] = 0, index, flags
    msg["change"] = IFF_UP if flags & IFF_UP else 0
    msg["attrs"] = [("IFLA_IFNAME", ifname)] if ifname and not index else []
    return msg


@pytest.mark.parametrize(
    "mac,master,peer_mac,alias",
    [
        (None, None, None, None),
        ("ee:ee:ee:ee:ee:ee", None, None, "web-0"),
        (None, 4, "02:00:00:00:00:01", "c1/eth0"),
    ],
)
def test_veth(mac, master, peer_mac, alias):
    peer = {
        "index": 2,
        "flags": 0,
        "change": 0,
        "attrs": [("IFLA_IFNAME", "eth0"), ("IFLA_MTU", 1450), ("IFLA_NET_NS_FD", 7)]
        + ([("IFLA_ADDRESS", peer_mac)] if peer_mac else []),
    }
    msg = _link(105, IFF_UP)
    msg["attrs"] = (
        [("IFLA_IFNAME", "veth0123abcd"), ("IFLA_MTU", 1450)]
        + ([("IFLA_ADDRESS", mac)] if mac else [])
        + ([("IFLA_MASTER", master)] if master else [])
        + [
            (
                "IFLA_LINKINFO",
                {
                    "attrs": [
                        ("IFLA_INFO_KIND", "veth"),
                        ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
                    ]
                },
            )
        ]
    )
    want = [_encode(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)]
    if alias:
        alias_msg = _link(105, ifname="veth0123abcd")
        alias_msg["attrs"].append(("IFLA_IFALIAS", alias))
        want.append(_encode(alias_msg, RTM_NEWLINK, 0, 2))
    got = _queued(
        lambda rt: rt.veth(
            "veth0123abcd",
            105,
            "eth0",
            2,
            7,
            1450,
            master=master,
            alias=alias,
            peer_mac=peer_mac,
            mac=mac,
        )
    )
    assert got == want


@pytest.mark.parametrize("index,name", [(3, "flannel.1"), (0, "cali0123456789a")])
def test_links_up_deleted_and_hairpinned(index, name):
    up = _encode(_link(index, IFF_UP, ifname=name), RTM_NEWLINK, 0)
    assert _queued(lambda rt: rt.link_up(index, name)) == [up]
    gone = _encode(_link(index, ifname=name), RTM_DELLINK, 0)
    assert _queued(lambda rt: rt.link_delete(index, name)) == [gone]
    msg = _link(index, ifname=name)
    msg["attrs"] += [
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_SLAVE_KIND", "bridge"),
                    ("IFLA_INFO_SLAVE_DATA", {"attrs": [("IFLA_BRPORT_MODE", 1)]}),
                ]
            },
        )
    ]
    assert _queued(lambda rt: rt.hairpin(index, name)) == [_encode(msg, RTM_NEWLINK, 0)]


def test_address():
    msg = ifaddrmsg()
    msg["family"], msg["prefixlen"], msg["index"], msg["scope"] = 2, 24, 2, 0
    msg["attrs"] = [("IFA_LOCAL", "10.244.1.2"), ("IFA_ADDRESS", "10.244.1.2")]
    want = _encode(msg, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL)
    assert _queued(lambda rt: rt.address(2, "10.244.1.2", 24, "eth0")) == [want]


@pytest.mark.parametrize(
    "dst,gateway,onlink,scope,proto,kind",
    [
        ("default", "10.244.1.1", False, None, 3, 1),
        ("10.244.2.0/24", "10.244.2.0", True, None, 3, 1),
        ("169.254.1.1/32", None, False, None, 3, 1),
        ("192.168.0.5/32", None, False, 253, 80, 1),
        ("192.168.0.0/26", None, False, None, 80, RTN_BLACKHOLE),
    ],
)
def test_route(dst, gateway, onlink, scope, proto, kind):
    net, _, plen = ("0.0.0.0/0" if dst == "default" else dst).partition("/")
    msg = rtmsg()
    msg["family"], msg["dst_len"], msg["table"] = 2, int(plen or 32), 254
    msg["proto"], msg["type"] = proto, kind
    msg["scope"] = scope if scope is not None else (0 if gateway or kind != 1 else 253)
    msg["flags"] = netlink.RTNH_F_ONLINK if onlink else 0
    attrs = [("RTA_TABLE", 254)] + ([("RTA_DST", net)] if msg["dst_len"] else [])
    attrs += ([("RTA_GATEWAY", gateway)] if gateway else []) + (
        [("RTA_OIF", 3)] if kind == 1 else []
    )
    msg["attrs"] = attrs
    want = _encode(msg, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL)
    got = _queued(
        lambda rt: rt.route(
            dst, 3, gateway=gateway, onlink=onlink, scope=scope, proto=proto, kind=kind
        )
    )
    assert got == [want]


def test_neighbour_and_fdb():
    msg = ndmsg()
    msg["family"], msg["ifindex"], msg["state"], msg["flags"] = 2, 3, netlink.NUD_PERMANENT, 0
    msg["attrs"] = [("NDA_DST", "10.244.2.0"), ("NDA_LLADDR", "02:4a:07:fa:ab:52")]
    want = _encode(msg, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL)
    assert _queued(lambda rt: rt.neighbour(3, "10.244.2.0", "02:4a:07:fa:ab:52", "x")) == [want]
    msg = ndmsg()
    msg["family"], msg["ifindex"] = 7, 3
    msg["state"], msg["flags"] = netlink.NUD_PERMANENT, netlink.NTF_SELF
    msg["attrs"] = [("NDA_LLADDR", "02:4a:07:fa:ab:52"), ("NDA_DST", "172.18.0.3")]
    want = _encode(msg, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL)
    assert _queued(lambda rt: rt.fdb(3, "02:4a:07:fa:ab:52", "172.18.0.3", "x")) == [want]
