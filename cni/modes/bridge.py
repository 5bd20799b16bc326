"""The pod side of flannel's modes, as the CNI bridge plugin wires it: a bridge `cni0` holding
the subnet's gateway (.1), one veth per pod with hairpin on, the pod's address from its node's
subnet, and in the pod a route to the whole cluster network and a default route, both via .1."""

from __future__ import annotations

import hashlib

from netaddr import IPNetwork

from netsim.kernel.netlink import IFINDEX, Rtnl

BRIDGE = "cni0"


def veth_name(cluster: str, pod: str) -> str:
    """`veth` + 8 hex, as the bridge plugin names them, derived from the pod so it is stable."""
    return "veth" + hashlib.sha256(f"{cluster}/{pod}".encode()).hexdigest()[:8]


def setup_bridge(rtnl: Rtnl, subnet: str, mtu: int) -> None:
    """cni0 holding the gateway address .1 of the node's subnet."""
    net = IPNetwork(subnet)
    rtnl.bridge(BRIDGE, IFINDEX.BRIDGE, mtu=mtu)
    rtnl.address(IFINDEX.BRIDGE, str(net.network + 1), net.prefixlen, BRIDGE)


def attach_host_side(node: Rtnl, pod_netns_fd: int, veth: str, index: int, mtu: int,
                     alias: str) -> None:
    """The node's half: the veth pair (peer eth0 created in the pod), on cni0, hairpin on."""
    node.veth(veth, index, "eth0", IFINDEX.ETH0, pod_netns_fd, mtu, master=IFINDEX.BRIDGE,
              alias=alias)
    node.hairpin(index, veth)


def attach_pod_side(pod: Rtnl, ip: str, subnet: str, network: str) -> None:
    """The pod's half: lo and eth0 up, the address, the cluster route and the default route."""
    net = IPNetwork(subnet)
    gateway = str(net.network + 1)
    pod.link_up(IFINDEX.LO, "lo")
    pod.link_up(IFINDEX.ETH0, "eth0")
    pod.address(IFINDEX.ETH0, ip, net.prefixlen, "eth0")
    pod.route(network, IFINDEX.ETH0, gateway=gateway)
    pod.route("default", IFINDEX.ETH0, gateway=gateway)
