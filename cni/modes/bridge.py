"""The pod side of flannel's modes, as the CNI bridge plugin wires it: a bridge `cni0` holding
the subnet's gateway (.1), one veth per attachment with hairpin on, the pod's address from its
node's subnet, and in the pod a route to the whole cluster network and a default route, both via
the gateway.

Used two ways: netsim batches many pods per node with interface indexes it assigns; the CNI
executable wires one attachment in a namespace it did not make, naming links instead (index 0).
"""

from __future__ import annotations

import hashlib
from ipaddress import IPv4Network

from netsim.kernel.netlink import IFINDEX, Rtnl

BRIDGE = "cni0"


def veth_name(container_id: str, ifname: str) -> str:
    """`veth` + 8 hex, as the bridge plugin names them, stable for one attachment."""
    return "veth" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:8]


def gateway(subnet: str) -> str:
    return str(IPv4Network(subnet).network_address + 1)


def setup_bridge(rtnl: Rtnl, subnet: str, mtu: int, index: int = IFINDEX.BRIDGE) -> None:
    """cni0 holding the gateway address .1 of the node's subnet."""
    net = IPv4Network(subnet)
    rtnl.bridge(BRIDGE, index, mtu=mtu)
    rtnl.address(index, gateway(subnet), net.prefixlen, BRIDGE)


def ensure_bridge(rtnl: Rtnl, subnet: str, mtu: int) -> int:
    """cni0's index, creating it first if this node has none yet (as the bridge plugin does)."""
    link = rtnl.link(BRIDGE)
    if link is None:
        rtnl.bridge(BRIDGE, 0, mtu=mtu)
        rtnl.commit()
        link = rtnl.link(BRIDGE)
        rtnl.address(link["index"], gateway(subnet), IPv4Network(subnet).prefixlen, BRIDGE)
        rtnl.commit()
    return link["index"]


def attach_host_side(node: Rtnl, pod_netns_fd: int, veth: str, index: int, mtu: int,
                     alias: str, pod_ifname: str = "eth0", pod_index: int = IFINDEX.ETH0,
                     bridge: int = IFINDEX.BRIDGE) -> None:
    """The node's half: the veth pair (peer created in the pod), on cni0, hairpin on."""
    node.veth(veth, index, pod_ifname, pod_index, pod_netns_fd, mtu, master=bridge, alias=alias)
    node.hairpin(index, veth)


def pod_routes(network: str, subnet: str, default: bool = True) -> list[tuple[str, str]]:
    """(destination, gateway) of the pod's routes: the cluster network, then the default."""
    return [(network, gateway(subnet))] + ([("default", gateway(subnet))] if default else [])


def attach_pod_side(pod: Rtnl, ip: str, prefixlen: int, routes: list[tuple[str, str]],
                    ifname: str = "eth0", index: int = IFINDEX.ETH0) -> None:
    """The pod's half: the interface up with its address, then its routes."""
    pod.link_up(index, ifname)
    pod.address(index, ip, prefixlen, ifname)
    for dst, via in routes:
        pod.route(dst, index, gateway=via)
