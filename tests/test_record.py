"""The typed record: a JSON round trip that keeps every type, and a damaged file named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from netsim import record as recmod
from netsim import state
from netsim.errors import NetsimError
from netsim.model import CalicoSpec, Container, Node, Pod, Segment, Service, ServicePort
from netsim.record import (
    ClusterSpec,
    KubeProxy,
    NodeRecord,
    PodRecord,
    Process,
    Record,
    Router,
    RouterLeg,
    TunnelSpec,
    Underlay,
)


def _record() -> Record:
    spec = ClusterSpec(
        "calico-ipip",
        "192.168.0.0/16",
        26,
        "10.96.0.0/12",
        1500,
        [Segment("lan", "172.18.0.0/24")],
        [Node("w1", "lan", "172.18.0.2")],
        [],
        CalicoSpec(ipip_mode="Always", reflectors=("w1",)),
        "1.0.0",
        [{"type": "tuning"}],
        "nftables",
    )
    rec = Record(
        "r",
        spec,
        Underlay("u", {"lan": "br-lan"}),
        Router("rt", {"lan": RouterLeg("r-lan", 100, "rp-lan")}),
    )
    rec.nodes["w1"] = NodeRecord(
        "w1",
        "ns",
        "172.18.0.2",
        "lan",
        24,
        "p-w1",
        "172.18.0.1",
        blocks=["192.168.0.0/26"],
        carrier="userspace",
        agent=Process(10, 20),
        agent_tunnel=TunnelSpec(
            "ipip", "tunl0", "172.18.0.2", 1480, {"192.168.0.64/26": "172.18.0.3"}, "192.168.0.0/32"
        ),
    )
    pod = Pod(
        "web-0",
        {"app": "web"},
        (Container("c", (80,), ("sleep", "1"), (("http", 80),)),),
        "w1",
        "web",
    )
    rec.pods["web-0"] = PodRecord(pod, "pns", "192.168.0.1", "cali0123", 100, pids=[5])
    rec.services["web"] = Service(
        "web",
        {"app": "web"},
        (ServicePort(80, "http", "TCP", "h"),),
        cluster_ip="10.96.0.10",
        session_affinity="ClientIP",
    )
    rec.kube_proxy = KubeProxy("nftables")
    return rec


def test_a_record_round_trips_with_its_types():
    rec = _record()
    back = recmod.decode(recmod.encode(rec, indent=1))
    assert back == rec
    assert isinstance(back.pods["web-0"].pod.containers, tuple)
    assert back.kube_proxy.mode == "nftables"
    assert back.pods["web-0"].pod.named_port("http") == 80
    assert dataclasses.asdict(back.spec) == dataclasses.asdict(rec.spec)


def test_a_damaged_record_is_named_and_gc_still_sees_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "ROOT", str(tmp_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text('{"cluster": 5}')
    with pytest.raises(NetsimError, match=r"broken/state.json cannot be read .*Expected `str`"):
        state.load("broken")


def test_gc_of_an_unreadable_record_still_stops_the_processes_it_names(tmp_path, monkeypatch):
    from netsim import teardown
    from netsim.kernel import proc

    monkeypatch.setattr(state, "ROOT", str(tmp_path))
    pid, start = proc.spawn(["sleep", "30"], str(tmp_path / "sleep.log"))
    try:
        (tmp_path / "oldformat").mkdir()
        (tmp_path / "oldformat" / "state.json").write_text(
            json.dumps(
                {"cluster": "oldformat", "nodes": {"w1": {"agent": {"pid": pid, "start": start}}}}
            )
        )
        report = teardown.gc("oldformat")
        assert f"process {pid}" in report["oldformat"]
        assert not proc.alive(pid, start)
        assert not (tmp_path / "oldformat").exists()
    finally:
        proc.stop([(pid, start)])
