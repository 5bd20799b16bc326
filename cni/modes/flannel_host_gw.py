"""flannel's host-gw backend: no tunnel. Each node routes every peer's subnet via the peer's
node IP on the underlay, which needs all nodes on one L2 segment; the MTU is the underlay's."""

from __future__ import annotations

from cni.modes import bridge
from netsim.kernel.netlink import IFINDEX, Rtnl


class FlannelHostGw:
    name = "flannel-host-gw"
    backend = "host-gw"
    tunnel = None

    def pod_mtu(self, underlay_mtu: int) -> int:
        return underlay_mtu

    def backend_data(self, node: dict) -> dict | None:
        return None

    def node_facts(self, cluster: str, name: str) -> dict:
        return {}

    def setup_node(self, rtnl: Rtnl, node: dict, underlay_mtu: int) -> None:
        bridge.setup_bridge(rtnl, node["subnet"], underlay_mtu)

    def add_peer(self, rtnl: Rtnl, node: dict, peer: dict) -> None:
        rtnl.route(peer["subnet"], IFINDEX.ETH0, gateway=peer["ip"])
