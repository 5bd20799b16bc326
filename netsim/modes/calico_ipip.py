"""Calico's IPIP data plane: pod traffic to a peer's block leaves as IP protocol 4 between the
node IPs, MTU underlay-20, routes `<peer block> via <peer node IP> dev tunl0 onlink`.

Three carriers put the same packets on the wire; the first this host can run is used (or the
topology's `ipipCarrier`), and `netsim doctor` / `describe node` name it:
- kernel: the ipip module's tunl0, as on any ordinary Linux host;
- ebpf: where the module is missing, a tc program on eth0 adds and strips the outer header
  (netsim/kernel/ipip_bpf.py); routes keep their shape with eth0 in tunl0's place (for a peer
  in another rack, via the rack's router: eth0 must resolve its next hop), and the tunnel
  address sits on lo;
- userspace: a TUN named tunl0 served by the node agent through a raw protocol-4 socket
  (netsim/userspace_tunnel.py), the last resort and the slowest.
"""

from __future__ import annotations

import os

from netsim.errors import NetsimError
from netsim.modes.calico import RTPROT_FELIX, CalicoBackend

DEVICE = "tunl0"
CARRIERS = {"kernel": "kernel tunl0", "ebpf": "tc eBPF on eth0", "userspace": "userspace TUN"}


def choose_carrier(wanted: str = "auto") -> tuple[str, str]:
    """(carrier, why): the kernel's ipip if present, else eBPF, else userspace."""
    from netsim.kernel import features, ipip_bpf

    kernel = features.link_kinds().get("ipip", False)
    if wanted == "kernel" and not kernel:
        return "", "this kernel has no ipip module (modprobe ipip, or use ipipCarrier ebpf)"
    if wanted == "ebpf" and not ipip_bpf.available():
        return "", ipip_bpf.unavailable_reason() or ""
    if wanted == "userspace" and not os.path.exists("/dev/net/tun"):
        return "", "/dev/net/tun is missing: the userspace carrier needs the tun module"
    if wanted != "auto":
        return wanted, "chosen in the topology"
    if kernel:
        return "kernel", "the kernel's ipip module"
    if ipip_bpf.available():
        return "ebpf", "no ipip module here: tc eBPF encapsulator on eth0"
    if os.path.exists("/dev/net/tun"):
        return "userspace", f"no ipip module and no eBPF carrier ({ipip_bpf.unavailable_reason()})"
    return "", (
        f"no ipip module (modprobe ipip), no eBPF carrier "
        f"({ipip_bpf.unavailable_reason()}) and no /dev/net/tun (modprobe tun)"
    )


class CalicoIpip(CalicoBackend):
    name = "calico-ipip"
    tunnel = DEVICE
    encapsulation = "ipip"
    overhead = 20
    summary = "IPIP, IP protocol 4"
    encap_setting = "ipip_mode"  # the pool's ipipMode

    def unavailable(self) -> str | None:
        carrier, why = choose_carrier()
        return None if carrier else why

    def data_path(self) -> str:
        carrier, why = choose_carrier()
        return f"carrier {carrier}: {why}" if carrier else f"unavailable: {why}"

    def plan_nodes(self, cluster, cluster_dir: str, names=None) -> dict[str, dict]:
        carrier, why = choose_carrier(cluster.calico.ipip_carrier)
        if not carrier:
            raise NetsimError(f"calico-ipip cannot run here: {why}")
        plan = super().plan_nodes(cluster, cluster_dir, names)
        for facts in plan.values():
            facts["carrier"] = carrier
        return plan

    def tunnel_device(self, node) -> str | None:
        return "eth0" if node.carrier == "ebpf" else DEVICE

    def carrier_text(self, node) -> str:
        return CARRIERS.get(node.carrier, node.carrier)

    def setup_node(self, rtnl, node, underlay_mtu: int) -> None:
        from netsim.kernel.netlink import IFINDEX

        mtu = self.pod_mtu(underlay_mtu)
        if node.carrier == "kernel":  # the module made tunl0 in every namespace
            rtnl.link_set(0, DEVICE, mtu=mtu)
            rtnl.commit()
            node.tunnel_index = rtnl.link(DEVICE)["index"]
            rtnl.address(node.tunnel_index, node.tunnel_ip, 32, DEVICE)
        elif node.carrier == "ebpf":
            rtnl.address(IFINDEX.LO, node.tunnel_ip, 32, "lo")
        super().setup_node(rtnl, node, underlay_mtu)

    def start_node(self, cluster_dir: str, node) -> None:
        if node.carrier == "ebpf":
            from netsim.kernel import ipip_bpf

            ipip_bpf.attach(node.netns, "eth0", ipip_bpf.build(), node.ip)

    def stop_node(self, node) -> None:
        if node.carrier == "ebpf":
            from netsim.kernel import ipip_bpf

            ipip_bpf.detach(node.netns, "eth0")

    def tunnel_spec(self, cluster, node, peers):
        """What the agent serves for the userspace carrier: tunl0 and its peer table."""
        from netsim.record import TunnelSpec

        if node.carrier != "userspace":
            return None
        table = {
            block: peer.ip
            for peer in peers
            if self.encapsulates(node, peer)
            for block in peer.blocks
        }
        return TunnelSpec(
            "ipip", DEVICE, node.ip, self.pod_mtu(cluster.mtu), table, f"{node.tunnel_ip}/32"
        )

    def encap_route(self, rtnl, node, peer, block: str, first: bool) -> None:
        from netsim.kernel.netlink import IFINDEX

        # tunl0 (kernel or the agent's TUN: its index is looked up once it exists), or eth0
        # where the eBPF carrier encapsulates on the way out
        index = IFINDEX.ETH0 if node.carrier == "ebpf" else node.tunnel_index
        gateway = peer.ip
        if node.carrier == "ebpf" and peer.segment != node.segment and node.gateway:
            # eth0, unlike tunl0, needs a neighbour on its own link: a peer in another rack is
            # reached through this rack's router (the outer destination is in the BPF map)
            gateway = node.gateway
        rtnl.route(block, index, gateway=gateway, onlink=True, proto=RTPROT_FELIX)
        if node.carrier == "ebpf":
            from netsim.kernel import ipip_bpf

            ipip_bpf.add_peer(node.netns, block, peer.ip)

    def forget_route(self, node, peer, block: str) -> None:
        if node.carrier == "ebpf":
            from netsim.kernel import ipip_bpf

            ipip_bpf.remove_peer(node.netns, block, peer.ip)

    def sweep(self, rtnl, node, peers: dict, own: set[str]) -> None:
        """Also the eBPF carrier's map entries no peer wants any more."""
        super().sweep(rtnl, node, peers, own)
        if node.carrier == "ebpf":
            from netsim.kernel import ipip_bpf

            wanted = {(b, p.ip) for p in peers.values() for b in p.blocks}
            for block, ip in ipip_bpf.peers(node.netns).items():
                if (block, ip) not in wanted:
                    ipip_bpf.remove_peer(node.netns, block, ip)

    def describe_node(self, record, node, run) -> list[tuple[str, str]]:
        sections = super().describe_node(record, node, run) if node.carrier != "ebpf" else []
        if node.carrier == "ebpf":
            sections.append(
                (
                    "tc filter show dev eth0 egress",
                    run("tc", "filter", "show", "dev", "eth0", "egress"),
                )
            )
        return sections
