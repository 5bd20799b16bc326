"""The pod side of flannel's modes, as the CNI bridge plugin wires it: a bridge `cni0` holding
the subnet's gateway (.1), one veth per attachment (`veth` + 8 hex) on it with hairpin on, the
pod's address from its node's subnet, and in the pod a route to the whole cluster network and
a default route, both via the gateway.
"""

from __future__ import annotations

import errno
import hashlib
from ipaddress import IPv4Network

from cni.wiring import Attachment
from netsim.errors import KernelError
from netsim.kernel.netlink import IFINDEX, Rtnl

BRIDGE = "cni0"


def veth_name(container_id: str, ifname: str) -> str:
    """`veth` + 8 hex, as the bridge plugin names them, stable for one attachment."""
    return "veth" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:8]


def gateway(subnet: str) -> str:
    return str(IPv4Network(subnet).network_address + 1)


def setup_bridge(rtnl: Rtnl, subnet: str, mtu: int, index: int = IFINDEX.BRIDGE) -> None:
    """cni0 holding the gateway address .1 of the node's subnet."""
    rtnl.bridge(BRIDGE, index, mtu=mtu)
    rtnl.address(index, gateway(subnet), IPv4Network(subnet).prefixlen, BRIDGE)


def ensure_bridge(rtnl: Rtnl, subnet: str, mtu: int) -> int:
    """cni0's index, creating it first if this node has none yet (as the bridge plugin does)."""
    link = rtnl.link(BRIDGE)
    if link is None:  # parallel ADDs race to make it: whoever loses uses the winner's
        for step in (
            lambda: rtnl.bridge(BRIDGE, 0, mtu=mtu),
            lambda: rtnl.address(
                rtnl.link(BRIDGE)["index"], gateway(subnet), IPv4Network(subnet).prefixlen, BRIDGE
            ),
        ):
            try:
                step()
                rtnl.commit()
            except KernelError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        link = rtnl.link(BRIDGE)
    return link["index"]


def pod_routes(network: str, subnet: str, default: bool = True) -> list[tuple[str, str]]:
    """(destination, gateway) of the pod's routes: the cluster network, then the default."""
    return [(network, gateway(subnet))] + ([("default", gateway(subnet))] if default else [])


class BridgePodSide:
    """The host end on cni0 with hairpin on; cni0 is found (or made) once per batch."""

    name = "bridge"

    def __init__(self, bridge_index: int = IFINDEX.BRIDGE):
        self.bridge_index = bridge_index

    def attach_host(self, node: Rtnl, attachment: Attachment) -> None:
        attachment.make_host_end(node, master=self.bridge_index)
        node.hairpin(attachment.index, attachment.veth)

    def after_host(self, node: Rtnl, attachments: list[Attachment]) -> None:
        pass
