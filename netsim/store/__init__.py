"""The cluster's datastore: etcd (server.py runs netsim's own; client.py speaks to any)."""

from __future__ import annotations

from netsim.model import Datastore
from netsim.store.client import CLIENT_PORT, Store


def master_netns(cluster: str) -> str:
    from netsim import naming

    return naming.ns_name(cluster, "master")


_stores: dict[tuple, Store] = {}


def of(cluster: str, datastore: Datastore, node_netns: str | None = None) -> Store:
    """The cluster's store: netsim's etcd, reached from the master namespace (the CLI) or over
    the underlay from a node's own (`node_netns`); or the user's endpoints, from the namespace
    they named (else the host's own). One client per process and place, so that what it wrote
    (Store.written: the IPAM's blocks too) is what apply waits for the nodes to apply."""
    key = (cluster, datastore, node_netns)
    if key not in _stores:
        _stores[key] = _new(cluster, datastore, node_netns)
    return _stores[key]


def forget(cluster: str) -> None:
    """The cluster's etcd is new (or gone): what this process wrote to the old one says
    nothing about the new one's revisions."""
    for key in [k for k in _stores if k[0] == cluster]:
        del _stores[key]


def _new(cluster: str, datastore: Datastore, node_netns: str | None) -> Store:
    if datastore.own:
        return Store(
            [f"http://{datastore.master_ip}:{CLIENT_PORT}"],
            node_netns or master_netns(cluster),
            fix=f"netsim's etcd for cluster {cluster} is not running; the next "
            "`netsim apply -f FILE` starts it again with its data",
        )
    return Store(datastore.endpoints, datastore.netns or None)


NETSIM = "/netsim.dev/"  # netsim's own keys, beside the real systems' layouts
# which cluster a store belongs to (the real layouts name none)
OWNER = NETSIM + "cluster"
# each node's daemons publish here the revision of each prefix they have applied
STATUS = NETSIM + "status/"
WRITTEN = ("/registry/", "/coreos.com/network/", "/calico/")  # what netsim writes


def check_owner(store: Store, cluster: str) -> None:
    """Refuse a store that holds another cluster's state: flannel's, Calico's and the API
    server's keys name no cluster, so two clusters in one etcd would overwrite each other."""
    from netsim.errors import NetsimError

    owner = store.get(OWNER)
    if owner is not None:
        name = owner.json().get("name")
        if name != cluster:
            raise NetsimError(
                f"{store} holds cluster {name}'s state: give cluster {cluster} an etcd of its "
                f"own (or `netsim down {name}` first)"
            )
        return
    for prefix in WRITTEN:
        if store.range(prefix, prefix=True, keys_only=True):
            raise NetsimError(
                f"{store} already holds keys under {prefix} that netsim did not write: give "
                f"cluster {cluster} an etcd of its own, or empty it (etcdctl del --prefix "
                f"{prefix})"
            )


def claim(store: Store, cluster: str) -> bool:
    """Mark the store as this cluster's (check_owner reads it), unless it is marked already;
    True if it was not."""
    import json

    return store.create(OWNER, json.dumps({"name": cluster}))
