"""The interface every CNI data plane implements, with the defaults most of them share.

A mode has two sides, as on a real cluster:
- the node side, what flanneld or calico-node does: plan each node's facts (lease, blocks,
  VTEP MAC, tunnel address), set up its devices, reach each peer, masquerade, run daemons;
- the pod side, what the CNI plugin does for one pod: named by `pod_side` (cni.bridge for
  flannel's bridge plugin, cni.calico_pod for Calico's), with the MTU, IPAM, routes and the
  node's CNI config this mode gives it.

Everything that describes a mode to a reader (trace, graph, describe, doctor, bench) is asked
of the mode through the attributes and methods below; no other module keeps per-mode tables.
Nothing here imports pyroute2, so topology validation can ask a mode without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cni.wiring import PodSide
    from netsim.kernel.netlink import Rtnl
    from netsim.model import Cluster
    from netsim.record import NodeRecord, Process, Record, TunnelSpec

# fail(field, problem, fix) raises the topology error for a field of the Cluster document
Fail = Callable[[str, str, str], Exception]


class Mode:
    name: str = ""
    family: str = ""  # flannel | calico: which CNI pod side and IPAM the pods get
    daemon: str = ""  # who sets a node up on a real cluster: flanneld | calico-node
    tunnel: str | None = None  # the device traffic to peer nodes' pods crosses, if any
    encapsulation: str | None = None  # vxlan | ipip | udp (flannel's userspace carrier)
    udp_port: int | None = None  # the outer UDP destination port, where there is one
    vni: int | None = None
    overhead: int = 0  # bytes the encapsulation adds: the pod MTU is the underlay's minus this
    cni_network: str = ""  # the network name in the real CNI config
    bgp: bool = False  # runs BGP (route reflectors and external peers need it)
    summary: str = ""  # the data path in one line: "VXLAN VNI 1, UDP 8472"
    # the store prefixes the node daemon watches to reach its peers (flanneld: the leases);
    # a mode with none has its peers programmed by apply
    watches: tuple[str, ...] = ()
    # how Felix's policy finds a pod's packets: by its host-side interface where the pod is
    # routed (Calico), by its address where it hangs on a bridge (netsim/policy_table.py)
    workload_dispatch: str = "address"

    # -- this host -----------------------------------------------------------------------------

    def unavailable(self) -> str | None:
        """Why this host cannot run the mode, with what to install; None when it can."""
        return None

    def data_path(self) -> str:
        """How the mode would run on this host (netsim doctor)."""
        why = self.unavailable()
        return f"unavailable: {why}" if why else self.summary

    # -- the topology --------------------------------------------------------------------------

    def defaults(self) -> dict[str, str]:
        """The Calico pool's encapsulation settings this mode implies (Calico modes only)."""
        return {}

    def validate(self, cluster: Cluster, fail: Fail) -> list[str]:
        """Refuse (by raising fail(...)) what this mode cannot build; return warnings."""
        return []

    def pod_mtu(self, underlay_mtu: int) -> int:
        return underlay_mtu - self.overhead

    # -- how a node reaches a peer (for readers) -----------------------------------------------

    def encapsulates(self, node: NodeRecord, peer: NodeRecord) -> bool:
        """Whether traffic from node to peer's pods is encapsulated."""
        return self.encapsulation is not None

    def tunnel_device(self, node: NodeRecord) -> str | None:
        """The device a node's routes to encapsulated peers name (eth0 for a tc carrier)."""
        return self.tunnel

    def carrier_text(self, node: NodeRecord) -> str:
        """What carries the encapsulation on this node, when the mode has a choice."""
        return ""

    # -- the node side -------------------------------------------------------------------------

    def plan_nodes(
        self, cluster: Cluster, cluster_dir: str, names: list[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each node's facts (NodeRecord fields): its subnet or blocks, VTEP MAC, ..."""
        raise NotImplementedError

    def setup_node(self, rtnl: Rtnl, node: NodeRecord, underlay_mtu: int) -> None:
        """The node's own devices, addresses and routes (queued on rtnl)."""

    def start_node(self, cluster_dir: str, node: NodeRecord) -> None:
        """A carrier outside netlink (a tc eBPF program), once the node's links exist."""

    def stop_node(self, node: NodeRecord) -> None:
        """Undo start_node."""

    def add_peer(self, rtnl: Rtnl, node: NodeRecord, peer: NodeRecord) -> None:
        """What node needs to reach peer's pods (queued on rtnl)."""

    def remove_peer(self, rtnl: Rtnl, node: NodeRecord, peer) -> None:
        """Undo add_peer for a peer that left (queued on rtnl)."""

    def peers_in_kernel(self, rtnl: Rtnl, node: NodeRecord, network: str) -> dict:
        """The peers node's kernel is programmed to reach, read back (a restarted daemon
        starts from them): key -> peer, as the node's daemon keys them."""
        return {}

    def tunnel_spec(
        self, cluster: Cluster, node: NodeRecord, peers: list[NodeRecord]
    ) -> TunnelSpec | None:
        """The userspace carrier the node's agent serves, if the mode uses one here."""
        return None

    def masquerade(self, cluster: Cluster, node: NodeRecord) -> str:
        """The node's nftables masquerade table (nft -f text)."""
        raise NotImplementedError

    def node_files(self, cluster: Cluster, node: NodeRecord) -> dict[str, str]:
        """Files the real daemon keeps on the node's disk (flannel's subnet.env)."""
        return {}

    def store_keys(self, cluster: Cluster, record: Record) -> dict[str, str]:
        """The mode's shared facts as the real system keeps them in etcd, key -> value,
        written once the nodes are built (flannel's network config; Calico's IP pool, nodes,
        BGP configuration and peers). What the mode claims at plan time (flannel's leases,
        Calico's blocks) it writes itself, with a transaction, in plan_nodes."""
        return {}

    def lease(self, node: NodeRecord) -> tuple[str, str] | None:
        """The key and value a node holds under an etcd lease its agent renews (flannel's
        subnet lease), or None."""
        return None

    def forget_node(self, store, cluster: Cluster, cluster_dir: str, node: NodeRecord) -> None:
        """A node left: delete what the store holds for it, so that every peer's daemon
        drops it (flannel: its subnet lease)."""
        held = self.lease(node) if node.subnet else None
        if held:
            store.delete(held[0])

    def nodes_changed(self, cluster: Cluster, record: Record) -> None:
        """Nodes joined or left: what outside the nodes follows them (BGP routers)."""

    def publish(self, store, cluster: Cluster, record: Record) -> list[str]:
        """Write the mode's keys to the cluster's etcd once its nodes are built, and on every
        later apply those that are missing or differ (lost with etcd's data, or deleted by
        hand); the keys written."""
        wanted = self.store_keys(cluster, record)
        held = store.get_many(list(wanted))
        changed = {
            k: v for k, v in wanted.items() if held[k] is None or held[k].value.decode() != v
        }
        if changed:
            store.put_all(changed)
        return list(changed)

    def start_cluster(
        self,
        cluster: Cluster,
        record: Record,
        cluster_dir: str,
        started: Callable[[Process], None],
        progress: Callable[[str], None],
    ) -> None:
        """Daemons that need every node up first (BIRD); `started` records each at once."""

    def restart_node(self, cluster: Cluster, record: Record, cluster_dir: str, node) -> None:
        """A stopped node's daemons outside the agent (BIRD), started again."""

    def describe_node(
        self, record: Record, node: NodeRecord, run: Callable[..., str]
    ) -> list[tuple[str, str]]:
        """Sections for `describe node`: (title, text); run(*argv) runs a tool in the node."""
        return []

    # -- Calico's blocks (other modes have none) -----------------------------------------------

    def new_blocks(
        self, cluster: Cluster, cluster_dir: str, record: Record
    ) -> dict[str, list[str]]:
        """Blocks nodes claimed since the record noted theirs: node -> blocks."""
        return {}

    # -- the pod side --------------------------------------------------------------------------

    @property
    def pod_side(self) -> PodSide:
        raise NotImplementedError

    def ipam(self, cluster: Cluster, cluster_dir: str, node: NodeRecord):
        """The node's address allocator, with session(), allocate() and release()."""
        raise NotImplementedError

    def host_veth(self, namespace: str, pod: str) -> str:
        raise NotImplementedError

    def pod_routes(self, cluster: Cluster, node: NodeRecord) -> list[tuple[str, str | None]]:
        raise NotImplementedError

    def pod_prefixlen(self, node: NodeRecord) -> int:
        raise NotImplementedError

    def cni_config(
        self, cluster: Cluster, node: NodeRecord, cluster_dir: str, node_dir: str
    ) -> dict:
        """netsim's plugin entry in the node's CNI config list."""
        raise NotImplementedError
