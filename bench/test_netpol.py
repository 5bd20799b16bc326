"""Network policy's costs (issue 16's figures).

- One policy change programmed on every node, on 10 nodes x 50 pods: from the write of a
  NetworkPolicy to etcd until every node's felix reports (its status key) that its table holds
  it; p50 of 20 (half add a policy, half delete it). Goal < 100 ms.
- The connection rate through a pod that 100 policies select (a client on another node opens
  fresh TCP connections to agnhost serve-hostname, reading each answer; the 100th policy is
  the one that allows it), against its neighbour on the same node that no policy selects,
  in alternating half-second bursts. Goal >= 0.9x.

    .venv/bin/python -m pytest -s bench/test_netpol.py
    NETSIM_NETPOL_MODES=calico-bgp .venv/bin/python -m pytest -s bench/test_netpol.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
import uuid
from pathlib import Path

import pytest
import yaml

from netsim import cluster as clustermod
from netsim import registry, state, teardown, topology
from netsim import store as storemod
from netsim.kernel import netns as nsmod
from netsim.kernel import nft

NODES, PODS_PER_NODE, ROUNDS = 10, 50, 20
MODES = os.environ.get("NETSIM_NETPOL_MODES", "flannel-vxlan,calico-vxlan").split(",")
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _cluster(mode: str, nodes: int) -> dict:
    path = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"
    cluster = next(yaml.safe_load_all(path.read_text()))
    cluster["metadata"]["name"] = "np" + uuid.uuid4().hex[:6]
    cluster["spec"]["cni"] = {"mode": mode}
    cluster["spec"]["nodes"] = [{"name": f"worker-{i}"} for i in range(1, nodes + 1)]
    return cluster


def _policy(name: str, spec: dict) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def _allow_from(name: str, selected: dict, role: str, port: int = 8080) -> dict:
    peer = {"podSelector": {"matchLabels": {"role": role}}}
    return _policy(
        name,
        {
            "podSelector": {"matchLabels": selected},
            "ingress": [{"from": [peer], "ports": [{"port": port}]}],
        },
    )


@pytest.mark.parametrize("mode", MODES)
def test_one_policy_change_on_every_node(mode):
    path = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0] = _cluster(mode, NODES)
    docs[1]["spec"]["replicas"] = NODES * PODS_PER_NODE
    # a policy already in place: every node's felix holds the pods and its table
    docs.append(_allow_from("base", {"app": "web"}, "client", 80))
    model = topology.parse(yaml.safe_dump_all(docs))[0]
    try:
        clustermod.apply(model)
        record = state.load(model.name)
        store = storemod.of(record.cluster, record.spec.datastore)
        samples = []
        for i in range(ROUNDS):
            key = f"{registry.NETWORK_POLICIES}default/bench-{i}"
            body = _allow_from(f"bench-{i}", {"app": "web"}, f"role-{i}", 9376)
            written = time.time()
            revision = store.put(key, json.dumps(body))
            samples.append(_applied_by_all(store, record, revision) - written)
            written = time.time()
            store.delete(key)
            samples.append(_applied_by_all(store, record, store.writes[key]) - written)
        p50 = statistics.median(samples)
        print(
            f"\n{mode}: one policy change, write to every node's felix applied "
            f"({NODES} x {PODS_PER_NODE} pods): p50 {p50 * 1000:.1f} ms, "
            f"max {max(samples) * 1000:.1f} ms over {len(samples)}"
        )
        assert p50 < 0.1
    finally:
        teardown.delete(model.name)


def _applied_by_all(store, record, revision: int, timeout: float = 10.0) -> float:
    """The latest time any node reported having applied the policies at `revision`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = [kv.json() for kv in store.range(storemod.STATUS, prefix=True)]
        done = [s for s in statuses if s["applied"].get(registry.NETWORK_POLICIES, 0) >= revision]
        if len(done) == len(record.nodes):
            return max(s["time"] for s in done)
        time.sleep(0.005)
    raise AssertionError(f"not every node applied the policies at {revision} in {timeout} s")


def _pods() -> list[dict]:
    """Two agnhost servers on worker-1 — one the policies will select, one they will not —
    and a client on worker-2."""
    server = {
        "name": "serve",
        "image": AGNHOST,
        "args": ["serve-hostname", "--tcp", "--http=false", "--port=8080"],
        "ports": [{"containerPort": 8080}],
    }

    def pod(name: str, labels: dict, node: str, containers: list) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": containers},
        }

    return [
        pod("guarded", {"app": "server"}, "worker-1", [server]),
        pod("open", {"app": "other"}, "worker-1", [server]),
        pod("client", {"role": "client"}, "worker-2", [{"name": "hostname"}]),
    ]


def _connections(netns: str, address: str, seconds: float) -> tuple[int, float]:
    """Fresh TCP connections from the namespace for `seconds`, each answer read to its end:
    (how many, how long they took)."""
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        with nsmod.entered(netns):
            sock = socket.socket()
        with sock:
            sock.settimeout(2)
            sock.connect((address, 8080))
            while sock.recv(256):
                pass
        done += 1
    return done, time.monotonic() - started


def _interleaved(netns: str, first: str, second: str, rounds: int = 16) -> tuple[float, float]:
    """Connections per second to each of two servers, measured in alternating bursts of
    half a second (ABBA: each goes first as often), so that whatever else the machine does
    weighs on both alike."""
    totals = {first: [0, 0.0], second: [0, 0.0]}
    for i in range(rounds):
        for address in (first, second) if i % 2 == 0 else (second, first):
            count, took = _connections(netns, address, 0.5)
            totals[address][0] += count
            totals[address][1] += took
    return tuple(n / t for n, t in (totals[first], totals[second]))


@pytest.mark.parametrize("mode", MODES)
def test_connection_rate_through_100_policies(mode):
    docs = [_cluster(mode, 2), *_pods()]
    policies = [_allow_from(f"p{i:03d}", {"app": "server"}, f"nobody-{i}") for i in range(99)]
    policies.append(_allow_from("p099", {"app": "server"}, "client"))  # the last one allows
    model = topology.parse(yaml.safe_dump_all(docs))[0]
    try:
        clustermod.apply(model)
        record = state.load(model.name)
        client = record.pods["client"].netns
        guarded, open_ = record.pods["guarded"].ip, record.pods["open"].ip
        deadline = time.monotonic() + 30
        while True:  # the servers' containers start after apply
            try:
                _connections(client, guarded, 0.01)
                _connections(client, open_, 0.01)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        before = _interleaved(client, guarded, open_)  # no policy yet: the measure's own noise
        clustermod.apply(topology.parse(yaml.safe_dump_all(docs + policies))[0])
        listed = nft.ruleset(record.nodes["worker-1"].netns)
        assert listed.count("chain cali-pi-") == 100  # the 100 policies are in the kernel
        after = _interleaved(client, guarded, open_)
        ratio = after[0] / after[1]
        print(
            f"\n{mode}: new connections/s, alternating bursts: to a pod 100 policies select "
            f"{after[0]:.0f}, to its neighbour no policy selects {after[1]:.0f}: {ratio:.2f}x "
            f"(before the policies, the same two: {before[0]:.0f} / {before[1]:.0f} = "
            f"{before[0] / before[1]:.2f}x)"
        )
        assert ratio >= 0.9
    finally:
        teardown.delete(model.name)
