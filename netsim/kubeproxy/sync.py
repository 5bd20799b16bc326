"""kube-proxy's sync on every node, from the record's Services: the nftables backend loads the
whole table with `nft -f` first and later sends only what changed as one nf_tables batch per
node; the userspace backend gives every node agent the service table and points the node's
nftables at the agent's proxy ports."""

from __future__ import annotations

import os

from netsim import agents, services
from netsim.kernel import nft
from netsim.model import Cluster
from netsim.record import KubeProxy, PodRecord, Record


def sync(
    cluster: Cluster,
    record: Record,
    terminating: dict[str, PodRecord] | None = None,
) -> None:
    """Pods `terminating` are out of the Services but still serve (the userspace proxies'
    agents keep them) until the caller stops them."""
    from netsim.kubeproxy import nftables as kp

    ports = services.proxy_ports(record)
    if cluster.proxy_mode == "userspace":
        return _sync_userspace(record, ports, terminating)
    previous = record.kube_proxy
    if previous is None or previous.mode != "nftables":
        base, batch = kp.first_sync(ports, cluster.pod_network)
        on_every_node(record, lambda netns: (nft.apply(netns, base), batch.commit(netns)))
    else:
        batch = kp.changes(previous.ports, ports, cluster.pod_network)
        if len(batch):  # nothing changed (a new cluster's second pass): no node to visit
            on_every_node(record, batch.commit)
    record.kube_proxy = KubeProxy("nftables", ports)


def on_every_node(record: Record, step, workers: int = 0) -> None:
    """Run step(netns) for every node, a few at once: the kernel does the work inside each
    send, with the interpreter's lock released, so nodes proceed on every core."""
    from concurrent.futures import ThreadPoolExecutor

    namespaces = [node.netns for node in record.nodes.values()]
    if len(namespaces) < 2:
        for netns in namespaces:
            step(netns)
        return
    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) + 1)) as pool:
        for future in [pool.submit(step, netns) for netns in namespaces]:
            future.result()  # the first failure, as a sequential loop would raise it


def _sync_userspace(record: Record, ports: list, terminating: dict | None) -> None:
    """Every node's agent proxies every Service port on a port of its own; the node's nftables
    send ClusterIP and NodePort traffic there. Pods that are `terminating` keep serving until
    every proxy has let them go."""
    from netsim.kubeproxy import userspace_rules

    table = {
        userspace_rules.key(p): {
            "protocol": p.protocol,
            "endpoints": [[e.ip, e.port] for e in p.endpoints],
            "affinity": "ClientIP" if p.affinity_timeout else "None",
            "timeout": p.affinity_timeout,
        }
        for p in ports
    }
    for entry in table.values():
        if entry["timeout"] is None:
            del entry["timeout"]  # the proxy's default
    fresh = record.kube_proxy is None or record.kube_proxy.mode != "userspace"
    record.kube_proxy = KubeProxy("userspace", ports, table)
    agents.sync(record, list(record.nodes), terminating)
    for node in record.nodes.values():
        nft.apply(node.netns, userspace_rules.ruleset(ports, node.proxy_ports, node.ip, fresh))
