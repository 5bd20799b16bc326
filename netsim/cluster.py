"""Reconcile a topology against the cluster's record: compute what differs, then make exactly
those kernel changes, in order, undoing this call's own work if any step fails.

The first apply builds the underlay, the nodes (with their mode's devices, peers, masquerade
rules and agent) and the pods; later applies add and remove only the pods that differ. Cluster-
level changes (mode, CIDRs, MTU, segments, nodes) are refused with the fix: delete, then apply.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from netaddr import IPNetwork

from netsim import agent as agentmod
from netsim import state
from netsim.errors import NetsimError
from netsim.kernel import ipip_bpf, nft, proc, sysctl
from netsim.kernel import netns as nsmod
from netsim.model import Cluster, Pod
from netsim.topology import allocate_cluster_ips, schedule

# pyroute2 takes ~130 ms to import; delete, gc and get do not need it, so the modules that
# use it (netsim.kernel.netlink, cni.modes) are imported by the functions that build.

# a pod out of its Services keeps serving this long before it is stopped, as a terminating
# pod does for its grace period, so a connection begun just before the update still finishes
TERMINATION_GRACE = 0.2
CNI_NETWORK = "cbr0"  # the network name in kube-flannel's CNI config (Calico's: k8s-pod-network)

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def ns_name(cluster: str, role: str, name: str = "") -> str:
    """netsim.<cluster>.underlay | .node.<name> | .pod.<name> | .ext.<name>"""
    return f"{state.PREFIX}.{cluster}.{role}" + (f".{name}" if name else "")


def port_name(host: str) -> str:
    """The host's port on its segment bridge in the underlay namespace (alias: the host)."""
    import hashlib

    name = f"p-{host}"
    return name if len(name) <= 15 else "p-" + hashlib.sha256(host.encode()).hexdigest()[:8]


def spec_of(cluster: Cluster) -> dict:
    """The cluster-level part of a topology, which an apply may not change in place."""
    return {"mode": cluster.mode, "pod_network": cluster.pod_network,
            "subnet_len": cluster.subnet_len, "service_cidr": cluster.service_cidr,
            "mtu": cluster.mtu, "segments": [asdict(s) for s in cluster.segments],
            "nodes": [asdict(n) for n in cluster.nodes],
            "clients": [asdict(c) for c in cluster.clients],
            "cni_version": cluster.cni_version, "cni_plugins": cluster.cni_plugins,
            "proxy_mode": cluster.proxy_mode}


@dataclass
class Changes:
    """What an apply did, for the summary line and for tests of idempotence."""

    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.created or self.removed or self.updated)

    def summary(self) -> str:
        if not self:
            return "unchanged"
        parts = [f"{len(v)} {k}" for k, v in (("created", self.created),
                                              ("removed", self.removed),
                                              ("updated", self.updated)) if v]
        return ", ".join(parts)


class Transaction:
    """Journals every namespace and process before creating it, and keeps the undo steps of
    this call so a failure leaves nothing of it behind."""

    def __init__(self, cluster: str):
        self.cluster = cluster
        self.undo: list[tuple[str, Callable[[], None]]] = []

    def netns(self, name: str) -> None:
        state.journal(self.cluster, {"netns": name})
        nsmod.create(name)
        self.undo.append((f"netns {name}", lambda: nsmod.remove(name)))

    def on_undo(self, what: str, step: Callable[[], None]) -> None:
        self.undo.append((what, step))

    def rollback(self) -> list[str]:
        """Undo in reverse; report steps that failed instead of hiding them."""
        problems = []
        for what, step in reversed(self.undo):
            try:
                step()
            except Exception as exc:  # keep undoing the rest
                problems.append(f"{what}: {exc}")
        self.undo.clear()
        return problems


# -- apply ------------------------------------------------------------------------------------


def preflight(cluster: Cluster) -> None:
    """Checks that need the host but change nothing, run before the first kernel change."""
    if nft.available() is None:
        raise NetsimError("nft not found: flannel's masquerade rules need nftables "
                          "(apt-get install nftables, or run ./bootstrap)")
    taken = [n for n in nsmod.names() if n.startswith(state.netns_prefix(cluster.name))]
    if taken and state.load(cluster.name) is None:
        raise NetsimError(f"namespaces of cluster {cluster.name} exist but it has no record "
                          f"({taken[0]} ...): run `netsim gc` first")


def apply(cluster: Cluster, progress: Progress = quiet, cni_exec: bool = False,
          overrides: dict | None = None) -> Changes:
    """Converge the kernel to the topology. With cni_exec, new pods are wired by executing each
    node's CNI config list as a runtime would, instead of in-process."""
    preflight(cluster)
    with state.locked(cluster.name):
        record = state.load(cluster.name)
        if record is not None and record["spec"] != spec_of(cluster):
            raise NetsimError(
                f"cluster {cluster.name} exists with a different mode, CIDRs, MTU, segments or "
                f"nodes; netsim changes pods and services in place, not those: run `netsim "
                f"delete -f {cluster.source}` with the old file (or `netsim down "
                f"{cluster.name}`), then apply again")
        fresh = record is None
        tx = Transaction(cluster.name)
        changes = Changes()
        try:
            if fresh:
                record = _build_base(cluster, tx, progress, changes)
            _reconcile_pods(cluster, record, tx, progress, changes, cni_exec)
            _reconcile_services(cluster, record, changes)
            _sync_kube_proxy(cluster, record)
            record["source"] = os.path.abspath(cluster.source) if cluster.source else ""
            record["overrides"] = overrides or {}  # apply -f: the file is the truth again
            if changes or fresh:
                state.save(record)
        except BaseException as exc:
            problems = tx.rollback()
            if fresh:
                _stop_agents(record or {})
                state.remove(cluster.name)
            else:
                committed = state.load(cluster.name)
                _sync_agents(committed, cluster.name, list(committed["nodes"]))
            detail = ("; rollback also failed for: " + "; ".join(problems)) if problems else ""
            if isinstance(exc, NetsimError):
                raise NetsimError(f"apply failed, this apply's changes were undone: {exc}"
                                  f"{detail}") from exc
            raise
        return changes


def _build_base(cluster: Cluster, tx: Transaction, progress: Progress,
                changes: Changes) -> dict:
    from cni import modes
    from netsim.kernel.netlink import IFINDEX, Rtnl

    mode = modes.get(cluster.mode)
    name = cluster.name
    state.journal(name, {"apply": os.getpid()})
    plan = mode.plan_nodes(cluster, state.cluster_dir(name))
    record: dict = {
        "cluster": name, "spec": spec_of(cluster), "mode": cluster.mode,
        "underlay": {"netns": ns_name(name, "underlay"), "bridges": {}},
        "router": {"netns": ns_name(name, "router"), "legs": {}},
        "nodes": {}, "clients": {}, "pods": {}, "services": {},
    }
    progress(f"underlay: {len(cluster.segments)} segment(s) and their router")
    underlay = record["underlay"]["netns"]
    tx.netns(underlay)
    changes.created.append(f"netns {underlay}")
    bridges = {}
    with Rtnl(underlay) as ul:
        ul.link_up(IFINDEX.LO, "lo")
        for i, seg in enumerate(cluster.segments):
            bridges[seg.name] = IFINDEX.ETH0 + i
            ul.bridge(f"br-{seg.name}", bridges[seg.name], mtu=cluster.mtu)
        ul.commit()
        record["underlay"]["bridges"] = {s: f"br-{s}" for s in bridges}
        _build_router(cluster, record, tx, ul, bridges, changes)
        hosts = [("node", n) for n in cluster.nodes] + [("ext", c) for c in cluster.clients]
        for i, (role, host) in enumerate(hosts):
            netns = ns_name(name, role, host.name)
            tx.netns(netns)
            changes.created.append(f"netns {netns}")
            fd = nsmod.open_fd(netns)
            try:
                ul.veth(port_name(host.name), IFINDEX.FIRST_DYNAMIC + i, "eth0", IFINDEX.ETH0, fd,
                        cluster.mtu, master=bridges[host.segment], alias=host.name)
                ul.commit()
            finally:
                os.close(fd)
            prefix = IPNetwork(cluster.segment(host.segment).subnet).prefixlen
            entry = {"netns": netns, "ip": host.ip, "segment": host.segment,
                     "prefixlen": prefix, "port": port_name(host.name),
                     "gateway": _router_ip(cluster, host.segment)}
            if role == "node":
                entry.update(next_ifindex=IFINDEX.FIRST_DYNAMIC, **plan[host.name],
                             **mode.node_facts(name, host.name))
                record["nodes"][host.name] = entry
            else:
                entry["asn"] = getattr(host, "asn", 0)
                record["clients"][host.name] = entry
    progress(f"nodes: {len(cluster.nodes)} in mode {cluster.mode}")
    for role, host in [("node", h) for h in record["nodes"].values()] + \
            [("ext", h) for h in record["clients"].values()]:
        with Rtnl(host["netns"]) as rt:
            rt.link_up(IFINDEX.LO, "lo")
            rt.link_up(IFINDEX.ETH0, "eth0")
            rt.address(IFINDEX.ETH0, host["ip"], host["prefixlen"], "eth0")
            # the segment's router is every host's gateway: it joins the racks, and a node's
            # default route is what makes Calico's proxy ARP answer for 169.254.1.1
            rt.route("default", IFINDEX.ETH0, gateway=host["gateway"])
            if role == "node":
                mode.setup_node(rt, host, cluster.mtu)
            rt.commit()
    for node_name, node in record["nodes"].items():
        if hasattr(mode, "start_node"):  # a carrier outside netlink (eBPF)
            tx.on_undo(f"carrier of {node_name}", lambda n=node: mode.stop_node(n))
            mode.start_node(state.cluster_dir(name), node)
        _start_agent(name, node_name, node, tx)
    _agent_tunnels(cluster, record, mode)
    for node_name, node in record["nodes"].items():
        sysctl.set_in(node["netns"], {"net.ipv4.ip_forward": "1"})
        with Rtnl(node["netns"]) as rt:
            for peer_name, peer in record["nodes"].items():
                if peer_name != node_name:
                    mode.add_peer(rt, node, peer)
            rt.commit()
        nft.apply(node["netns"], mode.masquerade(cluster, node))
        _write_node_files(cluster, node_name, node, mode)
    for path, text in mode.cluster_files(cluster, record).items():
        state.write_file(os.path.join(state.cluster_dir(name), path), text)
    if hasattr(mode, "start_cluster"):  # daemons that need every node up first (BIRD)
        progress("BGP: starting BIRD on every node, waiting for the sessions")

        def started(entry: dict, pid: int, start: int) -> None:
            state.journal(name, {"pid": pid, "start": start})
            tx.on_undo(f"process {pid}", lambda: proc.stop([(pid, start)]))

        mode.start_cluster(cluster, record, state.cluster_dir(name), started)
    return record


def _agent_tunnels(cluster: Cluster, record: dict, mode) -> None:
    """Userspace carriers (flannel-udp, Calico IPIP's last resort) live in the node agents:
    give each agent its TUN and peer table, then note the TUN's interface index for routes."""
    from netsim.kernel.netlink import Rtnl

    if not hasattr(mode, "tunnel_spec"):
        return
    nodes = record["nodes"]
    for name, node in nodes.items():
        peers = [p for n, p in nodes.items() if n != name]
        spec = mode.tunnel_spec(node, peers, cluster.mtu)
        if spec:
            node["agent_tunnel"] = spec
    _sync_agents(record, cluster.name, [n for n, node in nodes.items() if "agent_tunnel" in node])
    for node in nodes.values():
        if "agent_tunnel" in node:
            with Rtnl(node["netns"]) as rt:
                node["tunnel_index"] = rt.link(node["agent_tunnel"]["name"])["index"]


def _router_ip(cluster: Cluster, segment: str) -> str:
    """.1 of each segment belongs to the router."""
    return str(IPNetwork(cluster.segment(segment).subnet).network + 1)


def _build_router(cluster: Cluster, record: dict, tx: Transaction, ul, bridges: dict,
                  changes: Changes) -> None:
    """One router namespace with a leg on every segment holding the segment's .1: it routes
    between the racks' subnets, as a top-of-rack / spine pair would."""
    from netsim.kernel.netlink import IFINDEX, Rtnl

    netns = record["router"]["netns"]
    tx.netns(netns)
    changes.created.append(f"netns {netns}")
    fd = nsmod.open_fd(netns)
    legs = {}
    try:
        for i, seg in enumerate(cluster.segments):
            legs[seg.name] = {"ifname": f"r-{seg.name}", "index": IFINDEX.FIRST_DYNAMIC + i,
                              "port": f"rp-{seg.name}"}
            ul.veth(legs[seg.name]["port"], IFINDEX.FIRST_DYNAMIC + 500 + i,
                    legs[seg.name]["ifname"], legs[seg.name]["index"], fd, cluster.mtu,
                    master=bridges[seg.name], alias=f"router leg on {seg.name}")
        ul.commit()
    finally:
        os.close(fd)
    with Rtnl(netns) as rt:
        rt.link_up(IFINDEX.LO, "lo")
        for seg in cluster.segments:
            leg = legs[seg.name]
            rt.link_up(leg["index"], leg["ifname"])
            rt.address(leg["index"], _router_ip(cluster, seg.name),
                       IPNetwork(seg.subnet).prefixlen, leg["ifname"])
        rt.commit()
    sysctl.set_in(netns, {"net.ipv4.ip_forward": "1"})
    record["router"]["legs"] = legs


def _write_node_files(cluster: Cluster, node_name: str, node: dict, mode) -> None:
    """The mode's node files (flannel's subnet.env), and net.d/10-<mode>.conflist: the CNI
    config list a real node holds in /etc/cni/net.d, usable as it is by a runtime run inside
    the node's namespace."""
    directory = state.node_dir(cluster.name, node_name)
    for name, text in mode.node_files(cluster, node).items():
        state.write_file(os.path.join(directory, name), text)
    own = mode.cni_config(cluster, node, state.cluster_dir(cluster.name), directory)
    conflist = {"cniVersion": cluster.cni_version,
                "name": getattr(mode, "cni_network", CNI_NETWORK),
                "plugins": [own] + cluster.cni_plugins}
    state.write_file(conflist_path(cluster.name, node_name, cluster.mode),
                     json.dumps(conflist, indent=2) + "\n")


def conflist_path(cluster: str, node: str, mode: str) -> str:
    return os.path.join(state.node_dir(cluster, node), "net.d", f"10-{mode}.conflist")


def cni_bin_dir(cluster: str) -> str:
    """A CNI bin directory holding netsim's plugin under its type name, `netsim`."""
    from cni import plugin

    directory = os.path.join(state.cluster_dir(cluster), "bin")
    if not os.path.exists(os.path.join(directory, "netsim")):
        plugin.install(directory)
    return directory


def runtime(cluster: str, record: dict, node_name: str):
    """A CNI runtime for one node: its config list, run inside the node's namespace, results
    cached in the node's state."""
    from cni.runtime import DEFAULT_PATH, Runtime

    return Runtime(conflist_path(cluster, node_name, record["mode"]),
                   [cni_bin_dir(cluster)] + DEFAULT_PATH,
                   os.path.join(state.node_dir(cluster, node_name), "cni-cache"),
                   run_in=record["nodes"][node_name]["netns"])


def _start_agent(cluster: str, node_name: str, node: dict, tx: Transaction) -> None:
    directory = state.node_dir(cluster, node_name)
    os.makedirs(directory, exist_ok=True)
    control = agentmod.listen(os.path.join(directory, "agent.sock"))
    try:
        argv = [sys.executable, "-m", "netsim.agent", str(control.fileno()), cluster, node_name,
                node["netns"]]
        pid, started = proc.spawn(argv, os.path.join(directory, "agent.log"),
                                  pass_fds=(control.fileno(),))
    finally:
        control.close()
    state.journal(cluster, {"pid": pid, "start": started})
    node["agent"] = {"pid": pid, "start": started}
    tx.on_undo(f"agent of {node_name}", lambda: proc.stop([(pid, started)]))


def daemons(record: dict) -> list[tuple[int, int]]:
    """(pid, start time) of every process the record holds: agents, BIRDs."""
    hosts = list(record.get("nodes", {}).values()) + list(record.get("clients", {}).values())
    return [(h[kind]["pid"], h[kind]["start"]) for h in hosts for kind in ("agent", "bird")
            if kind in h]


def _stop_agents(record: dict) -> None:
    proc.stop(daemons(record))


# -- pods -------------------------------------------------------------------------------------


def _pod_fingerprint(pod: Pod) -> dict:
    """What, if changed, needs the pod rebuilt; in its JSON form, to compare with the record."""
    return json.loads(json.dumps({"node": pod.node,
                                  "containers": [asdict(c) for c in pod.containers]}))


def _reconcile_pods(cluster: Cluster, record: dict, tx: Transaction, progress: Progress,
                    changes: Changes, cni_exec: bool = False) -> None:
    recorded = record["pods"]
    desired = {p.name: p for p in schedule(cluster, {n: r["node"] for n, r in recorded.items()})}
    stale = [n for n, r in recorded.items()
             if n not in desired or r["spec"] != _pod_fingerprint(desired[n])]
    new = [p for n, p in desired.items() if n not in recorded or n in stale]
    for name, pod in desired.items():
        if name in recorded and name not in stale and recorded[name]["labels"] != pod.labels:
            recorded[name]["labels"] = pod.labels
            changes.updated.append(f"pod {name} labels")
    removing = {n: recorded.pop(n) for n in stale}
    if removing:
        if record.get("kube_proxy") is not None:
            # endpoints leave every node's Services first, as a terminating pod leaves its
            # EndpointSlice before it is killed: no new connection goes to a pod being removed
            _sync_kube_proxy(cluster, record, terminating=removing)
            if record["services"]:
                time.sleep(TERMINATION_GRACE)
        # a replaced pod keeps its name: take the old one down before building the new one
        _sync_agents(record, cluster.name, sorted({e["node"] for e in removing.values()}))
        _remove_pods(cluster, record, removing, progress)
        changes.removed += [f"pod {n}" for n in removing]
        state.save(record)  # removals are done: a later failure rolls back to this record
    if new:
        (_exec_pods if cni_exec else _add_pods)(cluster, record, new, tx, progress, changes)
        _sync_agents(record, cluster.name, sorted({p.node for p in new}))


def _add_pods(cluster: Cluster, record: dict, pods: list[Pod], tx: Transaction,
              progress: Progress, changes: Changes) -> None:
    """The in-process path: per node one IPAM session, one netlink batch for the host sides,
    one small batch inside each pod."""
    from cni import modes
    from cni.modes import bridge
    from netsim.kernel.netlink import IFINDEX, Rtnl

    mode = modes.get(cluster.mode)
    mtu = mode.pod_mtu(cluster.mtu)
    by_node: dict[str, list[Pod]] = {}
    for pod in pods:
        by_node.setdefault(pod.node, []).append(pod)
    done = 0
    for node_name, node_pods in by_node.items():
        node = record["nodes"][node_name]
        ipam = _ipam(cluster, record, node_name, mode)
        routes = mode.pod_routes(cluster.pod_network, node)
        prefixlen = mode.pod_prefixlen(node)
        entries = {}
        with ipam.session():
            for pod in node_pods:
                ip = ipam.allocate(pod.name, "eth0")
                tx.on_undo(f"ip of {pod.name}", lambda p=pod.name, i=ipam: _release(i, p))
                entries[pod.name] = {
                    "node": node_name, "netns": ns_name(cluster.name, "pod", pod.name), "ip": ip,
                    "veth": mode.host_veth(pod.name),
                    "ifindex": node["next_ifindex"], "labels": pod.labels, "owner": pod.owner,
                    "spec": _pod_fingerprint(pod), "ports": list(pod.serve_ports),
                    "named_ports": dict(n for c in pod.containers for n in c.port_names),
                    "commands": [list(c.command) for c in pod.containers if c.command]}
                node["next_ifindex"] += 1
        for entry in entries.values():
            tx.netns(entry["netns"])
        fds = []
        try:
            with Rtnl(node["netns"]) as rt:
                for pod_name, entry in entries.items():
                    fds.append(nsmod.open_fd(entry["netns"]))
                    mode.attach_host(rt, fds[-1], entry["veth"], entry["ifindex"], mtu, pod_name,
                                     entry["ip"])
                rt.commit()
        finally:
            for fd in fds:
                os.close(fd)
        mode.after_host(node["netns"], [e["veth"] for e in entries.values()])
        for pod_name, entry in entries.items():
            with Rtnl(entry["netns"]) as rt:
                rt.link_up(IFINDEX.LO, "lo")  # what a runtime's loopback plugin does
                bridge.attach_pod_side(rt, entry["ip"], prefixlen, routes)
                rt.commit()
            record["pods"][pod_name] = entry
            tx.on_undo(f"record of {pod_name}", lambda p=pod_name: record["pods"].pop(p, None))
            changes.created.append(f"pod {pod_name}")
        done += len(entries)
        progress(f"pods: {done}/{len(pods)}")
    _sync_blocks(cluster, record, mode, tx)


def _sync_blocks(cluster: Cluster, record: dict, mode, tx: Transaction) -> None:
    """Calico: a node whose blocks filled up claimed another; program it as felix (or BIRD)
    would: a blackhole on the owner, a route on every peer."""
    from netsim.kernel.netlink import Rtnl

    if not hasattr(mode, "store"):
        return
    affinity = mode.store(cluster, state.cluster_dir(cluster.name)).affinity()
    for node_name, node in record["nodes"].items():
        new = [b for b, owner in affinity.items() if owner == node_name
               and b not in node["blocks"]]
        if not new:
            continue
        with Rtnl(node["netns"]) as rt:
            for block in new:
                mode.own_block(rt, block)
            rt.commit()
        for peer_name, peer in record["nodes"].items():
            if peer_name != node_name:
                with Rtnl(peer["netns"]) as rt:
                    mode.peer_blocks(rt, peer, node, new)
                    rt.commit()
        node["blocks"] += new
        mode.blocks_changed(cluster, record, node_name)
        _agent_tunnels(cluster, record, mode)


def _exec_pods(cluster: Cluster, record: dict, pods: list[Pod], tx: Transaction,
               progress: Progress, changes: Changes) -> None:
    """Wire each pod by executing its node's CNI chain, as containerd would: ADD through every
    plugin, the result cached; a failure runs DEL through the chain."""
    from cni.spec import CniError
    from netsim.kernel.netlink import IFINDEX, Rtnl

    for done, pod in enumerate(pods, 1):
        netns = ns_name(cluster.name, "pod", pod.name)
        tx.netns(netns)
        rt = runtime(cluster.name, record, pod.node)
        path = nsmod.path(netns)
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.name}"
        try:
            result = rt.add(pod.name, path, "eth0", args)
        except CniError as exc:
            try:
                rt.delete(pod.name, path, "eth0")
            except CniError:
                pass  # the ADD's own failure is the one to report
            raise NetsimError(f"CNI ADD for pod {pod.name} failed (code {exc.code}): {exc.msg}"
                              + (f" ({exc.details})" if exc.details else "")) from None
        tx.on_undo(f"CNI DEL of {pod.name}", lambda r=rt, p=pod.name, n=path: r.delete(p, n))
        with Rtnl(netns) as pod_rt:
            pod_rt.link_up(IFINDEX.LO, "lo")  # the runtime's loopback plugin
            pod_rt.commit()
        address = next(ip["address"] for ip in result["ips"])
        record["pods"][pod.name] = {
            "node": pod.node, "netns": netns, "ip": address.split("/")[0],
            "veth": result["interfaces"][0]["name"], "via": "cni-exec",
            "labels": pod.labels, "owner": pod.owner, "spec": _pod_fingerprint(pod),
            "ports": list(pod.serve_ports),
            "named_ports": dict(n for c in pod.containers for n in c.port_names),
            "commands": [list(c.command) for c in pod.containers if c.command]}
        tx.on_undo(f"record of {pod.name}", lambda p=pod.name: record["pods"].pop(p, None))
        changes.created.append(f"pod {pod.name}")
        progress(f"pods: {done}/{len(pods)} (CNI exec)")
    from cni import modes

    _sync_blocks(cluster, record, modes.get(cluster.mode), tx)  # blocks the plugin claimed


def _ipam(cluster: Cluster, record: dict, node_name: str, mode=None):
    """The node's address allocator: host-local over its subnet, or Calico's blocks."""
    from cni import modes

    mode = mode or modes.get(cluster.mode)
    return mode.ipam(cluster, state.cluster_dir(cluster.name), node_name,
                     record["nodes"][node_name])


def _release(ipam, pod: str) -> None:
    with ipam.session():
        ipam.release(pod, "eth0")


def _sync_agents(record: dict, cluster: str, nodes: list[str],
                 terminating: dict | None = None) -> None:
    """Tell each node's agent the exact set of pods it serves (the recorded ones, and those
    `terminating`: out of the Services already, still serving), and wait for it to confirm."""
    for node_name in nodes:
        pods = {n: {"netns": p["netns"], "ports": p["ports"], "commands": p["commands"]}
                for n, p in (record["pods"] | (terminating or {})).items()
                if p["node"] == node_name}
        path = os.path.join(state.node_dir(cluster, node_name), "agent.sock")
        try:
            reply = agentmod.request(path, pods, record["nodes"][node_name].get("agent_tunnel"),
                                     (record.get("kube_proxy") or {}).get("userspace"))
        except OSError as exc:
            raise NetsimError(f"the agent of node {node_name} did not answer ({exc}); see "
                              f"{os.path.dirname(path)}/agent.log") from None
        if not reply.get("ok"):
            raise NetsimError(f"the agent of node {node_name} could not serve pods or its "
                              f"tunnel: {reply.get('errors')}")
        for pod_name, pids in reply.get("pids", {}).items():
            if pod_name in record["pods"]:
                record["pods"][pod_name]["pids"] = pids
        record["nodes"][node_name]["proxy_ports"] = reply.get("proxy_ports") or {}


def _remove_pods(cluster: Cluster, record: dict, removing: dict, progress: Progress) -> None:
    """Delete the host veth first (synchronous, takes the peer with it), then the namespace,
    then release the address."""
    from netsim.kernel.netlink import Rtnl

    by_node: dict[str, list[tuple[str, dict]]] = {}
    for name, entry in removing.items():
        by_node.setdefault(entry["node"], []).append((name, entry))
    for node_name, items in by_node.items():
        node = record["nodes"][node_name]
        for name, entry in items:
            if entry.get("via") == "cni-exec":  # DEL through the chain, as it was added
                runtime(cluster.name, record, node_name).delete(name, nsmod.path(entry["netns"]))
        with Rtnl(node["netns"]) as rt:
            for _, entry in items:
                if entry.get("via") != "cni-exec":
                    rt.link_delete(entry["ifindex"], entry["veth"])
            rt.commit()
        ipam = _ipam(cluster, record, node_name)
        with ipam.session():
            for name, entry in items:
                nsmod.remove(entry["netns"])
                ipam.release(name, "eth0")
    progress(f"pods: removed {len(removing)}")


def _reconcile_services(cluster: Cluster, record: dict, changes: Changes) -> None:
    """Services with their ClusterIPs and node ports (kept across applies once given)."""
    ips = allocate_cluster_ips(cluster, {n: s["clusterIP"] for n, s in record["services"].items()})
    node_ports = _allocate_node_ports(cluster, record)
    wanted = {}
    for svc in cluster.services:
        ports = [asdict(p) for p in svc.ports]
        for i, port in enumerate(ports):
            if svc.type == "NodePort":
                port["node_port"] = node_ports[(svc.name, i)]
        wanted[svc.name] = {"clusterIP": ips[svc.name], "type": svc.type,
                            "selector": svc.selector, "ports": ports,
                            "sessionAffinity": svc.session_affinity,
                            "affinityTimeout": svc.affinity_timeout}
    for name in set(record["services"]) | set(wanted):
        before, after = record["services"].get(name), wanted.get(name)
        if before != after:
            (changes.created if before is None else
             changes.removed if after is None else changes.updated).append(f"service {name}")
    record["services"] = wanted


def _allocate_node_ports(cluster: Cluster, record: dict) -> dict[tuple[str, int], int]:
    """NodePorts: as written, else as before, else the lowest free of 30000-32767."""
    from netsim.topology import NODE_PORT_RANGE

    given = {(s.name, i): p.node_port for s in cluster.services if s.type == "NodePort"
             for i, p in enumerate(s.ports) if p.node_port}
    before = {(n, i): p.get("node_port") for n, svc in record["services"].items()
              for i, p in enumerate(svc["ports"]) if p.get("node_port")}
    result = dict(given)
    for svc in cluster.services:
        for i, _ in enumerate(svc.ports):
            key = (svc.name, i)
            if svc.type == "NodePort" and key not in result and before.get(key) and \
                    before[key] not in result.values():
                result[key] = before[key]
    free = (p for p in range(NODE_PORT_RANGE[0], NODE_PORT_RANGE[1] + 1)
            if p not in result.values())
    for svc in cluster.services:
        for i, _ in enumerate(svc.ports):
            if svc.type == "NodePort" and (svc.name, i) not in result:
                result[(svc.name, i)] = next(free)
    return result


def endpoints(record: dict, service: dict) -> list[tuple[str, str]]:
    """(pod, ip) of the pods the selector matches, ordered by IP as kube-proxy orders them."""
    pods = [(n, p["ip"]) for n, p in record["pods"].items()
            if all(p["labels"].get(k) == v for k, v in service["selector"].items())]
    return sorted(pods, key=lambda x: tuple(int(o) for o in x[1].split(".")))


def target_port(record: dict, pod: str, port: dict) -> int | None:
    """A service port's targetPort in one pod: the number, or the pod's port of that name."""
    target = port["target_port"]
    if isinstance(target, int):
        return target
    return record["pods"][pod].get("named_ports", {}).get(target)


def service_ports(record: dict) -> list:
    """Every Service port with its endpoints, as kube-proxy's sync sees them."""
    from netsim.kubeproxy.nftables import Endpoint, ServicePort

    found = []
    for name, svc in sorted(record["services"].items()):
        eps = endpoints(record, svc)
        for port in svc["ports"]:
            resolved = [(ip, target_port(record, pod, port)) for pod, ip in eps]
            found.append(ServicePort(
                "default", name, port["name"], port["protocol"], svc["clusterIP"], port["port"],
                port.get("node_port"), tuple(Endpoint(ip, t) for ip, t in resolved if t),
                svc["affinityTimeout"] if svc["sessionAffinity"] == "ClientIP" else None))
    return found


def _sync_userspace_proxy(cluster: Cluster, record: dict, ports: list,
                          terminating: dict | None = None) -> None:
    """kube-proxy's userspace mode: every node's agent proxies every Service port on a port of
    its own; the node's nftables send ClusterIP and NodePort traffic there. Pods that are
    `terminating` keep serving until every proxy has let them go."""
    from netsim.kubeproxy import userspace_rules

    services = {userspace_rules.key(p): {
        "protocol": p.protocol, "endpoints": [[e.ip, e.port] for e in p.endpoints],
        "affinity": "ClientIP" if p.affinity_timeout else "None",
        "timeout": p.affinity_timeout or 10800} for p in ports}
    fresh = (record.get("kube_proxy") or {}).get("mode") != "userspace"
    record["kube_proxy"] = {"mode": "userspace", "userspace": services,
                            "ports": ports}
    _sync_agents(record, cluster.name, list(record["nodes"]), terminating)
    for node in record["nodes"].values():
        nft.apply(node["netns"], userspace_rules.ruleset(ports, node["proxy_ports"], node["ip"],
                                                         fresh))


def _sync_kube_proxy(cluster: Cluster, record: dict, terminating: dict | None = None) -> None:
    """Program every Service into every node, as kube-proxy does on each node: the first sync
    loads the whole table with `nft -f`, later ones send only what changed as one nf_tables
    batch per node. Pods `terminating` are out of the Services but still serve (the
    userspace proxies' agents keep them) until the caller stops them."""
    from netsim.kubeproxy import nftables as kp
    from netsim.kubeproxy.nftables import Endpoint, ServicePort

    ports = service_ports(record)
    if cluster.proxy_mode == "userspace":
        return _sync_userspace_proxy(cluster, record, ports, terminating)
    previous = record.get("kube_proxy")
    if previous is None or previous.get("mode") != "nftables":
        text = kp.full(kp.compute(ports, cluster.pod_network))
        for node in record["nodes"].values():
            nft.apply(node["netns"], text)
    else:
        old_ports = [ServicePort(*p[:7], tuple(Endpoint(*e) for e in p[7]), p[8])
                     for p in previous["ports"]]
        batch = kp.changes(old_ports, ports, cluster.pod_network)
        for node in record["nodes"].values():
            batch.commit(node["netns"])
    record["kube_proxy"] = {"mode": "nftables", "ports": ports}  # tuples: JSON lists


# -- delete and gc ----------------------------------------------------------------------------


def delete(name: str, progress: Progress = quiet) -> list[str]:
    """Remove everything the cluster's record, journal and names hold; list what was removed."""
    with state.locked(name):
        record = state.load(name)
        removed = _remove_everything(name, record, before_namespaces=lambda: state.remove(name))
    progress(f"removed {len(removed)} objects")
    return removed


def _remove_everything(name: str, record: dict | None,
                       before_namespaces: Callable[[], None] = lambda: None) -> list[str]:
    processes, namespaces = [], []
    journal = state.journal_entries(name)
    if record:
        processes += daemons(record)
        namespaces += [p["netns"] for p in record["pods"].values()]
        namespaces += [h["netns"] for h in list(record["clients"].values())
                       + list(record["nodes"].values())]
        namespaces.append(record["underlay"]["netns"])
        if "router" in record:
            namespaces.append(record["router"]["netns"])
    processes += [(e["pid"], e["start"]) for e in journal if "pid" in e]
    namespaces += [e["netns"] for e in journal if "netns" in e]
    prefix = state.netns_prefix(name)
    namespaces += [n for n in nsmod.names() if n.startswith(prefix)]
    removed = [f"process {pid}" for pid, started in set(processes) if proc.alive(pid, started)]
    proc.stop(list(set(processes)))
    # the kernel tears namespaces down in the background and that competes for the CPU, so
    # whatever else is to be removed goes first; a crash from here leaves only namespaces
    # that carry the cluster's name, which gc finds by name
    before_namespaces()
    for netns in dict.fromkeys(namespaces):
        if netns.startswith(prefix) and nsmod.remove(netns):
            removed.append(f"netns {netns}")
    for netns in ipip_bpf.pinned_namespaces():  # eBPF pins outlive their namespace
        if netns.startswith(prefix) and ipip_bpf.remove_pins(netns):
            removed.append(f"bpf pins of {netns}")
    return removed


def gc(only: str | None = None) -> dict[str, list[str]]:
    """Remove what crashed or killed runs left: for a cluster with no committed record,
    everything with its name; for a committed one, what its journal names beyond the record.
    A cluster another netsim run is changing is left alone."""
    names = set(state.clusters())
    names |= {n.split(".")[1] for n in nsmod.names()
              if n.startswith(state.PREFIX + ".") and n.count(".") >= 2}
    names.discard("probe")
    report: dict[str, list[str]] = {}
    for name in sorted(names):
        if only and name != only:
            continue
        try:
            with state.locked(name, wait=False):
                record = state.load(name)
                if record is None:
                    report[name] = _remove_everything(name, None)
                    state.remove(name)
                else:
                    report[name] = _collect_leftovers(name, record)
        except NetsimError as exc:
            report[name] = [f"skipped: {exc}"]
    return report


def _collect_leftovers(name: str, record: dict) -> list[str]:
    keep = {record["underlay"]["netns"], record.get("router", {}).get("netns")}
    keep |= {h["netns"] for h in list(record["nodes"].values()) + list(record["clients"].values())}
    keep |= {p["netns"] for p in record["pods"].values()}
    keep_pids = set(daemons(record))
    removed = []
    for entry in state.journal_entries(name):
        if "pid" in entry and (entry["pid"], entry["start"]) not in keep_pids and \
                proc.alive(entry["pid"], entry["start"]):
            proc.stop([(entry["pid"], entry["start"])])
            removed.append(f"process {entry['pid']}")
    for netns in nsmod.names():
        if netns.startswith(state.netns_prefix(name)) and netns not in keep:
            nsmod.remove(netns)
            removed.append(f"netns {netns}")
    state.save(record)  # clears the journal
    return removed
