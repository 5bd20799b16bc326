"""netsim.topology: shipped files parse, bad input is rejected by field, scheduling, ClusterIPs."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import yaml

from netsim import topology
from netsim.errors import TopologyError
from netsim.model import Cluster, Container, Node, Pod, Segment, Service, ServicePort

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
FILE = "test.yaml"

BASE = [
    {"apiVersion": "netsim.dev/v1alpha1", "kind": "Cluster", "metadata": {"name": "t"},
     "spec": {"cni": {"mode": "flannel-vxlan",
                      "flannel": {"Network": "10.244.0.0/16", "SubnetLen": 24}},
              "serviceCIDR": "10.96.0.0/12",
              "underlay": {"segments": [{"name": "lan", "subnet": "172.18.0.0/24"}]},
              "nodes": [{"name": f"n{i}", "segment": "lan"} for i in (1, 2, 3)]}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
     "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
              "template": {"metadata": {"labels": {"app": "web"}},
                           "spec": {"containers": [{"name": "hostname"}]}}}},
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "solo", "labels": {"app": "solo"}},
     "spec": {"containers": [{"name": "hostname"}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
     "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 9376}]}},
]
CLUSTER, DEPLOYMENT, POD, SERVICE = range(4)


def build(*edits) -> str:
    """The base topology as YAML text after applying each edit to a fresh copy of its docs."""
    docs = copy.deepcopy(BASE)
    for edit in edits:
        edit(docs)
    return yaml.safe_dump_all(docs, sort_keys=False)


def _set(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[last] = value


def put(index: int, changes: dict):
    """Edit: set dotted paths in document `index`."""
    def edit(docs: list[dict]) -> None:
        for path, value in changes.items():
            _set(docs[index], path, value)
    return edit


def extra(index: int, changes: dict | None = None):
    """Edit: append a copy of document `index`, with dotted paths changed."""
    def edit(docs: list[dict]) -> None:
        docs.append(copy.deepcopy(docs[index]))
        put(-1, changes or {})(docs)
    return edit


def fail(text: str) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        topology.parse(text, FILE)
    assert str(info.value).startswith(f"{FILE}: ")
    assert info.value.exit_code == 2
    return info.value


def lan(*subnets: str) -> list[dict]:
    return [{"name": f"lan{i or ''}", "subnet": s} for i, s in enumerate(subnets)]


# ---- shipped topologies -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flannel-vxlan", "flannel-host-gw"])
def test_shipped_topology_parses(name):
    cluster, notes = topology.load(str(TOPOLOGIES / f"{name}.yaml"))
    assert cluster.mode == name
    assert [n.ip for n in cluster.nodes] == ["172.18.0.2", "172.18.0.3", "172.18.0.4"]
    assert [p.name for p in cluster.pods] == ["web-0", "web-1", "web-2"]
    assert [s.name for s in cluster.services] == ["web"]
    assert len(notes) == 1 and notes[0].count("image") == 1


@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_topology_parses_and_spreads_its_pods(path):
    """Each ready file parses without a warning, in the mode it is named after, and schedules
    its pods on at least two nodes (so cross-node traffic has something to show)."""
    cluster, notes = topology.load(str(path))
    assert cluster.mode in path.stem or path.stem == "calico-crosssubnet"
    assert not [n for n in notes if n.startswith("warning")], notes
    assert len({p.node for p in topology.schedule(cluster, {})}) >= 2
    assert cluster.services


def test_affinity_timeout_defaults_to_10800():
    text = build(put(SERVICE, {"spec.sessionAffinity": "ClientIP"}))
    svc = topology.parse(text, FILE)[0].services[0]
    assert (svc.session_affinity, svc.affinity_timeout) == ("ClientIP", 10800)


def test_base_parses():
    cluster, notes = topology.parse(build(), FILE)
    assert [p.name for p in cluster.pods] == ["web-0", "web-1", "solo"]
    assert cluster.source == FILE and notes == []


def test_load_missing_file():
    with pytest.raises(TopologyError, match="cannot read it"):
        topology.load("/nonexistent/topology.yaml")


# ---- rejections ---------------------------------------------------------------------------

def test_malformed_yaml_names_the_line():
    err = fail(build() + "---\nkind: Pod\nmetadata:\n  name: a: b\n")
    line = len(build().splitlines()) + 4  # the "name: a: b" line
    assert "malformed YAML: mapping values are not allowed here" in err.problem
    assert f"line {line}" in err.document and f"line {line}" in str(err)


NP = {"spec.type": "NodePort", "spec.ports": [{"port": 80, "nodePort": 30080}]}
HOST_GW_TWO_SEGMENTS = {
    "spec.cni.mode": "flannel-host-gw",
    "spec.underlay.segments": lan("172.18.0.0/24", "172.19.0.0/24"),
    "spec.nodes": [{"name": "n1", "segment": "lan"}, {"name": "n2", "segment": "lan1"}]}
CASES = [
    ("unknown-kind", [put(POD, {"kind": "StatefulSet"})], "kind", "unknown kind 'StatefulSet'"),
    ("no-cluster", [lambda d: d.pop(CLUSTER)], "kind", "found 0 Cluster documents"),
    ("two-clusters", [extra(CLUSTER)], "kind", "found 2 Cluster documents"),
    ("duplicate-pod", [extra(POD)], "metadata.name", "duplicate pod name 'solo'"),
    ("duplicate-node", [lambda d: d[CLUSTER]["spec"]["nodes"].append({"name": "n1"})],
     "spec.nodes", "duplicate node or external client name 'n1'"),
    ("duplicate-service", [extra(SERVICE)], "metadata.name", "duplicate service name 'web'"),
    ("node-not-dns1123", [put(CLUSTER, {"spec.nodes": [{"name": "Web_1"}]})],
     "spec.nodes[0].name", "'Web_1' is not a DNS-1123 label"),
    ("pod-not-dns1123", [put(POD, {"metadata.name": "Web_1"})],
     "metadata.name", "'Web_1' is not a DNS-1123 label"),
    ("segments-overlap",
     [put(CLUSTER, {"spec.underlay.segments": lan("172.18.0.0/24", "172.18.0.0/25")})],
     "spec.underlay.segments[1].subnet", "overlaps 172.18.0.0/24"),
    ("network-overlaps-segment", [put(CLUSTER, {"spec.cni.flannel.Network": "172.16.0.0/12"})],
     "spec.cni.flannel.Network", "overlaps 172.18.0.0/24"),
    ("network-overlaps-service-cidr", [put(CLUSTER, {"spec.serviceCIDR": "10.240.0.0/12"})],
     "spec.serviceCIDR", "overlaps 10.244.0.0/16"),
    ("segment-too-small", [put(CLUSTER, {"spec.underlay.segments": lan("172.18.0.0/30")})],
     "spec.underlay.segments", "has room for 1 hosts, not 3"),
    ("network-too-small",
     [put(CLUSTER, {"spec.cni.flannel.Network": "10.244.0.0/23",
                    "spec.nodes": [{"name": "n1"}, {"name": "n2"}]})],
     "spec.cni.flannel.Network", "holds 1 /24 subnets for 2 nodes"),
    ("service-selector-matches-nothing", [put(SERVICE, {"spec.selector": {"app": "nope"}})],
     "spec.selector", "matches no pod"),
    ("deployment-selector-mismatch",
     [put(DEPLOYMENT, {"spec.selector.matchLabels": {"app": "other"}})],
     "spec.selector.matchLabels", "does not match the template labels"),
    ("unknown-node-name", [put(POD, {"spec.nodeName": "n9"})], "spec.nodeName",
     "no node named 'n9'"),
    ("unknown-cni-mode", [put(CLUSTER, {"spec.cni.mode": "calico"})], "spec.cni.mode",
     "unknown mode 'calico'"),
    ("host-gw-two-segments", [put(CLUSTER, HOST_GW_TWO_SEGMENTS)], "spec.nodes",
     "host-gw needs every node on one L2 segment"),
    ("port-70000", [put(SERVICE, {"spec.ports": [{"port": 70000}]})], "spec.ports[0].port",
     "70000 is not a port"),
    ("node-port-out-of-range",
     [put(SERVICE, {**NP, "spec.ports": [{"port": 80, "nodePort": 29999}]})],
     "spec.ports[0].nodePort", "29999 is outside 30000-32767"),
    ("node-port-taken", [put(SERVICE, NP), extra(SERVICE, {"metadata.name": "web2"})],
     "nodePort", "nodePort 30080 is already taken by Service web"),
    *[(f"affinity-timeout-{t}",
       [put(SERVICE, {"spec.sessionAffinity": "ClientIP",
                      "spec.sessionAffinityConfig.clientIP.timeoutSeconds": t})],
       "spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"{t} is out of range")
      for t in (0, 86401)],
    ("port-0", [put(SERVICE, {"spec.ports": [{"port": 0}]})], "spec.ports[0].port",
     "0 is not a port"),
    ("target-port-name-undeclared",
     [put(SERVICE, {"spec.ports": [{"port": 80, "targetPort": "http"}]})],
     "spec.ports[0].targetPort", "no container of the selected pods declares a port named"),
    ("selector-less-service", [put(SERVICE, {"spec.selector": {}})], "spec.selector",
     "a Service needs a selector"),
    ("unknown-kube-proxy-mode", [put(CLUSTER, {"spec.kubeProxy": {"mode": "ipvs"}})],
     "spec.kubeProxy.mode", "unknown kube-proxy mode 'ipvs'"),
    ("cidr-host-bits", [put(CLUSTER, {"spec.cni.flannel.Network": "10.244.1.0/16"})],
     "spec.cni.flannel.Network", "10.244.1.0/16 has host bits set"),
]


@pytest.mark.parametrize("edits, field, phrase", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_rejected(edits, field, phrase):
    err = fail(build(*edits))
    assert field in err.field
    assert phrase in err.problem
    assert f": {err.field}: " in str(err) and phrase in str(err)



CRASHES = {  # wrongly shaped input: a TopologyError, never a Python exception
    "no-segments": put(CLUSTER, {"spec.underlay.segments": []}),
    "segment-is-a-list": put(CLUSTER, {"spec.nodes": [{"name": "n1", "segment": ["lan"]}]}),
    "ports-not-a-list": put(POD, {"spec.containers": [{"name": "c", "ports": 80}]}),
    "command-a-string": put(POD, {"spec.containers": [{"name": "c", "command": "sh"}]}),
}


@pytest.mark.parametrize("edit", CRASHES.values(), ids=CRASHES.keys())
def test_bad_shape_is_a_topology_error(edit):
    fail(build(edit))

# ---- scheduler ----------------------------------------------------------------------------

def cluster_of(pods: list[Pod] = (), services: list[Service] = ()) -> Cluster:
    return Cluster(name="t", mode="flannel-vxlan", pod_network="10.244.0.0/16", subnet_len=24,
                   service_cidr="10.96.0.0/12", mtu=1500,
                   segments=[Segment("lan", "172.18.0.0/24")],
                   nodes=[Node(f"n{i}", "lan") for i in (1, 2, 3)],
                   pods=list(pods), services=list(services))


def pods(n: int, **pins: str) -> list[Pod]:
    return [Pod(f"p{i}", {"app": "p"}, (Container("hostname"),), pins.get(f"p{i}", ""))
            for i in range(n)]


def test_schedule_spreads_three_two_two():
    placed = topology.schedule(cluster_of(pods(7)), {})
    assert [p.name for p in placed] == [f"p{i}" for i in range(7)]
    assert Counter(p.node for p in placed) == {"n1": 3, "n2": 2, "n3": 2}


def test_schedule_node_name_wins_over_previous_placement():
    placed = topology.schedule(cluster_of(pods(7, p0="n3", p1="n3")), {"p0": "n1"})
    assert placed[0].node == "n3" and placed[1].node == "n3"
    assert sorted(Counter(p.node for p in placed).values()) == [2, 2, 3]


def test_schedule_keeps_previous_placement():
    previous = {"p0": "n3", "p1": "n3", "p2": "n3", "p3": "gone"}
    placed = {p.name: p.node for p in topology.schedule(cluster_of(pods(7)), previous)}
    assert [placed[f"p{i}"] for i in range(3)] == ["n3", "n3", "n3"]
    assert placed["p3"] in {"n1", "n2"}  # its node no longer exists: placed afresh
    assert Counter(placed.values()) == {"n3": 3, "n1": 2, "n2": 2}


# ---- ClusterIPs ---------------------------------------------------------------------------

def services(*names: str, **explicit: str) -> list[Service]:
    return [Service(n, {"app": "p"}, (ServicePort(80, 80),), cluster_ip=explicit.get(n, ""))
            for n in names]


def test_cluster_ips_start_at_dot_ten():
    cluster = cluster_of(services=services("a", "b"))
    assert topology.allocate_cluster_ips(cluster, {}) == {"a": "10.96.0.10", "b": "10.96.0.11"}


def test_cluster_ips_keep_previous_allocations():
    cluster = cluster_of(services=services("a", "b", "c"))
    got = topology.allocate_cluster_ips(cluster, {"b": "10.96.0.10", "gone": "10.96.0.11"})
    assert got == {"a": "10.96.0.11", "b": "10.96.0.10", "c": "10.96.0.12"}


def test_cluster_ips_honour_explicit_address():
    cluster = cluster_of(services=services("a", "b", b="10.96.0.10"))
    got = topology.allocate_cluster_ips(cluster, {"a": "10.96.0.10"})
    assert got == {"a": "10.96.0.11", "b": "10.96.0.10"}
