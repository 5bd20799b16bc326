"""flannel's host-gw backend: no tunnel. Each node routes every peer's subnet via the peer's
node IP on the underlay, which needs all nodes on one L2 segment; the MTU is the underlay's."""

from __future__ import annotations

from netsim.modes import flannel


class FlannelHostGw(flannel.FlannelBackend):
    name = "flannel-host-gw"
    backend = "host-gw"
    summary = "host-gw: no tunnel, routes to peer pod CIDRs via peer node IPs"

    def validate(self, cluster, fail) -> list[str]:
        if len({n.segment for n in cluster.nodes}) > 1:
            raise fail(
                "spec.nodes",
                "host-gw needs every node on one L2 segment",
                "put all nodes on one segment, or use mode flannel-vxlan",
            )
        return []

    def encapsulates(self, node, peer) -> bool:
        return False

    def setup_node(self, rtnl, node, underlay_mtu: int) -> None:
        from cni import bridge

        bridge.setup_bridge(rtnl, node.subnet, underlay_mtu)

    def add_peer(self, rtnl, node, peer) -> None:
        from netsim.kernel.netlink import IFINDEX

        rtnl.route(peer.subnet, IFINDEX.ETH0, gateway=peer.ip)

    def remove_peer(self, rtnl, node, peer) -> None:
        rtnl.route_delete(peer.subnet)

    def peers_in_kernel(self, rtnl, node, network: str) -> dict:
        from netsim.kernel.netlink import IFINDEX
        from netsim.modes.flannel import LeasePeer

        routes = self.peer_routes(rtnl, node, network, IFINDEX.ETH0)
        return {s: LeasePeer(s, r["gateway"] or "") for s, r in routes.items()}
