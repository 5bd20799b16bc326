"""kube-proxy's sync on every node, from the record's Services. The Services and Endpoints go
to the store (/registry); each node's own kube-proxy daemon watches them and programs its node
(netsim/daemons/kube_proxy.py: its nftables table, or in userspace mode its agent's proxy and
the rules that send Service traffic there), and the sync waits until every node reports it
has."""

from __future__ import annotations

import os

from netsim import agents, registry, services
from netsim.model import Cluster
from netsim.record import KubeProxy, Record


def sync(cluster: Cluster, record: Record, store) -> None:
    """Write the objects, then wait for every node's kube-proxy (pods out of the Services
    still serve until their caller stops them: the proxies have let them go by then)."""
    from netsim.kubeproxy import userspace_rules

    ports = services.proxy_ports(record)
    registry.sync(store, record)  # first: if etcd is gone, no node has heard of the change
    table = userspace_rules.table(ports) if cluster.proxy_mode == "userspace" else None
    record.kube_proxy = KubeProxy(cluster.proxy_mode, ports, table)
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
