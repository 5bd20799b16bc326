"""The Deployment controller's arithmetic (netsim/rollout.py): names, fenceposts, and every
step of a rollout within maxSurge / maxUnavailable, whatever order pods become ready in."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim import rollout
from netsim.rollout import Observed, RolloutState, Strategy

V1 = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web"}]}}
V2 = {
    "metadata": {"labels": {"app": "web"}},
    "spec": {"containers": [{"name": "web", "image": "v2"}]},
}


def test_names_have_kubernetes_shape():
    hash_ = rollout.template_hash(V1)
    assert re.fullmatch(r"[bcdfghjklmnpqrstvwxz2456789]{6,10}", hash_)
    assert rollout.template_hash(V1) == hash_ != rollout.template_hash(V2)
    names = rollout.pod_names(f"web-{hash_}", 50)
    assert len(set(names)) == 50
    assert all(re.fullmatch(rf"web-{hash_}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", n) for n in names)
    assert rollout.pod_names(f"web-{hash_}", 3) == names[:3]  # the same file, the same names
    assert not set(rollout.pod_names(f"web-{hash_}", 2, set(names))) & set(names)


@pytest.mark.parametrize(
    "surge,unavailable,replicas,expected",
    [
        ("25%", "25%", 10, (3, 2)),  # surge rounds up, unavailable down
        ("25%", "25%", 4, (1, 1)),
        ("25%", "25%", 1, (1, 0)),
        (0, "10%", 3, (0, 1)),  # both 0: unavailable is 1
        (2, 0, 5, (2, 0)),
        ("50%", "50%", 3, (2, 1)),
    ],
)
def test_fenceposts_round_as_kubernetes(surge, unavailable, replicas, expected):
    assert rollout.fenceposts(Strategy("RollingUpdate", surge, unavailable), replicas) == expected


def _ready_all(state: RolloutState) -> frozenset[str]:
    return frozenset(p for rs in state.replicasets for p in rs.pods)


def _settled(replicas: int) -> tuple[RolloutState, frozenset[str]]:
    state = RolloutState()
    rollout.step(state, "web", replicas, V1, Strategy(), Observed(frozenset(), 0.0))
    return state, _ready_all(state)


def test_first_sync_makes_one_replicaset_at_revision_1():
    state, _ = _settled(3)
    (rs,) = state.replicasets
    assert (rs.revision, rs.replicas, rs.hash) == (1, 3, rollout.template_hash(V1))


def _complete(state: RolloutState, replicas: int, template: dict, seen: Observed) -> bool:
    """DeploymentComplete: every replica updated and available, no old pod left."""
    new = state.by_hash(rollout.template_hash(template))
    return (
        new is not None
        and new.replicas == replicas
        and seen.available(state, new) == replicas
        and all(not rs.replicas for rs in state.replicasets if rs is not new)
    )


def _roll(replicas, strategy, readiness, template=V2, state=None, ready=None):
    """Step until done; after each step, the pods `readiness` picks become ready. Yields
    (total pods, ready pods of the Deployment) after every step."""
    if state is None:
        state, ready = _settled(replicas)
    for i in range(400):
        pods = _ready_all(state)
        ready = ready & pods
        seen = Observed(ready, float(i))
        rollout.observe(state, seen)
        rollout.step(state, "web", replicas, template, strategy, seen)
        pods = _ready_all(state)
        yield len(pods), len(ready & pods), state
        if _complete(state, replicas, template, Observed(ready & pods, float(i))):
            return
        ready = (ready & pods) | readiness(sorted(pods - ready), i)
    raise AssertionError("the rollout did not finish in 400 steps")


@settings(max_examples=150, deadline=None)
@given(
    replicas=st.integers(1, 15),
    surge=st.one_of(st.integers(0, 4), st.sampled_from(["0%", "10%", "25%", "50%", "100%"])),
    unavailable=st.one_of(st.integers(0, 4), st.sampled_from(["0%", "25%", "50%"])),
    data=st.data(),
)
def test_rolling_update_stays_within_surge_and_unavailable(replicas, surge, unavailable, data):
    strategy = Strategy("RollingUpdate", surge, unavailable)
    max_surge, max_unavailable = rollout.fenceposts(strategy, replicas)
    if max_surge == 0 and rollout.scaled(unavailable, replicas, False) == 0:
        return  # refused by the topology loader (both 0)

    def readiness(waiting, i):  # some of the waiting pods become ready; all, now and then
        if i % 5 == 4 or not waiting:
            return frozenset(waiting)
        return frozenset(data.draw(st.lists(st.sampled_from(waiting), unique=True)))

    steps = list(_roll(replicas, strategy, readiness))
    for total, ready, _ in steps:
        assert total <= replicas + max_surge
        assert ready >= replicas - max_unavailable
    state = steps[-1][2]
    new = state.by_hash(rollout.template_hash(V2))
    assert (new.revision, new.replicas) == (2, replicas)
    assert [rs.replicas for rs in state.replicasets if rs is not new] == [0]


def test_default_strategy_on_10_replicas_takes_kubernetes_steps():
    sizes = []
    for _, _, state in _roll(10, Strategy(), lambda waiting, i: frozenset(waiting)):
        old, new = sorted(state.replicasets, key=lambda rs: rs.revision)
        if not sizes or sizes[-1] != (old.replicas, new.replicas):
            sizes.append((old.replicas, new.replicas))
    # surge 3 (ceil 2.5), unavailable 2 (floor 2.5): up to 13 pods, never under 8 ready
    assert sizes == [(10, 3), (5, 3), (5, 8), (0, 8), (0, 10)]


def test_new_pods_never_ready_stall_the_rollout_within_bounds():
    state, ready = _settled(4)
    steps = []
    for _ in range(10):
        seen = Observed(ready, 1.0)
        rollout.step(state, "web", 4, V2, Strategy(), seen)
        steps.append([rs.replicas for rs in state.replicasets])
    assert steps[-1] == [3, 2]  # 1 unavailable allowed, 1 surge: stuck there
    assert steps[-1] == steps[-2]


def test_recreate_removes_every_old_pod_before_new_ones():
    state, ready = _settled(3)
    rollout.step(state, "web", 3, V2, Strategy("Recreate"), Observed(ready, 1.0))
    old, new = sorted(state.replicasets, key=lambda rs: rs.revision)
    assert (old.replicas, new.replicas) == (0, 3)


def test_min_ready_seconds_hold_the_old_pods_back():
    state, _ = _settled(2)
    ready = _ready_all(state)
    rollout.observe(state, Observed(ready, 0.0, 10))
    strategy = Strategy("RollingUpdate", 1, 0)
    rollout.step(state, "web", 2, V2, strategy, Observed(ready, 0.0, 10))  # new: 1 pod
    ready = _ready_all(state)
    for now in (1.0, 5.0):  # ready, not yet available: no old pod goes
        seen = Observed(ready, now, 10)
        rollout.observe(state, seen)
        rollout.step(state, "web", 2, V2, strategy, seen)
        assert [rs.replicas for rs in state.replicasets] == [2, 1]
    seen = Observed(ready, 12.0, 10)
    rollout.step(state, "web", 2, V2, strategy, seen)
    assert [rs.replicas for rs in state.replicasets] == [1, 1]


def test_undo_revives_the_old_replicaset_with_the_next_revision():
    state, ready = _settled(2)
    for _ in _roll(2, Strategy(), lambda w, i: frozenset(w), V2, state, ready):
        pass
    for _ in _roll(2, Strategy(), lambda w, i: frozenset(w), V1, state, _ready_all(state)):
        pass
    revisions = {rs.hash: rs.revision for rs in state.replicasets}
    assert revisions == {rollout.template_hash(V1): 3, rollout.template_hash(V2): 2}


def test_paused_deployment_scales_but_does_not_roll():
    state, ready = _settled(2)
    rollout.step(state, "web", 3, V2, Strategy(), Observed(ready, 1.0), paused=True)
    assert [(rs.revision, rs.replicas) for rs in state.replicasets] == [(1, 3)]


def test_old_replicasets_beyond_the_history_limit_go():
    state, ready = _settled(1)
    for n in range(5):
        template = {**V1, "metadata": {"labels": {"app": "web"}, "annotations": {"n": str(n)}}}
        for _ in range(10):
            rollout.step(state, "web", 1, template, Strategy(), Observed(_ready_all(state), 0.0))
            rollout.observe(state, Observed(_ready_all(state), 0.0))
    idle = [rs for rs in state.replicasets if not rs.replicas]
    assert len(state.replicasets) == 6 and len(idle) == 5
    rollout.step(
        state, "web", 1, template, Strategy(), Observed(_ready_all(state), 0.0), history_limit=2
    )
    assert len(state.replicasets) == 3
    assert sorted(rs.revision for rs in state.replicasets) == [4, 5, 6]
