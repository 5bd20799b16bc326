"""The Deployment controller's arithmetic (kube-controller-manager, pkg/controller/deployment):
ReplicaSets named `<deployment>-<pod-template-hash>`, their pods `<replicaset>-<5 chars>`,
and one sync step of a rollout — RollingUpdate bounded by maxSurge / maxUnavailable, or
Recreate — from the ReplicaSets' sizes and how many of their pods are available.

Pure: state in, state out. apply runs a step each time it converges the cluster
(netsim/deployments.py); the controller daemon runs apply again while a rollout is under way
and the pods' readiness changes, as the real controller requeues the Deployment.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

# k8s.io/apimachinery/pkg/util/rand: no vowels (no words), no 0, 1, 3 (no lookalikes)
ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"
SUFFIX_LENGTH = 5  # apiserver's storage/names generateName
HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
CHANGE_CAUSE = "kubernetes.io/change-cause"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


@dataclass
class ReplicaSetState:
    """One ReplicaSet of a Deployment: its template (as written, for undo and history), its
    revision, its size, and its pods by name (scaled down: not-ready ones first, then the
    newest, as the ReplicaSet controller ranks them)."""

    hash: str
    revision: int
    template: dict
    pods: list[str] = field(default_factory=list)
    created: float = 0.0
    cause: str = ""  # the template's kubernetes.io/change-cause annotation

    @property
    def replicas(self) -> int:
        return len(self.pods)


@dataclass
class RolloutState:
    """What the Deployment controller keeps about one Deployment (in the cluster's record)."""

    replicasets: list[ReplicaSetState] = field(default_factory=list)
    ready_since: dict[str, float] = field(default_factory=dict)  # pod -> first seen ready
    progressed: float = 0.0  # when the rollout last made progress (progressDeadlineSeconds)
    checked: float = 0.0  # when the controller last synced it

    def newest(self) -> ReplicaSetState | None:
        return max(self.replicasets, key=lambda rs: rs.revision, default=None)

    def by_hash(self, hash_: str) -> ReplicaSetState | None:
        return next((rs for rs in self.replicasets if rs.hash == hash_), None)


@dataclass(frozen=True)
class Strategy:
    type: str = "RollingUpdate"  # | Recreate
    max_surge: int | str = "25%"
    max_unavailable: int | str = "25%"


def _fnv32a(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def safe_encode(text: str) -> str:
    """rand.SafeEncodeString: each character mapped into ALPHANUMS."""
    return "".join(ALPHANUMS[ord(c) % len(ALPHANUMS)] for c in text)


def template_hash(template: dict) -> str:
    """The pod-template-hash: FNV-32a of the template, its decimal digits safe-encoded (the
    controller hashes the Go object; netsim hashes its canonical JSON — same shape, another
    value)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return safe_encode(str(_fnv32a(text.encode())))


def replicaset_name(deployment: str, hash_: str) -> str:
    return f"{deployment}-{hash_}"


def pod_names(
    replicaset: str, count: int, taken: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """`count` new pod names `<replicaset>-xxxxx` not in `taken`: random-looking but the same
    for the same ReplicaSet, so applying one file twice names its pods alike."""
    names: list[str] = []
    seen = set(taken)
    serial = 0
    while len(names) < count:
        digest = hashlib.blake2b(f"{replicaset}/{serial}".encode(), digest_size=8).digest()
        serial += 1
        name = f"{replicaset}-" + "".join(
            ALPHANUMS[b % len(ALPHANUMS)] for b in digest[:SUFFIX_LENGTH]
        )
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def scaled(value: int | str, total: int, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent: a number, or a percentage of `total`."""
    if isinstance(value, int):
        return value
    share = int(value.rstrip("%")) * total / 100
    return math.ceil(share) if round_up else math.floor(share)


def fenceposts(strategy: Strategy, replicas: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as numbers: surge rounds up, unavailable down; both zero
    would deadlock, so unavailable is then 1 (deploymentutil.ResolveFenceposts)."""
    surge = scaled(strategy.max_surge, replicas, True)
    unavailable = scaled(strategy.max_unavailable, replicas, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


@dataclass(frozen=True)
class Observed:
    """The pods as their kubelets report them: which are ready now."""

    ready: frozenset[str]
    now: float
    min_ready: int = 0

    def available(self, state: RolloutState, rs: ReplicaSetState) -> int:
        return sum(self.is_available(state, p) for p in rs.pods)

    def is_available(self, state: RolloutState, pod: str) -> bool:
        since = state.ready_since.get(pod)
        return pod in self.ready and since is not None and self.now - since >= self.min_ready


def observe(state: RolloutState, seen: Observed) -> None:
    """Note when each pod was first seen ready (minReadySeconds counts from then)."""
    pods = {p for rs in state.replicasets for p in rs.pods}
    state.ready_since = {p: state.ready_since.get(p, seen.now) for p in pods if p in seen.ready}


def _resize(
    rs: ReplicaSetState, replicas: int, state: RolloutState, deployment: str, seen: Observed
) -> None:
    if replicas > rs.replicas:
        taken = {p for other in state.replicasets for p in other.pods}
        rs.pods += pod_names(replicaset_name(deployment, rs.hash), replicas - rs.replicas, taken)
    elif replicas < rs.replicas:
        # the ReplicaSet controller deletes not-ready pods first, then the newest
        ranked = sorted(
            range(rs.replicas),
            key=lambda i: (seen.is_available(state, rs.pods[i]), -i),
        )
        gone = set(ranked[: rs.replicas - replicas])
        rs.pods = [p for i, p in enumerate(rs.pods) if i not in gone]


def step(
    state: RolloutState,
    deployment: str,
    replicas: int,
    template: dict,
    strategy: Strategy,
    seen: Observed,
    paused: bool = False,
    history_limit: int = 10,
    cause: str = "",
) -> RolloutState:
    """One sync of the Deployment: the ReplicaSet of `template` made (or an old one of the
    same hash revived with the next revision), then scaled as the strategy allows. The caller
    makes the pods and runs the next step when their readiness changed."""
    hash_ = template_hash(template)
    state.checked = seen.now
    new = state.by_hash(hash_)
    newest = state.newest()
    if paused and newest is not None and new is not newest:
        new = newest  # a paused Deployment scales but does not roll
    elif new is None:
        new = ReplicaSetState(
            hash_, (newest.revision + 1) if newest else 1, template, [], seen.now, cause
        )
        state.replicasets.append(new)
        state.progressed = seen.now
    elif new is not newest:
        new.revision = newest.revision + 1  # rollout undo: the old ReplicaSet is the newest again
        state.progressed = seen.now
    old = sorted((rs for rs in state.replicasets if rs is not new), key=lambda rs: rs.revision)
    before = (
        [rs.replicas for rs in state.replicasets],
        sum(seen.available(state, rs) for rs in state.replicasets),
    )
    if not any(rs.replicas for rs in old):
        _resize(new, replicas, state, deployment, seen)  # not rolling: a scale
    elif paused:
        pass  # mid-rollout and paused: nothing moves until resumed
    elif strategy.type == "Recreate":
        for rs in old:
            _resize(rs, 0, state, deployment, seen)
        _resize(new, replicas, state, deployment, seen)
    else:
        _rolling(state, deployment, new, old, replicas, strategy, seen)
    after = (
        [rs.replicas for rs in state.replicasets],
        sum(seen.available(state, rs) for rs in state.replicasets),
    )
    if after != before:
        state.progressed = seen.now
    _cleanup(state, new, history_limit)
    return state


def _rolling(
    state: RolloutState,
    deployment: str,
    new: ReplicaSetState,
    old: list[ReplicaSetState],
    replicas: int,
    strategy: Strategy,
    seen: Observed,
) -> None:
    """rolling.go: scale the new ReplicaSet up within maxSurge; else the old ones down
    within maxUnavailable (unhealthy pods first)."""
    surge, unavailable = fenceposts(strategy, replicas)
    total = sum(rs.replicas for rs in state.replicasets)
    if new.replicas > replicas:
        _resize(new, replicas, state, deployment, seen)
        return
    if new.replicas < replicas and total < replicas + surge:
        grow = min(replicas + surge - total, replicas - new.replicas)
        _resize(new, new.replicas + grow, state, deployment, seen)
        return
    min_available = replicas - unavailable
    new_unavailable = new.replicas - seen.available(state, new)
    budget = total - min_available - new_unavailable
    if budget <= 0:
        return
    for rs in old:  # cleanupUnhealthyReplicas: pods not available go first, oldest sets first
        if budget <= 0:
            break
        unhealthy = rs.replicas - seen.available(state, rs)
        cut = min(unhealthy, budget)
        if cut > 0:
            _resize(rs, rs.replicas - cut, state, deployment, seen)
            budget -= cut
    available = sum(seen.available(state, rs) for rs in state.replicasets)
    budget = min(budget, available - min_available)
    for rs in old:  # scaleDownOldReplicaSetsForRollingUpdate
        if budget <= 0:
            break
        cut = min(rs.replicas, budget)
        if cut:
            _resize(rs, rs.replicas - cut, state, deployment, seen)
            budget -= cut


def _cleanup(state: RolloutState, new: ReplicaSetState, history_limit: int) -> None:
    """Old ReplicaSets scaled to zero beyond revisionHistoryLimit go, oldest first."""
    idle = sorted(
        (rs for rs in state.replicasets if rs is not new and not rs.replicas),
        key=lambda rs: rs.revision,
    )
    extra = max(0, len(idle) - history_limit)
    drop = {id(rs) for rs in idle[:extra]}
    state.replicasets = [rs for rs in state.replicasets if id(rs) not in drop]
