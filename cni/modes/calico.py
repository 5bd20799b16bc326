"""What Calico's three data planes share: IPAM blocks affine to nodes, the pod side
(calico_pod), a blackhole route per own block, natOutgoing, and the CrossSubnet rule.

Each node claims its first block of the pool when the cluster is built and another whenever its
blocks are full; the tunnel address (VXLAN, IPIP) is the first address handed out from the
node's first block, as Calico allocates it. Per peer and per peer block a mode programs one
route: encapsulated (`encap_route`) or, for CrossSubnet peers on the node's own segment and for
BGP, native via the peer's node IP.
"""

from __future__ import annotations

import os

from cni.calico_ipam import BlockStore
from cni.modes import calico_pod
from netsim.kernel.netlink import IFINDEX, RTN_BLACKHOLE, Rtnl

RTPROT_FELIX = 80  # the protocol number Calico's felix marks its routes with


class CalicoIpam:
    """The node's view of the cluster's block store, shaped like HostLocal for netsim."""

    def __init__(self, store: BlockStore, node: str):
        self.store, self.node = store, node
        self.prefixlen = 32

    def session(self):
        return self.store.session()

    def allocate(self, handle: str, ifname: str, requested: str | None = None) -> str:
        return self.store.allocate(self.node, handle, ifname, requested)[0]

    def release(self, handle: str, ifname: str) -> list[str]:
        return self.store.release(self.node, handle, ifname)


class CalicoBackend:
    name = ""
    cni_network = "k8s-pod-network"  # the network name in Calico's CNI config
    backend = "calico"
    tunnel: str | None = None
    overhead = 0
    encap_setting = ""  # the CalicoSpec field (ipip_mode, vxlan_mode) that decides encapsulation

    # -- the cluster ---------------------------------------------------------------------------

    def pod_mtu(self, underlay_mtu: int) -> int:
        return underlay_mtu - self.overhead

    def store(self, cluster, cluster_dir: str) -> BlockStore:
        return BlockStore(os.path.join(cluster_dir, "calico-ipam"), cluster.pod_network,
                          cluster.subnet_len)

    def plan_nodes(self, cluster, cluster_dir: str) -> dict[str, dict]:
        """Each node's first block and, for the tunnelling modes, its tunnel address."""
        store = self.store(cluster, cluster_dir)
        setting = getattr(cluster.calico, self.encap_setting, "Never") \
            if self.encap_setting else "Never"
        plan = {}
        with store.session():
            for node in (n.name for n in cluster.nodes):
                block = store.claim(node)
                plan[node] = {"blocks": [block], "encap": setting}
                if self.tunnel:
                    plan[node]["tunnel_ip"] = store.allocate(
                        node, f"{self.tunnel}-tunnel-addr-{node}", self.tunnel)[0]
        return plan

    def node_facts(self, cluster: str, name: str) -> dict:
        return {}

    def ipam(self, cluster, cluster_dir: str, node_name: str, node: dict) -> CalicoIpam:
        return CalicoIpam(self.store(cluster, cluster_dir), node_name)

    def encapsulate(self, mode_setting: str, node: dict, peer: dict) -> bool:
        """Always: every peer; CrossSubnet: peers on another segment; Never: none."""
        return mode_setting == "Always" or (mode_setting == "CrossSubnet"
                                            and node["segment"] != peer["segment"])

    # -- a node --------------------------------------------------------------------------------

    def setup_node(self, rtnl: Rtnl, node: dict, underlay_mtu: int) -> None:
        for block in node["blocks"]:
            self.own_block(rtnl, block)

    def own_block(self, rtnl: Rtnl, block: str) -> None:
        """`blackhole <block>`: addresses of the block not (yet) given to a pod go nowhere."""
        rtnl.route(block, 0, kind=RTN_BLACKHOLE, proto=RTPROT_FELIX)

    def add_peer(self, rtnl: Rtnl, node: dict, peer: dict) -> None:
        self.peer_blocks(rtnl, node, peer, peer["blocks"], first=True)

    def peer_blocks(self, rtnl: Rtnl, node: dict, peer: dict, blocks: list[str],
                    first: bool = False) -> None:
        """Routes to a peer's blocks (node["encap"] holds the pool's ipipMode or vxlanMode);
        `first` also programs what reaching the peer itself needs (ARP and FDB entries)."""
        for block in blocks:
            if self.encapsulate(node["encap"], node, peer):
                self.encap_route(rtnl, node, peer, block, first)
                first = False
            else:
                rtnl.route(block, IFINDEX.ETH0, gateway=peer["ip"], proto=RTPROT_FELIX)

    def encap_route(self, rtnl: Rtnl, node: dict, peer: dict, block: str, first: bool) -> None:
        raise NotImplementedError  # the modes that tunnel define it

    def blocks_changed(self, cluster, record: dict, node_name: str) -> None:
        """A node took another block (BGP announces it; the other modes route it directly)."""

    def ready(self, rtnl: Rtnl) -> str | None:
        """calico-node has set the node up: its tunnel (where the mode has one) and the
        blackhole of a block affine to it."""
        problem = self.tunnel_problem(rtnl)
        if problem:
            return problem
        if not any(r["type"] == RTN_BLACKHOLE for r in rtnl.routes()):
            return "no block is affine to this node (no blackhole route): calico-node has not " \
                   "set up this node"
        return None

    def tunnel_problem(self, rtnl: Rtnl) -> str | None:
        if self.tunnel and rtnl.link(self.tunnel) is None:
            return f"{self.tunnel} is missing: calico-node has not set up this node"
        return None

    # -- pods ----------------------------------------------------------------------------------

    def host_veth(self, pod: str) -> str:
        return calico_pod.veth_name("default", pod)

    def attach_host(self, rtnl: Rtnl, pod_fd: int, veth: str, index: int, mtu: int, alias: str,
                    ip: str) -> None:
        calico_pod.attach_host_side(rtnl, pod_fd, veth, index, mtu, alias)
        calico_pod.route_to_pod(rtnl, ip, index)

    def after_host(self, node_netns: str | None, veths: list[str]) -> None:
        calico_pod.host_sysctls(node_netns, veths)

    def pod_routes(self, cluster_network: str, node: dict) -> list[tuple[str, str | None]]:
        return calico_pod.ROUTES

    def pod_prefixlen(self, node: dict) -> int:
        return 32

    def cni_config(self, cluster, node: dict, cluster_dir: str, node_dir: str) -> dict:
        """netsim's plugin entry of the node's config list: the node, the pool, the store."""
        return {"type": "netsim", "mode": self.name,
                "node": {"name": os.path.basename(node_dir), "network": cluster.pod_network,
                         "blockSize": cluster.subnet_len, "mtu": self.pod_mtu(cluster.mtu)},
                "ipam": {"type": "netsim-calico-ipam",
                         "dataDir": os.path.join(cluster_dir, "calico-ipam")}}

    # -- files and rules -----------------------------------------------------------------------

    def node_files(self, cluster, node: dict) -> dict[str, str]:
        return {}

    def cluster_files(self, cluster, record: dict) -> dict[str, str]:
        return {}

    def masquerade(self, cluster, node: dict) -> str:
        """natOutgoing: pod traffic leaving the pool is masqueraded (Calico's
        cali-nat-outgoing), traffic between pods is not."""
        pool = cluster.pod_network
        rule = (f"ip saddr {pool} ip daddr != {pool} masquerade fully-random "
                f'comment "cali-nat-outgoing"' if cluster.calico.nat_outgoing else "")
        return f"""table ip calico
delete table ip calico
table ip calico {{
  comment "netsim cluster {cluster.name}: calico natOutgoing"
  chain cali-nat-outgoing {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 return comment "kube-proxy masquerades these"
    {rule}
  }}
}}
"""
