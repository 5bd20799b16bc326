"""Pods: schedule them, bind them to their nodes, keep the record.

apply is the scheduler and the API server here: it places each pod and binds it to its node
(the pod's spec under the node's kubelet prefix in etcd, netsim/daemons/kubelet.py); the
node's kubelet makes it (CNI ADD, in-process or by executing the node's CNI chain with --cni
exec) and publishes its address, which apply reads back into the record. A pod whose spec
changed is replaced: its endpoints leave every node's Services first, it serves for a grace
period, then its binding goes (the kubelet runs the CNI DEL), then its successor is bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from netsim import agents, naming, state
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.model import Cluster, Pod
from netsim.modes import Mode
from netsim.record import PodRecord, Record
from netsim.topology import schedule
from netsim.transaction import Changes, Transaction

# a pod out of its Services keeps serving this long before it is stopped, as a terminating
# pod does for its grace period, so a connection begun just before the update still finishes
TERMINATION_GRACE = 0.2

Progress = Callable[[str], None]


def reconcile(
    cluster: Cluster,
    record: Record,
    mode: Mode,
    tx: Transaction,
    progress: Progress,
    changes: Changes,
    store,
    cni_exec: bool = False,
    alongside: Callable[[], None] | None = None,
) -> None:
    """`alongside`: work that needs the new pods' addresses (a new cluster's objects written
    to the store), done once the kubelets have made them."""
    from netsim.kubeproxy import sync

    recorded = record.pods
    unschedulable = frozenset(n for n, node in record.nodes.items() if node.down or node.evicted)
    # a Deployment's pods on a node evicted (NotReady past the timeout) are made elsewhere
    placed = {
        n: r.node for n, r in recorded.items() if not (record.nodes[r.node].evicted and r.pod.owner)
    }
    desired = {p.key: p for p in schedule(cluster, placed, unschedulable)}
    stale = [
        n
        for n, r in recorded.items()
        if n not in desired
        or (r.pod.node, r.pod.workload) != (desired[n].node, desired[n].workload)
    ]
    new = [p for n, p in desired.items() if n not in recorded or n in stale]
    for name, pod in desired.items():
        if name in recorded and name not in stale and recorded[name].pod != pod:
            recorded[name].pod = pod  # labels or owner: no rebuild
            changes.updated.append(f"pod {name} labels")
    removing = {n: recorded.pop(n) for n in stale}
    if removing:
        if record.kube_proxy is not None:
            # endpoints leave every node's Services first, as a terminating pod leaves its
            # EndpointSlice before it is killed: no new connection goes to a pod being removed
            sync.sync(cluster, record, store)
            if record.services:
                time.sleep(TERMINATION_GRACE)
        unbind(record, store, removing)
        progress(f"pods: removed {len(removing)}")
        changes.removed += [f"pod {n}" for n in removing]
        state.save(record)  # removals are done: a later failure rolls back to this record
    if new:
        bind(cluster, record, store, tx, new, "cni-exec" if cni_exec else "in-process", progress)
        changes.created += [f"pod {p.key}" for p in new]
        if alongside is not None:
            alongside()
        sync_blocks(cluster, record, mode)


def binding(pod: Pod) -> str:
    """The key of a pod bound to its node: what the node's kubelet watches."""
    from netsim.daemons.kubelet import KUBELET

    return f"{KUBELET}{pod.node}/{pod.key}"


def kubelet_spec(pod: Pod) -> dict:
    """What the node's kubelet runs for the pod: the hostname server's ports, the init
    containers and containers (the process each runs, its environment, its readiness
    probe), the restart policy."""
    from netsim.images import workload

    def container(c) -> dict:
        found: dict = {"name": c.name, "argv": workload(c).argv}
        if c.env:
            found["env"] = dict(c.env)
        if c.readiness is not None:
            found["readiness"] = probe(c.readiness, c)
        return found

    spec: dict = {
        "ports": list(pod.serve_ports),
        "containers": [container(c) for c in pod.containers],
    }
    if pod.init_containers:
        spec["init"] = [container(c) for c in pod.init_containers]
    if pod.restart_policy != "Always":
        spec["restartPolicy"] = pod.restart_policy
    if not pod.service_links:
        spec["serviceLinks"] = False
    if pod.namespace != "default":
        spec |= {"namespace": pod.namespace, "name": pod.name}
    return spec


def probe(p, container) -> dict:
    """A readiness probe as the kubelet runs it (a named port resolved in the container)."""
    port = p.port
    if isinstance(port, str):
        port = next((n for name, n in container.port_names if name == port), 0)
    return {
        "kind": p.kind,
        "port": port,
        "path": p.path,
        "command": list(p.command),
        "initialDelaySeconds": p.initial_delay,
        "periodSeconds": p.period,
        "timeoutSeconds": p.timeout,
        "successThreshold": p.success_threshold,
        "failureThreshold": p.failure_threshold,
    }


def bind(
    cluster: Cluster,
    record: Record,
    store,
    tx: Transaction,
    pods: list[Pod],
    via: str,
    progress: Progress,
) -> None:
    """Bind the pods to their nodes and wait for the kubelets to make them; their records
    from what the kubelets publish. Undone: the bindings go (the kubelets delete the pods)."""

    by_node: dict[str, dict[str, str]] = {}
    for pod in pods:
        by_node.setdefault(pod.node, {})[binding(pod)] = json.dumps(
            {"netns": naming.ns_name(cluster.name, "pod", pod.key), "via": via} | kubelet_spec(pod)
        )

    def unbound() -> None:  # the kubelets delete the pods
        store.delete_all([key for bound in by_node.values() for key in bound])
        agents.wait_applied(store, record)

    tx.on_undo("the pods' bindings", unbound)
    nodes = sorted(by_node)
    for node in nodes:  # one write a node: its kubelet makes them in one batch
        store.put_all(by_node[node])
    progress(f"pods: {len(pods)} bound to {len(nodes)} node(s); their kubelets make them")
    agents.wait_applied(store, record)
    made = _statuses(store, pods)
    _wait_for_new_blocks(store, record)
    failed = [(p, made[p.key]["error"]) for p in pods if made.get(p.key, {}).get("error")]
    missing = [p for p in pods if p.key not in made]
    if failed or missing:
        pod, why = failed[0] if failed else (missing[0], "it published no status")
        raise NetsimError(
            f"the kubelet of node {pod.node} could not make pod {pod.key}: {why} (see "
            f"{state.node_dir(cluster.name, pod.node)}/agent.log)"
        )
    for pod in pods:
        record.pods[pod.key] = _made(pod, made[pod.key])
        tx.on_undo(f"record of {pod.key}", lambda p=pod.key: record.pods.pop(p, None))
    progress(f"pods: {len(pods)} made")


def refresh(store, record: Record, nodes: list[str]) -> None:
    """The records of these nodes' pods as their kubelets publish them now (a restarted
    kubelet that had to make a pod again gave it a new address, veth or containers)."""
    if not nodes:
        return
    on = [entry for entry in record.pods.values() if entry.node in nodes]
    for name, status in _statuses(store, [entry.pod for entry in on]).items():
        if "error" not in status:
            record.pods[name] = _made(record.pods[name].pod, status)


def _made(pod: Pod, status: dict) -> PodRecord:
    """The record of a pod its kubelet made, from the status it published."""
    keys = ("netns", "ip", "veth", "ifindex", "via", "pids")
    return PodRecord(pod, *(status[k] for k in keys), ready=status.get("ready", True))


def _wait_for_new_blocks(store, record: Record) -> None:
    """Calico: blocks the kubelets claimed for their new pods reach every node's felix (and
    confd) before the pods count as made: the last block written is the revision to wait
    for."""
    from netsim import modes
    from netsim.modes.calico import AFFINITIES

    if AFFINITIES in modes.get(record.mode).watches:
        claims = store.range(AFFINITIES, prefix=True, keys_only=True)
        written = max((kv.mod_revision for kv in claims), default=0)
        agents.wait_applied(store, record, at_least={AFFINITIES: written})


def _statuses(store, pods: list[Pod]) -> dict[str, dict]:
    """What the pods' kubelets published: pod -> status."""
    from netsim.daemons.kubelet import POD_STATUS

    wanted = {f"{POD_STATUS}{p.node}/{p.key}": p.key for p in pods}
    if len(wanted) > 256:  # many: one read of them all beats a request per 128
        found = {kv.key: kv for kv in store.range(POD_STATUS, prefix=True) if kv.key in wanted}
    else:
        found = {k: kv for k, kv in store.get_many(list(wanted)).items() if kv is not None}
    return {wanted[key]: kv.json() for key, kv in found.items()}


def unbind(record: Record, store, removing: dict[str, PodRecord]) -> None:
    """The pods' bindings go and their kubelets delete them (CNI DEL), waited for. A stopped
    node's kubelet does so when it starts again; meanwhile its pods' namespaces are removed
    here (their veths go with them), so their names are free for their successors."""
    from netsim.daemons.kubelet import POD_STATUS

    store.delete_all([binding(entry.pod) for entry in removing.values()])
    down = [e for e in removing.values() if record.nodes[e.node].down]
    for entry in down:
        nsmod.remove(entry.netns)
    store.delete_all([f"{POD_STATUS}{e.node}/{e.name}" for e in down])  # not theirs any more
    agents.wait_applied(store, record)


def sync_blocks(cluster: Cluster, record: Record, mode: Mode) -> None:
    """Calico: a node whose blocks filled up claimed another; felix on every node (and confd,
    for BGP) programs it from the store, the record notes it for its readers."""
    new = mode.new_blocks(cluster, state.cluster_dir(cluster.name), record)
    for node_name, blocks in new.items():
        record.nodes[node_name].blocks += blocks
    if new:
        agent_tunnels(cluster, record, mode)  # a userspace carrier's table, as felix keeps it


def agent_tunnels(cluster: Cluster, record: Record, mode: Mode) -> None:
    """Userspace carriers (flannel-udp, Calico IPIP's last resort) live in the node agents:
    give each agent its TUN and peer table, then note the TUN's interface index for routes."""
    from netsim.kernel.netlink import Rtnl

    serving = []
    for name, node in record.nodes.items():
        peers = [p for n, p in record.nodes.items() if n != name]
        node.agent_tunnel = mode.tunnel_spec(cluster, node, peers)
        if node.agent_tunnel:
            serving.append(name)
    if not serving:
        return
    agents.sync(record, serving)
    for name in serving:
        node = record.nodes[name]
        with Rtnl(node.netns) as rt:
            node.tunnel_index = rt.link(node.agent_tunnel.name)["index"]
