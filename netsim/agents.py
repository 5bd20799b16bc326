"""The node agents from netsim's side: start one per node, tell each its userspace carrier,
lease and daemons (its kubelet takes its pods from the store), wait for what they report, stop
them by PID."""

from __future__ import annotations

import dataclasses
import os
import sys

import msgspec

from netsim import agent as agentmod
from netsim import state
from netsim.errors import NetsimError
from netsim.kernel import proc
from netsim.record import NodeRecord, Process, Record
from netsim.transaction import Transaction


def start(record: Record, node: NodeRecord, tx: Transaction) -> None:
    """The agent, forked by the cluster's zygote (netsim/zygote.py; started first if it is not
    running). It binds nothing itself: netsim hands it the control socket, already listening,
    so requests can be sent at once."""
    from netsim import zygote

    cluster = record.cluster
    directory = state.node_dir(cluster, node.name)
    os.makedirs(directory, exist_ok=True)
    running = record.zygote
    if running is None or not proc.alive(running.pid, running.start):
        record.zygote = start_zygote(cluster, tx)
    control = agentmod.listen(os.path.join(directory, "agent.sock"))
    try:
        request = {
            "cluster": cluster,
            "node": node.name,
            "netns": node.netns,
            "log": os.path.join(directory, "agent.log"),
        }
        pid = zygote.fork_agent(_zygote_path(cluster), control, request)
    except OSError as exc:
        raise NetsimError(
            f"the agents' zygote did not fork node {node.name}'s agent ({exc}); see "
            f"{state.cluster_dir(cluster)}/zygote.log"
        ) from None
    finally:
        control.close()
    started = proc.start_time(pid) or 0
    tx.process(f"agent of {node.name}", pid, started)
    node.agent = Process(pid, started)


def _zygote_path(cluster: str) -> str:
    return os.path.join(state.cluster_dir(cluster), "zygote.sock")


def start_zygote(cluster: str, tx: Transaction) -> Process:
    """The zygote gets its socket already listening: the first fork request waits in the
    backlog while it imports (a new cluster starts it first, so that happens while the
    underlay is built)."""
    control = agentmod.listen(_zygote_path(cluster))
    try:
        argv = [sys.executable, "-m", "netsim.zygote", str(control.fileno()), cluster]
        log = os.path.join(state.cluster_dir(cluster), "zygote.log")
        # one malloc arena for all of an agent's threads: a hundred agents, five threads each,
        # would otherwise each keep an arena per thread
        pid, started = proc.spawn(
            argv, log, pass_fds=(control.fileno(),), env={"MALLOC_ARENA_MAX": "1"}
        )
    finally:
        control.close()
    tx.process("the agents' zygote", pid, started)
    return Process(pid, started)


def sync(record: Record, nodes: list[str]) -> None:
    """Tell each node's agent its tunnel, lease and daemons, and wait for it to confirm;
    stopped nodes are told when they start."""
    for node_name in nodes:
        node = record.nodes[node_name]
        if node.down:  # stopped (`netsim node stop`): told everything when it starts
            continue
        path = os.path.join(state.node_dir(record.cluster, node_name), "agent.sock")
        tunnel = dataclasses.asdict(node.agent_tunnel) if node.agent_tunnel else None
        try:
            reply = agentmod.request(
                path, tunnel, _lease(record, node), daemons_config(record, node)
            )
        except OSError as exc:
            raise NetsimError(
                f"the agent of node {node_name} did not answer ({exc}); see "
                f"{os.path.dirname(path)}/agent.log"
            ) from None
        if not reply.get("ok"):
            raise NetsimError(
                f"the agent of node {node_name} could not start its tunnel or daemons: "
                f"{reply.get('errors')}"
            )


def daemons_config(record: Record, node: NodeRecord) -> dict:
    """What the node's daemons need to run against the store (netsim/daemons): the node, its
    mode, the pod network, kube-proxy's mode and how the node reaches etcd."""
    from netsim import store as storemod

    store = storemod.of(record.cluster, record.spec.datastore, node.netns)
    spec = dataclasses.replace(record.spec, nodes=[], clients=[])  # what stays while it lives
    return {
        "cluster": record.cluster,
        "spec": msgspec.to_builtins(spec),
        "mode": record.mode,
        "network": record.spec.pod_network,
        "kube_proxy": record.spec.proxy_mode,
        "grace": record.spec.node_grace,
        "node": msgspec.to_builtins(_lasting(node)),
        "store": {"endpoints": store.endpoints, "netns": store.netns},
    }


def _lasting(node: NodeRecord) -> NodeRecord:
    """The node's facts that stay while it lives (what changes with its pods, processes and
    leases cleared): a change of these, and only these, restarts its daemons."""
    return dataclasses.replace(
        node,
        lease=0,
        blocks=[],
        bird=None,
        agent=None,
        agent_tunnel=None,
        tunnel_index=0,
        down=False,
        evicted=False,
    )


def watched(record: Record, node: str) -> list[str]:
    """The prefixes a node's daemons watch: its own pods (kubelet), its mode's (flannel's
    leases; Calico's blocks and resources), Services and Endpoints (kube-proxy), the network
    policies (felix: Kubernetes' and Calico's, which are among Calico's resources)."""
    from netsim import modes, registry
    from netsim.daemons.kubelet import KUBELET

    mode = modes.get(record.mode).watches
    policies = [p for p in (registry.NETWORK_POLICIES, registry.CALICO_RESOURCES) if p not in mode]
    return [f"{KUBELET}{node}/", *mode, registry.SERVICES_ALL, *policies]


def wait_applied(
    store, record: Record, timeout: float = 60.0, at_least: dict[str, int] | None = None
) -> float:
    """Wait until every running node reports (its status key) that its daemons applied this
    client's last write under each prefix they watch (or the revision `at_least` names for a
    prefix, if higher: what other clients wrote); the seconds that took."""
    import time

    from netsim import store as storemod

    running = [name for name, node in record.nodes.items() if not node.down]
    written = store.written_under(sorted({p for n in running for p in watched(record, n)}))
    for prefix, revision in (at_least or {}).items():
        written[prefix] = max(written.get(prefix, 0), revision)
    targets = {}
    for name in running:
        if wanted := {p: written[p] for p in watched(record, name) if written[p]}:
            targets[name] = wanted
    started = time.monotonic()
    behind: dict[str, str] = {}
    pause = 0.002  # then longer: a hundred nodes' statuses are read at each look
    while targets:
        applied = {
            kv.key[len(storemod.STATUS) :]: kv.json().get("applied", {})
            for kv in store.range(storemod.STATUS, prefix=True)
        }
        behind = {}
        for name, wanted in targets.items():
            for prefix, revision in wanted.items():
                if applied.get(name, {}).get(prefix, 0) < revision:
                    behind[name] = f"{prefix} at revision {revision}"
        if not behind:
            break
        if time.monotonic() - started > timeout:
            name, what = next(iter(behind.items()))
            raise NetsimError(
                f"node {name} has not applied {what} within {timeout:.0f} s "
                f"({len(behind)} node(s) behind): see "
                f"{state.node_dir(record.cluster, name)}/agent.log"
            )
        time.sleep(pause)
        pause = min(pause * 1.5, 0.1)
    return time.monotonic() - started


def wait_reported(store, record: Record, name: str, since: float, timeout: float = 30.0) -> float:
    """Wait until the node's daemons report (after `since`, a wall-clock time) that they
    applied what they listed, every prefix they watch; the seconds from `since`."""
    import time

    from netsim import store as storemod

    deadline = time.monotonic() + timeout
    prefixes = watched(record, name)
    while time.monotonic() < deadline:
        status = store.get(storemod.STATUS + name)
        report = status.json() if status is not None else {}
        applied = report.get("applied", {})
        if report.get("time", 0) >= since and all(applied.get(p) for p in prefixes):
            return report["time"] - since
        time.sleep(0.005)
    raise NetsimError(
        f"node {name} has not reported within {timeout:.0f} s: see "
        f"{state.node_dir(record.cluster, name)}/agent.log"
    )


def _lease(record: Record, node) -> dict | None:
    """What the agent needs to renew the node's flannel lease, as flanneld does: the etcd
    lease, its TTL, and how the node reaches the store."""
    from netsim import modes

    held = node.lease and modes.get(record.mode).lease(node)
    if not held:
        return None
    from netsim import store as storemod

    store = storemod.of(record.cluster, record.spec.datastore, node.netns)
    key, value = held
    return {
        "id": node.lease,
        "ttl": record.spec.lease_ttl,
        "endpoints": store.endpoints,
        "netns": store.netns,
        "key": key,  # to take the lease again if it ended
        "value": value,
    }


def daemons(record: Record) -> list[tuple[int, int]]:
    """(pid, start time) of every process the record holds: agents, BIRDs, etcd."""
    found = []
    for host in record.hosts():
        for process in (getattr(host, "agent", None), host.bird):
            if process is not None:
                found.append((process.pid, process.start))
    if record.master is not None and record.master.etcd is not None:
        found.append((record.master.etcd.pid, record.master.etcd.start))
    for process in (record.controller, record.zygote):
        if process is not None:
            found.append((process.pid, process.start))
    return found


def stop_all(record: Record) -> None:
    proc.stop(daemons(record))
