"""flannel's vxlan backend (pkg/backend/vxlan), the default.

Each node owns `flannel.1` (VNI 1, UDP 8472, learning off, MTU underlay-50) holding its
subnet's network address as a /32. Peers are not learned: for every remote node flannel writes a
permanent ARP entry (remote VTEP address -> remote VTEP MAC), a permanent FDB entry (remote VTEP
MAC -> remote node IP), and last the route `<subnet> via <VTEP address> dev flannel.1 onlink`.
The order matters: with the route first the kernel would ARP for the gateway over the tunnel.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from socket import AF_BRIDGE

from netsim.modes import flannel
from netsim.modes.vxlan import VxlanDevice

VNI = 1
PORT = 8472


class FlannelVxlan(VxlanDevice, flannel.FlannelBackend):
    name = "flannel-vxlan"
    backend = "vxlan"
    tunnel = f"flannel.{VNI}"
    encapsulation = "vxlan"
    udp_port = PORT
    vni = VNI
    overhead = 50
    summary = f"VXLAN VNI {VNI}, UDP {PORT}"
    mac_prefix = 0x02

    def plan_nodes(self, cluster, cluster_dir: str, names=None) -> dict[str, dict]:
        plan = super().plan_nodes(cluster, cluster_dir, names)
        for name, facts in plan.items():
            facts["vtep_mac"] = self.vtep_mac(cluster.name, name)
        return plan

    def backend_data(self, node) -> dict:
        return {"VNI": VNI, "VtepMAC": node.vtep_mac}

    def backend_options(self) -> dict:
        return {"VNI": VNI, "Port": PORT}

    def setup_node(self, rtnl, node, underlay_mtu: int) -> None:
        from cni import bridge

        self.add_device(rtnl, node, underlay_mtu, str(IPv4Network(node.subnet).network_address))
        bridge.setup_bridge(rtnl, node.subnet, self.pod_mtu(underlay_mtu))

    def add_peer(self, rtnl, node, peer) -> None:
        vtep = str(IPv4Network(peer.subnet).network_address)
        self.reach_vtep(rtnl, vtep, peer)
        self.route_via_vtep(rtnl, peer.subnet, vtep)

    def remove_peer(self, rtnl, node, peer) -> None:
        """flanneld's order on a lease's removal: ARP entry, FDB entry, route."""
        from netsim.kernel.netlink import IFINDEX

        vtep = str(IPv4Network(peer.subnet).network_address)
        rtnl.neighbour_delete(IFINDEX.TUNNEL, vtep, self.tunnel)
        rtnl.fdb_delete(IFINDEX.TUNNEL, peer.vtep_mac, peer.ip, self.tunnel)
        rtnl.route_delete(peer.subnet)

    def peers_in_kernel(self, rtnl, node, network: str) -> dict:
        from netsim.kernel.netlink import IFINDEX
        from netsim.modes.flannel import LeasePeer

        arp = dict(rtnl.neighbours(IFINDEX.TUNNEL))
        fdb = {mac: dst for dst, mac in rtnl.neighbours(IFINDEX.TUNNEL, AF_BRIDGE)}
        found = {}
        for subnet in self.peer_routes(rtnl, node, network, IFINDEX.TUNNEL):
            mac = arp.get(str(IPv4Network(subnet).network_address), "")
            found[subnet] = LeasePeer(subnet, fdb.get(mac, ""), mac)
        return found

    def describe_tunnel(self, node, run) -> list[tuple[str, str]]:
        return super().describe_tunnel(node, run) + self.describe_vtep(run)
