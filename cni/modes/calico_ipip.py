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

from cni.modes.calico import RTPROT_FELIX, CalicoBackend
from netsim.kernel.netlink import IFINDEX, Rtnl

DEVICE = "tunl0"
CARRIERS = ("kernel", "ebpf", "userspace")


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
    return "", (f"no ipip module (modprobe ipip), no eBPF carrier "
                f"({ipip_bpf.unavailable_reason()}) and no /dev/net/tun (modprobe tun)")


class CalicoIpip(CalicoBackend):
    name = "calico-ipip"
    tunnel = DEVICE
    overhead = 20
    encap_setting = "ipip_mode"  # the pool's ipipMode

    def plan_nodes(self, cluster, cluster_dir: str) -> dict[str, dict]:
        plan = super().plan_nodes(cluster, cluster_dir)
        carrier, why = choose_carrier(cluster.calico.ipip_carrier)
        if not carrier:
            from netsim.errors import NetsimError

            raise NetsimError(f"calico-ipip cannot run here: {why}")
        for facts in plan.values():
            facts["carrier"] = carrier
        return plan


    def setup_node(self, rtnl: Rtnl, node: dict, underlay_mtu: int) -> None:
        mtu = self.pod_mtu(underlay_mtu)
        if node["carrier"] == "kernel":  # the module made tunl0 in every namespace
            rtnl.link_set(0, DEVICE, mtu=mtu)
            rtnl.commit()
            node["tunnel_index"] = rtnl.link(DEVICE)["index"]
            rtnl.address(node["tunnel_index"], node["tunnel_ip"], 32, DEVICE)
        elif node["carrier"] == "ebpf":
            rtnl.address(IFINDEX.LO, node["tunnel_ip"], 32, "lo")
        super().setup_node(rtnl, node, underlay_mtu)

    def start_node(self, cluster_dir: str, node: dict) -> None:
        if node["carrier"] == "ebpf":
            from netsim.kernel import ipip_bpf

            ipip_bpf.attach(node["netns"], "eth0", ipip_bpf.build(), node["ip"])

    def stop_node(self, node: dict) -> None:
        if node.get("carrier") == "ebpf":
            from netsim.kernel import ipip_bpf

            ipip_bpf.detach(node["netns"], "eth0")

    def tunnel_spec(self, node: dict, peers: list[dict], underlay_mtu: int) -> dict | None:
        """What the agent serves for the userspace carrier: tunl0 and its peer table."""
        if node["carrier"] != "userspace":
            return None
        table = {block: peer["ip"] for peer in peers if self.encapsulate(node["encap"], node,
                                                                         peer)
                 for block in peer["blocks"]}
        return {"kind": "ipip", "name": DEVICE, "local_ip": node["ip"],
                "mtu": self.pod_mtu(underlay_mtu), "peers": table,
                "address": f"{node['tunnel_ip']}/32"}

    def encap_route(self, rtnl: Rtnl, node: dict, peer: dict, block: str, first: bool) -> None:
        # tunl0 (kernel or the agent's TUN: its index is looked up once it exists), or eth0
        # where the eBPF carrier encapsulates on the way out
        index = IFINDEX.ETH0 if node["carrier"] == "ebpf" else node["tunnel_index"]
        gateway = peer["ip"]
        if node["carrier"] == "ebpf" and peer["segment"] != node["segment"] and \
                node.get("gateway"):
            # eth0, unlike tunl0, needs a neighbour on its own link: a peer in another rack is
            # reached through this rack's router (the outer destination is in the BPF map)
            gateway = node["gateway"]
        rtnl.route(block, index, gateway=gateway, onlink=True, proto=RTPROT_FELIX)
        if node["carrier"] == "ebpf":
            from netsim.kernel import ipip_bpf

            ipip_bpf.add_peer(node["netns"], block, peer["ip"])

    def tunnel_problem(self, rtnl: Rtnl) -> str | None:
        """tunl0 (kernel or userspace carrier), or the eBPF carrier's tunnel address on lo."""
        if rtnl.link(DEVICE) is not None or any(
                index == IFINDEX.LO and prefixlen == 32 for index, _, prefixlen in
                rtnl.addresses()):
            return None
        return "neither tunl0 nor the eBPF carrier's tunnel address on lo: calico-node has " \
               "not set up this node"
