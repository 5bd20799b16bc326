"""`netsim graph`: dot text from a cluster's record, and pictures rendered by graphviz's dot.

No root and no namespaces: the records are built here, shaped like the ones `apply` writes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from netsim import graph
from netsim.errors import NetsimError
from netsim.model import Container, Pod, Segment, Service, ServicePort
from netsim.record import (
    ClientRecord,
    ClusterSpec,
    NodeRecord,
    PodRecord,
    Process,
    Record,
    Router,
    RouterLeg,
    Underlay,
)

needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="graphviz's dot is not installed (apt-get install graphviz)"
)


def _record(
    mode: str,
    racks: dict[str, list[str]],
    pods_per_node: int = 1,
    clients: dict[str, tuple[str, int]] | None = None,
) -> Record:
    """A record as `apply` writes it: racks maps a segment (172.18.<i>.0/24) to its nodes."""
    calico = mode.startswith("calico")
    segments = [Segment(seg, f"172.18.{i}.0/24") for i, seg in enumerate(racks, start=1)]
    spec = ClusterSpec(
        mode,
        "192.168.0.0/16" if calico else "10.244.0.0/16",
        26 if calico else 24,
        "10.96.0.0/12",
        1500,
        segments,
        [],
        [],
        None,
        "1.0.0",
        [],
        "nftables",
    )
    record = Record(
        "pic-test", spec, Underlay("netsim.pic-test.underlay"), Router("netsim.pic-test.router")
    )
    block = 0
    for i, (seg, names) in enumerate(racks.items(), start=1):
        record.underlay.bridges[seg] = f"br-{seg}"
        record.router.legs[seg] = RouterLeg(f"r-{seg}", 99 + i, f"rp-{seg}")
        for j, name in enumerate(names, start=2):
            node = NodeRecord(
                name,
                f"netsim.pic-test.node.{name}",
                f"172.18.{i}.{j}",
                seg,
                24,
                f"p-{name}",
                f"172.18.{i}.1",
            )
            if calico:
                node.blocks = [f"192.168.{block // 4}.{block % 4 * 64}/26"]
                node.tunnel_ip = f"192.168.{block // 4}.{block % 4 * 64}"
                node.encap = "CrossSubnet" if len(racks) > 1 else "Always"
                if mode == "calico-ipip":
                    node.carrier = "ebpf"
                if mode == "calico-bgp":
                    node.bird = Process(1000 + block, 1)
            else:
                node.subnet = f"10.244.{block + 1}.0/24"
            if mode.endswith("vxlan"):
                node.vtep_mac = f"02:00:00:00:00:{block:02x}"
            record.nodes[name] = node
            for k in range(pods_per_node):
                pod = f"web-{block}-{k}"
                ip = (
                    f"192.168.{block // 4}.{block % 4 * 64 + k + 1}"
                    if calico
                    else f"10.244.{block + 1}.{k + 2}"
                )
                labels = {"app": "web" if k % 2 == 0 else "db"}
                record.pods[pod] = PodRecord(
                    Pod(pod, labels, (Container("hostname"),), name),
                    f"netsim.pic-test.pod.{pod}",
                    ip,
                    f"veth{block}{k}",
                )
            block += 1
    for name, (seg, asn) in (clients or {}).items():
        i = list(racks).index(seg) + 1
        record.clients[name] = ClientRecord(
            name,
            f"netsim.pic-test.ext.{name}",
            f"172.18.{i}.200",
            seg,
            24,
            f"p-{name}",
            f"172.18.{i}.1",
            asn=asn,
        )
    record.services = {
        "web": Service(
            "web",
            {"app": "web"},
            (ServicePort(80, 9376, "TCP", "http", 30080),),
            "NodePort",
            "10.96.0.10",
        ),
        "db.internal": Service(
            "db.internal", {"app": "db"}, (ServicePort(5432, 5432),), "ClusterIP", "10.96.0.11"
        ),
    }
    return record


FLANNEL = _record(
    "flannel-vxlan",
    {"underlay": ["worker-1", "worker-2", "worker-3"]},
    2,
    clients={"client": ("underlay", 0)},
)
CALICO_XS = _record(
    "calico-vxlan",
    {"rack1": ["worker-1", "worker-2"], "rack2": ["worker-3", "worker-4"]},
    pods_per_node=2,
    clients={"client": ("rack1", 0)},
)


def _edges(dot: str) -> set[tuple[str, str]]:
    return set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)"', dot, re.M))


@pytest.mark.parametrize("record", [FLANNEL, CALICO_XS], ids=["flannel-vxlan", "calico-xs"])
def test_dot_has_every_node_pod_and_service(record: Record) -> None:
    dot = graph.to_dot(record)
    edges = _edges(dot)
    for name, node in record.nodes.items():
        assert f'"node:{name}"' in dot and node.ip in dot
        assert (f"segment:{node.segment}", f"node:{name}") in edges
        for cidr in node.pod_cidrs:
            assert cidr in dot
    for name, pod in record.pods.items():
        assert f'"pod:{name}"' in dot and pod.ip in dot
        assert (f"node:{pod.node}", f"pod:{name}") in edges
    for name, svc in record.services.items():
        assert f'"service:{name}"' in dot and svc.cluster_ip in dot
        eps = {f"pod:{p}" for p, e in record.pods.items() if e.labels["app"] == svc.selector["app"]}
        assert eps and {b for b, s in edges if s == f"service:{name}"} == eps
    assert "NodePort 30080" in dot
    for seg, subnet in [(s.name, s.subnet) for s in record.spec.segments]:
        assert f'"cluster_segment:{seg}"' in dot and subnet in dot
        assert ("router", f"segment:{seg}") in edges
        assert subnet.replace("0/24", "1/24") in dot  # the router's leg is the segment's .1
    assert "external client client" in dot


def test_tunnels_per_mode() -> None:
    dot = graph.to_dot(FLANNEL)
    assert "flannel.1: VXLAN VNI 1, UDP 8472" in dot
    tunnels = {e for e in _edges(dot) if e[0].startswith("node:") and e[1].startswith("node:")}
    assert len(tunnels) == 3  # the full mesh of 3 nodes
    # CrossSubnet: a tunnel only between nodes on different racks
    dot = graph.to_dot(CALICO_XS)
    assert "vxlan.calico: VXLAN VNI 4096, UDP 4789" in dot and "CrossSubnet" in dot
    tunnels = {e for e in _edges(dot) if e[0].startswith("node:") and e[1].startswith("node:")}
    assert tunnels == {
        ("node:worker-1", "node:worker-3"),
        ("node:worker-1", "node:worker-4"),
        ("node:worker-2", "node:worker-3"),
        ("node:worker-2", "node:worker-4"),
    }
    assert "tc eBPF on eth0" in graph.to_dot(_record("calico-ipip", {"u": ["a", "b"]}))
    assert "flannel0: TUN, UDP 8285" in graph.to_dot(_record("flannel-udp", {"u": ["a", "b"]}))
    hostgw = graph.to_dot(_record("flannel-host-gw", {"u": ["a", "b"]}))
    assert "host-gw: no tunnel" in hostgw and 'style="dashed"' not in hostgw


def test_bgp_routers_and_big_clusters_stay_readable() -> None:
    record = _record(
        "calico-bgp",
        {"underlay": [f"worker-{i}" for i in range(10)]},
        clients={"tor": ("underlay", 65001), "client": ("underlay", 0)},
    )
    dot = graph.to_dot(record)
    assert "BGP router tor\\nAS 65001" in dot and "BIRD pid 1000" in dot
    edges = _edges(dot)
    assert {n for c, n in edges if c == "client:tor"} == {f"node:worker-{i}" for i in range(10)}
    assert not {n for c, n in edges if c == "client:client" and n.startswith("node:")}
    # ten tunnelling nodes: one legend note, not 45 edges
    dot = graph.to_dot(_record("flannel-vxlan", {"underlay": [f"w{i}" for i in range(10)]}))
    assert "45 node pairs tunnel over flannel.1" in dot
    assert not {e for e in _edges(dot) if e[0].startswith("node:") and e[1].startswith("node:")}


def test_many_pods_on_a_node_are_summarised() -> None:
    record = _record(
        "flannel-vxlan", {"underlay": ["w1"]}, pods_per_node=graph.MAX_PODS_PER_NODE + 6
    )
    dot = graph.to_dot(record)
    assert "+6 more pods" in dot
    assert ("pods-more:w1", "service:web") in _edges(dot)


def test_labels_are_quoted() -> None:
    record = _record("flannel-vxlan", {'rack "a"/b': ["n-1.x", "n\\2"]})
    record.pods['we"ird/pod'] = PodRecord(
        Pod('we"ird/pod', {"app": "web"}, (), "n-1.x"), "netns", "10.244.1.99", "v"
    )
    dot = graph.to_dot(record)
    assert '"node:n-1.x"' in dot and '"node:n\\\\2"' in dot and '"pod:we\\"ird/pod"' in dot
    assert re.search(r'(?<!\\)"pod:we"', dot) is None


@needs_dot
@pytest.mark.parametrize("record", [FLANNEL, CALICO_XS], ids=["flannel-vxlan", "calico-xs"])
def test_render_png_svg_dot(record: Record, tmp_path: Path) -> None:
    png = graph.render(record, str(tmp_path / "c.png"))
    assert png == str(tmp_path / "c.png")
    assert Path(png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    svg = ET.parse(graph.render(record, str(tmp_path / "c.svg"))).getroot()
    assert svg.tag.endswith("svg")
    text = "".join(svg.itertext())
    assert all(p.ip in text for p in record.pods.values())
    dot_path = graph.render(record, str(tmp_path / "c.dot"))
    assert Path(dot_path).read_text() == graph.to_dot(record)
    plain = subprocess.run(
        ["dot", "-Tplain", dot_path], capture_output=True, text=True, timeout=60, check=False
    )
    assert plain.returncode == 0 and not plain.stderr, plain.stderr
    assert plain.stdout.startswith("graph ")


@needs_dot
def test_quoted_labels_are_valid_dot(tmp_path: Path) -> None:
    record = _record(
        "calico-ipip",
        {'rack "a"/b': ["n-1.x", "n\\2"], "r2": ["z"]},
        clients={"c;{x}": ("r2", 65001)},
    )
    path = graph.render(record, str(tmp_path / "q.dot"))
    plain = subprocess.run(
        ["dot", "-Tplain", path], capture_output=True, text=True, timeout=60, check=False
    )
    assert plain.returncode == 0 and not plain.stderr, plain.stderr


def test_dot_file_needs_no_graphviz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    assert Path(graph.render(FLANNEL, str(tmp_path / "x.dot"))).read_text().startswith("digraph")
    with pytest.raises(NetsimError, match="apt-get install graphviz"):
        graph.render(FLANNEL, str(tmp_path / "x.png"))


def test_unknown_extension(tmp_path: Path) -> None:
    for name in ("x.jpg", "x"):
        with pytest.raises(NetsimError, match=r"\.dot, \.png, \.svg"):
            graph.render(FLANNEL, str(tmp_path / name))
    assert not list(tmp_path.iterdir())
