"""flannel's legacy udp backend: a TUN `flannel0` (MTU underlay-28) holding the node's subnet
address with the whole Network's prefix, so one route sends every other node's pods to it; the
node agent reads each packet and sends it as a UDP datagram to the owning node's port 8285,
which writes it to its own flannel0. Every packet crosses into userspace twice, which is why
flannel deprecated it, and why netsim keeps it: the benchmark shows what that costs.
"""

from __future__ import annotations

from ipaddress import IPv4Network

from cni.modes import bridge, flannel
from netsim.kernel.netlink import Rtnl

DEVICE = "flannel0"
PORT = 8285
OVERHEAD = 28


class FlannelUdp(flannel.FlannelBackend):
    name = "flannel-udp"
    backend = "udp"
    tunnel = DEVICE

    def pod_mtu(self, underlay_mtu: int) -> int:
        return underlay_mtu - OVERHEAD

    def setup_node(self, rtnl: Rtnl, node: dict, underlay_mtu: int) -> None:
        bridge.setup_bridge(rtnl, node["subnet"], self.pod_mtu(underlay_mtu))

    def tunnel_spec(self, node: dict, peers: list[dict], underlay_mtu: int) -> dict:
        network = IPv4Network(node["network"])
        return {"kind": "udp", "name": DEVICE, "local_ip": node["ip"],
                "mtu": self.pod_mtu(underlay_mtu),
                "peers": {peer["subnet"]: peer["ip"] for peer in peers},
                "address": f"{IPv4Network(node['subnet']).network_address}/{network.prefixlen}"}

    def add_peer(self, rtnl: Rtnl, node: dict, peer: dict) -> None:
        """Nothing in the kernel: the agent's peer table routes (flannel0's prefix covers it)."""

    def ready(self, rtnl: Rtnl) -> str | None:
        link = rtnl.link(DEVICE)
        return None if link and link["up"] else f"{DEVICE} is missing: flanneld is not running"
