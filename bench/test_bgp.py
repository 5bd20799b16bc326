"""BGP convergence of 10 Calico nodes with BIRD 2: the time from starting the BIRDs until every
node's kernel holds every peer's block, as a full mesh and with one route reflector.

    .venv/bin/python -m pytest bench/test_bgp.py --benchmark-columns=min,median,max

Each round starts 10 fresh BIRDs on the same namespaces (the previous round's BIRDs are stopped
and their routes gone before the clock starts). The clock includes netsim's work per BIRD
(`bird -p` check, spawn, waiting for its control socket), BIRD's `connect delay time 1`, the
sessions and the updates.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_bgp_bird import Lab  # noqa: E402

from netsim.kernel import proc  # noqa: E402
from netsim.kernel.netlink import Rtnl  # noqa: E402

NODES, ROUNDS, TIMEOUT = 10, 5, 15.0
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bird") is None,
    reason="needs root and BIRD 2 (apt-get install bird2)",
)


class Probe:
    """Reads each node's main table over one netlink socket per node (no fork per poll)."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.rtnl = {h["name"]: Rtnl(h["netns"]) for h in lab.nodes}
        self.want = {
            h["name"]: {(o["blocks"][0], o["ip"]) for o in lab.nodes if o is not h}
            for h in lab.nodes
        }

    def learned(self, name: str) -> set[tuple[str, str]]:
        """Routes with a gateway: in this lab only BIRD adds those."""
        return {(r["dst"], r["gateway"]) for r in self.rtnl[name].routes() if r["gateway"]}

    def converged(self) -> bool:
        return all(self.learned(n) == w for n, w in self.want.items())

    def empty(self) -> bool:
        return not any(self.learned(n) for n in self.want)

    def close(self) -> None:
        for rtnl in self.rtnl.values():
            rtnl.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("bgp"), NODES)
    probe = None
    try:
        lab.build()
        probe = Probe(lab)
        yield lab, probe
    finally:
        if probe:
            probe.close()
        lab.close()


def _reset(lab: Lab, probe: Probe) -> None:
    proc.stop(list(lab.procs.values()))
    lab.procs.clear()
    deadline = time.monotonic() + 5
    while not probe.empty():
        assert time.monotonic() < deadline, "routes of stopped BIRDs did not go"
        time.sleep(0.01)


def _converge(lab: Lab, probe: Probe, configs: dict[str, str]) -> None:
    for host in lab.nodes:
        lab.start(host, configs[host["name"]])
    deadline = time.monotonic() + TIMEOUT
    while not probe.converged():
        assert time.monotonic() < deadline, f"not converged within {TIMEOUT} s"
        time.sleep(0.005)


def _bench(benchmark, lab_probe, configs: dict[str, str]) -> None:
    lab, probe = lab_probe

    def setup():
        _reset(lab, probe)
        return (lab, probe, configs), {}

    try:
        benchmark.pedantic(_converge, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        _reset(lab, probe)


@pytest.mark.benchmark(group="bgp convergence, 10 nodes")
def test_full_mesh_convergence(benchmark, lab):
    nodes = lab[0]
    _bench(benchmark, lab, {h["name"]: nodes.mesh_config(h) for h in nodes.nodes})


@pytest.mark.benchmark(group="bgp convergence, 10 nodes")
def test_one_reflector_convergence(benchmark, lab):
    _bench(benchmark, lab, lab[0].reflector_configs({"n1"}))


def _bgp_model(source: str):
    """A shipped calico-bgp topology grown to NODES nodes, one pod each, a fresh name."""
    import uuid

    import yaml

    from netsim import topology

    path = Path(__file__).resolve().parent.parent / "topologies" / source
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0]["metadata"]["name"] = "bgp" + uuid.uuid4().hex[:6]
    docs[0]["spec"]["nodes"] = [{"name": f"worker-{i}"} for i in range(1, NODES + 1)]
    next(d for d in docs if d["kind"] == "Deployment")["spec"]["replicas"] = NODES
    return topology.parse(yaml.safe_dump_all(docs))[0]


def _apply_until_converged(model) -> None:
    """`netsim apply` of the whole cluster, then until every node's kernel holds a route to
    every peer's blocks via that peer."""
    from netsim import cluster as clustermod
    from netsim import state

    clustermod.apply(model)
    record = state.load(model.name)
    want = {
        n: {(b, o.ip) for m, o in record.nodes.items() if m != n for b in o.blocks}
        for n in record.nodes
    }
    deadline = time.monotonic() + TIMEOUT
    with_rtnl = {n: Rtnl(h.netns) for n, h in record.nodes.items()}
    try:
        while not all(
            want[n] <= {(r["dst"], r["gateway"]) for r in rt.routes()}
            for n, rt in with_rtnl.items()
        ):
            assert time.monotonic() < deadline, f"not converged within {TIMEOUT} s"
            time.sleep(0.005)
    finally:
        for rt in with_rtnl.values():
            rt.close()


@pytest.mark.benchmark(group="bgp: netsim apply of 10 nodes until every route is in")
@pytest.mark.parametrize("source", ["calico-bgp.yaml", "calico-bgp-rr.yaml"])
def test_apply_to_convergence(benchmark, source):
    """What the issue measures: from `apply` (namespaces, underlay, pods, BIRDs) to every
    node holding every peer's blocks; full mesh, and one reflector plus a top-of-rack peer."""
    from netsim import teardown

    model = _bgp_model(source)

    def setup():
        teardown.delete(model.name)
        return (model,), {}

    try:
        benchmark.pedantic(_apply_until_converged, setup=setup, rounds=3, iterations=1)
    finally:
        teardown.delete(model.name)
