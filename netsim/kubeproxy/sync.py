"""kube-proxy's sync on every node, from the record's Services. The Services and Endpoints go
to the store (/registry); in nftables mode each node's own kube-proxy daemon watches them and
programs its table (netsim/daemons/kube_proxy.py), and the sync waits until every node reports
it has; the userspace backend gives every node agent the service table and points the node's
nftables at the agent's proxy ports."""

from __future__ import annotations

import os

from netsim import agents, registry, services
from netsim.kernel import nft
from netsim.model import Cluster
from netsim.record import KubeProxy, PodRecord, Record


def sync(
    cluster: Cluster,
    record: Record,
    store,
    terminating: dict[str, PodRecord] | None = None,
) -> None:
    """Pods `terminating` are out of the Services but still serve (the userspace proxies'
    agents keep them) until the caller stops them."""
    ports = services.proxy_ports(record)
    registry.sync(store, record)  # first: if etcd is gone, no node has heard of the change
    if cluster.proxy_mode == "userspace":
        _sync_userspace(record, ports, terminating)
    else:
        record.kube_proxy = KubeProxy("nftables", ports)
    agents.wait_applied(store, record)


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
