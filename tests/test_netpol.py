"""NetworkPolicy checked as the upstream e2e suite checks it (test/e2e/network/netpol): pods
a, b, c in each of namespaces x, y, z (labels pod=<name>, ns=<namespace>), each serving TCP and
UDP on ports 80 and 81 from agnhost containers with named ports serve-<port>-<proto>, each
behind a Service s-<ns>-<pod>. For each case a policy is applied (`netsim apply -f`), every
pair is probed on both ports and protocols, to the pod and through its Service, and the whole
matrix is compared with the expected truth table, printed on failure. Loopback (a pod to
itself) is not compared, as upstream's ignoreLoopback."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import yaml
from conftest import ClusterUnderTest, cluster_document, run_netsim, wait_for

from netsim import reachability
from netsim.reachability import Probe

pytestmark = pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="netsim creates namespaces: needs root"
)

AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
NODES = ("node-1", "node-2", "node-3")
MODES = ("flannel-vxlan", "calico-vxlan", "calico-bgp")


@dataclass(frozen=True)
class Peer:
    namespace: str
    pod: str

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.pod}"


EVERYONE = [Peer(n, p) for n in NAMESPACES for p in PODS]


def _pod(namespace: str, pod: str, node: str) -> dict:
    containers = [
        {
            "name": f"cont-{port}-{proto.lower()}",
            "image": AGNHOST,
            "args": ["serve-hostname", f"--{proto.lower()}", "--http=false", f"--port={port}"],
            "ports": [
                {"containerPort": port, "name": f"serve-{port}-{proto.lower()}", "protocol": proto}
            ],
        }
        for port in PORTS
        for proto in PROTOCOLS
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace, "labels": {"pod": pod}},
        "spec": {"nodeName": node, "containers": containers},
    }


def _service(namespace: str, pod: str) -> dict:
    ports = [
        {"name": f"service-port-{proto.lower()}-{port}", "port": port, "protocol": proto}
        for port in PORTS
        for proto in PROTOCOLS
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"s-{namespace}-{pod}", "namespace": namespace},
        "spec": {"selector": {"pod": pod}, "ports": ports},
    }


@pytest.fixture(scope="module", params=MODES)
def model(request, tmp_path_factory):
    c = ClusterUnderTest(tmp_path_factory.mktemp("netpol"))
    cluster = cluster_document(c.name, list(NODES))
    cluster["spec"]["cni"]["mode"] = request.param
    docs = [cluster]
    docs += [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {"ns": n}}}
        for n in NAMESPACES
    ]
    for i, peer in enumerate(EVERYONE):  # pods of one namespace on three nodes: both paths
        docs += [_pod(peer.namespace, peer.pod, NODES[i % 3]), _service(peer.namespace, peer.pod)]
    with open(c.file, "w") as fh:
        yaml.safe_dump_all(docs, fh)
    try:
        run_netsim("apply", "-f", c.file, check=True)
        rec = c.record()
        c.pods = {p.name: rec.pods[f"{p.namespace}.{p.pod}"] for p in EVERYONE}
        c.service_ips = {
            p.name: rec.services[f"{p.namespace}.s-{p.namespace}-{p.pod}"].cluster_ip
            for p in EVERYONE
        }
        # the pods' containers start after apply; their Endpoints follow their readiness
        wait_for(lambda: all(probe_all(c).values()), 60, "every pod reached on every port")
        yield c
    finally:
        run_netsim("down", c.name)
        from netsim import teardown

        teardown.gc(c.name)
        assert not c.namespaces()


def probe_all(model) -> dict[Probe, bool]:
    probes = []
    for src, dst in itertools.product(EVERYONE, EVERYONE):
        if src == dst:
            continue
        for port, proto in itertools.product(PORTS, PROTOCOLS):
            for address in (model.pods[dst.name].ip, model.service_ips[dst.name]):
                probes.append(Probe(src.name, dst.name, address, port, proto))
    netns = {p.name: model.pods[p.name].netns for p in EVERYONE}
    return reachability.run(probes, netns, timeout=1.5)


Expect = Callable[[Peer, Peer, int, str], bool]


def check(model, expect: Expect) -> None:
    """Probe the whole matrix; on any difference, fail with the expected and observed tables
    of each port, protocol and path that differs."""
    observed = probe_all(model)
    peers = {p.name: p for p in EVERYONE}
    wrong = []
    for (port, proto, via_service), group in itertools.groupby(
        sorted(
            observed.items(),
            key=lambda item: (
                item[0].port,
                item[0].protocol,
                item[0].address == model.service_ips[item[0].target],
            ),
        ),
        key=lambda item: (
            item[0].port,
            item[0].protocol,
            item[0].address == model.service_ips[item[0].target],
        ),
    ):
        cells = dict(group)
        wanted = {p: expect(peers[p.source], peers[p.target], p.port, p.protocol) for p in cells}
        if wanted != cells:
            names = [p.name for p in EVERYONE]
            path = "through the Service" if via_service else "to the pod"
            wrong.append(
                f"{proto} {port} {path}:\nexpected\n{reachability.table(wanted, names)}\n"
                f"observed\n{reachability.table(cells, names)}"
            )
    assert not wrong, "\n\n".join(wrong)


def _apply(model, name: str, *docs: dict) -> str:
    path = f"{model.dir}/{name}.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump_all(list(docs), fh)
    model.netsim("apply", "-f", path, check=True)
    return path


def _policy(name: str, namespace: str, spec: dict) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _case(model, name: str, expect: Expect, *docs: dict) -> None:
    path = _apply(model, name, *docs)
    try:
        check(model, expect)
    finally:
        model.netsim("delete", "-f", path, check=True)


A = {"matchLabels": {"pod": "a"}}


def test_no_policy_everyone_reaches_everyone(model):
    check(model, lambda src, dst, port, proto: True)


def test_default_deny_ingress_then_deleted(model):
    deny = _policy("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})
    _case(model, "deny-ingress", lambda s, d, port, proto: d.namespace != "x", deny)
    check(model, lambda src, dst, port, proto: True)  # the policy deleted: open again


def test_default_deny_egress(model):
    deny = _policy("deny-egress", "x", {"podSelector": {}, "policyTypes": ["Egress"]})
    _case(model, "deny-egress", lambda s, d, port, proto: s.namespace != "x", deny)


def test_allow_from_same_namespace(model):
    allow = _policy(
        "allow-same", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}
    )
    _case(
        model,
        "allow-same",
        lambda s, d, port, proto: d.namespace != "x" or s.namespace == "x",
        allow,
    )


def test_allow_from_namespace_by_label(model):
    allow = _policy(
        "allow-ns-y",
        "x",
        {
            "podSelector": A,
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
        },
    )
    _case(
        model,
        "allow-ns-y",
        lambda s, d, port, proto: d.name != "x/a" or s.namespace == "y",
        allow,
    )


def test_peer_with_both_selectors_is_and(model):
    peer = {
        "namespaceSelector": {"matchLabels": {"ns": "y"}},
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]},
    }
    allow = _policy("allow-y-b", "x", {"podSelector": A, "ingress": [{"from": [peer]}]})
    _case(model, "allow-y-b", lambda s, d, port, proto: d.name != "x/a" or s.name == "y/b", allow)


def test_two_peers_are_or(model):
    peers = [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
        {"podSelector": {"matchLabels": {"pod": "b"}}},
    ]
    allow = _policy("allow-y-or-b", "x", {"podSelector": A, "ingress": [{"from": peers}]})
    _case(
        model,
        "allow-y-or-b",
        lambda s, d, port, proto: d.name != "x/a" or s.namespace == "y" or s.name == "x/b",
        allow,
    )


def test_ip_block_with_except(model):
    pool = "10.244.0.0/16" if model.record().mode.startswith("flannel") else "192.168.0.0/16"
    block = {"cidr": pool, "except": [f"{model.pods['y/b'].ip}/32"]}
    allow = _policy(
        "allow-block", "x", {"podSelector": A, "ingress": [{"from": [{"ipBlock": block}]}]}
    )
    _case(model, "allow-block", lambda s, d, port, proto: d.name != "x/a" or s.name != "y/b", allow)


def test_named_port(model):
    allow = _policy(
        "allow-named", "x", {"podSelector": A, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}
    )
    _case(
        model,
        "allow-named",
        lambda s, d, port, proto: d.name != "x/a" or (port, proto) == (80, "TCP"),
        allow,
    )


def test_port_range(model):
    ports = [{"protocol": "UDP", "port": 81, "endPort": 90}]
    allow = _policy("allow-range", "x", {"podSelector": A, "ingress": [{"ports": ports}]})
    _case(
        model,
        "allow-range",
        lambda s, d, port, proto: d.name != "x/a" or (port, proto) == (81, "UDP"),
        allow,
    )


def test_egress_to_dns_only(model):
    import dns.message
    import dns.query

    from netsim.kernel import netns as nsmod

    ports = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    only = _policy(
        "dns-only", "x", {"podSelector": A, "policyTypes": ["Egress"], "egress": [{"ports": ports}]}
    )
    path = _apply(model, "dns-only", only)
    try:
        check(model, lambda s, d, port, proto: s.name != "x/a")
        rec = model.record()
        dns_ip = rec.services["kube-system.kube-dns"].cluster_ip
        query = dns.message.make_query("s-y-b.y.svc.cluster.local", "A")
        with nsmod.entered(model.pods["x/a"].netns):
            answer = dns.query.udp(query, dns_ip, timeout=3)
        assert [r.to_text() for r in answer.answer[0]] == [model.service_ips["y/b"]]
    finally:
        model.netsim("delete", "-f", path, check=True)


def test_policy_on_a_services_endpoints(model):
    deny = _policy("deny-a", "x", {"podSelector": A, "ingress": []})
    _case(model, "deny-a", lambda s, d, port, proto: d.name != "x/a", deny)


def test_calico_order_and_actions(model):
    """Calico's own policies before the Kubernetes one (order 1000): a GlobalNetworkPolicy
    denying y → x (order 10), one passing z → x to the profiles (order 5, skipping the
    Kubernetes policy that would deny it), a namespaced one denying x/c (order 100)."""
    gnp = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "deny-y-to-x"},
        "spec": {
            "order": 10,
            "selector": "projectcalico.org/namespace == 'x'",
            "ingress": [
                {"action": "Log", "source": {"namespaceSelector": "ns == 'y'"}},
                {"action": "Deny", "source": {"namespaceSelector": "ns == 'y'"}},
            ],
        },
    }
    passing = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "pass-z"},
        "spec": {
            "order": 5,
            "selector": "projectcalico.org/namespace == 'x'",
            "types": ["Ingress"],
            "ingress": [{"action": "Pass", "source": {"namespaceSelector": "ns in {'z'}"}}],
        },
    }
    np = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny-c", "namespace": "x"},
        "spec": {
            "order": 100,
            "selector": "all()",
            "ingress": [{"action": "Deny", "source": {"selector": "pod == 'c'"}}],
        },
    }
    only_x = _policy(
        "only-x", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}
    )

    def expect(s, d, port, proto):
        if d.namespace != "x":
            return True
        if s.namespace == "y" or s.name == "x/c":
            return False
        return True  # x by the Kubernetes policy, z passed to the profile

    path = _apply(model, "calico", gnp, passing, np, only_x)
    try:
        check(model, expect)
        denied = model.netsim("policy", "check", "y/a", "x/b", "--port", "80").stdout
        assert "GlobalNetworkPolicy deny-y-to-x ingress rule 2: Deny" in denied
        passed = model.netsim("policy", "check", "z/a", "x/b", "--port", "80").stdout
        assert "passed to the profiles by GlobalNetworkPolicy pass-z ingress rule 1: Pass" in passed
        assert "selected by GlobalNetworkPolicy pass-z, GlobalNetworkPolicy deny-y-to-x" in passed
        logged = model.netsim("policy", "check", "y/a", "x/b", "--port", "80", "--udp").stdout
        assert "logged by GlobalNetworkPolicy deny-y-to-x ingress rule 1: Log" in logged
        listed = model.netsim("get", "globalnetworkpolicies", check=True).stdout
        assert [line.split()[:2] for line in listed.splitlines()[1:]] == [
            ["deny-y-to-x", "10"],
            ["pass-z", "5"],
        ]
        calico = model.netsim("get", "networkpolicies.projectcalico.org", "-A", check=True)
        assert calico.stdout.splitlines()[1].split()[:3] == ["x", "deny-c", "100"]
    finally:
        model.netsim("delete", "-f", path, check=True)


def test_check_trace_describe_and_get_name_the_policy(model):
    both = {
        "namespaceSelector": {"matchLabels": {"ns": "y"}},
        "podSelector": {"matchLabels": {"pod": "b"}},
    }
    allow = _policy("allow-y-b", "x", {"podSelector": A, "ingress": [{"from": [both]}]})
    path = _apply(model, "allow-y-b", allow)
    try:
        ok = model.netsim("policy", "check", "y/b", "x/a", "--port", "80")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.startswith(f"y/b -> x/a ({model.pods['x/a'].ip}) TCP 80: allowed")
        assert "NetworkPolicy x/allow-y-b ingress rule 1: Allow" in ok.stdout
        no = model.netsim("policy", "check", "y/a", "x/s-x-a", "--port", "81", "--udp")
        assert no.returncode == 1, no.stdout + no.stderr
        assert no.stdout.startswith(f"y/a -> x/s-x-a ({model.service_ips['x/a']}) UDP 81: denied")
        assert "ingress x/a" in no.stdout and "selected by NetworkPolicy x/allow-y-b" in no.stdout
        assert "Drop if no policies passed packet" in no.stdout
        traced = model.netsim("-n", "y", "trace", "a", "x.a", "--tcp", "80")
        assert traced.returncode == 1
        assert "nftables: ingress x/a" in traced.stdout and "denied" in traced.stdout
        described = model.netsim("-n", "x", "describe", "pod", "a", check=True).stdout
        assert "ingress: NetworkPolicy x/allow-y-b (order 1000) [cali-tw-" in described
        assert "egress:  <none>: open [cali-fw-" in described
        listed = model.netsim("get", "networkpolicies", "-A", check=True).stdout.split("\n")
        assert listed[1].split() == ["x", "allow-y-b", "pod=a", "Ingress"]
    finally:
        model.netsim("delete", "-f", path, check=True)
    gone = model.netsim("policy", "check", "y/a", "x/a", "--port", "80")
    assert gone.returncode == 0 and "no policy exists in the cluster" in gone.stdout


def test_bad_policy_is_refused_and_changes_nothing(model):
    bad = _policy(
        "bad", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}
    )
    path = f"{model.dir}/bad.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump(bad, fh)
    out = model.netsim("apply", "-f", path)
    assert out.returncode == 2
    assert (
        "bad.yaml: document 1 (NetworkPolicy bad): spec.ingress[0].ports[0].endPort" in out.stderr
    )
    assert "Traceback" not in out.stderr
    assert model.netsim("get", "netpol", "-A", check=True).stdout.count("\n") == 1  # a header
    deleted = model.netsim("-n", "x", "delete", "netpol", "bad")
    assert (
        deleted.returncode != 0
        and 'networkpolicies.networking.k8s.io "bad" not found' in deleted.stderr
    )
    typo = model.netsim("policy", "check", "x/a", "x/nosuch", "--port", "80")
    assert typo.returncode == 2 and "no pod or Service named x.nosuch" in typo.stderr


def test_a_restarted_agent_ends_with_the_same_policy_table(model):
    """kill -9 of a node's agent; the next apply starts it again: its felix sweeps what the
    old one left, programs the table anew, and it holds exactly what it held."""
    import os
    import signal

    from netsim.kernel import nft

    deny = _policy("deny-a", "x", {"podSelector": A, "ingress": []})
    path = _apply(model, "deny-a", deny)
    try:
        node = model.record().nodes["node-1"]

        def table() -> list[str]:
            listed = nft.ruleset(node.netns)
            return sorted(line.strip() for line in listed.splitlines() if line.strip())

        before = table()
        assert any("cali-tw-" in line for line in before)
        os.kill(node.agent.pid, signal.SIGKILL)
        wait_for(
            lambda: not os.path.exists(f"/proc/{node.agent.pid}/status"), 5, "the agent to die"
        )
        model.netsim("apply", "-f", model.file, check=True)
        wait_for(lambda: table() == before, 10, "the same table after the restart")
        wait_for(  # its pods' containers start again
            lambda: all(ok for p, ok in probe_all(model).items() if p.target != "x/a"),
            60,
            "every pod but x/a reached again",
        )
        check(model, lambda s, d, port, proto: d.name != "x/a")
    finally:
        model.netsim("delete", "-f", path, check=True)
