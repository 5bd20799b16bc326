"""kube-proxy in real namespaces: real connections from pods, nodes and the external client to
the built-in hostname servers through ClusterIPs and NodePorts."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import assert_sticky, needs_root, netns_cookie, run_netsim, wait_for

from netsim import cluster as clustermod
from netsim import probe, topology
from netsim.kernel import netns as nsmod

pytestmark = needs_root
TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"

SERVICES = """
---
apiVersion: v1
kind: Service
metadata: {name: web-aff}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: AFFINITY}}
  ports: [{port: 80, targetPort: 9376}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 8080, targetPort: http, nodePort: 30080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: idle}
spec:
  replicas: 0
  selector: {matchLabels: {app: idle}}
  template:
    metadata: {labels: {app: idle}}
    spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: idle}
spec:
  selector: {app: idle}
  ports: [{port: 80, targetPort: 9376}]
---
apiVersion: v1
kind: Pod
metadata: {name: solo, labels: {app: solo}}
spec:
  nodeName: worker-1
  containers: [{name: c}]
---
apiVersion: v1
kind: Service
metadata: {name: solo}
spec:
  selector: {app: solo}
  ports: [{port: 80, targetPort: 9376}]
"""


BACKENDS = ["nftables", "userspace"]


def write(
    cluster,
    affinity: str = "ClientIP",
    timeout: int = 3,
    extra: str = "",
    backend: str = "nftables",
) -> None:
    text = TOPOLOGY.read_text().replace("name: demo", f"name: {cluster.name}", 1)
    text = text.replace(
        "  serviceCIDR: 10.96.0.0/12",
        f"  serviceCIDR: 10.96.0.0/12\n  kubeProxy: {{mode: {backend}}}\n"
        "  controlPlane: {podNames: Ordinal}",
    )
    cluster.backend = backend
    text = text.replace("- containerPort: 9376", "- containerPort: 9376\n              name: http")
    services = SERVICES.replace("AFFINITY", str(timeout))
    if affinity != "ClientIP":
        services = services.replace("sessionAffinity: ClientIP", f"sessionAffinity: {affinity}")
    Path(cluster.file).write_text(text + services + extra)


def kube_proxy_table(netns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "list", "table", "ip", "kube-proxy"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def listening(netns: str, pid: int) -> set[int]:
    """The TCP and UDP ports process `pid` listens on in the namespace."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Htulnp"], capture_output=True, text=True, check=True
    ).stdout
    return {
        int(line.split()[4].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={pid}," in line
    }


def assert_backend(cluster, backend: str) -> None:
    """The backend every node really runs, read from its kernel: the nftables backend's verdict
    maps, no proxy; or the userspace mode's DNAT of every Service port to a port the node's
    agent listens on. The record says the same."""
    record = cluster.record()
    assert record.kube_proxy.mode == backend
    for name, node in record.nodes.items():
        table = kube_proxy_table(node.netns)
        ports = listening(node.netns, node.agent.pid)
        if backend == "nftables":
            assert "map service-ips" in table and "goto service-" in table, name
            assert f"dnat to {node.ip}:" not in table and not ports, (name, ports)
        else:
            # one ClusterIP rule per service port, each to a port the agent listens on
            proxied = re.findall(rf"ip daddr [\d.]+ \w+ dport \d+ dnat to {node.ip}:(\d+)", table)
            ports_wanted = sum(
                len(s.ports) for s in record.services.values() if s.cluster_ip != "None"
            )
            assert len(proxied) == ports_wanted, (name, table)
            assert "map service-ips" not in table, name
            assert {int(p) for p in proxied} <= ports, (name, proxied, ports)


@pytest.fixture(params=BACKENDS)
def services(cluster, request):
    write(cluster, backend=request.param)
    run_netsim("apply", "-f", cluster.file, check=True)
    assert_backend(cluster, request.param)
    return cluster


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def who(record, src: str, ip: str, port: int, count: int) -> list[str]:
    """The pod that answered each of `count` fresh connections from `src`."""
    netns = (record.pods.get(src) or record.nodes.get(src) or record.clients[src]).netns
    answers = []
    for _ in range(count):
        reply = probe.http_get(netns, ip, port)
        answers.append(reply.body.strip() if reply.body else f"error: {reply.error}")
    return answers


def cip(record, service: str) -> str:
    return record.services[service].cluster_ip


def test_round_robin_is_exact_through_any_node(services):
    record = services.record()
    for client in ("web-0", "web-1"):  # on worker-1 and worker-2: every node programs it
        counts = Counter(who(record, client, cip(record, "web"), 80, 30))
        assert counts == {"web-0": 10, "web-1": 10, "web-2": 10}, counts
    answers = who(record, "web-0", cip(record, "web"), 80, 6)
    assert answers[:3] == answers[3:]  # in turn, by endpoint IP


def affinity_clients(netns: str, service: str) -> set[str]:
    """Client IPs in the node's affinity sets of a Service (nftables backend): a set element
    is dropped by the kernel once its timeout has passed unused."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "sets", "ip"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = set()
    for obj in json.loads(out)["nftables"]:
        s = obj.get("set", {})
        if (
            s.get("table") == "kube-proxy"
            and s["name"].startswith("affinity-")
            and f"/{service}/" in s["name"]
        ):
            for e in s.get("elem", []):
                found.add(e["elem"]["val"] if isinstance(e, dict) else e)
    return found


def test_client_ip_affinity_e2e_checks(services):
    record = services.record()
    answers = who(record, "web-0", cip(record, "web-aff"), 80, 16)
    used = time.monotonic()
    assert len(set(answers[1:])) == 1, answers  # the last 15 of 16 reach the same pod
    # the 3 s timeout passes unused: the next connection goes to the next endpoint in turn
    if services.backend == "nftables":
        node = record.nodes[record.pods["web-0"].node].netns
        client = record.pods["web-0"].ip
        assert client in affinity_clients(node, "web-aff")
        wait_for(
            lambda: client not in affinity_clients(node, "web-aff"),
            10,
            "the kernel drops web-0's affinity binding",
            interval=0.1,
        )
    else:  # the agent's proxy shows no state: wait until 3 s have passed since the last use
        wait_for(lambda: time.monotonic() - used > 3, 10, "3 s since the last use")
    after = who(record, "web-0", cip(record, "web-aff"), 80, 1)
    assert after[0] != answers[-1]
    write(services, affinity="None", backend=services.backend)
    run_netsim("apply", "-f", services.file, check=True)
    assert_backend(services, services.backend)
    assert len(set(who(record, "web-0", cip(record, "web-aff"), 80, 6))) > 1


def test_affinity_timeout_slides(services):
    record = services.record()
    # 4.5 s, longer than the 3 s timeout, used every 0.5 s: each use renews the binding
    assert_sticky(lambda: who(record, "web-1", cip(record, "web-aff"), 80, 1)[0], 3, 4.5)


def test_removed_endpoint_drops_only_its_own_clients_affinity(cluster, backend):
    """Two clients on worker-1 bound to different endpoints; the endpoint of one leaves the
    selector (its label changes): that client moves, the other keeps its pod."""
    clients = "".join(
        f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {n}, labels: {{role: client}}}}
spec:
  nodeName: worker-1
  containers: [{{name: c, command: [sleep, "3600"]}}]
"""
        for n in ("client-a", "client-b")
    )
    write(cluster, timeout=600, extra="\n" + clients, backend=backend)
    run_netsim("apply", "-f", cluster.file, check=True)
    assert_backend(cluster, backend)
    record = cluster.record()
    ip = cip(record, "web-aff")
    a = who(record, "client-a", ip, 80, 1)[0]
    b = who(record, "client-b", ip, 80, 1)[0]
    assert a != b  # round robin gave them consecutive endpoints
    # client-a's endpoint leaves the Service: its pod's labels change (no rebuild)
    model, _ = topology.load(cluster.file)
    model.pods = [replace(p, labels={"app": "gone"}) if p.name == a else p for p in model.pods]
    clustermod.apply(model)
    assert who(record, "client-b", ip, 80, 5) == [b] * 5
    moved = who(record, "client-a", ip, 80, 5)
    assert a not in moved and len(set(moved)) == 1


@pytest.mark.parametrize("src", ["client", "solo"])
def test_nodeport_from_the_external_client_or_a_pod_via_every_node(services, src):
    record = services.record()
    assert record.services["web-np"].ports[0].node_port == 30080
    seen = set()
    for node in record.nodes.values():
        answers = who(record, src, node.ip, 30080, 3)
        assert all(not a.startswith("error") for a in answers), answers
        seen |= set(answers)
    assert seen == {"web-0", "web-1", "web-2"}


def test_node_to_clusterip_and_hairpin(services):
    record = services.record()
    assert set(who(record, "worker-3", cip(record, "web"), 80, 3)) == {"web-0", "web-1", "web-2"}
    # solo is the only endpoint of its Service: it reaches itself, masqueraded on the way back
    assert who(record, "solo", cip(record, "solo"), 80, 2) == ["solo", "solo"]


def test_service_without_endpoints_rejects_at_once(services):
    record = services.record()
    netns = record.pods["web-0"].netns
    start = time.monotonic()
    reply = probe.http_get(netns, cip(record, "idle"), 80, timeout=5)
    # nftables rejects (ICMP port unreachable: refused); the userspace proxy resets
    assert reply.error in ("Connection refused", "Connection reset by peer"), reply.error
    assert time.monotonic() - start < 1


def test_kube_proxy_table_has_kube_proxys_shape(services):
    if services.backend != "nftables":
        pytest.skip("the userspace backend's table only redirects to the agent's proxy")
    record = services.record()
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            record.nodes["worker-2"].netns,
            "nft",
            "-j",
            "list",
            "table",
            "ip",
            "kube-proxy",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objects = [next(iter(o.items())) for o in json.loads(out)["nftables"]]
    names = {(kind, o.get("name")) for kind, o in objects}
    for expected in (
        ("map", "service-ips"),
        ("map", "service-nodeports"),
        ("map", "no-endpoint-services"),
        ("chain", "mark-for-masquerade"),
        ("chain", "masquerading"),
        ("chain", "services"),
    ):
        assert expected in names
    chains = [o["name"] for kind, o in objects if kind == "chain"]
    # kube-proxy's prefix: base32 of the first five bytes of sha256("<ns>/<svc>/<proto>/<port>")
    prefix = base64.b32encode(hashlib.sha256(b"default/web/tcp/").digest()[:5]).decode()
    assert f"service-{prefix}-default/web/tcp/" in chains
    # web, web-aff, np; solo; kube-dns's dns (UDP) and dns-tcp
    assert sum(c.startswith("endpoint-") for c in chains) == 3 * 3 + 1 + 2
    sets = [o for kind, o in objects if kind == "set" and o["name"].startswith("affinity-")]
    assert len(sets) == 3 and all(s["timeout"] == 3 and "timeout" in s["flags"] for s in sets)
    text = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            record.nodes["worker-2"].netns,
            "nft",
            "list",
            "table",
            "ip",
            "kube-proxy",
        ],
        capture_output=True,
        text=True,
    ).stdout
    assert "numgen inc mod 3 vmap" in text and "update @affinity-" in text
    assert "tcp . 30080 : goto external-" in text


def under_load(cluster, plans: list[dict]) -> tuple[int, int]:
    """Fresh connections to Service web from pod solo while each replica plan is applied in
    turn; checks that no connection begun after an update reaches a pod it removed."""
    record = cluster.record()
    ip, netns = cip(record, "web"), record.pods["solo"].netns
    results: list[tuple[float, str | None, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            reply = probe.http_get(netns, ip, 80, timeout=2)
            results.append((started, reply.body and reply.body.strip(), reply.error))

    thread = threading.Thread(target=client)
    thread.start()
    steps: list[tuple[float, float, set[str]]] = []  # (update began, ended, pods after it)
    try:
        for replicas in plans:
            time.sleep(0.3)
            began = time.monotonic()
            overrides = {"replicas": replicas}
            model, _ = topology.load(cluster.file, overrides)
            clustermod.apply(model, overrides=overrides)
            steps.append((began, time.monotonic(), set(cluster.record().pods)))
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(timeout=30)
    ok = [r for r in results if r[2] is None]
    assert len(results) > 100 and len(ok) >= 0.999 * len(results), [r for r in results if r[2]][:5]
    late = []
    for started, pod, _ in ok:  # begun after an update ended, before the next one began
        done = [i for i, (_, end, _) in enumerate(steps) if end < started]
        if (
            done
            and (done[-1] + 1 == len(steps) or steps[done[-1] + 1][0] > started)
            and pod not in steps[done[-1]][2]
        ):
            late.append((started, pod))
    assert not late, late[:5]
    return len(ok), len(results)


def test_scale_under_continuous_connections(services):
    ok, total = under_load(services, [{"web": 6}, {"web": 2}, {"web": 3}])
    print(f"\n{ok} of {total} requests succeeded while web went 3 -> 6 -> 2 -> 3")


def test_get_expose_and_curl_through_a_new_service(cluster):
    """`get services|endpoints` as kubectl prints them (a named targetPort resolved to each
    pod's number), `expose` refusing a name in use and making a NodePort Service whose node
    port comes from the range, and `curl --count` through it reaching every pod in turn."""
    write(cluster)
    run_netsim("apply", "-f", cluster.file, check=True)
    assert_backend(cluster, "nftables")
    record = cluster.record()
    web = sorted(record.pods[p].ip for p in record.pods if p.startswith("web"))
    endpoints = cluster.netsim("get", "endpoints", check=True).stdout
    row = next(line.split() for line in endpoints.splitlines() if line.startswith("web-np "))
    assert sorted(row[1].split(",")) == sorted(f"{ip}:9376" for ip in web)
    services = cluster.netsim("get", "services", check=True).stdout
    row = next(line.split() for line in services.splitlines() if line.startswith("web-np "))
    assert row[1:] == ["NodePort", cip(record, "web-np"), "<none>", "8080:30080/TCP"]

    taken = cluster.netsim("expose", "deployment/web", "--port", "8081")
    assert taken.returncode != 0 and "service/web already exists" in taken.stderr
    assert cluster.record().services.keys() == record.services.keys()  # nothing changed
    cluster.netsim(
        "expose",
        "deployment/web",
        "--port",
        "8081",
        "--target-port",
        "9376",
        "--type",
        "NodePort",
        "--name",
        "web-ext",
        check=True,
    )
    ext = cluster.record().services["web-ext"]
    node_port = ext.ports[0].node_port
    assert 30000 <= node_port <= 32767 and node_port != 30080
    answers = cluster.netsim(
        "curl", "solo", "http://web-ext:8081/", "--count", "6", check=True
    ).stdout.split()
    assert sorted(answers[1::2]) == ["web-0", "web-0", "web-1", "web-1", "web-2", "web-2"]


def test_delete_pod_updates_the_endpoints_on_every_node(cluster):
    """A Deployment's pod deleted is made again (fresh namespace, back in the endpoints); a
    bare Pod deleted leaves its Service without endpoints on every node until `apply -f`."""
    write(cluster)
    run_netsim("apply", "-f", cluster.file, check=True)
    assert_backend(cluster, "nftables")
    namespace = cluster.record().pods["web-1"].netns
    before = netns_cookie(namespace)
    cluster.netsim("delete", "pod", "web-1", check=True)
    after = cluster.record()
    assert "web-1" in after.pods and netns_cookie(namespace) != before  # made again
    web = cip(after, "web")
    for src in ("solo", "web-0", "web-2"):  # clients on every node
        assert sorted(who(after, src, web, 80, 3)) == ["web-0", "web-1", "web-2"], src

    cluster.netsim("delete", "pod", "solo", check=True)
    gone = cluster.record()
    assert "solo" not in gone.pods and not any(n.endswith(".solo") for n in cluster.namespaces())
    endpoints = cluster.netsim("get", "endpoints", check=True).stdout
    assert (
        next(line.split() for line in endpoints.splitlines() if line.startswith("solo "))[1]
        == "<none>"
    )
    for src in ("web-0", "web-1", "web-2"):
        started = time.monotonic()
        assert "refused" in (who(gone, src, cip(gone, "solo"), 80, 1)[0])
        assert time.monotonic() - started < 1
    refused = cluster.netsim("delete", "pod", "nosuch")
    assert refused.returncode != 0 and "no pod named 'nosuch'" in refused.stderr
    run_netsim("apply", "-f", cluster.file, check=True)
    assert "solo" in cluster.record().pods


def test_an_established_connection_outlives_a_sync(services):
    """Connected through the ClusterIP before a scale, the request sent after it is still
    answered on that connection (conntrack, or the userspace relay, keeps it)."""
    record = services.record()
    with nsmod.entered(record.pods["solo"].netns):
        conn = socket.create_connection((cip(record, "web"), 80), timeout=5)
    with conn:
        services.netsim("scale", "deployment/web", "--replicas=6", check=True)
        conn.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.") and reply.split(b"\r\n\r\n", 1)[1].strip() in (
        b"web-0",
        b"web-1",
        b"web-2",
    )  # one of the endpoints it was made to


def auto_node_port(name: str) -> str:
    return f"""
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 81, targetPort: 9376}}]
"""


def test_an_assigned_node_port_stays_with_its_service(cluster):
    """No nodePort written: the lowest free one from 30000, kept across applies even when a
    Service written before it in the file later wants one too."""
    write(cluster, extra=auto_node_port("b-np"))
    run_netsim("apply", "-f", cluster.file, check=True)
    assert_backend(cluster, "nftables")
    assert cluster.record().services["b-np"].ports[0].node_port == 30000
    write(cluster, extra=auto_node_port("a-np") + auto_node_port("b-np"))
    run_netsim("apply", "-f", cluster.file, check=True)
    record = cluster.record()
    assert [record.services[s].ports[0].node_port for s in ("a-np", "b-np")] == [30001, 30000]
    assert who(record, "client", record.nodes["worker-2"].ip, 30001, 1)[0] in (
        "web-0",
        "web-1",
        "web-2",
    )


def hooked_chains(netns: str) -> dict[str, int]:
    """Handles of the kube-proxy table and of its base chains: a table made again gets a new
    handle (chain handles count from 1 again in the new table)."""

    def nft_json(what: str) -> list:
        argv = ["ip", "netns", "exec", netns, "nft", "-j", "list", what, "ip"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return json.loads(out)["nftables"]

    listed, tables = nft_json("chains"), nft_json("tables")
    handles = {
        "table": next(
            t["table"]["handle"]
            for t in tables
            if "table" in t and t["table"]["name"] == "kube-proxy"
        )
    }
    return handles | {
        c["chain"]["name"]: c["chain"]["handle"]
        for c in listed
        if "chain" in c and c["chain"]["table"] == "kube-proxy" and "hook" in c["chain"]
    }


def test_a_sync_keeps_the_nat_hooks_in_place(services):
    """A new connection must never meet the table between a NAT chain's removal and its
    return: conntrack would keep that flow, and its retransmitted SYNs, unNATed."""
    netns = services.record().nodes["worker-1"].netns
    before = hooked_chains(netns)
    assert {"table", "nat-prerouting", "nat-output"} <= set(before)
    run_netsim("--cluster", services.name, "scale", "deployment/web", "--replicas=4", check=True)
    assert len(set(who(services.record(), "solo", cip(services.record(), "web"), 80, 8))) == 4
    assert hooked_chains(netns) == before


def test_rolling_replacement_under_continuous_connections(cluster, backend):
    """web-v2 (same labels) replaces web one pod at a time, each new pod ready first."""
    v2 = (
        TOPOLOGY.read_text()
        .split("---")[1]
        .replace("name: web", "name: web-v2", 1)
        .replace("replicas: 3", "replicas: 0")
        .replace("- containerPort: 9376", "- containerPort: 9376\n              name: http")
    )
    write(cluster, extra="\n---" + v2, backend=backend)
    run_netsim("apply", "-f", cluster.file, check=True)
    assert_backend(cluster, backend)
    plans = [
        {"web": 3, "web-v2": 1},
        {"web": 2, "web-v2": 1},
        {"web": 2, "web-v2": 2},
        {"web": 1, "web-v2": 2},
        {"web": 1, "web-v2": 3},
        {"web": 0, "web-v2": 3},
    ]
    ok, total = under_load(cluster, plans)
    print(f"\n{ok} of {total} requests succeeded during the rolling replacement")
    assert {p for p in cluster.record().pods if p.startswith("web")} == {
        "web-v2-0",
        "web-v2-1",
        "web-v2-2",
    }
