"""Apply and delete of a flannel-vxlan and a calico-vxlan cluster of 10 nodes x 50 pods (500
pods with their hostname servers), beside the same kernel work done with ip -batch files. The
apply starts the cluster's etcd and writes its keys; etcd's own start is printed apart (-s).

    .venv/bin/python -m pytest bench/ --benchmark-columns=min,median,max
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import reference_ipbatch  # noqa: E402

from netsim import cluster as clustermod  # noqa: E402
from netsim import scale, state, teardown, topology  # noqa: E402

NODES, PODS_PER_NODE, ROUNDS = 10, 50, 3
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


MODES = ["flannel-vxlan", "calico-vxlan"]


def _model(mode: str):
    path = Path(__file__).resolve().parent.parent / "topologies" / f"{mode}.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0]["metadata"]["name"] = "bench" + uuid.uuid4().hex[:6]
    docs[0]["spec"]["nodes"] = [{"name": f"worker-{i}"} for i in range(1, NODES + 1)]
    docs[1]["spec"]["replicas"] = NODES * PODS_PER_NODE
    return topology.parse(yaml.safe_dump_all(docs))[0]


@pytest.fixture(params=MODES)
def model(request):
    m = _model(request.param)
    yield m
    teardown.delete(m.name)


@pytest.mark.benchmark(group="apply 10x50")
def test_apply_netsim(benchmark, model):
    def setup():
        teardown.delete(model.name)
        return (model,), {}

    benchmark.pedantic(clustermod.apply, setup=setup, rounds=ROUNDS, iterations=1)
    record = state.load(model.name)
    assert sum(p.pod.namespace == "default" for p in record.pods.values()) == NODES * PODS_PER_NODE
    benchmark.extra_info["agents_pss_mib"] = round(scale.agents_pss_mib(record), 1)
    # the apply includes starting the cluster's etcd; how long etcd took to answer, apart
    benchmark.extra_info["etcd_started_s"] = record.master.etcd_started_s
    print(f"\n{model.mode}: etcd answered {record.master.etcd_started_s:.3f} s after it started")


@pytest.mark.benchmark(group="delete 10x50")
def test_delete_netsim(benchmark, model):
    def setup():
        clustermod.apply(model)
        return (model.name,), {}

    benchmark.pedantic(teardown.delete, setup=setup, rounds=ROUNDS, iterations=1)
    assert state.load(model.name) is None


@pytest.fixture(params=MODES)
def ref_tag(request):
    tag = f"ref{uuid.uuid4().hex[:6]}"
    yield tag, request.param
    teardown.gc(tag)


@pytest.mark.benchmark(group="apply 10x50")
def test_apply_reference(benchmark, ref_tag):
    tag, mode = ref_tag

    def setup():
        teardown.gc(tag)
        return (tag, NODES, PODS_PER_NODE, mode), {}

    benchmark.pedantic(reference_ipbatch.build, setup=setup, rounds=ROUNDS, iterations=1)


@pytest.mark.benchmark(group="delete 10x50")
def test_delete_reference(benchmark, ref_tag):
    tag, mode = ref_tag

    def setup():
        reference_ipbatch.build(tag, NODES, PODS_PER_NODE, mode)
        return (tag, NODES, PODS_PER_NODE), {}

    benchmark.pedantic(reference_ipbatch.teardown, setup=setup, rounds=ROUNDS, iterations=1)
