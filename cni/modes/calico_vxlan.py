"""Calico's VXLAN data plane: `vxlan.calico`, VNI 4096, UDP 4789, learning off, MTU
underlay-50, the node's tunnel address /32 on it. Per peer, as felix programs it: a permanent
ARP entry (peer tunnel IP -> peer VTEP MAC), a permanent FDB entry (VTEP MAC -> peer node IP),
and per peer block `<block> via <peer tunnel IP> dev vxlan.calico onlink` — ARP and FDB first,
so the kernel never has to resolve the gateway over the tunnel.
"""

from __future__ import annotations

import hashlib

from cni.modes.calico import RTPROT_FELIX, CalicoBackend
from netsim.kernel.netlink import IFINDEX, Rtnl

VNI = 4096
PORT = 4789
DEVICE = "vxlan.calico"


class CalicoVxlan(CalicoBackend):
    name = "calico-vxlan"
    tunnel = DEVICE
    overhead = 50
    encap_setting = "vxlan_mode"  # the pool's vxlanMode

    def node_facts(self, cluster: str, name: str) -> dict:
        """A stable VTEP MAC (felix generates one and stores it on the node resource)."""
        digest = hashlib.sha256(f"{cluster}/{name}/vxlan.calico".encode()).digest()
        return {"vtep_mac": ":".join(f"{b:02x}" for b in (0x66,) + tuple(digest[:5]))}

    def setup_node(self, rtnl: Rtnl, node: dict, underlay_mtu: int) -> None:
        rtnl.vxlan(DEVICE, IFINDEX.TUNNEL, VNI, node["ip"], IFINDEX.ETH0, PORT,
                   self.pod_mtu(underlay_mtu), node["vtep_mac"])
        rtnl.address(IFINDEX.TUNNEL, node["tunnel_ip"], 32, DEVICE)
        super().setup_node(rtnl, node, underlay_mtu)

    def encap_route(self, rtnl: Rtnl, node: dict, peer: dict, block: str, first: bool) -> None:
        if first:
            rtnl.neighbour(IFINDEX.TUNNEL, peer["tunnel_ip"], peer["vtep_mac"], DEVICE)
            rtnl.fdb(IFINDEX.TUNNEL, peer["vtep_mac"], peer["ip"], DEVICE)
        rtnl.route(block, IFINDEX.TUNNEL, gateway=peer["tunnel_ip"], onlink=True,
                   proto=RTPROT_FELIX)
