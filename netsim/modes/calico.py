"""What Calico's three data planes share: IPAM blocks affine to nodes, the pod side
(cni.calico_pod), a blackhole route per own block, natOutgoing, and the CrossSubnet rule.

Each node claims its first block of the pool when the cluster is built and another whenever its
blocks are full; the tunnel address (VXLAN, IPIP) is the first address handed out from the
node's first block, as Calico allocates it. Per peer and per peer block a mode programs one
route: encapsulated (`encap_route`) or, for CrossSubnet peers on the node's own segment and for
BGP, native via the peer's node IP.
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

from netsim.modes.base import Mode

RTPROT_FELIX = 80  # the protocol number Calico's felix marks its routes with
CNI_NETWORK = "k8s-pod-network"  # the network name in Calico's CNI config
RESOURCES = "/calico/resources/v3/projectcalico.org/"  # v3 resources in Calico's etcdv3 store
NODES = RESOURCES + "nodes/"
AFFINITIES = "/calico/ipam/v2/host/"  # each node's claim on its IPAM blocks
SEGMENT_LABEL = "netsim.io/segment"  # on Node resources: external BGP peers select by it


class CalicoPeer(NamedTuple):
    """Another node as felix reads it from the store: its Node resource and its blocks."""

    name: str
    ip: str
    segment: str
    tunnel_ip: str
    vtep_mac: str
    blocks: tuple[str, ...]


_decoded: dict[str, tuple[int, dict]] = {}  # key -> (revision, value): felix syncs often


def decoded(kv) -> dict:
    """The key's value as JSON, decoded once per revision of it (a node's felix and confd
    read every block and Node at each sync; only one of them changed)."""
    held = _decoded.get(kv.key)
    if held is None or held[0] != kv.mod_revision:
        held = _decoded[kv.key] = (kv.mod_revision, kv.json())
    return held[1]


def block_order(block: str) -> tuple[int, ...]:
    return tuple(int(x) for x in block.replace("/", ".").split("."))


def affine_blocks(affinities: dict) -> dict[str, list[str]]:
    """node -> its blocks (in address order), from the IPAM affinity keys
    (/calico/ipam/v2/host/<node>/ipv4/block/<net>-<len>, as confd's bird_aggr watches them):
    small, and written only when a node claims or releases a block, unlike the blocks."""
    found: dict[str, list[str]] = {}
    for kv in affinities.values():
        node, _, rest = kv.key[len(AFFINITIES) :].partition("/ipv4/block/")
        if rest and decoded(kv).get("state", "confirmed") == "confirmed":
            found.setdefault(node, []).append(rest.replace("-", "/"))
    return {node: sorted(b, key=block_order) for node, b in found.items()}


def node_resources(resources: dict) -> dict[str, dict]:
    """name -> the v3 Node resource, from the store's resources."""
    return {
        kv.key[len(NODES) :]: decoded(kv) for kv in resources.values() if kv.key.startswith(NODES)
    }


def peers_of(resources: dict, affinities: dict, me: str) -> tuple[dict[str, CalicoPeer], set[str]]:
    """(every other node with an address, as felix reaches it; this node's own blocks)."""
    affine = affine_blocks(affinities)
    peers = {}
    for name, node in node_resources(resources).items():
        spec = node.get("spec", {})
        bgp = spec.get("bgp", {})
        address = bgp.get("ipv4Address", "").split("/")[0]
        if name == me or not address:
            continue
        peers[name] = CalicoPeer(
            name,
            address,
            node.get("metadata", {}).get("labels", {}).get(SEGMENT_LABEL, ""),
            spec.get("ipv4VXLANTunnelAddr") or bgp.get("ipv4IPIPTunnelAddr", ""),
            spec.get("vxlanTunnelMACAddr", ""),
            tuple(affine.get(name, ())),
        )
    return peers, set(affine.get(me, ()))


class CalicoIpam:
    """The node's view of the cluster's block store, shaped like HostLocal for netsim."""

    def __init__(self, store, node: str):
        self.store, self.node = store, node

    def session(self):
        return self.store.session()

    def allocate(self, handle: str, ifname: str, requested: str | None = None) -> str:
        """An address for the pod netsim names `handle` (its container ID is its name), held
        under Calico's handle `k8s-pod-network.<containerID>`."""
        from cni.calico_ipam import pod_handle
        from netsim.services import NAMESPACE

        now = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())
        attrs = {"namespace": NAMESPACE, "pod": handle, "timestamp": now}
        return self.store.allocate(
            self.node, pod_handle(CNI_NETWORK, handle), ifname, requested, attrs
        )[0]

    def release(self, handle: str, ifname: str) -> list[str]:
        from cni.calico_ipam import pod_handle

        return self.store.release(self.node, pod_handle(CNI_NETWORK, handle), ifname)


def block_store(cluster, cluster_dir: str, node_netns: str | None = None):
    """The cluster's Calico IPAM, in its etcd as the CLI reaches it (or a node, from its
    namespace); the per-node locks in the cluster's state directory (they go with it)."""
    from cni.calico_ipam import BlockStore
    from netsim import store

    return BlockStore(
        store.of(cluster.name, cluster.datastore, node_netns),
        cluster.pod_network,
        cluster.subnet_len,
        lock_dir=os.path.join(cluster_dir, "calico-ipam"),
    )


def resource(
    kind: str, plural: str, name: str, spec: dict, labels: dict | None = None
) -> dict[str, str]:
    """{key: value} of a Calico v3 resource as Calico's etcdv3 backend keeps it."""
    metadata = {"name": name, **({"labels": labels} if labels else {})}
    value = {"kind": kind, "apiVersion": "projectcalico.org/v3", "metadata": metadata}
    return {f"{RESOURCES}{plural}/{name}": json.dumps({**value, "spec": spec})}


class CalicoBackend(Mode):
    family = "calico"
    workload_dispatch = "iface"
    daemon = "calico-node"
    cni_network = CNI_NETWORK
    encap_setting = ""  # the CalicoSpec field (ipip_mode, vxlan_mode) that decides encapsulation
    watches = (AFFINITIES, RESOURCES)  # felix and confd: block affinities, the Node resources

    # -- the cluster ---------------------------------------------------------------------------

    def setting(self, cluster) -> str:
        """The pool's ipipMode or vxlanMode for this mode's encapsulation; Never for BGP."""
        return getattr(cluster.calico, self.encap_setting) if self.encap_setting else "Never"

    def plan_nodes(self, cluster, cluster_dir: str, names=None) -> dict[str, dict]:
        """Each node's (of `names`, else all) first block and, for the tunnelling modes, its
        tunnel address."""
        store = block_store(cluster, cluster_dir)
        plan = {}
        with store.session():
            for node in names if names is not None else [n.name for n in cluster.nodes]:
                plan[node] = {"blocks": [store.claim(node)], "encap": self.setting(cluster)}
                if self.tunnel:
                    plan[node]["tunnel_ip"] = store.allocate(
                        node,
                        f"{self.encapsulation}-tunnel-addr-{node}",
                        self.tunnel,
                        attrs={"type": f"{self.encapsulation}TunnelAddress"},
                    )[0]
        return plan

    def ipam(self, cluster, cluster_dir: str, node) -> CalicoIpam:
        return CalicoIpam(block_store(cluster, cluster_dir, node.netns), node.name)

    def encapsulates(self, node, peer) -> bool:
        """Always: every peer; CrossSubnet: peers on another segment; Never: none."""
        return node.encap == "Always" or (
            node.encap == "CrossSubnet" and node.segment != peer.segment
        )

    # -- a node --------------------------------------------------------------------------------

    def setup_node(self, rtnl, node, underlay_mtu: int) -> None:
        for block in node.blocks:
            self.own_block(rtnl, block)

    def own_block(self, rtnl, block: str) -> None:
        """`blackhole <block>`: addresses of the block not (yet) given to a pod go nowhere."""
        from netsim.kernel.netlink import RTN_BLACKHOLE

        rtnl.route(block, 0, kind=RTN_BLACKHOLE, proto=RTPROT_FELIX)

    def add_peer(self, rtnl, node, peer) -> None:
        self.reach_peer(rtnl, node, peer, peer.blocks)

    def remove_peer(self, rtnl, node, peer, keep=None) -> None:
        """Undo add_peer, except what `keep` (the same peer as it is now) still needs."""
        for block in peer.blocks:
            if keep is None or block not in keep.blocks:
                rtnl.route_delete(block)
                if self.encapsulates(node, peer):
                    self.forget_route(node, peer, block)
        same = keep is not None and keep[:5] == peer[:5] and keep.blocks
        if self.encapsulates(node, peer) and not same:
            self.forget_vtep(rtnl, peer)

    def forget_route(self, node, peer, block: str) -> None:
        """What encap_route programmed outside the routing table (the eBPF carrier's map)."""

    def forget_vtep(self, rtnl, peer) -> None:
        """What reaching the peer itself took (VXLAN: its ARP and FDB entries)."""

    def sweep(self, rtnl, node, peers: dict, own: set[str]) -> None:
        """A starting felix: remove the routes it marked that neither `own` nor a peer wants
        (a node or block that left while it was away)."""
        wanted = own | {b for p in peers.values() for b in p.blocks}
        for route in rtnl.routes():
            if route["proto"] == RTPROT_FELIX and route["dst"] not in wanted:
                rtnl.route_delete(route["dst"])

    def reach_peer(self, rtnl, node, peer, blocks: list[str], first: bool = True) -> None:
        """Routes to a peer's blocks; `first` also programs what reaching the peer itself
        needs (ARP and FDB entries)."""
        from netsim.kernel.netlink import IFINDEX

        for block in blocks:
            if self.encapsulates(node, peer):
                self.encap_route(rtnl, node, peer, block, first)
                first = False
            else:
                rtnl.route(block, IFINDEX.ETH0, gateway=peer.ip, proto=RTPROT_FELIX)

    def encap_route(self, rtnl, node, peer, block: str, first: bool) -> None:
        raise NotImplementedError  # the modes that tunnel define it

    def forget_node(self, store, cluster, cluster_dir: str, node) -> None:
        """Its Node resource, blocks, affinities and tunnel handle: felix on every peer drops
        its routes, confd its BGP session."""
        store.delete(f"{NODES}{node.name}")
        block_store(cluster, cluster_dir).forget_node(node.name)

    def new_blocks(self, cluster, cluster_dir: str, record) -> dict[str, list[str]]:
        affinity = block_store(cluster, cluster_dir).affinity()
        found: dict[str, list[str]] = {}
        for block, owner in affinity.items():
            if owner in record.nodes and block not in record.nodes[owner].blocks:
                found.setdefault(owner, []).append(block)
        return found

    def describe_node(self, record, node, run) -> list[tuple[str, str]]:
        if not self.tunnel:
            return []
        return [(f"ip -d link show {self.tunnel}", run("ip", "-d", "link", "show", self.tunnel))]

    # -- pods ----------------------------------------------------------------------------------

    @property
    def pod_side(self):
        from cni.calico_pod import CalicoPodSide

        return CalicoPodSide()

    def host_veth(self, namespace: str, pod: str) -> str:
        from cni.calico_pod import veth_name

        return veth_name(namespace, pod)

    def pod_routes(self, cluster, node) -> list[tuple[str, str | None]]:
        from cni.calico_pod import ROUTES

        return ROUTES

    def pod_prefixlen(self, node) -> int:
        return 32

    def cni_config(self, cluster, node, cluster_dir: str, node_dir: str) -> dict:
        """netsim's plugin entry of the node's config list: the node, the pool, the store, and
        what the node must have before pods are wired (the tunnel device, or its address)."""
        ready = {"tunnel": self.tunnel_device(node) if self.tunnel_device(node) != "eth0" else None}
        if self.tunnel and ready["tunnel"] is None:
            ready["tunnelAddress"] = node.tunnel_ip
        return {
            "type": "netsim",
            "mode": self.name,
            "node": {
                "name": node.name,
                "network": cluster.pod_network,
                "blockSize": cluster.subnet_len,
                "mtu": self.pod_mtu(cluster.mtu),
                **ready,
            },
            "ipam": {
                "type": "netsim-calico-ipam",
                **etcd_fields(cluster, node),
                "dataDir": os.path.join(cluster_dir, "calico-ipam"),  # the nodes' locks
            },
        }

    # -- the store -----------------------------------------------------------------------------

    def store_keys(self, cluster, record) -> dict[str, str]:
        """Calico's v3 resources: the IP pool, a Node per node (its BGP address, its tunnel
        address, route reflector cluster ID), the default BGPConfiguration, and BGPPeers for
        the route reflectors and the top-of-rack routers."""
        calico = cluster.calico
        reflectors = set(calico.reflectors)
        pool = {
            "cidr": cluster.pod_network,
            "blockSize": cluster.subnet_len,
            "ipipMode": calico.ipip_mode,
            "vxlanMode": calico.vxlan_mode,
            "natOutgoing": calico.nat_outgoing,
            "nodeSelector": "all()",
        }
        keys = resource("IPPool", "ippools", "default-ipv4-ippool", pool)
        for name, node in record.nodes.items():
            bgp = {"ipv4Address": f"{node.ip}/{node.prefixlen}"}
            spec: dict = {"bgp": bgp}
            if node.tunnel_ip and self.encapsulation == "ipip":
                bgp["ipv4IPIPTunnelAddr"] = node.tunnel_ip
            if node.tunnel_ip and self.encapsulation == "vxlan":
                spec["ipv4VXLANTunnelAddr"] = node.tunnel_ip
            if self.encapsulation == "vxlan" and node.vtep_mac:
                spec["vxlanTunnelMACAddr"] = node.vtep_mac
            labels = {SEGMENT_LABEL: node.segment}
            if name in reflectors:  # each reflector its own cluster, as BIRD is configured
                bgp["routeReflectorClusterID"] = node.ip
                labels["route-reflector"] = "true"
            keys |= resource("Node", "nodes", name, spec, labels)
        config = {
            "logSeverityScreen": "Info",
            "nodeToNodeMeshEnabled": not reflectors,
            "asNumber": calico.asn,
        }
        keys |= resource("BGPConfiguration", "bgpconfigurations", "default", config)
        if reflectors:
            peers = {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}
            keys |= resource("BGPPeer", "bgppeers", "peer-with-route-reflectors", peers)
        for name, client in record.clients.items():
            if client.asn:  # a top-of-rack router: the nodes of its segment peer with it
                peer = {
                    "nodeSelector": f"{SEGMENT_LABEL} == '{client.segment}'",
                    "peerIP": client.ip,
                    "asNumber": client.asn,
                }
                keys |= resource("BGPPeer", "bgppeers", name, peer)
        return keys

    # -- rules ---------------------------------------------------------------------------------

    def masquerade(self, cluster, node) -> str:
        """natOutgoing: pod traffic leaving the pool is masqueraded (Calico's
        cali-nat-outgoing), traffic between pods is not."""
        pool = cluster.pod_network
        rule = (
            f"ip saddr {pool} ip daddr != {pool} masquerade fully-random "
            f'comment "cali-nat-outgoing"'
            if cluster.calico.nat_outgoing
            else ""
        )
        # the table is Felix's: its policy chains live in it too (netsim/policy_table.py),
        # so only this chain is made again
        return f"""table ip calico {{
  chain cali-nat-outgoing {{ type nat hook postrouting priority srcnat; policy accept; }}
}}
flush chain ip calico cali-nat-outgoing
table ip calico {{
  chain cali-nat-outgoing {{
    meta mark & 0x4000 == 0x4000 return comment "kube-proxy masquerades these"
    {rule}
  }}
}}
"""


def etcd_fields(cluster, node) -> dict:
    """What the CNI plugin in the node needs to reach the cluster's etcd: netsim's own over
    the underlay from the node's namespace, or the user's from where they named."""
    from netsim import store

    reach = store.of(cluster.name, cluster.datastore, node.netns)
    return {"etcdEndpoints": list(reach.endpoints), "etcdNetns": reach.netns}
