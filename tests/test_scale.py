"""Real, smaller versions of the scale run: a cluster of a few hundred pods comes up, answers
from its first pod to its last and through its Service, changes nothing when applied again and
goes; a node with a hundred peers programs every one of them."""

from __future__ import annotations

import json
import subprocess

from conftest import needs_root

from netsim import scale, state, teardown, topology


@needs_root
def test_a_few_hundred_pods_come_up_answer_and_go():
    point = scale.measure(scale.default_modes()[0], 300)
    assert point.reached and not point.errors, point
    assert point.nodes == 3 and point.pods_per_s > 0 and point.agents_pss_mib > 0
    assert not [n for n in state.clusters() if n.startswith("scale-")]


@needs_root
def test_a_hundred_peers_per_node_are_programmed():
    from netsim import cluster

    text = scale.topology("flannel-vxlan", "peers101", 101, per_node=1)
    model, _ = topology.parse(text, "peers101")
    try:
        cluster.apply(model)
        record = state.load("peers101")
        node = record.nodes["w1"]
        out = subprocess.run(
            ["ip", "-n", node.netns, "-j", "route", "show", "dev", "flannel.1"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        routes = {r["dst"] for r in json.loads(out)}
        assert routes == {p.subnet for n, p in record.nodes.items() if n != "w1"}
        fdb = subprocess.run(
            ["bridge", "-n", node.netns, "fdb", "show", "dev", "flannel.1"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert len([line for line in fdb.splitlines() if "permanent" in line]) == 100
    finally:
        teardown.delete("peers101")
