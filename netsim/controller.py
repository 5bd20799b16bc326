"""The node lifecycle part of kube-controller-manager, one process per cluster.

Every node's kubelet (its agent) renews a Lease under /registry/leases/kube-node-lease/ every
quarter of the grace period (kubelet: 10 s of 40). When a node's lease has not been renewed for
the node-monitor grace period (Kubernetes' 40 s, spec.controlPlane.nodeMonitorGracePeriod), the
controller marks the node NotReady (its Ready condition Unknown, "Kubelet stopped posting node
status.") and the endpoints controller's part follows: that node's pods move from `addresses`
to `notReadyAddresses` in every Endpoints object, so every kube-proxy drops them. When the
lease is renewed again, the node is Ready and its pods return. A node NotReady for longer than
the eviction timeout is tainted and its Deployments' pods are made again elsewhere
(netsim/eviction.py); the taint goes when the node is Ready again.

It polls the store once a second (the grace is tens of seconds) and records what it did as
events of its own. Run as `python -m netsim.controller CONFIG.json`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import UTC, datetime

from netsim import events, registry
from netsim.services import ip_key

LEASES = "/registry/leases/kube-node-lease/"


def rfc3339(t: float) -> str:
    """A MicroTime as the API server writes it: 2026-12-02T06:30:00.123456Z."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def node_lease(node: str, duration: int, now: float) -> str:
    """The kubelet's heartbeat object (coordination.k8s.io/v1 Lease)."""
    return json.dumps(
        {
            "kind": "Lease",
            "apiVersion": "coordination.k8s.io/v1",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": duration,
                "renewTime": rfc3339(now),
            },
        },
        separators=(",", ":"),
    )


def ready_condition(ready: bool, now: float) -> dict:
    if ready:
        return {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastTransitionTime": rfc3339(now),
        }
    return {
        "type": "Ready",
        "status": "Unknown",
        "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
        "lastTransitionTime": rfc3339(now),
    }


def is_ready(node: dict) -> bool:
    """A node object's Ready condition (a node no controller has judged yet is Ready)."""
    for condition in node.get("status", {}).get("conditions", []):
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return True


def address_pod(address: dict) -> str:
    """The key (netsim.model.object_key) of the pod an Endpoints address is."""
    from netsim.model import object_key

    ref = address.get("targetRef", {})
    return object_key(ref.get("namespace", "default"), ref.get("name", ""))


def split_endpoints(
    obj: dict, not_ready: set[str] | frozenset[str], pods: set[str] | frozenset[str] = frozenset()
) -> dict:
    """The Endpoints object with the addresses of pods on `not_ready` nodes, and of the
    `pods` that are not ready (keys), in notReadyAddresses and the others in addresses (the
    endpoints controller's view: a pod serves once Running and ready, and stops with its
    node)."""
    subsets = []
    for subset in obj.get("subsets", []):
        every = subset.get("addresses", []) + subset.get("notReadyAddresses", [])
        every.sort(key=lambda a: ip_key(a["ip"]))
        out = {k: v for k, v in subset.items() if k not in ("addresses", "notReadyAddresses")}

        def waits(a: dict) -> bool:
            return a.get("nodeName") in not_ready or (bool(pods) and address_pod(a) in pods)

        ready = [a for a in every if not waits(a)]
        waiting = [a for a in every if waits(a)]
        if ready:
            out["addresses"] = ready
        if waiting:
            out["notReadyAddresses"] = waiting
        subsets.append(out)
    return {**obj, "subsets": subsets}


def not_ready_since(node: dict, now: float) -> float:
    """When the node's Ready condition last went to Unknown (now if it has not)."""
    for condition in node.get("status", {}).get("conditions", []):
        if condition.get("type") == "Ready" and condition.get("status") != "True":
            return parse_time(condition["lastTransitionTime"])
    return now


class Controller:
    def __init__(
        self,
        store,
        grace: float,
        log_dir: str,
        cluster: str = "",
        eviction_timeout: float = 300,
        evicted: set[str] | None = None,
    ):
        self.store, self.grace, self.log_dir = store, grace, log_dir
        self.cluster, self.eviction_timeout = cluster, eviction_timeout
        self.evicted = set(evicted or ())  # nodes tainted: their pods were made elsewhere
        self.first_seen: dict[str, float] = {}  # nodes with no lease yet: when first listed
        # the NotReady nodes and not-ready pods every Endpoints object was last split for,
        # and the generation of the Endpoints objects then (None: not yet)
        self.split_for: tuple | None = None
        self.generation = 0  # counts the changes seen to Endpoints objects and pods' readiness
        self.pods_not_ready: frozenset[str] = frozenset()  # from the kubelets' pod statuses
        self.nodes_not_ready: frozenset[str] = frozenset()  # as the last step judged them
        self.wake = threading.Event()
        self.rolling: frozenset[str] = frozenset()  # Deployments with rollout steps left
        self.rollouts_wake = threading.Event()  # readiness changed while they roll

    def event(self, node: str, message: str) -> None:
        events.record(self.log_dir, node, "node-controller", message)

    def step(self, now: float) -> None:
        leases = {kv.key[len(LEASES) :]: kv.json() for kv in self.store.range(LEASES, True)}
        nodes = {kv.key: kv for kv in self.store.range(registry.NODES, True)}
        not_ready, changed = set(), {}
        for key, kv in nodes.items():
            name = key[len(registry.NODES) :]
            node = kv.json()
            lease = leases.get(name)
            if lease is not None:
                renewed = parse_time(lease["spec"]["renewTime"])
            else:  # a node that has not posted yet gets the grace from when it was listed
                renewed = self.first_seen.setdefault(name, now)
            ready = now - renewed <= self.grace
            if not ready:
                not_ready.add(name)
            if not ready and name not in self.evicted and self.cluster:
                if now - not_ready_since(node, now) >= self.eviction_timeout:
                    self.evict(name)
            elif ready and name in self.evicted:
                self.readmit(name)
            if ready != is_ready(node):
                status = node.setdefault("status", {})
                others = [c for c in status.get("conditions", []) if c.get("type") != "Ready"]
                status["conditions"] = others + [ready_condition(ready, now)]
                changed[key] = (kv, json.dumps(node, separators=(",", ":"), sort_keys=True))
                self.event(
                    name,
                    "node is Ready: its kubelet posts status again"
                    if ready
                    else f"node is NotReady: no heartbeat for {self.grace:.0f} s; its pods "
                    "leave every Service's endpoints",
                )
        self.nodes_not_ready = frozenset(not_ready)
        wanted = (self.nodes_not_ready, self.pods_not_ready)
        key = (wanted, self.generation)
        if key != self.split_for:  # else the Endpoints are as they should be
            for kv in self.store.range(registry.ENDPOINTS, True):
                obj = kv.json()
                split = split_endpoints(obj, *wanted)
                if split != obj:
                    text = json.dumps(split, separators=(",", ":"), sort_keys=True)
                    changed[kv.key] = (kv, text)
        from netsim.store.client import put_op, unchanged

        done = True
        for key, (kv, value) in changed.items():
            # only if nobody (an apply) changed it since it was read: the next step sees theirs
            done &= self.store.txn([unchanged(kv)], [put_op(key, value)])["succeeded"]
        if done:
            self.split_for = key

    def evict(self, node: str) -> None:
        from netsim import eviction

        self.evicted.add(node)
        self.event(
            node,
            f"NotReady for {self.eviction_timeout:.0f} s: tainted NoExecute, evicting its "
            "Deployments' pods",
        )
        try:
            moved = eviction.evict(self.cluster, node)
        except Exception as exc:  # noqa: BLE001 -- a failed eviction is reported, then retried
            self.evicted.discard(node)
            self.event(node, f"eviction failed: {exc}")
            return
        if moved:
            names = ", ".join(moved)
            self.event(node, f"evicted {len(moved)} pod(s), made again elsewhere: {names}")

    def readmit(self, node: str) -> None:
        from netsim import eviction

        self.evicted.discard(node)
        if eviction.readmit(self.cluster, node):
            self.event(node, "Ready again: taint removed, pods may be scheduled to it")

    def run(self) -> None:
        from netsim.daemons.informer import Informer
        from netsim.errors import NetsimError

        daemons = [Readiness(self), Rollouts(self)]
        Informer(self.store, daemons, lambda applied: None, print).start()
        if self.cluster:
            threading.Thread(target=self.roll, daemon=True, name="deployments").start()
        while True:
            try:
                self.step(time.time())
            except NetsimError as exc:  # the store is away: try again
                print(f"controller: {exc}", flush=True)
            self.wake.wait(1.0)
            self.wake.clear()

    def roll(self) -> None:
        """The Deployment controller's requeue: while a Deployment rolls, apply the cluster
        again when its pods' readiness changed (or each second, for minReadySeconds and the
        progress deadline): each apply takes the rollout's next step (netsim/rollout.py)."""
        from netsim import cluster

        while True:
            self.rollouts_wake.wait(1.0)
            self.rollouts_wake.clear()
            if not self.rolling:
                continue
            try:
                cluster.apply_recorded(self.cluster)
            except Exception as exc:  # noqa: BLE001 -- reported, then tried again
                print(f"deployment controller: {exc}", flush=True)
                time.sleep(1.0)


REVISION = "deployment.kubernetes.io/revision"


class Rollouts:
    """The Deployment controller's watch: the Deployments whose rollout has steps left
    (their new ReplicaSet is not yet of their size, or old pods are left) and not paused."""

    name = "deployment-controller"

    def __init__(self, controller: Controller):
        self.controller = controller
        self.prefixes = (registry.DEPLOYMENTS,)

    def sync(self, view: dict) -> None:
        rolling = set()
        for key, kv in view[self.prefixes[0]].items():
            obj = kv.json()
            spec, status = obj["spec"], obj.get("status", {})
            wanted = spec.get("replicas", 1)
            managed = REVISION in obj["metadata"].get("annotations", {})  # has ReplicaSets
            if (
                managed
                and not spec.get("paused")
                and (status.get("updatedReplicas") != wanted or status.get("replicas") != wanted)
            ):
                rolling.add(key)
        self.controller.rolling = frozenset(rolling)
        if rolling:
            self.controller.rollouts_wake.set()


class Readiness:
    """The endpoints controller's watch (an informer's daemon): which pods their kubelets
    report not ready (init containers running, a readiness probe failing, ended), and any
    change of an Endpoints object (an apply wrote it), so that the controller splits them
    again at once."""

    name = "endpoints-controller"

    def __init__(self, controller: Controller):
        from netsim.daemons.kubelet import POD_STATUS

        self.controller = controller
        self.prefixes = (POD_STATUS, registry.ENDPOINTS)
        self.known: dict[str, tuple[int, bool]] = {}  # status key -> (its revision, ready)
        self.checked: dict[str, int] = {}  # Endpoints key -> the revision found well split

    def sync(self, view: dict) -> None:
        statuses = view[self.prefixes[0]]
        known = {}
        for key, kv in statuses.items():  # only what changed is decoded (10,000 pods)
            held = self.known.get(key)
            fresh = held is None or held[0] != kv.mod_revision
            known[key] = (kv.mod_revision, _ready(kv.json())) if fresh else held
        self.known = known
        not_ready = frozenset(k.rsplit("/", 1)[1] for k, (_, ready) in known.items() if not ready)
        controller = self.controller
        if not_ready != controller.pods_not_ready:
            self.checked = {}  # every object is to be split again
        controller.pods_not_ready = not_ready
        controller.rollouts_wake.set()  # a pod made, gone or ready: a rollout may go on
        # an Endpoints object written since it was last checked (an apply's, or the
        # controller's own) is split as the controller would split it: a difference wakes it
        objects = view[self.prefixes[1]]
        wrong = False
        for key, kv in objects.items():
            if self.checked.get(key) != kv.mod_revision:
                obj = kv.json()
                wrong |= split_endpoints(obj, controller.nodes_not_ready, not_ready) != obj
                self.checked[key] = kv.mod_revision
        self.checked = {k: r for k, r in self.checked.items() if k in objects}
        if wrong:
            controller.generation += 1
            controller.wake.set()


def _ready(status: dict) -> bool:
    return "error" not in status and status.get("ready", True)


def main() -> None:
    from netsim.store.client import Store

    with open(sys.argv[1]) as fh:
        config = json.load(fh)
    from netsim import state

    store = Store(config["endpoints"], config["netns"])
    print(f"netsim controller {os.getpid()} for cluster {config['cluster']}", flush=True)
    record = state.load(config["cluster"])
    evicted = {n for n, node in record.nodes.items() if node.evicted} if record else set()
    Controller(
        store,
        config["grace"],
        os.path.dirname(sys.argv[1]),
        config["cluster"],
        config.get("eviction_timeout", 300),
        evicted,
    ).run()


if __name__ == "__main__":
    main()
