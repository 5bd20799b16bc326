"""The live cluster on 10 nodes x 50 pods (flannel-vxlan): how long the nodes' daemons take,
from a write to etcd until every node reports (its status key) that it applied it.

- one new endpoint, written into a Service's Endpoints: every node's kube-proxy (p50 of 20);
- a new lease, as a joining node's flanneld writes it: every peer's ARP, FDB and route;
- a stopped node (lease TTL 10 s): from its lease's expiry in etcd until no peer routes to it.

    .venv/bin/python -m pytest -s bench/test_live.py --benchmark-columns=min,median,max
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from netsim import cluster as clustermod
from netsim import membership, state, teardown, topology
from netsim import store as storemod

NODES, PODS_PER_NODE, ROUNDS = 10, 50, 20
SUBNETS = "/coreos.com/network/subnets/"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _model(lease_ttl: int = 86400):
    path = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0]["metadata"]["name"] = "live" + uuid.uuid4().hex[:6]
    docs[0]["spec"]["nodes"] = [{"name": f"worker-{i}"} for i in range(1, NODES + 1)]
    docs[0]["spec"]["cni"]["flannel"]["leaseTTL"] = lease_ttl
    docs[1]["spec"]["replicas"] = NODES * PODS_PER_NODE
    return topology.parse(yaml.safe_dump_all(docs))[0]


@pytest.fixture(scope="module")
def live():
    model = _model(lease_ttl=10)
    try:
        clustermod.apply(model)
        record = state.load(model.name)
        yield record, storemod.of(record.cluster, record.spec.datastore), model
    finally:
        teardown.delete(model.name)


def _applied_by_all(
    store, record, prefix: str, revision: int, only=None, timeout: float = 10.0
) -> float:
    """The latest time any node (of `only`, else all) reported having applied `revision` of
    `prefix` (each node stamps its status when it has), waiting until all have."""
    nodes = set(only or record.nodes)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = [kv.json() for kv in store.range(storemod.STATUS, prefix=True)]
        done = [
            s for s in statuses if s["node"] in nodes and s["applied"].get(prefix, 0) >= revision
        ]
        if len(done) == len(nodes):
            return max(s["time"] for s in done)
        time.sleep(0.01)  # the reports carry their own time: polling faster only loads etcd
    raise AssertionError(f"not every node applied {prefix} at {revision} in {timeout} s")


def test_one_new_endpoint_in_every_kube_proxy(benchmark, live):
    record, store, _ = live
    key = "/registry/services/endpoints/default/web"
    original = store.get(key).value.decode()
    samples = []

    def one_endpoint(i: int) -> None:
        obj = json.loads(original)
        obj["subsets"][0]["addresses"].append({"ip": f"10.244.250.{i + 1}", "nodeName": "x"})
        written = time.time()
        revision = store.put(key, json.dumps(obj))
        samples.append(_applied_by_all(store, record, "/registry/services/", revision) - written)
        revision = store.put(key, original)
        _applied_by_all(store, record, "/registry/services/", revision)

    rounds = iter(range(ROUNDS))
    benchmark.pedantic(lambda: one_endpoint(next(rounds)), rounds=ROUNDS, iterations=1)
    p50 = statistics.median(samples)
    benchmark.extra_info["p50_ms"] = round(p50 * 1000, 1)
    print(
        f"\none endpoint, write to every kube-proxy applied: p50 {p50 * 1000:.1f} ms, "
        f"max {max(samples) * 1000:.1f} ms over {len(samples)}"
    )
    assert p50 < 0.1


def test_a_joining_nodes_routes_in_every_peer(benchmark, live):
    record, store, _ = live
    samples = []

    def join(i: int) -> None:
        key = f"{SUBNETS}10.244.{200 + i}.0-24"
        lease = {
            "PublicIP": f"172.18.0.{200 + i}",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": f"02:00:00:00:00:{i:02x}"},
        }
        written = time.time()
        revision = store.put(key, json.dumps(lease))
        samples.append(_applied_by_all(store, record, SUBNETS, revision) - written)
        store.delete(key)
        _applied_by_all(store, record, SUBNETS, store.writes[key])

    rounds = iter(range(5))
    benchmark.pedantic(lambda: join(next(rounds)), rounds=5, iterations=1)
    p50 = statistics.median(samples)
    print(f"\na joining node's lease to routes in every peer: p50 {p50 * 1000:.1f} ms")
    assert p50 < 0.5


def test_a_node_joins_and_another_drains_by_apply(live):
    """Not a timing loop: the wall time of the two applies, printed (`-s`)."""
    from dataclasses import replace

    from netsim.model import Node

    record, _, model = live
    segment = model.nodes[0].segment
    bigger = replace(model, nodes=[*model.nodes, Node("worker-11", segment)])
    started = time.monotonic()
    clustermod.apply(bigger)
    joined = time.monotonic() - started
    smaller = replace(bigger, nodes=[n for n in bigger.nodes if n.name != "worker-2"])
    started = time.monotonic()
    clustermod.apply(smaller)
    drained = time.monotonic() - started
    after = state.load(record.cluster)
    assert "worker-11" in after.nodes and "worker-2" not in after.nodes
    assert sum(p.pod.namespace == "default" for p in after.pods.values()) == NODES * PODS_PER_NODE
    print(
        f"\nworker-11 joined in {joined:.2f} s (apply, until every node reported); worker-2 "
        f"drained in {drained:.2f} s (its {PODS_PER_NODE} pods made again elsewhere)"
    )


def test_a_stopped_nodes_routes_leave_every_peer_after_its_lease(live):
    """Not a timing loop: one stop, measured from the moment etcd ends the lease (it deletes
    the key: a watch sees it at once) to the last peer's report."""
    record, store, _ = live
    record = state.load(record.cluster)  # as the join and drain above left it
    node = record.nodes["worker-10"]
    subnet_key = SUBNETS + node.subnet.replace("/", "-")
    ended: list[tuple[int, float]] = []
    watching = threading.Event()

    def handle(_, events):
        for event in events:
            if event.type == "DELETE":
                ended.append((event.kv.mod_revision, time.time()))
                watching.set()

    start_revision = store.revision() + 1
    thread = threading.Thread(
        target=lambda: store.watch(subnet_key, start_revision, handle, watching), daemon=True
    )
    thread.start()
    membership.stop(record.cluster, node.name)
    stopped = time.time()
    watching.wait(30)
    assert ended, "the stopped node's lease did not end within 30 s"
    revision, expired = ended[0]
    peers = [n for n in record.nodes if n != node.name]
    done = _applied_by_all(store, record, SUBNETS, revision, only=peers)
    print(
        f"\nstopped node: etcd ended its 10 s lease {expired - stopped:.1f} s after the stop; "
        f"every peer had dropped its routes {(done - expired) * 1000:.0f} ms after that"
    )
    assert done - expired < 1.0
    membership.start(record.cluster, node.name)
