"""What flannel's and Calico's VXLAN data planes share: a VXLAN device with learning off, a
stable VTEP MAC per node, and per peer a permanent ARP entry (peer VTEP address -> VTEP MAC),
then a permanent FDB entry (VTEP MAC -> peer node IP), then onlink routes via the VTEP address
— in that order, so the kernel never has to resolve a gateway over the tunnel."""

from __future__ import annotations

import hashlib

RTPROT_BOOT = 3


class VxlanDevice:
    tunnel: str
    vni: int
    udp_port: int
    mac_prefix = 0x02  # the first octet of the VTEP MACs (locally administered)
    route_proto = RTPROT_BOOT

    def vtep_mac(self, cluster: str, node: str) -> str:
        """A stable, locally administered VTEP MAC (the real daemons let the kernel pick one
        and publish it; a fixed one lets a batch program peers at once)."""
        digest = hashlib.sha256(f"{cluster}/{node}/{self.tunnel}".encode()).digest()
        return ":".join(f"{b:02x}" for b in (self.mac_prefix,) + tuple(digest[:5]))

    def add_device(self, rtnl, node, underlay_mtu: int, address: str) -> None:
        from netsim.kernel.netlink import IFINDEX

        rtnl.vxlan(
            self.tunnel,
            IFINDEX.TUNNEL,
            self.vni,
            node.ip,
            IFINDEX.ETH0,
            self.udp_port,
            self.pod_mtu(underlay_mtu),
            node.vtep_mac,
        )
        rtnl.address(IFINDEX.TUNNEL, address, 32, self.tunnel)

    def reach_vtep(self, rtnl, vtep: str, peer) -> None:
        from netsim.kernel.netlink import IFINDEX

        rtnl.neighbour(IFINDEX.TUNNEL, vtep, peer.vtep_mac, self.tunnel)
        rtnl.fdb(IFINDEX.TUNNEL, peer.vtep_mac, peer.ip, self.tunnel)

    def route_via_vtep(self, rtnl, prefix: str, vtep: str) -> None:
        from netsim.kernel.netlink import IFINDEX

        rtnl.route(prefix, IFINDEX.TUNNEL, gateway=vtep, onlink=True, proto=self.route_proto)

    def describe_vtep(self, run) -> list[tuple[str, str]]:
        return [
            (f"ip neigh show dev {self.tunnel}", run("ip", "neigh", "show", "dev", self.tunnel)),
            (
                f"bridge fdb show dev {self.tunnel}",
                run("bridge", "fdb", "show", "dev", self.tunnel),
            ),
        ]

    def unavailable(self) -> str | None:
        from netsim.kernel import features

        return (
            None
            if features.link_kinds().get("vxlan")
            else "this kernel has no vxlan module (modprobe vxlan)"
        )
