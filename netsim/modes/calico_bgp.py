"""Calico's BGP data plane: no encapsulation. One BIRD 2 per node (netsim/bgp/bird.py), iBGP
on port 179 in AS 64512 — a full mesh, or sessions with the route reflectors only when the
topology names some — each node announcing its blocks; what a node learns, BIRD installs as
`<peer block> via <peer node IP> dev eth0 proto bird`. A top-of-rack router declared in the
topology (an external client with its own AS) peers over eBGP with the nodes of its segment
and learns their blocks.
"""

from __future__ import annotations

import os
import shutil

from netsim.modes.calico import CalicoBackend

CONVERGE_TIMEOUT = 15.0  # seconds for every session to reach Established


def sessions(record, node_name: str, asn: int, reflectors: list[str]) -> list[dict]:
    """A node's BGP peers and their roles: full mesh, or the route-reflector shape; plus the
    external routers on its segment."""
    node = record.nodes[node_name]
    peers = []
    for other, entry in record.nodes.items():
        if other == node_name:
            continue
        if not reflectors:
            role = "mesh"
        elif node_name in reflectors:
            role = "mesh" if other in reflectors else "rr-client"
        elif other in reflectors:
            role = "reflector"
        else:
            continue
        peers.append({"name": other, "ip": entry.ip, "asn": asn, "role": role})
    for other, entry in record.clients.items():
        if entry.asn and entry.segment == node.segment:
            peers.append({"name": other, "ip": entry.ip, "asn": entry.asn, "role": "external"})
    return peers


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

    def peer_blocks(self, rtnl, node, peer, blocks: list[str]) -> None:
        """A peer's new block arrives by BGP too."""

    def _config(self, cluster, record, node_name: str) -> str:
        from netsim.bgp import bird

        node = record.nodes[node_name]
        me = {
            "name": node_name,
            "ip": node.ip,
            "blocks": node.blocks,
            "reflector": node_name in cluster.calico.reflectors,
        }
        return bird.render(
            me,
            sessions(record, node_name, cluster.calico.asn, list(cluster.calico.reflectors)),
            cluster.calico.asn,
            pools=[cluster.pod_network],
        )

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

    def restart_node(self, cluster, record, cluster_dir: str, node) -> None:
        """BIRD again, with the node's configuration; its sessions come back by themselves."""
        from netsim.bgp import bird
        from netsim.record import Process

        directory = os.path.join(cluster_dir, "nodes", node.name, "bird")
        pid, start = bird.start(node.netns, directory, self._config(cluster, record, node.name))
        node.bird = Process(pid, start, directory)

    def blocks_changed(self, cluster, record, node_name: str) -> None:
        """Announce the new block: BIRD re-reads its config, sessions stay up."""
        from netsim.bgp import bird

        bird.reconfigure(record.nodes[node_name].bird.dir, self._config(cluster, record, node_name))
