"""The cluster's datastore: etcd (server.py runs netsim's own; client.py speaks to any)."""

from __future__ import annotations

from netsim.model import Datastore
from netsim.store.client import CLIENT_PORT, Store


def master_netns(cluster: str) -> str:
    from netsim import naming

    return naming.ns_name(cluster, "master")


def of(cluster: str, datastore: Datastore) -> Store:
    """The cluster's store as the CLI reaches it: netsim's etcd from the master namespace, or
    the user's endpoints from the namespace they named (else the host's own)."""
    if datastore.own:
        return Store([f"http://{datastore.master_ip}:{CLIENT_PORT}"], master_netns(cluster))
    return Store(datastore.endpoints, datastore.netns or None)


def from_node(cluster: str, datastore: Datastore, node_netns: str) -> Store:
    """The store as a node reaches it: netsim's etcd over the underlay from the node's own
    namespace; the user's from where they named."""
    if datastore.own:
        return Store([f"http://{datastore.master_ip}:{CLIENT_PORT}"], node_netns)
    return Store(datastore.endpoints, datastore.netns or None)
