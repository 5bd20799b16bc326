"""flannel's legacy udp backend: a TUN `flannel0` (MTU underlay-28) holding the node's subnet
address with the whole Network's prefix, so one route sends every other node's pods to it; the
node agent reads each packet and sends it as a UDP datagram to the owning node's port 8285,
which writes it to its own flannel0. Every packet crosses into userspace twice, which is why
flannel deprecated it, and why netsim keeps it: the benchmark shows what that costs.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Network

from netsim.modes import flannel

PORT = 8285


class FlannelUdp(flannel.FlannelBackend):
    name = "flannel-udp"
    backend = "udp"
    tunnel = "flannel0"
    encapsulation = "udp"
    udp_port = PORT
    overhead = 28
    summary = f"TUN, UDP {PORT} by the node agent"

    def unavailable(self) -> str | None:
        return None if os.path.exists("/dev/net/tun") else "/dev/net/tun is missing (modprobe tun)"

    def setup_node(self, rtnl, node, underlay_mtu: int) -> None:
        from cni import bridge

        bridge.setup_bridge(rtnl, node.subnet, self.pod_mtu(underlay_mtu))

    def tunnel_spec(self, cluster, node, peers):
        """Nothing in the kernel reaches peers: the agent's peer table does (flannel0's
        prefix, the whole Network, covers them)."""
        from netsim.record import TunnelSpec

        network = IPv4Network(cluster.pod_network)
        return TunnelSpec(
            "udp",
            self.tunnel,
            node.ip,
            self.pod_mtu(cluster.mtu),
            {peer.subnet: peer.ip for peer in peers},
            f"{IPv4Network(node.subnet).network_address}/{network.prefixlen}",
        )
