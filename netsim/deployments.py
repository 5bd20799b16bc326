"""Deployments, as kube-controller-manager's Deployment and ReplicaSet controllers keep them.

apply runs one sync of every Deployment (netsim/rollout.py) before it converges the pods: the
pods wanted are those its ReplicaSets hold after the step. While a rollout is under way the
node controller process (netsim/controller.py) applies the cluster again whenever its pods'
readiness changes, as the real controller requeues the Deployment, until the new ReplicaSet
holds every replica and no old pod is left. With `spec.controlPlane.podNames: Ordinal` pods
are `<deployment>-<i>` and a new template replaces them in place (no ReplicaSets).

The Deployments and ReplicaSets are written to the store as the API server keeps them:

    /registry/deployments/<namespace>/<deployment>
    /registry/replicasets/<namespace>/<deployment>-<pod-template-hash>
"""

from __future__ import annotations

import copy
from dataclasses import replace

from netsim import rollout
from netsim.model import Cluster, Deployment, object_key
from netsim.record import Record
from netsim.rollout import RolloutState

DEPLOYMENTS = "/registry/deployments/"
REPLICASETS = "/registry/replicasets/"


def reconcile(
    cluster: Cluster, record: Record | None, store, overrides: dict, now: float
) -> tuple[Cluster, dict[str, RolloutState], list[tuple[str, str]]]:
    """The cluster with its Deployments' pods as their ReplicaSets hold them after one sync,
    the Deployments' new states (for the record), and what the controller did."""
    from netsim import topology

    deleted = set(overrides.get("deleted_pods", []))  # `netsim delete pod`
    if cluster.pod_names == "Ordinal":
        cluster.pods = _labelled(cluster.pods, overrides)
        return cluster, {}, []
    made: dict[str, list] = {}
    states: dict[str, RolloutState] = {}
    said: list[tuple[str, str]] = []  # (deployment, event): as the controller reports
    for dep in cluster.deployments:
        state = _copy(record.rollouts.get(dep.key)) if record else RolloutState()
        seen = _observe(dep, state, record, store, now)
        if seen.ready or rolling(dep, state):  # what was read (a rest keeps its clock)
            rollout.observe(state, seen)
        strategy = rollout.Strategy(dep.strategy, dep.max_surge, dep.max_unavailable)
        sizes = {rs.hash: rs.replicas for rs in state.replicasets}
        rollout.step(
            state,
            dep.name,
            dep.replicas,
            dep.template,
            strategy,
            seen,
            dep.paused,
            dep.history_limit,
            dep.cause,
        )
        states[dep.key] = state
        for rs in state.replicasets:
            before, after = sizes.get(rs.hash, 0), rs.replicas
            if before != after:
                way = "up" if after > before else "down"
                name = rollout.replicaset_name(dep.name, rs.hash)
                said.append((dep.key, f"Scaled {way} replica set {name} from {before} to {after}"))
        made[dep.key] = [
            pod
            for rs in sorted(state.replicasets, key=lambda rs: rs.revision)
            if rs.pods
            for pod in topology.template_pods(cluster, dep, rs.template, rs.pods, hash_=rs.hash)
            if pod.key not in deleted
        ]
    pods, placed = [], set()
    for pod in cluster.pods:  # in the file's order: the scheduler places them so
        key = object_key(pod.namespace, pod.owner) if pod.owner else None
        if key not in made:
            pods.append(pod)
        elif key not in placed:
            placed.add(key)
            pods += made[key]
    pods += [p for key, group in made.items() if key not in placed for p in group]
    cluster.pods = _labelled(pods, overrides)
    return cluster, states, said


def _labelled(pods: list, overrides: dict) -> list:
    """Pods with the labels `netsim label pod` gave them (a Deployment's pods too)."""
    labels = overrides.get("labels", {})
    if not any(k.startswith("Pod/") for k in labels):
        return pods
    found = []
    for pod in pods:
        extra = labels.get(f"Pod/{pod.key}")
        if extra:
            merged = {**pod.labels, **extra}
            pod = replace(pod, labels={k: v for k, v in merged.items() if v is not None})
        found.append(pod)
    return found


def _copy(state: RolloutState | None) -> RolloutState:
    """A state to step (the record's stays as it was if the apply fails)."""
    return RolloutState() if state is None else copy.deepcopy(state)


def rolling(dep: Deployment, state: RolloutState) -> bool:
    """Pods of another template than the Deployment's are still there, or the new ReplicaSet
    is not yet of the Deployment's size: the controller has steps to take."""
    new = state.by_hash(rollout.template_hash(dep.template))
    return (
        new is None
        or new.replicas != dep.replicas
        or any(rs.replicas for rs in state.replicasets if rs is not new)
    )


def _observe(
    dep: Deployment, state: RolloutState, record: Record | None, store, now: float
) -> rollout.Observed:
    """Which of the Deployment's pods their kubelets report ready, read from the store while
    it rolls (a Deployment at rest only scales, and readiness does not matter then)."""
    from netsim.pods import _statuses

    if record is None or not rolling(dep, state):
        return rollout.Observed(frozenset(), now, dep.min_ready)
    keys = [object_key(dep.namespace, p) for rs in state.replicasets for p in rs.pods]
    pods = [record.pods[k].pod for k in keys if k in record.pods]
    found = _statuses(store, pods)
    ready = frozenset(
        record.pods[k].pod.name
        for k, status in found.items()
        if "error" not in status and status.get("ready", True)
    )
    return rollout.Observed(ready, now, dep.min_ready)


def objects(record: Record) -> dict[str, dict]:
    """The Deployment and ReplicaSet objects of the record, by /registry key."""
    found: dict[str, dict] = {}
    for key, dep in record.deployments.items():
        state = record.rollouts.get(key)
        where = f"{dep.namespace}/{dep.name}"
        found[DEPLOYMENTS + where] = deployment_object(dep, state, record)
        for rs in state.replicasets if state else ():
            name = rollout.replicaset_name(dep.name, rs.hash)
            found[f"{REPLICASETS}{dep.namespace}/{name}"] = replicaset_object(dep, rs)
    return found


def deployment_object(dep: Deployment, state: RolloutState | None, record: Record) -> dict:
    spec: dict = {
        "replicas": dep.replicas,
        "selector": {"matchLabels": dict(dep.selector)},
        "template": dep.template,
        "strategy": {"type": dep.strategy},
        "minReadySeconds": dep.min_ready,
        "revisionHistoryLimit": dep.history_limit,
        "progressDeadlineSeconds": dep.progress_deadline,
    }
    if dep.strategy == "RollingUpdate":
        spec["strategy"]["rollingUpdate"] = {
            "maxSurge": dep.max_surge,
            "maxUnavailable": dep.max_unavailable,
        }
    if dep.paused:
        spec["paused"] = True
    meta: dict = {"name": dep.name, "namespace": dep.namespace, "labels": dict(dep.labels)}
    status: dict = {"observedGeneration": 1}
    if state is not None and state.replicasets:
        new = state.by_hash(rollout.template_hash(dep.template))
        meta["annotations"] = {rollout.REVISION: str(state.newest().revision)}
        pods = [p for rs in state.replicasets for p in rs.pods]
        # (ready and available pods are the kubelets' to say: `get deployments` reads them)
        status |= {"replicas": len(pods), "updatedReplicas": new.replicas if new else 0}
        status["conditions"] = [_progressing(dep, state)]
    else:  # pods by ordinal: made in place by each apply, nothing left to roll
        made = [k for k, p in record.pods.items() if p.pod.owner == dep.name]
        made = [k for k in made if record.pods[k].pod.namespace == dep.namespace]
        status |= {"replicas": len(made), "updatedReplicas": len(made)}
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": meta,
        "spec": spec,
        "status": status,
    }


def _progressing(dep: Deployment, state: RolloutState) -> dict:
    """The Progressing condition: the rollout's state as `rollout status` reads it."""
    if not rolling(dep, state):
        reason, status = "NewReplicaSetAvailable", "True"
    elif dep.paused:
        reason, status = "DeploymentPaused", "Unknown"
    elif state.progressed + dep.progress_deadline < state.checked:  # the step's own time
        reason, status = "ProgressDeadlineExceeded", "False"
    else:
        reason, status = "ReplicaSetUpdated", "True"
    return {"type": "Progressing", "status": status, "reason": reason}


def replicaset_object(dep: Deployment, rs: rollout.ReplicaSetState) -> dict:
    labels = {**((rs.template.get("metadata") or {}).get("labels") or {})}
    labels[rollout.HASH_LABEL] = rs.hash
    name = rollout.replicaset_name(dep.name, rs.hash)
    return {
        "kind": "ReplicaSet",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": name,
            "namespace": dep.namespace,
            "labels": labels,
            "annotations": {rollout.REVISION: str(rs.revision)}
            | ({rollout.CHANGE_CAUSE: rs.cause} if rs.cause else {}),
            "ownerReferences": [{"kind": "Deployment", "name": dep.name, "controller": True}],
            "creationTimestamp": rs.created,
        },
        "spec": {
            "replicas": rs.replicas,
            "selector": {"matchLabels": {**dep.selector, rollout.HASH_LABEL: rs.hash}},
            "template": rs.template,
        },
        "status": {"replicas": rs.replicas},
    }


def report(cluster: str, said: list[tuple[str, str]]) -> None:
    """The Deployment controller's events, with the node controller's (`get events`)."""
    import os

    from netsim import events, state

    directory = os.path.join(state.cluster_dir(cluster), "controller")
    os.makedirs(directory, exist_ok=True)
    for key, message in said:
        events.record(directory, f"deployment/{key}", "deployment-controller", message)
