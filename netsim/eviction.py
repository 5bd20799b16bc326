"""Eviction, as the node lifecycle controller's taint manager does it: a node NotReady for
longer than the eviction timeout (spec.controlPlane.podEvictionTimeout; Kubernetes' 300 s, the
`node.kubernetes.io/unreachable` taint's tolerationSeconds) is tainted, and its Deployments'
pods are deleted and made again on the Ready nodes; no new pod goes to it until it is Ready
again. Pods no Deployment owns stay where they are (Kubernetes deletes them for good).

The controller calls these; the pods are made again by applying the cluster's file with the
node tainted, as a ReplicaSet controller and the scheduler would, under the cluster's lock.
"""

from __future__ import annotations

from netsim import state


def _mark(cluster_name: str, node: str, evicted: bool) -> bool:
    """Set the node's taint in the record; False if it was so already (or is gone)."""
    with state.locked(cluster_name):
        record = state.load(cluster_name)
        if record is None or node not in record.nodes:
            return False
        entry = record.nodes[node]
        if entry.evicted == evicted:
            return False
        entry.evicted = evicted
        state.save(record)
        return True


def evict(cluster_name: str, node: str) -> list[str]:
    """Taint the node and make its Deployments' pods again elsewhere; the pods moved."""
    from netsim import cluster

    _mark(cluster_name, node, True)  # (marked already: an eviction that failed, again)
    record = state.load(cluster_name)
    if record is None or node not in record.nodes or not record.nodes[node].evicted:
        return []
    owned = sorted(p.name for p in record.pods_on(node) if p.pod.owner)
    if not owned:
        return []
    cluster.apply_recorded(cluster_name)
    after = state.load(cluster_name)
    return [name for name in owned if name in after.pods and after.pods[name].node != node]


def readmit(cluster_name: str, node: str) -> bool:
    """The node is Ready again: pods may go to it; True if it was tainted."""
    return _mark(cluster_name, node, False)
