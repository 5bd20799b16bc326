"""LoadBalancer Services announced as MetalLB's layer 2 mode announces them, and kube-proxy's
traffic policies: externalTrafficPolicy Local (the client's address kept, nodes without an
endpoint drop, the health check node port), internalTrafficPolicy Local. One cluster for the
module: three nodes, an external client, pods a (worker-1) and b (worker-2) running agnhost
netexec, a pool of addresses on the underlay."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml
from conftest import ClusterUnderTest, cluster_document, run_netsim, wait_for

from netsim.daemons.speaker import ETH_P_ARP, REPLY, REQUEST, arp, winner
from netsim.kernel import netns as nsmod

pytestmark = pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="netsim creates namespaces: needs root"
)

AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.39"
NODES = ["worker-1", "worker-2", "worker-3"]


def _pod(name: str, node: str) -> dict:
    container = {"name": "agnhost", "image": AGNHOST, "args": ["netexec", "--http-port=8080"]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [container]},
    }


def _service(name: str, kind: str, **spec) -> dict:
    body = {"type": kind, "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": body | spec,
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    c = ClusterUnderTest(tmp_path_factory.mktemp("policies"))
    cluster = cluster_document(c.name, NODES, ("client",))
    cluster["spec"]["loadBalancer"] = {"addresses": ["172.18.0.200-172.18.0.203"]}
    cluster["spec"]["controlPlane"]["nodeMonitorGracePeriod"] = 2
    docs = [
        cluster,
        _pod("a", "worker-1"),
        _pod("b", "worker-2"),
        {**_pod("probe1", "worker-1"), "metadata": {"name": "probe1"}},
        {**_pod("probe3", "worker-3"), "metadata": {"name": "probe3"}},
        _service("web-lb", "LoadBalancer"),
        _service("web-local", "LoadBalancer", externalTrafficPolicy="Local"),
        _service("web-np-local", "NodePort", externalTrafficPolicy="Local"),
        _service("web-itp", "ClusterIP", internalTrafficPolicy="Local"),
    ]
    with open(c.file, "w") as fh:
        yaml.safe_dump_all(docs, fh)
    try:
        run_netsim("apply", "-f", c.file, check=True)
        services = json.loads(c.netsim("get", "services", "-o", "json", check=True).stdout)
        c.services = {s["name"]: s for s in services["items"]}
        c.rec = c.record()
        yield c
    finally:
        run_netsim("down", c.name)
        from netsim import teardown

        teardown.gc(c.name)
        assert not c.namespaces()


def _get(live, src: str, url: str) -> tuple[int, str]:
    out = live.netsim("curl", src, url)
    return out.returncode, out.stdout.strip()


def _arp_replies(netns: str, sender_ip: str, target: str) -> list[bytes]:
    """Who answers an ARP request for `target` on the namespace's eth0: their MACs."""
    with nsmod.entered(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    with sock:
        sock.bind(("eth0", ETH_P_ARP))
        mac = sock.getsockname()[4]
        sock.send(arp(REQUEST, mac, sender_ip, b"\0" * 6, target))
        sock.settimeout(0.2)
        found, deadline = [], time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                frame = sock.recv(128)
            except TimeoutError:
                continue
            op = int.from_bytes(frame[20:22], "big")
            if op == REPLY and socket.inet_ntoa(frame[28:32]) == target and frame[0:6] == mac:
                found.append(frame[22:28])
        return found


def _mac(netns: str) -> bytes:
    with nsmod.entered(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    with sock:
        sock.bind(("eth0", ETH_P_ARP))
        return sock.getsockname()[4]


def test_load_balancer_address_from_the_pool_answered_by_one_node(live):
    lb = live.services["web-lb"]["externalIP"]
    assert lb in {f"172.18.0.{i}" for i in range(200, 204)}
    row = next(
        line.split()
        for line in live.netsim("get", "services").stdout.splitlines()
        if line.startswith("web-lb ")
    )
    assert row[1:4] == ["LoadBalancer", live.services["web-lb"]["clusterIP"], lb]
    client = live.rec.clients["client"]
    elected = winner(NODES, lb)
    wait_for(lambda: _arp_replies(client.netns, client.ip, lb), 10, f"an ARP answer for {lb}")
    replies = _arp_replies(client.netns, client.ip, lb)
    assert replies == [_mac(live.rec.nodes[elected].netns)]  # exactly one node, the elected
    code, answer = _get(live, "client", f"http://{lb}/hostname")
    assert code == 0 and answer in {"a", "b"}
    events = live.netsim("get", "events").stdout
    assert f"announcing {lb} (service default/web-lb)" in events


def test_source_address_with_local_and_cluster_policies(live):
    client_ip = live.rec.clients["client"].ip
    cluster_lb = live.services["web-lb"]["externalIP"]
    local_lb = live.services["web-local"]["externalIP"]
    wait_for(lambda: _get(live, "client", f"http://{local_lb}/clientip")[0] == 0, 10, "Local LB")
    # Cluster: masqueraded by the node that took it; Local: the client's own address
    assert _get(live, "client", f"http://{cluster_lb}/clientip")[1].split(":")[0] != client_ip
    assert _get(live, "client", f"http://{local_lb}/clientip")[1].split(":")[0] == client_ip
    # the Local address is announced only by a node with an endpoint of it
    announcer = winner(["worker-1", "worker-2"], local_lb)
    replies = _arp_replies(live.rec.clients["client"].netns, client_ip, local_lb)
    assert replies == [_mac(live.rec.nodes[announcer].netns)]
    node_port = live.services["web-np-local"]["ports"][0]["node_port"]
    for node, pod in (("worker-1", "a"), ("worker-2", "b")):
        url = f"http://{live.rec.nodes[node].ip}:{node_port}"
        assert _get(live, "client", f"{url}/clientip")[1].split(":")[0] == client_ip
        assert _get(live, "client", f"{url}/hostname")[1] == pod  # its own endpoint only
    # a node without an endpoint drops what comes to its node port from outside; its pods
    # are not subject to the policy (kube-proxy's short-circuit for pod traffic)
    url = f"http://{live.rec.nodes['worker-3'].ip}:{node_port}/hostname"
    assert _get(live, "client", url)[0] != 0
    assert _get(live, "probe3", url)[1] in {"a", "b"}
    assert _get(live, "probe3", f"http://{local_lb}/hostname")[1] in {"a", "b"}
    # the health check node port, as kube-proxy serves it
    health = live.services["web-local"]["healthCheckNodePort"]
    assert 30000 <= health <= 32767
    for node, code, local in (("worker-1", 200, 1), ("worker-3", 503, 0)):
        out = live.netsim(
            "exec",
            "client",
            "--",
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
            f"http://{live.rec.nodes[node].ip}:{health}/",
        )
        body, status = out.stdout.rsplit("\n", 1)
        assert int(status) == code
        assert json.loads(body) == {
            "service": {"namespace": "default", "name": "web-local"},
            "localEndpoints": local,
            "serviceProxyHealthy": True,
        }


def test_internal_traffic_policy_local_keeps_to_the_node(live):
    ip = live.services["web-itp"]["clusterIP"]
    answers = {_get(live, "probe1", f"http://{ip}/hostname")[1] for _ in range(6)}
    assert answers == {"a"}  # worker-1's own endpoint, never b
    assert _get(live, "probe3", f"http://{ip}/hostname")[0] != 0  # none on worker-3: dropped
    # the same pods through the Cluster policy's ClusterIP reach both
    ip = live.services["web-lb"]["clusterIP"]
    answers = {_get(live, "probe3", f"http://{ip}/hostname")[1] for _ in range(6)}
    assert answers == {"a", "b"}


def test_the_address_moves_when_its_node_fails(live):
    lb = live.services["web-lb"]["externalIP"]
    first = winner(NODES, lb)
    second = winner([n for n in NODES if n != first], lb)
    client = live.rec.clients["client"]
    assert _get(live, "client", f"http://{lb}/hostname")[0] == 0
    live.netsim("node", "stop", first, check=True)
    try:
        moved = _mac(live.rec.nodes[second].netns)
        wait_for(
            lambda: _arp_replies(client.netns, client.ip, lb) == [moved],
            20,
            f"{second} answering ARP for {lb}",
        )
        assert f"announcing {lb} (service default/web-lb)" in "".join(
            line for line in live.netsim("get", "events").stdout.splitlines() if second in line
        )
        # the client's traffic follows it (its cache took the gratuitous ARP, or it asks anew)
        wait_for(lambda: _get(live, "client", f"http://{lb}/hostname")[0] == 0, 10, "LB after")
    finally:
        live.netsim("node", "start", first, check=True)
