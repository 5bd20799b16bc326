"""`netsim describe`: the record of a node or pod, then the kernel's own view of it, printed
by iproute2 inside its namespace, so the user sees exactly what `ip` would show on a real node.
What is particular to a mode (subnet.env and the lease, the VTEP's ARP and FDB entries, a tc
carrier) the mode adds itself."""

from __future__ import annotations

import os
import subprocess

from netsim import modes
from netsim.cniconf import conflist_path
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.kernel import proc
from netsim.record import Record


def _ip(netns: str, *argv: str) -> str:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, preexec_fn=lambda: nsmod.enter_for_exec(netns)
    )
    return (result.stdout or result.stderr).rstrip()


def _section(title: str, body: str) -> str:
    lines = body.splitlines() or ["<none>"]
    return f"{title}:\n" + "\n".join("  " + line for line in lines)


def node(record: Record, name: str) -> str:
    entry = record.nodes.get(name)
    if entry is None:
        raise NetsimError(f"no node named {name!r}; `netsim get nodes` lists them")
    mode = modes.get(record.mode)
    running = entry.agent is not None and proc.alive(entry.agent.pid, entry.agent.start)
    pods = [p.name for p in record.pods_on(name)]
    tunnel = mode.tunnel or "none (routes via peer node IPs)"
    if mode.carrier_text(entry):
        tunnel += f", carrier: {entry.carrier} ({mode.carrier_text(entry)}" + (
            ": routes name eth0)" if mode.tunnel_device(entry) != mode.tunnel else ")"
        )
    if entry.agent_tunnel:
        tunnel += " (a TUN served by the node agent)"
    head = [
        f"Name:          {name}",
        f"Cluster:       {record.cluster}",
        f"Mode:          {record.mode}",
        f"Netns:         {entry.netns}   (ip netns exec {entry.netns} ...)",
        f"InternalIP:    {entry.ip}/{entry.prefixlen} on segment {entry.segment}, "
        f"gateway {entry.gateway}",
        f"PodCIDR:       {', '.join(entry.pod_cidrs)}"
        + (" (Calico IPAM blocks)" if entry.blocks else ""),
        f"Tunnel:        {tunnel}" + (f", address {entry.tunnel_ip}/32" if entry.tunnel_ip else ""),
        f"Agent:         pid {entry.agent.pid if entry.agent else None} "
        f"{'running' if running else 'NOT RUNNING'}",
        f"Pods:          {len(pods)} ({', '.join(pods[:8])}{' ...' if len(pods) > 8 else ''})",
        f"CNI config:    {conflist_path(record.cluster, name, record.mode)}",
    ]
    out = ["\n".join(head), _section("daemons (netsim get events)", _daemons(record, entry))]
    for title, text in mode.describe_node(record, entry, lambda *argv: _ip(entry.netns, *argv)):
        out.append(_section(title, text))
    out.append(_section("ip route", _ip(entry.netns, "ip", "route")))
    return "\n\n".join(out)


def _daemons(record: Record, entry) -> str:
    """What the node's daemons last reported to the store, and their last events."""
    import time

    from netsim import events
    from netsim import store as storemod
    from netsim.store.client import StoreError

    lines = ["down (netsim node stop): nothing runs" if entry.down else ""]
    try:
        status = storemod.of(record.cluster, record.spec.datastore).get(
            storemod.STATUS + entry.name
        )
    except StoreError as exc:
        status, lines[0] = None, str(exc)
    if status is not None:
        report = status.json()
        applied = ", ".join(f"{p} at {r}" for p, r in sorted(report["applied"].items()))
        ago = time.time() - report["time"]
        lines.append(f"applied {applied} ({ago:.0f} s ago)")
    mine = [e for e in events.read(record.cluster) if e["node"] == entry.name][-5:]
    lines += [f"{e['daemon']}: {e['message']}" for e in mine]
    return "\n".join(line for line in lines if line)


def pod(record: Record, name: str) -> str:
    entry = record.pods.get(name)
    if entry is None:
        raise NetsimError(f"no pod named {name!r}; `netsim get pods` lists them")
    side = modes.get(record.mode).pod_side.name
    head = [
        f"Name:          {entry.pod.name}",
        f"Namespace:     {entry.pod.namespace}",
        f"Node:          {entry.node} ({record.nodes[entry.node].ip})",
        f"IP:            {entry.ip}",
        f"Netns:         {entry.netns}",
        f"Host veth:     {entry.veth} (on the node"
        + (", in cni0)" if side == "bridge" else ", proxy ARP)"),
        f"Labels:        {', '.join(f'{k}={v}' for k, v in entry.labels.items()) or '<none>'}",
        f"Controlled By: {_controller(entry.pod)}",
        f"Serving:       hostname on {', '.join(map(str, entry.pod.serve_ports)) or '<none>'}",
        *_policies(record, entry),
    ]
    return "\n\n".join(
        [
            "\n".join(head),
            _containers(record, entry),
            _section("ip addr show eth0", _ip(entry.netns, "ip", "addr", "show", "eth0")),
            _section("ip route", _ip(entry.netns, "ip", "route")),
        ]
    )


def _policies(record: Record, entry) -> list[str]:
    """The policies that select the pod, per direction, in the order Felix evaluates them,
    and the chain that holds them (netsim/policy_table.py)."""
    from netsim import netpol, policy_table
    from netsim.policy_check import selecting

    if not record.policies:
        return ["Policies:      <none> (no policy in the cluster: the pod is open)"]
    lines = []
    for direction in netpol.TYPES:
        mine = selecting(record, entry, direction)
        chain = policy_table.endpoint_chain(entry.veth, direction)
        names = ", ".join(
            p.title + (f" (order {p.order:g})" if p.order is not None else "") for p in mine
        )
        word = direction.lower() + ":"
        what = f"{names} [{chain}]" if mine else f"<none>: open [{chain}]"
        lines.append(f"{'Policies:' if not lines else '':<15}{word:<9}{what}")
    return lines


def _controller(pod) -> str:
    """kubectl's Controlled By: a ReplicaSet's pods name it, ordinal pods their Deployment."""
    from netsim.rollout import HASH_LABEL

    if not pod.owner:
        return "<none>"
    if HASH_LABEL in pod.labels:
        return f"ReplicaSet/{pod.owner}-{pod.labels[HASH_LABEL]}"
    return f"Deployment/{pod.owner}"


def _containers(record: Record, entry) -> str:
    """Each container's state as its kubelet last published it (kubectl describe's
    Containers and Init Containers)."""
    from netsim import store as storemod
    from netsim.daemons.kubelet import POD_STATUS
    from netsim.podstatus import columns
    from netsim.store.client import StoreError

    try:
        found = storemod.of(record.cluster, record.spec.datastore).get(
            f"{POD_STATUS}{entry.node}/{entry.name}"
        )
    except StoreError as exc:
        return f"Status:        unknown ({exc})"
    status = found.json() if found is not None else {}
    ready, shown, restarts = columns(status) if "phase" in status else ("0/1", "Pending", 0)
    lines = [f"Status:        {shown} (phase {status.get('phase', 'Pending')}, ready {ready})"]
    for title, key in (
        ("Init Containers", "initContainerStatuses"),
        ("Containers", "containerStatuses"),
    ):
        if status.get(key):
            lines.append(f"{title}:")
        for c in status.get(key, []):
            state, detail = next(iter(c.get("state", {}).items()), ("unknown", {}))
            why = detail.get("reason") or ""
            code = f", exit code {detail['exitCode']}" if "exitCode" in detail else ""
            lines.append(
                f"  {c['name']}: {state.capitalize()}{' (' + why + code + ')' if why else ''}, "
                f"ready {str(c.get('ready', False)).lower()}, restarts {c.get('restartCount', 0)}"
            )
    return "\n".join(lines)


def cluster(record: Record) -> str:
    """The cluster and its datastore: where etcd is, how to read it, what it holds."""
    from netsim import store as storemod
    from netsim.store import server
    from netsim.store.client import StoreError

    spec = record.spec
    store = storemod.of(record.cluster, spec.datastore)
    head = [
        f"Name:          {record.cluster}",
        f"Mode:          {record.mode}",
        f"Nodes:         {len(record.nodes)}    Pods: {len(record.pods)}    "
        f"Services: {len(record.services)}",
        f"Source:        {record.source or '-'}",
    ]
    master = record.master
    if master is not None:
        running = master.etcd is not None and proc.alive(master.etcd.pid, master.etcd.start)
        log = server.log_path(os.path.dirname(master.etcd.dir)) if master.etcd else "-"
        head += [
            f"Datastore:     etcd run by netsim on the master, http://{master.ip}:2379",
            f"Master:        {master.netns} ({master.ip} on segment {master.segment})",
            f"etcd:          pid {master.etcd.pid if master.etcd else None} "
            f"{'running' if running else 'NOT RUNNING (the next apply starts it again)'}, "
            f"answered {master.etcd_started_s:.2f} s after it started",
            f"etcd data:     {master.etcd.dir if master.etcd else '-'}/data",
            f"etcd log:      {log}",
            f"Read it:       ip netns exec {master.netns} etcdctl get --prefix / --keys-only",
        ]
    else:
        where = f" from netns {spec.datastore.netns}" if spec.datastore.netns else ""
        head.append(f"Datastore:     the user's etcd at {', '.join(store.endpoints)}{where}")
    try:
        keys = store.range("/", prefix=True)
        counts: dict[str, int] = {}
        for kv in keys:
            top = "/".join(kv.key.split("/")[:3]) + "/"
            counts[top] = counts.get(top, 0) + 1
        body = "\n".join(f"{prefix:<32} {n} keys" for prefix, n in sorted(counts.items()))
        head.append(f"Revision:      {store.revision()}")
    except StoreError as exc:
        body = str(exc)
    return "\n".join(head) + "\n\n" + _section("Keys", body)
