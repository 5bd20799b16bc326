"""The pod side of Calico's modes (calico's CNI plugin): no bridge. The host end of the veth is
`cali` + 11 hex characters with MAC ee:ee:ee:ee:ee:ee, proxy_arp on and proxy_delay 0; the pod
holds its address as a /32 with `169.254.1.1 dev eth0 scope link` and `default via 169.254.1.1`.
The pod ARPs for 169.254.1.1, the host answers with its own MAC (proxy ARP: the node routes that
address elsewhere, by its default route), and the node reaches the pod by `<podIP> dev caliX
scope link`.
"""

from __future__ import annotations

import hashlib

from netsim.kernel import netns as nsmod
from netsim.kernel.netlink import IFINDEX, RT_SCOPE_LINK, Rtnl

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY = "169.254.1.1"
ROUTES = [(f"{GATEWAY}/32", None), ("default", GATEWAY)]


def veth_name(namespace: str, pod: str) -> str:
    """`cali` + the first 11 hex digits of sha1("<namespace>.<pod>"), as Calico names them."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def attach_host_side(node: Rtnl, pod_netns_fd: int, veth: str, index: int, mtu: int,
                     alias: str, pod_ifname: str = "eth0", pod_index: int = IFINDEX.ETH0) -> None:
    """The node's half: the cali veth (peer created in the pod), MAC ee:ee:ee:ee:ee:ee."""
    node.veth(veth, index, pod_ifname, pod_index, pod_netns_fd, mtu, alias=alias, mac=HOST_MAC)


def route_to_pod(node: Rtnl, ip: str, index: int) -> None:
    """`<podIP> dev caliX scope link` on the node."""
    node.route(f"{ip}/32", index, scope=RT_SCOPE_LINK)


def host_sysctls(node_netns: str | None, veths: list[str]) -> None:
    """proxy_arp=1, forwarding=1 and neigh proxy_delay=0 on each cali interface."""
    with nsmod.entered(node_netns):
        for veth in veths:
            for path, value in ((f"/proc/sys/net/ipv4/conf/{veth}/proxy_arp", "1"),
                                (f"/proc/sys/net/ipv4/conf/{veth}/forwarding", "1"),
                                (f"/proc/sys/net/ipv4/neigh/{veth}/proxy_delay", "0")):
                with open(path, "w") as fh:
                    fh.write(value)
