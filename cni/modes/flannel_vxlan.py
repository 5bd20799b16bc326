"""flannel's vxlan backend (pkg/backend/vxlan), the default.

Each node owns `flannel.1` (VNI 1, UDP 8472, learning off, MTU underlay-50) holding its
subnet's network address as a /32. Peers are not learned: for every remote node flannel writes a
permanent ARP entry (remote VTEP address -> remote VTEP MAC), a permanent FDB entry (remote VTEP
MAC -> remote node IP), and last the route `<subnet> via <VTEP address> dev flannel.1 onlink`.
The order matters: with the route first the kernel would ARP for the gateway over the tunnel.
"""

from __future__ import annotations

import hashlib
from ipaddress import IPv4Network

from cni.modes import bridge, flannel
from netsim.kernel.netlink import IFINDEX, Rtnl

VNI = 1
PORT = 8472
DEVICE = f"flannel.{VNI}"
OVERHEAD = 50


class FlannelVxlan(flannel.FlannelBackend):
    name = "flannel-vxlan"
    backend = "vxlan"
    tunnel = DEVICE

    def pod_mtu(self, underlay_mtu: int) -> int:
        return underlay_mtu - OVERHEAD

    def backend_data(self, node: dict) -> dict:
        return {"VNI": VNI, "VtepMAC": node["vtep_mac"]}

    def node_facts(self, cluster: str, name: str) -> dict:
        """A stable, locally administered VTEP MAC for the node (flannel lets the kernel pick
        one and publishes it in the lease; a fixed one lets a batch program peers at once)."""
        digest = hashlib.sha256(f"{cluster}/{name}/vtep".encode()).digest()
        return {"vtep_mac": ":".join(f"{b:02x}" for b in (0x02,) + tuple(digest[:5]))}

    def setup_node(self, rtnl: Rtnl, node: dict, underlay_mtu: int) -> None:
        vtep = str(IPv4Network(node["subnet"]).network_address)
        rtnl.vxlan(DEVICE, IFINDEX.TUNNEL, VNI, node["ip"], IFINDEX.ETH0, PORT,
                   self.pod_mtu(underlay_mtu), node["vtep_mac"])
        rtnl.address(IFINDEX.TUNNEL, vtep, 32, DEVICE)
        bridge.setup_bridge(rtnl, node["subnet"], self.pod_mtu(underlay_mtu))

    def ready(self, rtnl: Rtnl) -> str | None:
        """Why pods cannot be wired on this node yet (CNI STATUS), or None."""
        link = rtnl.link(DEVICE)
        if link is None or not link["up"]:
            return f"{DEVICE} is {'down' if link else 'missing'}: flanneld has not set up this node"
        return None

    def add_peer(self, rtnl: Rtnl, node: dict, peer: dict) -> None:
        vtep = str(IPv4Network(peer["subnet"]).network_address)
        rtnl.neighbour(IFINDEX.TUNNEL, vtep, peer["vtep_mac"], DEVICE)
        rtnl.fdb(IFINDEX.TUNNEL, peer["vtep_mac"], peer["ip"], DEVICE)
        rtnl.route(peer["subnet"], IFINDEX.TUNNEL, gateway=vtep, onlink=True)
