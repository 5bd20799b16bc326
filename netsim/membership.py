"""Nodes join, leave, stop and start while the cluster runs, as real nodes do.

A joining node is plugged into its segment, sets up its own devices, takes its subnet lease
(flannel) or its first IPAM block and its Node resource (Calico) in etcd and starts its
daemons; the other nodes' flanneld, or felix and confd, see it and reach it. A leaving node's
pods are made again elsewhere first (apply reschedules them), then its agent stops, its keys
are deleted (every peer's daemons drop its routes and BGP session) and its namespace goes.
`node stop` is a power cut: the node's processes are killed and its underlay port goes down,
and nothing else is told; `node start` brings the port and the processes back, and the daemons
resync from the store (list, then watch). Only what the node itself would do is done here: no
other node's namespace is touched.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from ipaddress import IPv4Network
from types import SimpleNamespace

from netsim import agents, state, underlay
from netsim import store as storemod
from netsim.controller import LEASES
from netsim.daemons.kubelet import KUBELET, POD_STATUS
from netsim.errors import NetsimError
from netsim.kernel import proc, sysctl
from netsim.model import Cluster
from netsim.record import NodeRecord, Record
from netsim.transaction import Transaction


def keep_addresses(cluster: Cluster, record: Record) -> Cluster:
    """Hosts that exist keep the addresses they have; a joining node whose loader-given
    address another host holds gets the next free one of its segment (the loader numbers hosts
    in file order, which a node added or removed would shift)."""
    held = {n.name: n.ip for n in record.spec.nodes} | {c.name: c.ip for c in record.spec.clients}
    taken = set(held.values()) | ({record.master.ip} if record.master else set())
    nodes = [replace(n, ip=held[n.name]) if n.name in held else n for n in cluster.nodes]
    clients = [replace(c, ip=held[c.name]) if c.name in held else c for c in cluster.clients]
    for i, node in enumerate(nodes):
        if node.name in held:
            continue
        if not node.ip or node.ip in taken:
            segment = cluster.segment(node.segment)
            net = IPv4Network(segment.subnet)
            free = (
                str(a)
                for a in net.hosts()
                if str(a) not in taken
                and str(a) != segment.router_ip
                and a != net.network_address + 1
            )
            ip = next(free, None)
            if ip is None:
                raise NetsimError(
                    f"spec.nodes: segment {node.segment} ({segment.subnet}) has no free "
                    f"address left for node {node.name}: use a larger subnet, or another segment"
                )
            node = replace(node, ip=ip)
            nodes[i] = node
        taken.add(node.ip)
    return replace(cluster, nodes=nodes, clients=clients)


def changed_nodes(cluster: Cluster, record: Record) -> tuple[list, list[str]]:
    """(nodes joining, names of nodes leaving)."""
    wanted = {n.name for n in cluster.nodes}
    return [n for n in cluster.nodes if n.name not in record.nodes], [
        name for name in record.nodes if name not in wanted
    ]


def bring_up(cluster: Cluster, record: Record, mode, nodes: list[NodeRecord], tx) -> None:
    """Each node's own part, as its daemons set it up at boot: devices, carrier, agent,
    forwarding, masquerade rules and the files flannel keeps on disk. Peers are the daemons'
    job."""
    from netsim import pods
    from netsim.cniconf import write_node_files
    from netsim.kernel import nft
    from netsim.kernel.netlink import Rtnl

    for node in nodes:
        with Rtnl(node.netns) as rt:
            mode.setup_node(rt, node, cluster.mtu)
            rt.commit()
    for node in nodes:
        tx.on_undo(f"carrier of {node.name}", lambda n=node: mode.stop_node(n))
        mode.start_node(state.cluster_dir(cluster.name), node)
        agents.start(record, node, tx)
    pods.agent_tunnels(cluster, record, mode)
    for node in nodes:
        sysctl.set_in(node.netns, {"net.ipv4.ip_forward": "1"})
        nft.apply(node.netns, mode.masquerade(cluster, node))
        write_node_files(cluster, node, mode)


def join(cluster: Cluster, record: Record, mode, store, tx: Transaction, joining: list) -> None:
    """New nodes into the running cluster: plugged in, planned (a free subnet, a block),
    brought up, leased, their daemons started (BIRD too, for BGP)."""
    cluster_dir = state.cluster_dir(cluster.name)
    plan = mode.plan_nodes(cluster, cluster_dir, [n.name for n in joining])
    for node in joining:  # what planning claimed (Calico's blocks) goes if the join fails
        tx.on_undo(
            f"{node.name} in the store",
            lambda n=node: mode.forget_node(
                store, cluster, cluster_dir, SimpleNamespace(**vars(n), **plan[n.name])
            ),
        )
    made = []
    for node in joining:
        made.append(underlay.join(cluster, record.underlay, node, tx))
        for key, value in plan[node.name].items():
            setattr(made[-1], key, value)
        record.nodes[node.name] = made[-1]
        tx.on_undo(f"record of {node.name}", lambda n=node.name: record.nodes.pop(n, None))
    bring_up(cluster, record, mode, made, tx)
    mode.publish(store, cluster, record)
    for node in made:
        held = mode.lease(node)
        if held:
            tx.on_undo(f"lease of {node.name}", lambda k=held[0]: store.delete(k))
    agents.sync(record, [n.name for n in made])
    for node in made:
        mode.restart_node(cluster, record, cluster_dir, node)
        if node.bird is not None:
            tx.process(f"BIRD of {node.name}", node.bird.pid, node.bird.start)
    mode.nodes_changed(cluster, record)


def leave(cluster: Cluster, record: Record, mode, store, names: list[str]) -> None:
    """Nodes out of the cluster, their pods already gone: agent and daemons stopped, its keys
    deleted (the peers' daemons drop the routes), namespace and files removed."""
    from netsim.kernel import netns as nsmod

    for name in names:
        node = record.nodes[name]
        proc.stop(_processes(record, node))
        mode.stop_node(node)
        mode.forget_node(store, cluster, state.cluster_dir(cluster.name), node)
        if node.lease:
            store.revoke(node.lease)
        store.delete(storemod.STATUS + name)
        store.delete(LEASES + name)
        for prefix in (KUBELET, POD_STATUS):  # its pods are gone: no bindings are left there
            store.delete(f"{prefix}{name}/", prefix=True)
        nsmod.remove(node.netns)
        shutil.rmtree(state.node_dir(cluster.name, name), ignore_errors=True)
        del record.nodes[name]
    mode.nodes_changed(cluster, record)
    if mode.encapsulation == "udp":  # the agents' forwarding tables, as apply keeps them
        from netsim import pods

        pods.agent_tunnels(cluster, record, mode)


def _processes(record: Record, node: NodeRecord) -> list[tuple[int, int]]:
    """The node's agent and BIRD, and its pods' container processes (as its kubelet noted
    them on the node's disk)."""
    from netsim.daemons.kubelet import container_pids

    found = [(p.pid, p.start) for p in (node.agent, node.bird) if p is not None]
    found += container_pids(state.node_dir(record.cluster, node.name))
    return [p for p in found if p[1]]


def stop(cluster_name: str, name: str) -> NodeRecord:
    """A power cut: the node's processes die at once (SIGKILL) and its underlay port goes
    down. Its kernel state stays, as a real node's disk does; nobody else is told."""
    import signal

    with state.locked(cluster_name):
        record, node = _node(cluster_name, name)
        if node.down:
            raise NetsimError(f"node {name} is already stopped: `netsim node start {name}`")
        # the port first: a dying process's sockets say goodbye (a FIN to its BGP peers),
        # which a power cut does not let them do
        underlay.set_port(record.underlay, node, up=False)
        proc.finish(proc.terminate(_processes(record, node), signal.SIGKILL))
        node.down = True
        state.save(record)
        return node


def start(cluster_name: str, name: str) -> float:
    """Power back: the port up, the agent (its pods' servers, its daemons: list, then watch)
    and the node's lease taken again if it expired meanwhile; the seconds until the node
    reported it had applied the store."""
    from netsim import modes

    with state.locked(cluster_name):
        record, node = _node(cluster_name, name)
        if not node.down:
            raise NetsimError(f"node {name} is running: `netsim node stop {name}` first")
        mode = modes.get(record.mode)
        store = storemod.of(record.cluster, record.spec.datastore)
        underlay.set_port(record.underlay, node, up=True)
        tx = Transaction(cluster_name)
        agents.start(record, node, tx)
        node.down = False  # a taint stays until the node controller sees it Ready again
        cluster = record.spec.cluster(record.cluster)
        mode.publish(store, cluster, record)  # flanneld at its start: take the lease again
        mode.restart_node(cluster, record, state.cluster_dir(cluster_name), node)
        began = time.time()
        agents.sync(record, [name])
        state.save(record)
        return agents.wait_reported(store, record, name, began)


def _node(cluster_name: str, name: str) -> tuple[Record, NodeRecord]:
    record = state.load(cluster_name)
    if record is None:
        raise NetsimError(f"no cluster {cluster_name}: `netsim get clusters` lists them")
    if name not in record.nodes:
        raise NetsimError(
            f"cluster {cluster_name} has no node {name}; its nodes: {', '.join(record.nodes)}"
        )
    return record, record.nodes[name]
