"""netsim.topology: shipped files parse, bad input is rejected by field, scheduling, ClusterIPs."""

from __future__ import annotations

import copy
import re
import time
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
    {
        "apiVersion": "netsim.dev/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": "t"},
        "spec": {
            "cni": {
                "mode": "flannel-vxlan",
                "flannel": {"Network": "10.244.0.0/16", "SubnetLen": 24},
            },
            "serviceCIDR": "10.96.0.0/12",
            "underlay": {"segments": [{"name": "lan", "subnet": "172.18.0.0/24"}]},
            "nodes": [{"name": f"n{i}", "segment": "lan"} for i in (1, 2, 3)],
            "controlPlane": {"podNames": "Ordinal"},
        },
    },
    {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "hostname"}]},
            },
        },
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "solo", "labels": {"app": "solo"}},
        "spec": {"containers": [{"name": "hostname"}]},
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 9376}]},
    },
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
    (rs,) = {p.labels["pod-template-hash"] for p in cluster.pods}  # one ReplicaSet's pods
    assert all(
        re.fullmatch(rf"web-{rs}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", p.name) for p in cluster.pods
    )
    assert len(cluster.pods) == 3
    assert [s.name for s in cluster.services] == ["web"]
    assert notes == []


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
    "spec.nodes": [{"name": "n1", "segment": "lan"}, {"name": "n2", "segment": "lan1"}],
}
CASES = [
    ("unknown-kind", [put(POD, {"kind": "StatefulSet"})], "kind", "unknown kind 'StatefulSet'"),
    ("no-cluster", [lambda d: d.pop(CLUSTER)], "kind", "found 0 Cluster documents"),
    ("two-clusters", [extra(CLUSTER)], "kind", "found 2 Cluster documents"),
    ("duplicate-pod", [extra(POD)], "metadata.name", "duplicate pod name 'solo'"),
    (
        "duplicate-node",
        [lambda d: d[CLUSTER]["spec"]["nodes"].append({"name": "n1"})],
        "spec.nodes",
        "duplicate node or external client name 'n1'",
    ),
    ("duplicate-service", [extra(SERVICE)], "metadata.name", "duplicate service name 'web'"),
    (
        "node-not-dns1123",
        [put(CLUSTER, {"spec.nodes": [{"name": "Web_1"}]})],
        "spec.nodes[0].name",
        "'Web_1' is not a DNS-1123 label",
    ),
    (
        "pod-not-dns1123",
        [put(POD, {"metadata.name": "Web_1"})],
        "metadata.name",
        "'Web_1' is not a DNS-1123 label",
    ),
    (
        "segments-overlap",
        [put(CLUSTER, {"spec.underlay.segments": lan("172.18.0.0/24", "172.18.0.0/25")})],
        "spec.underlay.segments[1].subnet",
        "overlaps 172.18.0.0/24",
    ),
    (
        "network-overlaps-segment",
        [put(CLUSTER, {"spec.cni.flannel.Network": "172.16.0.0/12"})],
        "spec.cni.flannel.Network",
        "overlaps 172.18.0.0/24",
    ),
    (
        "network-overlaps-service-cidr",
        [put(CLUSTER, {"spec.serviceCIDR": "10.240.0.0/12"})],
        "spec.serviceCIDR",
        "overlaps 10.244.0.0/16",
    ),
    (
        "segment-too-small",
        [put(CLUSTER, {"spec.underlay.segments": lan("172.18.0.0/30")})],
        "spec.underlay.segments",
        "has room for 0 hosts beside the master (its etcd), not 3",
    ),
    (
        "network-too-small",
        [
            put(
                CLUSTER,
                {
                    "spec.cni.flannel.Network": "10.244.0.0/23",
                    "spec.nodes": [{"name": "n1"}, {"name": "n2"}],
                },
            )
        ],
        "spec.cni.flannel.Network",
        "holds 1 /24 subnets for 2 nodes",
    ),
    (
        "deployment-selector-mismatch",
        [put(DEPLOYMENT, {"spec.selector.matchLabels": {"app": "other"}})],
        "spec.selector.matchLabels",
        "does not match the template labels",
    ),
    (
        "unknown-node-name",
        [put(POD, {"spec.nodeName": "n9"})],
        "spec.nodeName",
        "no node named 'n9'",
    ),
    (
        "unknown-cni-mode",
        [put(CLUSTER, {"spec.cni.mode": "calico"})],
        "spec.cni.mode",
        "unknown mode 'calico'",
    ),
    (
        "host-gw-two-segments",
        [put(CLUSTER, HOST_GW_TWO_SEGMENTS)],
        "spec.nodes",
        "host-gw needs every node on one L2 segment",
    ),
    (
        "port-70000",
        [put(SERVICE, {"spec.ports": [{"port": 70000}]})],
        "spec.ports[0].port",
        "70000 is not a port",
    ),
    (
        "node-port-out-of-range",
        [put(SERVICE, {**NP, "spec.ports": [{"port": 80, "nodePort": 29999}]})],
        "spec.ports[0].nodePort",
        "29999 is outside 30000-32767",
    ),
    (
        "node-port-taken",
        [put(SERVICE, NP), extra(SERVICE, {"metadata.name": "web2"})],
        "nodePort",
        "nodePort 30080 is already taken by Service web",
    ),
    *[
        (
            f"affinity-timeout-{t}",
            [
                put(
                    SERVICE,
                    {
                        "spec.sessionAffinity": "ClientIP",
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds": t,
                    },
                )
            ],
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            f"{t} is out of range",
        )
        for t in (0, 86401)
    ],
    (
        "port-0",
        [put(SERVICE, {"spec.ports": [{"port": 0}]})],
        "spec.ports[0].port",
        "0 is not a port",
    ),
    (
        "target-port-name-undeclared",
        [put(SERVICE, {"spec.ports": [{"port": 80, "targetPort": "http"}]})],
        "spec.ports[0].targetPort",
        "no container of the selected pods declares a port named",
    ),
    (
        "unknown-kube-proxy-mode",
        [put(CLUSTER, {"spec.kubeProxy": {"mode": "ipvs"}})],
        "spec.kubeProxy.mode",
        "unknown kube-proxy mode 'ipvs'",
    ),
    (
        "cidr-host-bits",
        [put(CLUSTER, {"spec.cni.flannel.Network": "10.244.1.0/16"})],
        "spec.cni.flannel.Network",
        "10.244.1.0/16 has host bits set",
    ),
    (
        "pod-names",
        [put(CLUSTER, {"spec.controlPlane.podNames": "Random"})],
        "spec.controlPlane.podNames",
        "'Random' is not a way to name pods",
    ),
    (
        "strategy-type",
        [put(DEPLOYMENT, {"spec.strategy.type": "BlueGreen"})],
        "spec.strategy.type",
        "'BlueGreen' is not a strategy",
    ),
    (
        "surge-and-unavailable-zero",
        [put(DEPLOYMENT, {"spec.strategy.rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}})],
        "spec.strategy.rollingUpdate.maxUnavailable",
        "may not be 0 when maxSurge is 0",
    ),
    (
        "surge-not-a-percentage",
        [put(DEPLOYMENT, {"spec.strategy.rollingUpdate": {"maxSurge": "25"}})],
        "spec.strategy.rollingUpdate.maxSurge",
        "'25' is not a number or a percentage",
    ),
    (
        "recreate-with-rolling-update",
        [put(DEPLOYMENT, {"spec.strategy": {"type": "Recreate", "rollingUpdate": {}}})],
        "spec.strategy.rollingUpdate",
        "may not be given when strategy type is 'Recreate'",
    ),
    (
        "min-ready-negative",
        [put(DEPLOYMENT, {"spec.minReadySeconds": -1})],
        "spec.minReadySeconds",
        "-1 is negative",
    ),
    (
        "lb-pool-outside-segments",
        [put(CLUSTER, {"spec.loadBalancer.addresses": ["10.0.0.1-10.0.0.9"]})],
        "spec.loadBalancer.addresses[0]",
        "is not inside one underlay segment",
    ),
    (
        "lb-pool-holds-a-node",
        [put(CLUSTER, {"spec.loadBalancer.addresses": ["172.18.0.0/28"]})],
        "spec.loadBalancer.addresses[0]",
        "holds 172.18.0.2, the address of node n1",
    ),
    (
        "lb-pool-backwards",
        [put(CLUSTER, {"spec.loadBalancer.addresses": ["172.18.0.20-172.18.0.10"]})],
        "spec.loadBalancer.addresses[0]",
        "ends before it begins",
    ),
    (
        "lb-ip-outside-pool",
        [
            put(CLUSTER, {"spec.loadBalancer.addresses": ["172.18.0.200-172.18.0.201"]}),
            put(SERVICE, {"spec.type": "LoadBalancer", "spec.loadBalancerIP": "172.18.0.9"}),
        ],
        "spec.loadBalancerIP",
        "172.18.0.9 is not in the cluster's pool",
    ),
    (
        "etp-on-cluster-ip",
        [put(SERVICE, {"spec.externalTrafficPolicy": "Local"})],
        "spec.externalTrafficPolicy",
        "may only be set when `type` is 'NodePort' or 'LoadBalancer'",
    ),
    (
        "itp-unknown",
        [put(SERVICE, {"spec.internalTrafficPolicy": "Nearest"})],
        "spec.internalTrafficPolicy",
        "'Nearest' is not a traffic policy",
    ),
    (
        "health-check-port-without-local",
        [put(SERVICE, {"spec.type": "LoadBalancer", "spec.healthCheckNodePort": 30500})],
        "spec.healthCheckNodePort",
        "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
    ),
]


@pytest.mark.parametrize("edits, field, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
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
    return Cluster(
        name="t",
        mode="flannel-vxlan",
        pod_network="10.244.0.0/16",
        subnet_len=24,
        service_cidr="10.96.0.0/12",
        mtu=1500,
        segments=[Segment("lan", "172.18.0.0/24")],
        nodes=[Node(f"n{i}", "lan") for i in (1, 2, 3)],
        pods=list(pods),
        services=list(services),
    )


def pods(n: int, **pins: str) -> list[Pod]:
    return [
        Pod(f"p{i}", {"app": "p"}, (Container("hostname"),), pins.get(f"p{i}", ""))
        for i in range(n)
    ]


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
    return [
        Service(n, {"app": "p"}, (ServicePort(80, 80),), cluster_ip=explicit.get(n, ""))
        for n in names
    ]


def test_cluster_ips_start_at_dot_eleven_after_kube_dns():
    cluster = cluster_of(services=services("a", "b"))
    assert topology.allocate_cluster_ips(cluster, {}) == {"a": "10.96.0.11", "b": "10.96.0.12"}
    assert topology.dns_ip(cluster.service_cidr) == "10.96.0.10"


def test_cluster_ips_keep_previous_allocations():
    cluster = cluster_of(services=services("a", "b", "c"))
    got = topology.allocate_cluster_ips(cluster, {"b": "10.96.0.10", "gone": "10.96.0.11"})
    assert got == {"a": "10.96.0.11", "b": "10.96.0.10", "c": "10.96.0.12"}


def test_cluster_ips_honour_explicit_address():
    cluster = cluster_of(services=services("a", "b", b="10.96.0.10"))
    got = topology.allocate_cluster_ips(cluster, {"a": "10.96.0.10"})
    assert got == {"a": "10.96.0.11", "b": "10.96.0.10"}


# ---- the sound house: every input is built as written, or refused with one line -----------


def laughs(levels: int = 9) -> str:
    """YAML whose aliases expand to 9**levels values ("billion laughs")."""
    rows = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    rows += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(rows) + f", *l{levels - 1}]"


def raw(index: int, path: str, snippet: str) -> str:
    """The base topology with the value at `path` of document `index` replaced by raw YAML."""
    return build(put(index, {path: "SNIPPET"})).replace("SNIPPET", snippet)


def one_line(err: TopologyError, field: str) -> TopologyError:
    assert err.field.startswith(field), (err.field, str(err))
    assert len(str(err).splitlines()) == 1 and len(str(err)) < 400 and str(err).isprintable()
    return err


def quick(text: str, field: str, limit: float = 1.0) -> TopologyError:
    start = time.monotonic()
    err = fail(text)
    assert time.monotonic() - start < limit
    return one_line(err, field)


NO_SOLO = [lambda d: d.pop(POD)]  # the base without its single Pod: only the Deployment's


@pytest.mark.parametrize("index", [CLUSTER, POD, SERVICE])
def test_a_number_as_metadata_name(index):
    one_line(fail(build(put(index, {"metadata.name": 5}))), "metadata.name")


def test_kind_or_name_of_any_type_is_named():
    for value in ([], {"a": "b"}, None, 1.5):
        one_line(fail(build(put(POD, {"kind": value}))), "kind")
    one_line(fail(build(put(POD, {"metadata": ["solo"]}))), "metadata.name")


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(build().encode() + "# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(TopologyError) as info:
        topology.load(str(path))
    assert "not UTF-8" in str(info.value) and str(path) in str(info.value)
    assert f"line {len(build().splitlines()) + 1}" in str(info.value)


def test_a_control_character_is_one_line():
    err = fail(build() + "# \x00\n")
    assert "U+0000" in err.problem and f"line {len(build().splitlines()) + 1}" in err.document


def test_an_integer_of_thousands_of_digits():
    err = quick(raw(DEPLOYMENT, "spec.replicas", "9" * 5000), "spec.replicas")
    assert "5000 digits" in err.problem


def test_integer_length_boundary():
    limit = topology.MAX_INT_DIGITS
    err = one_line(fail(raw(DEPLOYMENT, "spec.replicas", "9" * limit)), "spec.replicas")
    assert "out of range" in err.problem  # read as a number, then refused by its range
    err = fail(raw(DEPLOYMENT, "spec.replicas", "9" * (limit + 1)))
    assert f"{limit + 1} digits" in err.problem and err.field == "spec.replicas"


def test_deeply_nested_yaml():
    err = quick(raw(POD, "metadata.annotations", "[" * 5000 + "]" * 5000), "metadata.annotations")
    assert f"more than {topology.MAX_DEPTH} deep" in err.problem


def test_nesting_depth_boundary():
    # the document, metadata, then lists: the innermost is at depth 2 + lists
    deepest = topology.MAX_DEPTH - 2
    topology.parse(raw(POD, "metadata.annotations", "[" * deepest + "]" * deepest), FILE)
    fail(raw(POD, "metadata.annotations", "[" * (deepest + 1) + "]" * (deepest + 1)))


@pytest.mark.parametrize(
    "path, value",
    [
        ("spec.cni.calico.bgp.routeReflectors", [{"n1": "x"}]),
        ("spec.nodes", {"n1": "lan"}),
        ("spec.underlay.segments", {"lan": "172.18.0.0/24"}),
    ],
)
def test_a_mapping_where_names_are_expected(path, value):
    edits = [
        put(CLUSTER, {"spec.cni.mode": "calico-bgp", "spec.cni.flannel": None}),
        put(CLUSTER, {path: value}),
    ]
    one_line(fail(build(*edits)), path)


def test_billion_laughs_in_a_label():
    err = quick(
        raw(DEPLOYMENT, "spec.template.metadata.labels.app", laughs()),
        "spec.template.metadata.labels.app",
    )
    assert "alias" in err.problem and str(topology.MAX_VALUES) in err.problem


def test_billion_laughs_in_a_count():
    quick(raw(DEPLOYMENT, "spec.replicas", laughs()), "spec.replicas")


def test_a_recursive_alias():
    err = quick(raw(POD, "metadata.annotations", "&a [1, *a]"), "metadata.annotations")
    assert "contains it" in err.problem


def test_a_few_aliases_are_read_as_written():
    text = raw(DEPLOYMENT, "spec.selector.matchLabels", "&labels {app: web}").replace(
        "labels:\n        app: web", "labels: *labels"
    )
    assert "*labels" in text
    assert [p.name for p in topology.parse(text, FILE)[0].pods] == ["web-0", "web-1", "solo"]


def test_a_huge_flannel_network_plans_at_once():
    from netsim.modes.flannel import allocate_subnets

    text = build(put(CLUSTER, {"spec.cni.flannel": {"Network": "32.0.0.0/3", "SubnetLen": 28}}))
    cluster = topology.parse(text, FILE)[0]
    start = time.monotonic()
    leases = allocate_subnets(
        cluster.pod_network,
        cluster.subnet_len,
        [n.name for n in cluster.nodes],
        {"n2": "32.0.0.16/28"},
    )
    assert time.monotonic() - start < 0.5
    assert leases == {"n2": "32.0.0.16/28", "n1": "32.0.0.32/28", "n3": "32.0.0.48/28"}


def test_allocate_subnets_keeps_only_leases_of_the_network():
    from netsim.modes.flannel import allocate_subnets

    got = allocate_subnets(
        "10.244.0.0/16",
        24,
        ["a", "b", "c", "d"],
        {"a": "10.244.7.0/24", "b": "10.244.0.0/24", "c": "10.245.1.0/24", "d": "10.244.8.0/25"},
    )
    assert got == {
        "a": "10.244.7.0/24",
        "b": "10.244.1.0/24",
        "c": "10.244.2.0/24",
        "d": "10.244.3.0/24",
    }


# flannel: a /28 per node holds 16 - 3 = 13 pods; three nodes 39
FLANNEL_28 = put(CLUSTER, {"spec.cni.flannel.SubnetLen": 28})


def test_flannel_node_subnet_holds_its_pods_exactly():
    cluster = topology.parse(
        build(*NO_SOLO, FLANNEL_28, put(DEPLOYMENT, {"spec.replicas": 39})), FILE
    )[0]
    assert Counter(p.node for p in topology.schedule(cluster, {})) == {"n1": 13, "n2": 13, "n3": 13}


def test_more_pods_than_a_flannel_node_subnet_holds():
    err = fail(build(*NO_SOLO, FLANNEL_28, put(DEPLOYMENT, {"spec.replicas": 40})))
    one_line(err, "spec.replicas")
    assert "web-39 would be pod 14 on node n1" in err.problem and "holds 13 pods" in err.problem


def test_pinned_pods_count_on_their_node():
    pinned = put(DEPLOYMENT, {"spec.template.spec.nodeName": "n2", "spec.replicas": 13})
    topology.parse(build(*NO_SOLO, FLANNEL_28, pinned), FILE)
    err = fail(build(FLANNEL_28, pinned, put(POD, {"spec.nodeName": "n2"})))
    one_line(err, "spec.nodeName")
    assert "node n2" in err.problem


def calico(mode: str, cidr: str, block: int = 26) -> list:
    return [
        put(
            CLUSTER,
            {
                "spec.cni.mode": mode,
                "spec.cni.flannel": None,
                "spec.cni.calico": {"ipPool": {"cidr": cidr, "blockSize": block}},
            },
        )
    ]


def test_calico_pool_with_fewer_blocks_than_nodes():
    nodes = put(CLUSTER, {"spec.nodes": [{"name": f"n{i}"} for i in range(1, 6)]})
    err = fail(build(*calico("calico-bgp", "10.244.0.0/24"), nodes))
    one_line(err, "spec.cni.calico.ipPool.cidr")
    assert "holds 4 /26 blocks for 5 nodes" in err.problem
    four = put(CLUSTER, {"spec.nodes": [{"name": f"n{i}"} for i in range(1, 5)]})
    topology.parse(build(*calico("calico-bgp", "10.244.0.0/24"), four), FILE)


# A /24 pool of four /26 blocks for three nodes. calico-bgp: 64+64+65 = 193 pods fit, the next
# would need a fifth block; calico-vxlan: each node's tunnel address takes one, so 190.
@pytest.mark.parametrize("mode, most", [("calico-bgp", 193), ("calico-vxlan", 190)])
def test_calico_pool_holds_its_pods_exactly(mode, most):
    pool = calico(mode, "10.244.0.0/24")
    topology.parse(build(*NO_SOLO, *pool, put(DEPLOYMENT, {"spec.replicas": most})), FILE)
    err = fail(build(*NO_SOLO, *pool, put(DEPLOYMENT, {"spec.replicas": most + 1})))
    one_line(err, "spec.replicas")
    assert f"web-{most}" in err.problem and "holds 4 /26 blocks" in err.problem


def node_port_service(ports: int, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "many"},
        "spec": {
            "type": "NodePort",
            "selector": {"app": "web"},
            **spec,
            "ports": [{"name": f"p{i}", "port": i} for i in range(1, ports + 1)],
        },
    }


def test_node_ports_exactly_fill_the_range():
    size = topology.NODE_PORT_RANGE[1] - topology.NODE_PORT_RANGE[0] + 1
    topology.parse(build(lambda d: d.append(node_port_service(size))), FILE)
    err = fail(build(lambda d: d.append(node_port_service(size + 1))))
    one_line(err, f"spec.ports[{size}].nodePort")
    assert "no nodePort is left" in err.problem


def test_two_unnamed_ports_in_one_service():
    err = fail(build(put(SERVICE, {"spec.ports": [{"port": 80}, {"port": 81}]})))
    one_line(err, "spec.ports[0].name")
    assert "must name each" in err.problem
    topology.parse(
        build(put(SERVICE, {"spec.ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "b"}]})),
        FILE,
    )


@pytest.mark.parametrize("name", ["a b", "a" * 64, "-a", "a-", "A", "a_b", 80, ["a"]])
def test_bad_service_port_names(name):
    one_line(
        fail(build(put(SERVICE, {"spec.ports": [{"port": 80, "name": name}]}))),
        "spec.ports[0].name",
    )


def test_service_port_names_are_dns_labels_as_in_kubernetes():
    """Kubernetes validates a Service port's name as a DNS-1123 label (up to 63 characters);
    the names a targetPort refers to are containerPort names, IANA_SVC_NAMEs (up to 15)."""
    name = "a" * 40
    svc = topology.parse(build(put(SERVICE, {"spec.ports": [{"port": 80, "name": name}]})), FILE)[
        0
    ].services[0]
    assert svc.ports[0].name == name


@pytest.mark.parametrize("name", ["a b", "a" * 40, "a" * 16, "80", "a--b", "-a", "Http"])
def test_bad_container_port_and_target_port_names(name):
    port = {"spec.containers": [{"name": "c", "ports": [{"containerPort": 80, "name": name}]}]}
    one_line(fail(build(put(POD, port))), "spec.containers[0].ports[0].name")
    target = {"spec.ports": [{"port": 80, "targetPort": name}]}
    one_line(fail(build(put(SERVICE, target))), "spec.ports[0].targetPort")


def test_a_fifteen_character_port_name_is_taken():
    name = "a" * 14 + "1"
    port = {"spec.containers": [{"name": "c", "ports": [{"containerPort": 80, "name": name}]}]}
    svc = {"spec.selector": {"app": "solo"}, "spec.ports": [{"port": 80, "targetPort": name}]}
    cluster = topology.parse(build(put(POD, port), put(SERVICE, svc)), FILE)[0]
    assert cluster.services[0].ports[0].target_port == name


def test_duplicate_port_and_protocol_in_one_service():
    twice = [{"port": 80, "name": "a"}, {"port": 80, "name": "b"}]
    err = fail(build(put(SERVICE, {"spec.ports": twice})))
    one_line(err, "spec.ports[1].port")
    assert "80/TCP" in err.problem
    both = [{"port": 53, "name": "dns", "protocol": "UDP"}, {"port": 53, "name": "dns-tcp"}]
    topology.parse(build(put(SERVICE, {"spec.ports": both})), FILE)
    err = fail(
        build(put(SERVICE, {"spec.ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]}))
    )
    one_line(err, "spec.ports[1].name")


@pytest.mark.parametrize(
    "ip, words",
    [
        ("10.96.0.0", "network address"),
        ("10.111.255.255", "broadcast address"),
        ("10.96.0.10", "kube-dns"),
        ("10.96.0.010", "not an IPv4"),
        ("10.112.0.1", "not in the service CIDR"),
    ],
)
def test_bad_cluster_ips(ip, words):
    err = one_line(fail(build(put(SERVICE, {"spec.clusterIP": ip}))), "spec.clusterIP")
    assert words in err.problem


def test_cluster_ip_next_to_the_edges_is_taken():
    for ip in ("10.96.0.1", "10.111.255.254"):
        cluster = topology.parse(build(put(SERVICE, {"spec.clusterIP": ip})), FILE)[0]
        assert topology.allocate_cluster_ips(cluster, {}) == {"web": ip}


def services_in(cidr: str, count: int, **ips: str):
    def edit(docs: list[dict]) -> None:
        docs[CLUSTER]["spec"]["serviceCIDR"] = cidr
        for i in range(1, count):
            docs.append(copy.deepcopy(docs[SERVICE]))
            docs[-1]["metadata"]["name"] = f"web{i}"
        for doc in docs:
            if doc["kind"] == "Service" and doc["metadata"]["name"] in ips:
                doc["spec"]["clusterIP"] = ips[doc["metadata"]["name"]]

    return edit


def test_service_cidr_holds_its_services_exactly():
    # a /28: netsim allocates from .11 to .14 (.10 is kube-dns's), four addresses
    cluster = topology.parse(build(services_in("10.96.0.0/28", 4)), FILE)[0]
    assert sorted(topology.allocate_cluster_ips(cluster, {}).values()) == [
        f"10.96.0.{i}" for i in range(11, 15)
    ]
    err = fail(build(services_in("10.96.0.0/28", 5)))
    one_line(err, "spec.serviceCIDR")
    assert "room for 4" in err.problem and "Service web4 gets none" in err.problem


def test_written_cluster_ips_count_against_the_room_only_inside_it():
    topology.parse(build(services_in("10.96.0.0/28", 5, web4="10.96.0.2")), FILE)
    fail(build(services_in("10.96.0.0/28", 5, web4="10.96.0.12")))


def test_a_service_cidr_with_no_room_at_all():
    one_line(fail(build(services_in("10.96.0.0/29", 1))), "spec.serviceCIDR")


def test_allocate_cluster_ips_refuses_instead_of_stopping():
    """parse() refuses this; a Cluster made another way still gets an error, not a crash."""
    cluster = cluster_of(services=services(*"abcdef"))
    cluster.service_cidr = "10.96.0.0/28"
    with pytest.raises(TopologyError, match="no address left for Service e"):
        topology.allocate_cluster_ips(cluster, {})


def test_service_cidr_larger_than_kube_apiserver_takes():
    one_line(fail(build(put(CLUSTER, {"spec.serviceCIDR": "10.64.0.0/11"}))), "spec.serviceCIDR")


@pytest.mark.parametrize(
    "field, cidr",
    [
        ("spec.cni.flannel.Network", "127.16.0.0/16"),
        ("spec.cni.flannel.Network", "169.254.0.0/16"),
        ("spec.cni.flannel.Network", "168.0.0.0/6"),
        ("spec.cni.flannel.Network", "224.1.0.0/16"),
        ("spec.cni.flannel.Network", "240.0.0.0/16"),
        ("spec.cni.flannel.Network", "0.0.0.0/1"),
        ("spec.serviceCIDR", "127.96.0.0/12"),
        ("spec.underlay.segments[0].subnet", "127.0.0.0/24"),
    ],
)
def test_reserved_ranges(field, cidr):
    path = "spec.underlay.segments" if "segments" in field else field
    value = lan(cidr) if "segments" in field else cidr
    err = one_line(fail(build(put(CLUSTER, {path: value}))), field)
    assert "overlaps" in err.problem


def test_calico_pool_holding_the_pod_gateway():
    err = one_line(
        fail(build(*calico("calico-vxlan", "169.254.0.0/16"))), "spec.cni.calico.ipPool.cidr"
    )
    assert "169.254.1.1" in err.problem


def test_bgp_peer_with_the_clusters_own_as():
    peers = {
        "spec.cni.calico.bgp": {"asNumber": 64512, "peers": [{"name": "tor", "asNumber": 64512}]}
    }
    err = one_line(
        fail(build(*calico("calico-bgp", "10.244.0.0/16"), put(CLUSTER, peers))),
        "spec.cni.calico.bgp.peers[0].asNumber",
    )
    assert "iBGP" in err.problem
    peers["spec.cni.calico.bgp"]["peers"][0]["asNumber"] = 65001
    topology.parse(build(*calico("calico-bgp", "10.244.0.0/16"), put(CLUSTER, peers)), FILE)


def test_calico_settings_in_a_flannel_mode():
    err = fail(build(put(CLUSTER, {"spec.cni.calico": {"ipPool": {"cidr": "10.244.0.0/16"}}})))
    one_line(err, "spec.cni.calico")
    assert "flannel-vxlan" in err.problem and "remove spec.cni.calico" in err.fix


def test_flannel_settings_in_a_calico_mode():
    edit = put(CLUSTER, {"spec.cni.mode": "calico-vxlan"})  # the base's flannel: stays
    err = one_line(fail(build(edit)), "spec.cni.flannel")
    assert "remove spec.cni.flannel" in err.fix


# ---- the loader's limits ------------------------------------------------------------------


def test_file_size_limit(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(build() + "#" * topology.MAX_BYTES + "\n")
    with pytest.raises(TopologyError, match="1 MiB"):
        topology.load(str(path))
    with pytest.raises(TopologyError, match="1 MiB"):
        topology.parse(path.read_text(), FILE)


def test_document_count_limit():
    docs = len(BASE)
    topology.parse(build() + "---\n" * (topology.MAX_DOCUMENTS - docs), FILE)
    err = fail(build() + "---\n" * (topology.MAX_DOCUMENTS - docs + 1))
    assert f"more than {topology.MAX_DOCUMENTS} documents" in err.problem


def test_value_count_limit():
    text = raw(POD, "metadata.annotations", "[" + "a, " * topology.MAX_VALUES + "]")
    err = quick(text, "metadata.annotations", limit=2.0)
    assert f"more than {topology.MAX_VALUES} values" in err.problem


def test_duplicate_keys():
    text = build().replace("replicas: 2\n", "replicas: 2\n  replicas: 200\n")
    one_line(fail(text), "spec.replicas")


@pytest.mark.parametrize(
    "tag",
    [
        "!!binary aGk=",
        "!!set {a: null}",
        "!!timestamp 2001-12-14",
        "!!python/object/apply:os.system [true]",
        "!local x",
    ],
)
def test_yaml_tags(tag):
    err = one_line(fail(raw(POD, "metadata.annotations", tag)), "metadata.annotations")
    assert "tag" in err.problem


@pytest.mark.parametrize("snippet", ["!!int x", "!!float x", "!!bool maybe", "0b_", "0x_"])
def test_malformed_typed_scalars(snippet):
    fail(raw(POD, "metadata.annotations", snippet))


def test_timestamps_and_base_60_are_strings_as_in_kubernetes():
    labels = {"app": "web", "day": "SNAP1"}
    containers = [{"name": "c", "command": ["sleep", "SNAP2"]}]
    text = (
        build(
            put(
                DEPLOYMENT,
                {
                    "spec.template.metadata.labels": labels,
                    "spec.template.spec.containers": containers,
                },
            )
        )
        .replace("SNAP1", "2001-12-14")
        .replace("SNAP2", "1:20")
    )
    assert "day: 2001-12-14" in text and "- 1:20" in text
    pod = topology.parse(text, FILE)[0].pods[0]
    assert pod.labels == {"app": "web", "day": "2001-12-14"}
    assert pod.containers[0].command == ("sleep", "1:20")


# ---- what Kubernetes refuses --------------------------------------------------------------


@pytest.mark.parametrize(
    "index, version",
    [(CLUSTER, "v1"), (POD, "apps/v1"), (DEPLOYMENT, "extensions/v1beta1"), (SERVICE, None)],
)
def test_api_version_per_kind(index, version):
    one_line(fail(build(put(index, {"apiVersion": version}))), "apiVersion")


@pytest.mark.parametrize(
    "labels, field",
    [
        ({"app": 1}, "metadata.labels.app"),
        ({"app": True}, "metadata.labels.app"),
        ({"app": "a b"}, "metadata.labels.app"),
        ({"app": "x" * 64}, "metadata.labels.app"),
        ({"a b": "x"}, "metadata.labels"),
        ({"-a": "x"}, "metadata.labels"),
        ({"Example.com/a": "x"}, "metadata.labels"),
        ({1: "x"}, "metadata.labels"),
    ],
)
def test_bad_labels(labels, field):
    one_line(fail(build(put(POD, {"metadata.labels": labels}))), field)


def test_labels_kubernetes_takes():
    labels = {"app": "solo", "example.com/tier": "Front_end.1", "empty": "", "null": None}
    pod = topology.parse(build(put(POD, {"metadata.labels": labels})), FILE)[0].pods[-1]
    assert pod.labels == {"app": "solo", "example.com/tier": "Front_end.1", "empty": "", "null": ""}


def test_command_words_are_strings():
    item = {"spec.containers": [{"name": "c", "command": ["sleep", 100]}]}
    err = one_line(fail(build(put(POD, item))), "spec.containers[0].command[1]")
    assert "quote it" in err.fix


def test_duplicate_container_names():
    item = {"spec.containers": [{"name": "c"}, {"name": "c"}]}
    one_line(fail(build(put(POD, item))), "spec.containers[1].name")


def test_service_name_starts_with_a_letter():
    one_line(fail(build(put(SERVICE, {"metadata.name": "1web"}))), "metadata.name")


def test_kubernetes_defaults_for_null_and_zero():
    """targetPort: null is the port, protocol: null is TCP, nodePort: 0 is "allocate one"."""
    ports = [{"port": 80, "targetPort": None, "protocol": None, "nodePort": 0}]
    svc = topology.parse(build(put(SERVICE, {"spec.type": "NodePort", "spec.ports": ports})), FILE)[
        0
    ].services[0]
    assert svc.ports[0] == ServicePort(80, 80, "TCP", "", None)


@pytest.mark.parametrize("ip", ["172.18.0.010", "172.18.0.5 ", 2886860805, "::1"])
def test_node_ip_is_a_dotted_quad(ip):
    one_line(
        fail(build(put(CLUSTER, {"spec.nodes": [{"name": "n1", "ip": ip}]}))), "spec.nodes[0].ip"
    )


def test_cni_plugin_type_is_a_file_name():
    for kind in ("..", "a b", "x\x00", "/bin/sh"):
        one_line(
            fail(build(put(CLUSTER, {"spec.cni.plugins": [{"type": kind}]}))), "spec.cni.plugins[0]"
        )


def test_scale_override_on_a_bad_document():
    """netsim scale re-reads the file: a broken Deployment is still a TopologyError."""
    text = build(put(DEPLOYMENT, {"metadata": ["web"]}))
    with pytest.raises(TopologyError):
        topology.parse(text, FILE, {"replicas": {"web": 3}})
    text = build(put(DEPLOYMENT, {"spec": ["x"]}))
    with pytest.raises(TopologyError):
        topology.parse(text, FILE, {"replicas": {"web": 3}})


def test_long_values_are_cut_in_messages():
    err = one_line(fail(build(put(CLUSTER, {"spec.cni.mode": "x" * 100000}))), "spec.cni.mode")
    assert len(str(err)) < 400
    nodes = [{"name": f"n{i}"} for i in range(1, 201)]
    big = {"spec.nodes": nodes, "spec.underlay.segments": lan("172.18.0.0/16")}
    err = one_line(
        fail(build(put(CLUSTER, big), put(POD, {"spec.nodeName": "n999"}))), "spec.nodeName"
    )
    assert "and 190 more" in err.fix


def test_the_first_overlapping_pair_is_named():
    segments = lan("172.18.0.0/24", "172.19.0.0/24", "172.19.0.128/25", "172.18.0.0/25")
    err = fail(build(put(CLUSTER, {"spec.underlay.segments": segments})))
    assert err.field == "spec.underlay.segments[3].subnet" and "overlaps 172.18.0.0/24" in str(err)


def test_a_large_cluster_parses_in_seconds():
    """Thousands of nodes, segments and pods: every check is linear or close to it (the
    scheduler once looked up each node's position for each pod: minutes)."""
    segments = [{"name": f"s{i}", "subnet": f"10.{i // 256}.{i % 256}.0/24"} for i in range(1000)]
    nodes = [{"name": f"n{i}", "segment": f"s{i % 1000}"} for i in range(2000)]
    big = {
        "spec.underlay.segments": segments,
        "spec.nodes": nodes,
        "spec.serviceCIDR": "10.200.0.0/16",
        "spec.cni.flannel": {"Network": "100.64.0.0/10", "SubnetLen": 24},
    }
    start = time.monotonic()
    cluster = topology.parse(
        build(put(CLUSTER, big), put(DEPLOYMENT, {"spec.replicas": 10000})), FILE
    )[0]
    assert len(cluster.pods) == 10001 and time.monotonic() - start < 10
    assert Counter(Counter(p.node for p in topology.schedule(cluster, {})).values()) == {
        5: 1999,
        6: 1,
    }


def test_cni_plugin_config_is_json():
    text = build(put(CLUSTER, {"spec.cni.plugins": [{"type": "tuning", "x": "SNIP"}]}))
    one_line(fail(text.replace("SNIP", ".nan")), "spec.cni.plugins")


# ---- containers as Kubernetes runs them ---------------------------------------------------


def test_command_and_args_keep_their_kubernetes_meaning():
    from netsim.images import workload

    agnhost = "registry.k8s.io/e2e-test-images/agnhost:2.53"
    item = {
        "spec.containers": [
            {"name": "a", "image": agnhost, "args": ["serve-hostname", "--port", "80"]},
            {"name": "b", "image": agnhost},
            {"name": "c", "image": "busybox:1.28", "args": ["sleep", "5"]},
            {"name": "d", "image": "busybox", "command": ["echo"], "args": ["hi"]},
            {"name": "e", "image": "nginx:1.27"},  # nginx's port: 80, as the guides expose it
            {"name": "f"},
            {"name": "g", "image": "redis:7", "ports": [{"containerPort": 6379}]},
        ]
    }
    cluster, notes = topology.parse(build(put(POD, item)), FILE)
    a, b, c, d, e, f, g = (workload(x) for x in cluster.pods[-1].containers)
    assert a.argv[-4:] == ("netsim.agnhost", "serve-hostname", "--port", "80")
    assert b.argv[-2:] == ("netsim.agnhost", "pause")  # agnhost's CMD
    assert c.argv == ("sleep", "5")  # busybox has no ENTRYPOINT: args are the command
    assert d.argv == ("echo", "hi")
    assert e.argv is None and f.argv is None and g.argv is None  # the hostname server
    assert cluster.pods[-1].serve_ports == (80, 6379, 9376)
    assert notes == [  # (nginx's is modelled so: no notice)
        "warning: image redis:7 of container g is not modelled and has no command: "
        "netsim's hostname server answers on port 6379"
    ]


def test_init_containers_restart_policy_and_probes_are_read():
    item = {
        "spec.initContainers": [{"name": "i", "image": "busybox", "command": ["true"]}],
        "spec.restartPolicy": "OnFailure",
        "spec.enableServiceLinks": False,
        "spec.containers": [
            {
                "name": "c",
                "ports": [{"containerPort": 8080, "name": "http"}],
                "env": [{"name": "A", "value": "1"}],
                "readinessProbe": {
                    "httpGet": {"port": "http", "path": "/ready"},
                    "periodSeconds": 2,
                },
            }
        ],
    }
    pod = topology.parse(build(put(POD, item)), FILE)[0].pods[-1]
    assert [c.name for c in pod.init_containers] == ["i"]
    assert pod.restart_policy == "OnFailure" and not pod.service_links
    probe = pod.containers[0].readiness
    assert (probe.kind, probe.port, probe.path, probe.period) == ("httpGet", "http", "/ready", 2)
    assert pod.containers[0].env == (("A", "1"),)


@pytest.mark.parametrize(
    "item, field",
    [
        ({"spec.restartPolicy": "Sometimes"}, "spec.restartPolicy"),
        (
            {"spec.initContainers": [{"name": "hostname", "command": ["true"]}]},
            "spec.initContainers",
        ),
        (
            {"spec.containers": [{"name": "c", "readinessProbe": {"httpGet": {"port": "web"}}}]},
            "spec.containers[0].readinessProbe.httpGet.port",
        ),
        (
            {"spec.containers": [{"name": "c", "readinessProbe": {"periodSeconds": 1}}]},
            "spec.containers[0].readinessProbe",
        ),
        (
            {"spec.containers": [{"name": "c", "env": [{"value": "x"}]}]},
            "spec.containers[0].env[0].name",
        ),
        ({"spec.containers": [{"name": "c", "image": 5}]}, "spec.containers[0].image"),
    ],
)
def test_bad_pod_specs(item, field):
    one_line(fail(build(put(POD, item))), field)


def test_a_deployment_restarts_always():
    item = {"spec.template.spec.restartPolicy": "Never"}
    one_line(fail(build(put(DEPLOYMENT, item))), "spec.template.spec.restartPolicy")


def test_services_kubernetes_takes_without_pods_behind_them():
    """A selector that matches nothing yet is a warning; no selector, or headless, is fine."""
    cluster, notes = topology.parse(build(put(SERVICE, {"spec.selector": {"app": "nope"}})), FILE)
    assert notes == [
        "warning: the selector {'app': 'nope'} of Service web matches no pod: it has no endpoints"
    ]
    cluster, notes = topology.parse(build(put(SERVICE, {"spec.selector": {}})), FILE)
    assert notes == [] and cluster.services[0].selector == {}
    cluster, _ = topology.parse(build(put(SERVICE, {"spec.clusterIP": "None"})), FILE)
    assert cluster.services[0].cluster_ip == "None"


def test_namespaces_are_declared_and_names_are_unique_in_each():
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "x", "labels": {"team": "a"}},
    }
    text = build(put(POD, {"metadata.namespace": "x"}), lambda docs: docs.append(namespace))
    cluster = topology.parse(text, FILE)[0]
    assert cluster.namespaces == {"x": {"team": "a", "kubernetes.io/metadata.name": "x"}}
    pod = cluster.pods[-1]
    assert (pod.namespace, pod.key) == ("x", f"x.{pod.name}")
    err = one_line(fail(build(put(POD, {"metadata.namespace": "y"}))), "metadata.namespace")
    assert "not found" in err.problem and "Namespace" in err.fix


def test_load_balancer_services_take_pool_addresses_and_node_ports():
    from netsim import services
    from netsim.record import Record
    from netsim.transaction import Changes

    text = build(
        put(CLUSTER, {"spec.loadBalancer.addresses": ["172.18.0.200-172.18.0.201"]}),
        put(SERVICE, {"spec.type": "LoadBalancer", "spec.externalTrafficPolicy": "Local"}),
        extra(SERVICE, {"metadata.name": "two", "spec.externalTrafficPolicy": "Cluster"}),
        extra(SERVICE, {"metadata.name": "three", "spec.externalTrafficPolicy": "Cluster"}),
    )
    cluster, _ = topology.parse(text, FILE)
    record = Record(cluster.name, None, None, None)
    services.reconcile(cluster, record, Changes())
    web, two, three = (record.services[n] for n in ("web", "two", "three"))
    assert (web.load_balancer_ip, two.load_balancer_ip, three.load_balancer_ip) == (
        "172.18.0.200",
        "172.18.0.201",
        "",  # no room left: <pending>, as MetalLB leaves it
    )
    assert web.ports[0].node_port and web.health_check_node_port
    assert two.health_check_node_port is None  # Cluster policy: no health check port
    assert len({web.ports[0].node_port, web.health_check_node_port, two.ports[0].node_port}) == 3


def test_an_asked_address_held_by_another_service_stays_pending():

    from netsim import services
    from netsim.record import Record
    from netsim.transaction import Changes

    pool = put(CLUSTER, {"spec.loadBalancer.addresses": ["172.18.0.200/32", "172.18.0.201/32"]})
    cluster, _ = topology.parse(build(pool, put(SERVICE, {"spec.type": "LoadBalancer"})), FILE)
    record = Record(cluster.name, None, None, None)
    services.reconcile(cluster, record, Changes())
    assert record.services["web"].load_balancer_ip == "172.18.0.200"  # a /32 is one address
    asking = extra(SERVICE, {"metadata.name": "two", "spec.loadBalancerIP": "172.18.0.200"})
    cluster, _ = topology.parse(
        build(pool, put(SERVICE, {"spec.type": "LoadBalancer"}), asking), FILE
    )
    services.reconcile(cluster, record, Changes())
    assert record.services["web"].load_balancer_ip == "172.18.0.200"  # the holder keeps it
    assert record.services["two"].load_balancer_ip == ""  # <pending>, as MetalLB leaves it
