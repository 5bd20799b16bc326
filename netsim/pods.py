"""Pods: schedule them, wire the new ones, take down the stale ones, keep the record.

New pods are wired in-process (per node one IPAM session, one netlink batch for the host ends,
one small batch inside each pod: cni.wiring, the code the CNI executable runs too) or, with
--cni exec, by executing each node's CNI config list as a container runtime would. A pod whose
spec changed is replaced: its endpoints leave every node's Services first, it serves for a
grace period, then goes, then its successor is built.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future

from netsim import agents, naming, services, state
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
# nodes wired side by side: the kernel does most of a node's work inside its sends, with the
# interpreter's lock released, so a few threads keep every core busy
WORKERS = min(8, (os.cpu_count() or 1) + 1)

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
    """`alongside`: work that needs the new pods' addresses but not their wiring, done while
    the nodes wire them (a new cluster's objects written to the store, so that every node's
    kube-proxy programs them meanwhile)."""
    from netsim.kubeproxy import sync

    recorded = record.pods
    stopped = frozenset(n for n, node in record.nodes.items() if node.down or node.evicted)
    # a Deployment's pods on a node evicted (NotReady past the timeout) are made elsewhere
    placed = {
        n: r.node for n, r in recorded.items() if not (record.nodes[r.node].evicted and r.pod.owner)
    }
    desired = {p.name: p for p in schedule(cluster, placed, stopped)}
    stale = [
        n
        for n, r in recorded.items()
        if n not in desired
        or (r.pod.node, r.pod.containers) != (desired[n].node, desired[n].containers)
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
        # a replaced pod keeps its name: take the old one down before building the new one
        agents.sync(record, sorted({p.node for p in removing.values()}))
        remove(cluster, record, mode, removing)
        progress(f"pods: removed {len(removing)}")
        changes.removed += [f"pod {n}" for n in removing]
        state.save(record)  # removals are done: a later failure rolls back to this record
    if new and cni_exec:
        _exec_pods(cluster, record, mode, new, tx, progress, changes)
    elif new:
        _add_pods(cluster, record, mode, new, tx, progress, changes, alongside)
    if new:
        sync_blocks(cluster, record, mode)
        agents.sync(record, sorted({p.node for p in new}))


def _by_node(pods: list[Pod]) -> dict[str, list[Pod]]:
    found: dict[str, list[Pod]] = {}
    for pod in pods:
        found.setdefault(pod.node, []).append(pod)
    return found


def _release(ipam, pod: str) -> None:
    with ipam.session():
        ipam.release(pod, "eth0")


def _add_pods(
    cluster: Cluster,
    record: Record,
    mode: Mode,
    pods: list[Pod],
    tx: Transaction,
    progress: Progress,
    changes: Changes,
    alongside: Callable[[], None] | None = None,
) -> None:
    """The in-process path: every node's new pods get their addresses first (one IPAM
    session a node), then the nodes are wired side by side: its pods' namespaces, one netlink
    batch for the host ends, one small batch inside each pod. `alongside` runs in a thread of
    its own while the nodes are wired: the record already holds every new pod."""
    from concurrent.futures import ThreadPoolExecutor

    groups = list(_by_node(pods).values())
    with ThreadPoolExecutor(min(len(groups), WORKERS) + (alongside is not None)) as pool:
        addressed = _each(
            [(pool.submit(_address_on_node, cluster, record, mode, g, tx), None) for g in groups]
        )
        for made in addressed:
            for name, entry in made.items():
                record.pods[name] = entry
                tx.on_undo(f"record of {name}", lambda p=name: record.pods.pop(p, None))
        side = [(pool.submit(alongside), None)] if alongside is not None else []
        done = 0

        def wired(made: dict[str, PodRecord]) -> None:
            nonlocal done
            changes.created.extend(f"pod {name}" for name in made)
            done += len(made)
            progress(f"pods: {done}/{len(pods)}")

        wiring = [
            (pool.submit(_wire_on_node, cluster, record, mode, made, tx), wired)
            for made in addressed
        ]
        _each(side + wiring)


def _each(futures: list[tuple[Future, Callable | None]]) -> list:
    """Every future's result in order, each one's callback (if any) called on it as it is
    taken; all of them finish (or fail) before the first failure is raised, so the undo sees
    the whole of it."""
    results, failure = [], None
    for future, then in futures:
        try:
            result = future.result()
        except BaseException as exc:
            failure = failure or exc
            continue
        results.append(result)
        if then is not None:
            then(result)
    if failure is not None:
        raise failure
    return results


def _wire_on_node(
    cluster: Cluster, record: Record, mode: Mode, made: dict[str, PodRecord], tx: Transaction
) -> dict[str, PodRecord]:
    """One node's addressed pods: their namespaces made and wired."""
    from cni.wiring import Attachment, wire
    from netsim.kernel.netlink import Rtnl

    node = record.nodes[next(iter(made.values())).node]
    routes, prefixlen = mode.pod_routes(cluster, node), mode.pod_prefixlen(node)
    mtu = mode.pod_mtu(cluster.mtu)
    for entry in made.values():
        tx.netns(entry.netns)
    attachments = []
    try:
        for name, entry in made.items():
            attachments.append(
                Attachment(
                    entry.netns,
                    nsmod.open_fd(entry.netns),
                    entry.veth,
                    entry.ip,
                    prefixlen,
                    routes,
                    mtu,
                    alias=name,
                    index=entry.ifindex,
                )
            )
        with Rtnl(node.netns) as rt:
            wire(mode.pod_side, rt, attachments, loopback=True)
    finally:
        for attachment in attachments:
            os.close(attachment.pod_fd)
    return made


def _address_on_node(
    cluster: Cluster, record: Record, mode: Mode, pods: list[Pod], tx: Transaction
) -> dict[str, PodRecord]:
    """One IPAM session for the node's new pods: each one's address, names and index."""
    node = record.nodes[pods[0].node]
    ipam = mode.ipam(cluster, state.cluster_dir(cluster.name), node)
    made = {}
    with ipam.session():
        for pod in pods:
            ip = ipam.allocate(pod.name, "eth0")
            tx.on_undo(f"ip of {pod.name}", lambda p=pod.name, i=ipam: _release(i, p))
            made[pod.name] = PodRecord(
                pod,
                naming.ns_name(cluster.name, "pod", pod.name),
                ip,
                mode.host_veth(services.NAMESPACE, pod.name),
                node.next_ifindex,
            )
            node.next_ifindex += 1
    return made


def _exec_pods(
    cluster: Cluster,
    record: Record,
    mode: Mode,
    pods: list[Pod],
    tx: Transaction,
    progress: Progress,
    changes: Changes,
) -> None:
    """Wire each pod by executing its node's CNI chain, as containerd would: ADD through every
    plugin, the result cached; a failure runs DEL through the chain."""
    from cni.spec import CniError
    from netsim.cniconf import runtime
    from netsim.kernel.netlink import IFINDEX, Rtnl

    for done, pod in enumerate(pods, 1):
        netns = naming.ns_name(cluster.name, "pod", pod.name)
        tx.netns(netns)
        rt = runtime(record, pod.node)
        path = nsmod.path(netns)
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={services.NAMESPACE};K8S_POD_NAME={pod.name}"
        try:
            result = rt.add(pod.name, path, "eth0", args)
        except CniError as exc:
            try:
                rt.delete(pod.name, path, "eth0")
            except CniError:
                pass  # the ADD's own failure is the one to report
            raise NetsimError(
                f"CNI ADD for pod {pod.name} failed (code {exc.code}): {exc.msg}"
                + (f" ({exc.details})" if exc.details else "")
            ) from None
        tx.on_undo(f"CNI DEL of {pod.name}", lambda r=rt, p=pod.name, n=path: r.delete(p, n))
        with Rtnl(netns) as pod_rt:
            pod_rt.link_up(IFINDEX.LO, "lo")  # the runtime's loopback plugin
            pod_rt.commit()
        address = next(ip["address"] for ip in result["ips"])
        record.pods[pod.name] = PodRecord(
            pod, netns, address.split("/")[0], result["interfaces"][0]["name"], via="cni-exec"
        )
        tx.on_undo(f"record of {pod.name}", lambda p=pod.name: record.pods.pop(p, None))
        changes.created.append(f"pod {pod.name}")
        progress(f"pods: {done}/{len(pods)} (CNI exec)")


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


def remove(cluster: Cluster, record: Record, mode: Mode, removing: dict[str, PodRecord]) -> None:
    """Delete the host veth first (synchronous, takes the peer with it), then the namespace,
    then release the address."""
    from netsim.cniconf import runtime
    from netsim.kernel.netlink import Rtnl

    by_node: dict[str, list[PodRecord]] = {}
    for entry in removing.values():
        by_node.setdefault(entry.node, []).append(entry)
    for node_name, items in by_node.items():
        node = record.nodes[node_name]
        for entry in items:
            if entry.via == "cni-exec":  # DEL through the chain, as it was added
                runtime(record, node_name).delete(entry.name, nsmod.path(entry.netns))
        with Rtnl(node.netns) as rt:
            for entry in items:
                if entry.via != "cni-exec":
                    rt.link_delete(entry.ifindex, entry.veth)
            rt.commit()
        ipam = mode.ipam(cluster, state.cluster_dir(cluster.name), node)
        with ipam.session():
            for entry in items:
                nsmod.remove(entry.netns)
                ipam.release(entry.name, "eth0")
