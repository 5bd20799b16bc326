"""Calico's BGP data plane: no encapsulation. One BIRD 2 per node (netsim/bgp/bird.py), iBGP
on port 179 in AS 64512 — a full mesh, or sessions with the route reflectors only when the
topology names some — each node announcing its blocks; what a node learns, BIRD installs as
`<peer block> via <peer node IP> dev eth0 proto bird`. A top-of-rack router declared in the
topology (an external client with its own AS) peers over eBGP with the nodes of its segment
and learns their blocks.
"""

from __future__ import annotations

import os
import re
import shutil

from netsim.errors import NetsimError
from netsim.modes.calico import (
    AFFINITIES,
    RESOURCES,
    SEGMENT_LABEL,
    CalicoBackend,
    affine_blocks,
    decoded,
    node_resources,
)

CONVERGE_TIMEOUT = 15.0  # seconds for every session to reach Established


def sessions(
    nodes: dict[str, tuple[str, str]],
    routers: list[tuple[str, str, int, str]],
    me: str,
    asn: int,
    reflectors: list[str],
) -> list[dict]:
    """A node's BGP peers and their roles, by name: full mesh, or the route-reflector shape;
    plus the external routers (name, ip, asn, segment) on its segment. `nodes`: name -> (ip,
    segment)."""
    peers = []
    for other, (ip, _) in sorted(nodes.items()):
        if other == me:
            continue
        if not reflectors:
            role = "mesh"
        elif me in reflectors:
            role = "mesh" if other in reflectors else "rr-client"
        elif other in reflectors:
            role = "reflector"
        else:
            continue
        peers.append({"name": other, "ip": ip, "asn": asn, "role": role})
    for name, ip, router_asn, segment in sorted(routers):
        if segment == nodes[me][1]:
            peers.append({"name": name, "ip": ip, "asn": router_asn, "role": "external"})
    return peers


def config_from_store(resources: dict, blocks: dict, me: str) -> str | None:
    """The node's bird.cfg as confd renders it from the store: the Node resources (addresses,
    segments, route reflectors), the BGPConfiguration's AS, the BGPPeers naming external
    routers, the IP pools and the node's own blocks; None while the node is not in the store."""
    from netsim.bgp import bird

    nodes, reflectors, routers, pools, asn = {}, [], [], [], bird.DEFAULT_ASN
    for name, node in node_resources(resources).items():
        bgp = node.get("spec", {}).get("bgp", {})
        if bgp.get("ipv4Address"):
            segment = node.get("metadata", {}).get("labels", {}).get(SEGMENT_LABEL, "")
            nodes[name] = (bgp["ipv4Address"].split("/")[0], segment)
            if bgp.get("routeReflectorClusterID"):
                reflectors.append(name)
    if me not in nodes:
        return None
    for kv in resources.values():
        rest = kv.key[len(RESOURCES) :]
        spec = decoded(kv).get("spec", {})
        if rest == "bgpconfigurations/default":
            asn = int(spec.get("asNumber", asn))
        elif rest.startswith("ippools/"):
            pools.append(spec["cidr"])
        elif rest.startswith("bgppeers/") and spec.get("peerIP"):
            segment = re.search(r"== '([^']*)'", spec.get("nodeSelector", ""))
            if segment:
                routers.append(
                    (rest[len("bgppeers/") :], spec["peerIP"], int(spec["asNumber"]), segment[1])
                )
    own = affine_blocks(blocks).get(me, [])
    node = {"name": me, "ip": nodes[me][0], "blocks": own, "reflector": me in reflectors}
    return bird.render(
        node, sessions(nodes, routers, me, asn, sorted(reflectors)), asn, pools=sorted(pools)
    )


class CalicoBgp(CalicoBackend):
    name = "calico-bgp"
    summary = "BGP (BIRD): no tunnel, peer blocks routed via peer node IPs"
    bgp = True

    def validate(self, cluster, fail) -> list[str]:
        if len({n.segment for n in cluster.nodes}) > 1:
            return [
                "calico-bgp across underlay segments: the routers between them learn no "
                "pod routes, so pods on different segments cannot reach each other (as on "
                "a fabric whose routers do not peer); use calico-ipip or calico-vxlan "
                "with CrossSubnet to cross them"
            ]
        return []

    def unavailable(self) -> str | None:
        return (
            None
            if shutil.which("bird")
            else "bird is not installed: apt-get install bird2 (./bootstrap installs it)"
        )

    def data_path(self) -> str:
        return "BIRD 2 per node" if shutil.which("bird") else "unavailable: apt-get install bird2"

    def encapsulates(self, node, peer) -> bool:
        return False

    def add_peer(self, rtnl, node, peer) -> None:
        """Nothing to program: BIRD learns the peer's blocks and installs the routes."""

    def remove_peer(self, rtnl, node, peer, keep=None) -> None:
        """Nothing either: BIRD withdraws them when the peer's session ends."""

    def _config(self, cluster, record, node_name: str) -> str:
        """The node's bird.cfg as its confd renders it, from the store."""
        from netsim import store as storemod

        store = storemod.of(record.cluster, record.spec.datastore)
        resources = {kv.key: kv for kv in store.range(RESOURCES, prefix=True)}
        blocks = {kv.key: kv for kv in store.range(AFFINITIES, prefix=True)}
        config = config_from_store(resources, blocks, node_name)
        if config is None:
            raise NetsimError(f"node {node_name} has no Calico Node resource in {store}")
        return config

    def _router_config(self, cluster, record, name: str) -> str:
        from netsim.bgp import bird

        router = record.clients[name]
        peers = [
            {"name": n, "ip": e.ip, "asn": cluster.calico.asn, "role": "external"}
            for n, e in record.nodes.items()
            if e.segment == router.segment
        ]
        return bird.render_external(
            {"name": name, "ip": router.ip}, peers, router.asn, pools=[cluster.pod_network]
        )

    def start_cluster(self, cluster, record, cluster_dir: str, started, progress) -> None:
        """One BIRD per node and per top-of-rack router; then wait for every session.
        `started(process)` records each daemon before the next one starts."""
        from netsim.bgp import bird
        from netsim.record import Process

        progress("BGP: starting BIRD on every node, waiting for the sessions")
        daemons = [
            (
                record.nodes[n],
                self._config(cluster, record, n),
                os.path.join(cluster_dir, "nodes", n, "bird"),
            )
            for n in record.nodes
        ]
        daemons += [
            (
                e,
                self._router_config(cluster, record, n),
                os.path.join(cluster_dir, "routers", n, "bird"),
            )
            for n, e in record.clients.items()
            if e.asn
        ]
        for host, config, directory in daemons:
            pid, start = bird.start(host.netns, directory, config)
            host.bird = Process(pid, start, directory)
            started(host.bird)
        bird.wait_established([d for _, _, d in daemons], CONVERGE_TIMEOUT)

    def nodes_changed(self, cluster, record) -> None:
        """The top-of-rack routers peer with the nodes of their segment: they re-read theirs."""
        from netsim.bgp import bird

        for name, router in record.clients.items():
            if router.asn and router.bird is not None:
                bird.reconfigure(router.bird.dir, self._router_config(cluster, record, name))

    def restart_node(self, cluster, record, cluster_dir: str, node) -> None:
        """BIRD again, with the node's configuration; its sessions come back by themselves."""
        from netsim.bgp import bird
        from netsim.record import Process

        directory = os.path.join(cluster_dir, "nodes", node.name, "bird")
        pid, start = bird.start(node.netns, directory, self._config(cluster, record, node.name))
        node.bird = Process(pid, start, directory)
