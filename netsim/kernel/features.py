"""What this kernel and host offer, found by trying rather than by reading version numbers:
each link kind is created once in a scratch namespace that is removed right after."""

from __future__ import annotations

import os
import shutil

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netsim.kernel import netns as nsmod

LINK_KINDS = {
    "veth": {"peer": "probe1"},
    "bridge": {},
    "vxlan": {"vxlan_id": 42, "vxlan_port": 4789},
    "ipip": {},
    "gre": {},
    "geneve": {"geneve_id": 42, "geneve_remote": "192.0.2.1"},
    "wireguard": {},
}
TOOLS = {
    "nft": "nftables",
    "ping": "iputils-ping",
    "iperf3": "iperf3",
    "tcpdump": "tcpdump",
    "bird": "bird2",
    "clang": "clang",
    "tc": "iproute2",
}


def link_kinds() -> dict[str, bool]:
    """Create each kind in a throwaway namespace; True where the kernel accepted it."""
    scratch = f"netsim.probe.{os.getpid()}"
    nsmod.create(scratch)
    result = {}
    try:
        with nsmod.entered(scratch):
            ipr = IPRoute()
        with ipr:
            for kind, extra in LINK_KINDS.items():
                try:
                    ipr.link("add", ifname=f"p-{kind}"[:15], kind=kind, **extra)
                    result[kind] = True
                except NetlinkError:
                    result[kind] = False
    finally:
        nsmod.remove(scratch)
    result["tun"] = os.path.exists("/dev/net/tun")
    return result


def tools() -> dict[str, str | None]:
    return {tool: shutil.which(tool) for tool in TOOLS}
