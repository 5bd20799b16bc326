"""flannel's host-gw backend: no tunnel. Each node routes every peer's subnet via the peer's
node IP on the underlay, which needs all nodes on one L2 segment; the MTU is the underlay's."""

from __future__ import annotations

from cni.modes import bridge, flannel
from netsim.kernel import netns as nsmod
from netsim.kernel.netlink import IFINDEX, Rtnl


class FlannelHostGw(flannel.FlannelBackend):
    name = "flannel-host-gw"
    backend = "host-gw"
    tunnel = None

    def setup_node(self, rtnl: Rtnl, node: dict, underlay_mtu: int) -> None:
        bridge.setup_bridge(rtnl, node["subnet"], underlay_mtu)

    def ready(self, rtnl: Rtnl) -> str | None:
        """Why pods cannot be wired on this node yet (CNI STATUS), or None."""
        with nsmod.entered(rtnl.netns), open("/proc/sys/net/ipv4/ip_forward") as fh:
            forwarding = fh.read().strip() == "1"
        return None if forwarding else "IPv4 forwarding is off: flanneld has not set up this node"

    def add_peer(self, rtnl: Rtnl, node: dict, peer: dict) -> None:
        rtnl.route(peer["subnet"], IFINDEX.ETH0, gateway=peer["ip"])
