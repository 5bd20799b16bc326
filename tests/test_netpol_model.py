"""Policies as data (netsim.netpol, netsim.calico_selector, netsim.policy_table): Kubernetes'
defaulting and conversion, Calico's selectors, every bad input named by its field, and the
table Felix's layout gives one node. Pure: no kernel."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from test_topology import BASE, fail

from netsim import calico_selector, netpol, policy_table, topology
from netsim.errors import NetsimError


def _parse(*policies: dict):
    docs = [BASE[0], {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}]
    return topology.parse(yaml.safe_dump_all(docs + list(policies)), "test.yaml")[0].policies


def _k8s(spec: dict, name: str = "p", namespace: str = "x") -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _calico(spec: dict, kind: str = "GlobalNetworkPolicy", name: str = "g") -> dict:
    meta = {"name": name} | ({"namespace": "x"} if kind == "NetworkPolicy" else {})
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta, "spec": spec}


# ---- Kubernetes' defaulting and conversion --------------------------------------------------


def test_policy_types_default_to_ingress_plus_egress_when_written():
    (only_in,) = _parse(_k8s({"podSelector": {}}))
    assert only_in.types == ("Ingress",) and only_in.ingress == ()
    (both,) = _parse(_k8s({"podSelector": {}, "egress": [{}]}))
    assert both.types == ("Ingress", "Egress")
    assert both.egress == (netpol.PolicyRule("Allow"),)  # [{}]: everything


def test_peers_times_ports_become_allow_rules_in_order_1000():
    (policy,) = _parse(
        _k8s(
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {"matchLabels": {"pod": "b"}}},
                            {
                                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                                "podSelector": {
                                    "matchExpressions": [{"key": "pod", "operator": "Exists"}]
                                },
                            },
                        ],
                        "ports": [{"port": 80}, {"protocol": "UDP", "port": 81, "endPort": 90}],
                    }
                ],
            }
        )
    )
    assert policy.order == 1000 and policy.selector == "pod == 'a'"
    assert policy.calico_name == "knp/x/knp.default.p"
    sources = [(r.source.selector, r.source.namespace_selector) for r in policy.ingress]
    assert sources == [("pod == 'b'", "")] * 2 + [("has(pod)", "ns == 'y'")] * 2
    assert [(r.protocol, str(r.destination.ports[0])) for r in policy.ingress] == [
        ("TCP", "80"),
        ("UDP", "81-90"),
    ] * 2
    assert {r.number for r in policy.ingress} == {1}  # one rule as written: its number


def test_ip_block_and_named_port():
    (policy,) = _parse(
        _k8s(
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                        "ports": [{"port": "dns"}],
                    }
                ],
            }
        )
    )
    (rule,) = policy.egress
    assert rule.destination.nets == ("10.0.0.0/8",)
    assert rule.destination.not_nets == ("10.1.0.0/16",)
    assert rule.destination.ports == (netpol.PortRange(name="dns"),)


def test_calico_types_default_and_order():
    (gnp,) = _parse(_calico({"egress": [{"action": "Deny"}]}))
    assert gnp.types == ("Egress",) and gnp.order is None and gnp.selector == "all()"
    (np,) = _parse(_calico({"order": 5, "ingress": [{"action": "Pass"}]}, "NetworkPolicy"))
    assert np.kind == "CalicoNetworkPolicy" and np.types == ("Ingress",) and np.order == 5
    assert sorted([np, gnp], key=lambda p: p.sort_key) == [np, gnp]  # unordered last


def test_a_kubernetes_and_a_calico_policy_may_share_a_name():
    both = _parse(_k8s({"podSelector": {}}), _calico({"selector": "all()"}, "NetworkPolicy", "p"))
    assert {p.kind for p in both} == {"NetworkPolicy", "CalicoNetworkPolicy"}


REJECTED = [
    (
        "misspelt-field",
        _k8s({"podSelector": {}, "ingres": [{}]}),
        "spec.ingres",
        'unknown field "ingres"',
    ),
    (
        "misspelt-peer-field",
        _k8s({"ingress": [{"from": [{"podSelectors": {}}]}]}),
        "spec.ingress[0].from[0].podSelectors",
        "unknown field",
    ),
    ("calico-misspelt", _calico({"selectr": "all()"}), "spec.selectr", "unknown field"),
    (
        "calico-reversed-range",
        _calico(
            {
                "ingress": [
                    {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["90:80"]}}
                ]
            }
        ),
        "spec.ingress[0].destination.ports[0]",
        "ends before it starts",
    ),
    (
        "ipblock-and-selector",
        _k8s({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
        "spec.ingress[0].from[0]",
        "may not specify more than 1 peer type",
    ),
    (
        "empty-peer",
        _k8s({"ingress": [{"from": [{}]}]}),
        "spec.ingress[0].from[0]",
        "must specify a peer",
    ),
    (
        "except-outside",
        _k8s(
            {
                "ingress": [
                    {"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}
                ]
            }
        ),
        "except[0]",
        "strict subset",
    ),
    (
        "bad-cidr",
        _k8s({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0"}}]}]}),
        "ipBlock.cidr",
        "not an IPv4 CIDR",
    ),
    (
        "end-below-port",
        _k8s({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
        "endPort",
        "greater than or equal",
    ),
    (
        "end-with-name",
        _k8s({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
        "endPort",
        "non-numeric",
    ),
    (
        "bad-protocol",
        _k8s({"ingress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]}),
        "protocol",
        "not a protocol",
    ),
    (
        "bad-operator",
        _k8s({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}),
        "operator",
        "not a valid selector operator",
    ),
    (
        "in-without-values",
        _k8s({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
        "values",
        "must be specified",
    ),
    ("bad-type", _k8s({"policyTypes": ["Inbound"]}), "spec.policyTypes[0]", "not a policy type"),
    ("unknown-namespace", _k8s({}, namespace="nowhere"), "metadata.namespace", "not found"),
    ("calico-bad-selector", _calico({"selector": "app == "}), "spec.selector", "selector"),
    (
        "calico-bad-action",
        _calico({"ingress": [{"action": "Reject"}]}),
        "spec.ingress[0].action",
        "not an action",
    ),
    (
        "calico-ports-without-protocol",
        _calico({"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]}),
        "spec.ingress[0].protocol",
        "ports need a protocol",
    ),
]


@pytest.mark.parametrize(
    "doc, field, phrase", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_rejected(doc, field, phrase):
    docs = [BASE[0], {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}, doc]
    err = fail(yaml.safe_dump_all(docs))
    assert field in err.field, err
    assert phrase in err.problem, err


def test_duplicate_policy_is_rejected():
    docs = [BASE[0], {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}]
    err = fail(yaml.safe_dump_all(docs + [_k8s({}), _k8s({})]))
    assert "duplicate NetworkPolicy x/p" in err.problem


# ---- Calico's selectors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, labels, expected",
    [
        ("all()", {}, True),
        ("", {}, True),
        ("app == 'web'", {"app": "web"}, True),
        ('app == "web"', {"app": "db"}, False),
        ("app != 'web'", {}, True),
        ("has(app) && !has(tier)", {"app": "x"}, True),
        ("app in {'a', 'b'}", {"app": "b"}, True),
        ("app not in {'a', 'b'}", {}, True),
        (
            "role == 'db' || (app == 'web' && env starts with 'pr')",
            {"app": "web", "env": "prod"},
            True,
        ),
        ("env ends with 'od' && env contains 'ro'", {"env": "prod"}, True),
        ("!(app == 'web')", {"app": "web"}, False),
    ],
)
def test_selector(text, labels, expected):
    assert calico_selector.matches(calico_selector.parse(text), labels) is expected


@pytest.mark.parametrize(
    "text", ["app ==", "app = 'x'", "has(", "app in {'a'", "(a == 'b'", "a == 'b' b"]
)
def test_bad_selector_says_what(text):
    with pytest.raises(NetsimError, match="selector"):
        calico_selector.parse(text)


_keys = st.sampled_from(["app", "tier", "k8s.io/x"])
_values = st.sampled_from(["a", "b", "web-1"])
_leaves = st.one_of(
    st.just(("all",)),
    st.tuples(st.just("has"), _keys),
    st.tuples(st.sampled_from(["eq", "ne", "starts", "ends", "contains"]), _keys, _values),
    st.tuples(st.sampled_from(["in", "notin"]), _keys, st.frozensets(_values, min_size=1)),
)
_trees = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner),
        st.tuples(st.sampled_from(["and", "or"]), inner, inner),
    ),
    max_leaves=6,
)


@given(_trees, st.dictionaries(_keys, _values))
def test_selector_text_reads_back_to_the_same_meaning(tree, labels):
    """What netsim writes of a selector (the canonical text that names IP sets) parses back
    into a selector that selects the same endpoints."""
    again = calico_selector.parse(calico_selector.text(tree))
    assert calico_selector.matches(again, labels) == calico_selector.matches(tree, labels)
    assert calico_selector.text(again) == calico_selector.text(tree)


# ---- one node's table --------------------------------------------------------------------------


def _pod(ns: str, name: str, ip: str, **labels) -> netpol.PodInfo:
    return netpol.PodInfo(ns, name, {"pod": name, **labels}, ip, (("http", "TCP", 80),))


def test_table_of_a_node():
    (allow,) = _parse(
        _k8s(
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                        "ports": [{"port": "http"}],
                    }
                ],
            }
        )
    )
    a, b, c = _pod("x", "a", "10.0.0.1"), _pod("x", "b", "10.0.1.1"), _pod("x", "c", "10.0.0.2")
    spaces = {"x": {"kubernetes.io/metadata.name": "x"}}
    table = policy_table.compute([allow], [a, b, c], spaces, [(a, "caliA"), (c, "caliC")], "iface")
    assert table.elements[policy_table.TO] == {
        "caliA": "jump cali-tw-caliA",
        "caliC": "jump cali-tw-caliC",
    }
    chain = policy_table.policy_chain(allow, "Ingress")
    assert chain == "cali-pi-knp/x/knp.default.p"  # within 28 characters: as it is
    (rule,) = table.chains[chain]
    assert rule.comment == "NetworkPolicy x/p ingress rule 1: Allow"
    sources, named = (n for n in table.sets if n in rule.text)
    assert table.elements[sources] == {"10.0.1.1": None}  # pod b, wherever it runs
    assert table.elements[named] == {"10.0.0.1 . tcp . 80": None}  # a's port named http
    a_in = [r.text for r in table.chains["cali-tw-caliA"]]
    assert a_in[0] == "ct state established,related accept"
    group = policy_table.group_chain(a, "Ingress")  # a's namespace and labels
    assert group.startswith("cali-gi-") and f"jump {group}" in a_in
    assert any(f"jump {chain}" in r.text for r in table.chains[group])
    assert table.chains[group][-1].comment.endswith("Drop if no policies passed packet")
    assert table.chains[policy_table.group_chain(c, "Ingress")] == ()  # c is open
    assert "cali-pri-kns.x" in table.chains and "cali-pro-kns.x" in table.chains
    by_address = policy_table.compute([allow], [a, b, c], spaces, [(a, "vethA")], "address")
    assert by_address.elements[policy_table.FROM] == {"10.0.0.1": "jump cali-fw-vethA"}
