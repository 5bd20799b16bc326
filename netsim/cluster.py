"""Reconcile a topology against the cluster's record: compute what differs, then make exactly
those kernel changes, in order, undoing this call's own work if any step fails.

The first apply builds the underlay (netsim.underlay), the nodes with their mode's devices,
peers, masquerade rules, agent and daemons (netsim.modes), then the pods (netsim.pods), the
Services (netsim.services) and kube-proxy's rules (netsim.kubeproxy.sync). Later applies change
only pods and Services. Cluster-level changes (mode, CIDRs, MTU, segments, nodes) are refused
with the fix: delete, then apply. Removal lives in netsim.teardown.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

from netsim import (
    agents,
    deployments,
    membership,
    netpol,
    pods,
    registry,
    services,
    state,
    underlay,
)
from netsim import store as storemod
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.kernel import nft
from netsim.model import Cluster
from netsim.record import ClusterSpec, Record
from netsim.transaction import Changes, Transaction

# pyroute2 takes ~130 ms to import; delete, gc and get do not need it, so the modules that
# use it (netsim.kernel.netlink, the modes' node sides) are imported by the functions that build.

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


# the topology fields behind each ClusterSpec field, for messages
SPEC_FIELDS = {
    "mode": "spec.cni.mode",
    "pod_network": "pod network (spec.cni.flannel.Network or spec.cni.calico.ipPool.cidr)",
    "subnet_len": "subnet length (spec.cni.flannel.SubnetLen or ipPool.blockSize)",
    "service_cidr": "spec.serviceCIDR",
    "mtu": "spec.underlay.mtu",
    "segments": "spec.underlay.segments",
    "nodes": "spec.nodes",
    "clients": "spec.externalClients (or BGP peers)",
    "calico": "spec.cni.calico",
    "cni_version": "spec.cni.cniVersion",
    "cni_plugins": "spec.cni.plugins",
    "proxy_mode": "spec.kubeProxy.mode",
    "datastore": "spec.datastore",
    "lease_ttl": "spec.cni.flannel.leaseTTL",
    "node_grace": "spec.controlPlane.nodeMonitorGracePeriod",
    "eviction_timeout": "spec.controlPlane.podEvictionTimeout",
    "lb_addresses": "spec.loadBalancer.addresses",
}


def spec_of(cluster: Cluster) -> ClusterSpec:
    """The cluster-level part of a topology, which an apply may not change in place."""
    return ClusterSpec(
        cluster.mode,
        cluster.pod_network,
        cluster.subnet_len,
        cluster.service_cidr,
        cluster.mtu,
        list(cluster.segments),
        list(cluster.nodes),
        list(cluster.clients),
        cluster.calico,
        cluster.cni_version,
        cluster.cni_plugins,
        cluster.proxy_mode,
        cluster.datastore,
        cluster.lease_ttl,
        cluster.node_grace,
        cluster.eviction_timeout,
        cluster.lb_addresses,
    )


def preflight(cluster: Cluster) -> None:
    """Checks that need the host but change nothing, run before the first kernel change."""
    if nft.available() is None:
        raise NetsimError(
            "nft not found: the masquerade and kube-proxy rules need nftables "
            "(apt-get install nftables, or run ./bootstrap)"
        )
    taken = [n for n in nsmod.names() if n.startswith(state.netns_prefix(cluster.name))]
    if taken and state.load(cluster.name) is None:
        raise NetsimError(
            f"namespaces of cluster {cluster.name} exist but it has no record "
            f"({taken[0]} ...): run `netsim --cluster {cluster.name} gc` first"
        )
    datastore = cluster.datastore
    if not datastore.own:
        if datastore.netns and datastore.netns not in nsmod.names():
            raise NetsimError(
                f"spec.datastore.etcd.netns: no network namespace {datastore.netns}; name one "
                "`ip netns list` shows, or leave netns out to reach etcd from the host's own"
            )
        store = storemod.of(cluster.name, datastore)
        store.revision()  # unreachable: one line, before anything is made
        storemod.check_owner(store, cluster.name)


def apply(
    cluster: Cluster,
    progress: Progress = quiet,
    cni_exec: bool = False,
    overrides: dict | None = None,
) -> Changes:
    """Converge the kernel to the topology. With cni_exec, new pods are wired by executing each
    node's CNI config list as a runtime would, instead of in-process."""
    from netsim import addons, modes
    from netsim.kubeproxy import sync

    preflight(cluster)
    mode = modes.get(cluster.mode)
    with state.locked(cluster.name):
        record = state.load(cluster.name)
        if record is not None:
            cluster = membership.keep_addresses(cluster, record)
            _check_in_place(cluster, record, mode)
        fresh = record is None
        pool_changed = not fresh and record.spec.lb_addresses != cluster.lb_addresses
        if fresh:
            storemod.forget(cluster.name)
        cni_exec = cni_exec or (record is not None and record.cni_exec)  # once chosen, kept
        store = storemod.of(cluster.name, cluster.datastore)
        cluster, rollouts, said = deployments.reconcile(
            cluster, record, store, overrides or {}, time.time()
        )
        cluster = addons.with_cluster_dns(cluster, tuple(store.endpoints))
        tx = Transaction(cluster.name)
        changes = Changes()
        joining, leaving = [], []
        try:
            alongside = None
            if fresh:
                record = _build_base(cluster, mode, store, tx, progress, changes)
                # a new cluster's Services and their endpoints go to the store as soon as its
                # pods have addresses: every node's kube-proxy programs them while the pods are
                # wired (nobody sends traffic to a cluster that is being built)
                services.reconcile(cluster, record, changes)
                _declared(cluster, record, changes)
                alongside = functools.partial(registry.sync, store, record)
            else:
                if _revive_etcd(record, tx, progress):
                    changes.updated.append("etcd (restarted)")
                if _revive_controller(record, tx):
                    changes.updated.append("node controller (restarted)")
                revived = _revive_agents(record, tx, progress)
                changes.updated += [f"agent of {name} (restarted)" for name in revived]
                leases = {name: node.lease for name, node in record.nodes.items()}
                restored = [storemod.OWNER] if storemod.claim(store, cluster.name) else []
                restored += mode.publish(store, cluster, record)
                changes.updated += [f"etcd key {key} (restored)" for key in restored]
                # a lease taken again: its node's agent renews the new one; a restarted agent
                # gets its pods, tunnel and daemons (they list the store, then watch)
                changed = [n for n, v in leases.items() if record.nodes[n].lease != v]
                began = time.time()
                agents.sync(record, sorted(set(changed) | set(revived)))
                for name in revived:  # their daemons listed the store and caught up with it
                    agents.wait_reported(store, record, name, began)
                pods.refresh(store, record, revived)
                joining, leaving = membership.changed_nodes(cluster, record)
                if joining:
                    progress(f"nodes: {', '.join(n.name for n in joining)} joining")
                    membership.join(cluster, record, mode, store, tx, joining)
                    changes.created += [f"node {n.name}" for n in joining]
            if _rolled(record, cluster, rollouts):
                changes.updated += [
                    f"deployment {key}" for key in _rolled(record, cluster, rollouts)
                ]
            record.deployments = {d.key: d for d in cluster.deployments}
            record.rollouts = rollouts
            pods.reconcile(cluster, record, mode, tx, progress, changes, store, cni_exec, alongside)
            if leaving:  # their pods are running elsewhere now
                progress(f"nodes: {', '.join(leaving)} leaving")
                membership.leave(cluster, record, mode, store, leaving)
                changes.removed += [f"node {n}" for n in leaving]
                record.spec = spec_of(cluster)
                state.save(record)  # they are gone: a later failure rolls back to this
            record.spec = spec_of(cluster)
            if pool_changed:  # the nodes' speakers start, or follow the pool
                agents.sync(record, sorted(record.nodes))
            services.reconcile(cluster, record, changes)
            _declared(cluster, record, changes)
            # the objects go to the store; the nodes' daemons apply them, and apply waits
            waited = sync.sync(cluster, record, store)
            revision = max(store.writes.values(), default=0)
            running = sum(not n.down for n in record.nodes.values())
            if revision:
                progress(
                    f"store: revision {revision}; every node ({running}) reported it applied, "
                    f"{waited:.3f} s after the last write"
                )
            record.cni_exec = cni_exec
            record.source = os.path.abspath(cluster.source) if cluster.source else ""
            record.overrides = overrides or {}  # apply -f: the file is the truth again
            if changes or fresh:
                state.save(record)
            deployments.report(cluster.name, said)
        except BaseException as exc:
            problems = tx.rollback()
            if fresh:
                if record is not None:
                    agents.stop_all(record)
                state.remove(cluster.name)
                # the pods' namespaces too, which the kubelets made
                prefix = state.netns_prefix(cluster.name)
                made = [n for n in nsmod.names() if n.startswith(prefix)]
                nsmod.unlink_all(state.netns_dir(cluster.name), made)
                nsmod.remove_group(state.netns_dir(cluster.name))
            else:
                committed = state.load(cluster.name)
                agents.sync(committed, list(committed.nodes))
            detail = ("; rollback also failed for: " + "; ".join(problems)) if problems else ""
            if isinstance(exc, NetsimError):
                raise NetsimError(
                    f"apply failed, this apply's changes were undone: {exc}{detail}"
                ) from exc
            raise
        return changes


def _declared(cluster: Cluster, record: Record, changes: Changes) -> None:
    """The objects that are kept as declared: namespaces (their labels) and policies."""
    for name, labels in cluster.namespaces.items():
        if name in record.namespaces and record.namespaces[name] != labels:
            changes.updated.append(f"namespace {name} (labels)")  # selectors may follow them
    record.namespaces = dict(cluster.namespaces)
    policies = {netpol.key(p.kind, p.namespace, p.name): p for p in cluster.policies}
    for key, policy in policies.items():
        if key not in record.policies:
            changes.created.append(policy.title.lower())
        elif record.policies[key] != policy:
            changes.updated.append(policy.title.lower())
    changes.removed += [p.title.lower() for k, p in record.policies.items() if k not in policies]
    record.policies = policies


def apply_recorded(name: str) -> Changes | None:
    """Apply the cluster's own file again with its imperative changes on top, as its
    controllers do (eviction, a rollout's next step); None if the cluster is gone."""
    from netsim import topology

    with state.locked(name):  # what the record says now, not before another apply
        record = state.load(name)
        if record is None:
            return None
        if not record.source:
            raise NetsimError(f"cluster {name} has no topology file on record")
        model, _ = topology.load(record.source, record.overrides)
        return apply(model, overrides=record.overrides)


def _rolled(record: Record, cluster: Cluster, rollouts: dict) -> list[str]:
    """Deployments whose spec or ReplicaSets (revisions, sizes) this apply changed."""

    def shape(state) -> list:
        return [(rs.hash, rs.revision, rs.pods) for rs in state.replicasets] if state else []

    wanted = {d.key: d for d in cluster.deployments}
    return sorted(
        key
        for key in {*wanted, *record.deployments}
        if wanted.get(key) != record.deployments.get(key)
        or shape(rollouts.get(key)) != shape(record.rollouts.get(key))
    )


def _check_in_place(cluster: Cluster, record: Record, mode) -> None:
    """Refuse what a real cluster cannot change in place (mode, CIDRs, the underlay ...);
    nodes join and leave, since every node's daemons follow the store."""
    before, after = asdict(record.spec), asdict(spec_of(cluster))
    for changes_in_place in ("nodes", "lb_addresses"):
        before.pop(changes_in_place, None), after.pop(changes_in_place)
    changed = [SPEC_FIELDS[k] for k in after if before.get(k) != after[k]]
    if changed:
        raise NetsimError(
            f"cluster {cluster.name} exists with another {', '.join(changed)}; netsim "
            f"changes nodes, pods and Services in place, not those: run `netsim down "
            f"{cluster.name}`, then apply again"
        )


def _build_base(
    cluster: Cluster, mode, store, tx: Transaction, progress: Progress, changes: Changes
) -> Record:

    name = cluster.name
    state.journal(name, {"apply": os.getpid()})
    zygote = agents.start_zygote(name, tx)  # it imports while the underlay is built
    progress(f"underlay: {len(cluster.segments)} segment(s) and their router")
    ul, router, nodes, clients, master = underlay.build(cluster, tx, changes)
    record = Record(name, spec_of(cluster), ul, router, nodes, clients, master=master)
    record.zygote = zygote
    if master is not None:
        _start_etcd(record, tx, progress)
    plan = mode.plan_nodes(cluster, state.cluster_dir(name))
    for node_name, facts in plan.items():
        for key, value in facts.items():
            setattr(nodes[node_name], key, value)
    progress(f"nodes: {len(cluster.nodes)} in mode {cluster.mode}")
    membership.bring_up(cluster, record, mode, list(nodes.values()), tx)
    storemod.claim(store, name)
    _start_controller(record, tx)
    mode.publish(store, cluster, record)
    agents.sync(record, list(nodes))  # the nodes' daemons start: list, then watch

    def started(process) -> None:
        tx.process(f"process {process.pid}", process.pid, process.start)

    mode.start_cluster(cluster, record, state.cluster_dir(name), started, progress)
    return record


def _start_etcd(record: Record, tx: Transaction, progress: Progress) -> None:
    """netsim's etcd for the cluster, in the master namespace; how long it took to answer is
    kept apart from the build's own time."""
    from netsim.record import Process
    from netsim.store import server

    master = record.master
    started = time.perf_counter()
    progress(f"etcd: in {master.netns}, http://{master.ip}:2379")

    def spawned(process: tuple[int, int]) -> None:
        tx.process("etcd", *process)
        master.etcd = Process(*process, server.directory(state.cluster_dir(record.cluster)))

    server.start(state.cluster_dir(record.cluster), master.netns, "master", master.ip, spawned)
    master.etcd_started_s = round(time.perf_counter() - started, 3)


def _start_controller(record: Record, tx: Transaction) -> None:
    """The node lifecycle controller (netsim/controller.py), reaching the store as the CLI
    does."""
    import json

    from netsim.kernel import proc
    from netsim.record import Process

    store = storemod.of(record.cluster, record.spec.datastore)
    directory = os.path.join(state.cluster_dir(record.cluster), "controller")
    os.makedirs(directory, exist_ok=True)
    config = os.path.join(directory, "config.json")
    state.write_file(
        config,
        json.dumps(
            {
                "cluster": record.cluster,
                "endpoints": store.endpoints,
                "netns": store.netns,
                "grace": record.spec.node_grace,
                "eviction_timeout": record.spec.eviction_timeout,
            }
        ),
    )
    argv = [sys.executable, "-m", "netsim.controller", config]
    pid, start = proc.spawn(argv, os.path.join(directory, "controller.log"))
    tx.process("node controller", pid, start)
    record.controller = Process(pid, start, directory)


def _revive_controller(record: Record, tx: Transaction) -> bool:
    """A cluster whose controller died gets it back; True if it had to."""
    from netsim.kernel import proc

    running = record.controller
    if running is not None and proc.alive(running.pid, running.start):
        return False
    _start_controller(record, tx)
    return True


def _revive_agents(record: Record, tx: Transaction, progress: Progress) -> list[str]:
    """Agents that died (killed, crashed) on nodes that are not stopped come back, as a
    supervisor restarts a node's kubelet; the names of their nodes."""
    from netsim.kernel import proc

    dead = [
        name
        for name, node in record.nodes.items()
        if not node.down
        and (node.agent is None or not proc.alive(node.agent.pid, node.agent.start))
    ]
    for name in dead:
        progress(f"the agent of node {name} was not running: starting it again")
        agents.start(record, record.nodes[name], tx)
    return dead


def _revive_etcd(record: Record, tx: Transaction, progress: Progress) -> bool:
    """A cluster whose etcd has died (killed, or the host's processes ended) gets it back with
    its data before anything else changes; True if it had to."""
    from netsim.kernel import proc

    master = record.master
    if master is None or (
        master.etcd is not None and proc.alive(master.etcd.pid, master.etcd.start)
    ):
        return False
    progress("etcd was not running: starting it again with its data")
    _start_etcd(record, tx, progress)
    return True
