"""Calico's VXLAN data plane: `vxlan.calico`, VNI 4096, UDP 4789, learning off, MTU
underlay-50, the node's tunnel address /32 on it. Per peer, as felix programs it: a permanent
ARP entry (peer tunnel IP -> peer VTEP MAC), a permanent FDB entry (VTEP MAC -> peer node IP),
and per peer block `<block> via <peer tunnel IP> dev vxlan.calico onlink`.
"""

from __future__ import annotations

from netsim.modes.calico import RTPROT_FELIX, CalicoBackend
from netsim.modes.vxlan import VxlanDevice

VNI = 4096
PORT = 4789


class CalicoVxlan(VxlanDevice, CalicoBackend):
    name = "calico-vxlan"
    tunnel = "vxlan.calico"
    encapsulation = "vxlan"
    udp_port = PORT
    vni = VNI
    overhead = 50
    summary = f"VXLAN VNI {VNI}, UDP {PORT}"
    encap_setting = "vxlan_mode"  # the pool's vxlanMode
    mac_prefix = 0x66
    route_proto = RTPROT_FELIX

    def plan_nodes(self, cluster, cluster_dir: str, names=None) -> dict[str, dict]:
        plan = super().plan_nodes(cluster, cluster_dir, names)
        for name, facts in plan.items():  # felix generates one and stores it on the node
            facts["vtep_mac"] = self.vtep_mac(cluster.name, name)
        return plan

    def setup_node(self, rtnl, node, underlay_mtu: int) -> None:
        self.add_device(rtnl, node, underlay_mtu, node.tunnel_ip)
        super().setup_node(rtnl, node, underlay_mtu)

    def encap_route(self, rtnl, node, peer, block: str, first: bool) -> None:
        if first:
            self.reach_vtep(rtnl, peer.tunnel_ip, peer)
        self.route_via_vtep(rtnl, block, peer.tunnel_ip)

    def forget_vtep(self, rtnl, peer) -> None:
        from netsim.kernel.netlink import IFINDEX

        rtnl.neighbour_delete(IFINDEX.TUNNEL, peer.tunnel_ip, self.tunnel)
        rtnl.fdb_delete(IFINDEX.TUNNEL, peer.vtep_mac, peer.ip, self.tunnel)

    def sweep(self, rtnl, node, peers: dict, own: set[str]) -> None:
        """Also the ARP and FDB entries of VTEPs no peer has any more."""
        from socket import AF_BRIDGE

        from netsim.kernel.netlink import IFINDEX

        super().sweep(rtnl, node, peers, own)
        vteps = {p.tunnel_ip for p in peers.values()}
        macs = {(p.vtep_mac, p.ip) for p in peers.values()}
        for ip, _ in rtnl.neighbours(IFINDEX.TUNNEL):
            if ip not in vteps:
                rtnl.neighbour_delete(IFINDEX.TUNNEL, ip, self.tunnel)
        for dst, mac in rtnl.neighbours(IFINDEX.TUNNEL, AF_BRIDGE):
            if (mac, dst) not in macs:
                rtnl.fdb_delete(IFINDEX.TUNNEL, mac, dst, self.tunnel)

    def describe_node(self, record, node, run) -> list[tuple[str, str]]:
        return super().describe_node(record, node, run) + self.describe_vtep(run)
