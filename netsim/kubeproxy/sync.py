"""kube-proxy's sync on every node, from the record's Services. The Services and Endpoints go
to the store (/registry); each node's own kube-proxy daemon watches them and programs its node
(netsim/daemons/kube_proxy.py: its nftables table, or in userspace mode its agent's proxy and
the rules that send Service traffic there), and the sync waits until every node reports it
has."""

from __future__ import annotations

from netsim import agents, registry
from netsim.model import Cluster
from netsim.record import KubeProxy, Record


def sync(cluster: Cluster, record: Record, store) -> float:
    """Write the objects, then wait for every node's kube-proxy (pods out of the Services
    still serve until their caller stops them: the proxies have let them go by then); the
    seconds from the write until every node reported it."""
    registry.sync(store, record)  # first: if etcd is gone, no node has heard of the change
    record.kube_proxy = KubeProxy(cluster.proxy_mode)
    return agents.wait_applied(store, record)
