"""The pod side of flannel's modes, as the CNI bridge plugin wires it: a bridge `cni0` holding
the subnet's gateway (.1), one veth per attachment (`veth` + 8 hex) on it with hairpin on, the
pod's address from its node's subnet, and in the pod a route to the whole cluster network and
a default route, both via the gateway.
"""

from __future__ import annotations

import errno
import hashlib
import os
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


def fixed_mac() -> str:
    """A random, locally administered MAC given to cni0 when it is made. The bridge plugin
    sets the bridge's MAC to itself for the same reason: a bridge whose MAC was never set takes
    its lowest port's, and changes as pods come and go (every pod's ARP entry for the gateway
    then points at another pod)."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def setup_bridge(rtnl: Rtnl, subnet: str, mtu: int, index: int = IFINDEX.BRIDGE) -> None:
    """cni0 holding the gateway address .1 of the node's subnet."""
    rtnl.bridge(BRIDGE, index, mtu=mtu, mac=fixed_mac())
    rtnl.address(index, gateway(subnet), IPv4Network(subnet).prefixlen, BRIDGE)


def ensure_bridge(rtnl: Rtnl, subnet: str, mtu: int) -> int:
    """cni0's index, creating it first if this node has none yet (as the bridge plugin does)."""
    link = rtnl.link(BRIDGE)
    if link is None:  # parallel ADDs race to make it: whoever loses uses the winner's
        for step in (
            lambda: rtnl.bridge(BRIDGE, 0, mtu=mtu, mac=fixed_mac()),
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
