"""Pods as real workloads: the e2e tests' agnhost (serve-hostname, netexec), command and args
with Kubernetes' meaning, init containers in order with retries, restart policies, kubectl's
STATUS and RESTARTS, `netsim logs`, the environment a container gets. One cluster for the
module (flannel-vxlan, two nodes, an external client); every check is made from inside it."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import yaml
from conftest import ClusterUnderTest, cluster_document, run_netsim, wait_for

from netsim.kernel import netns as nsmod

pytestmark = pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="netsim creates namespaces: needs root"
)

AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"


def _pod(name: str, spec: dict, labels: dict | None = None) -> dict:
    meta = {"name": name, "labels": labels or {"pod": name}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _service(name: str, selector: dict, ports: list, kind: str = "ClusterIP") -> dict:
    spec = {"type": kind, "selector": selector, "ports": ports}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def documents(name: str, gate: str, ready: str) -> list[dict]:
    return [
        cluster_document(name, ["n1", "n2"], ("client",)),
        # test/e2e/network: the backends of service tests, args without command
        _pod(
            "hostnames",
            {
                "nodeName": "n1",
                "containers": [
                    {
                        "name": "agnhost",
                        "image": AGNHOST,
                        "args": ["serve-hostname"],
                        "ports": [{"containerPort": 9376}],
                    },
                    {
                        "name": "tcp",
                        "image": AGNHOST,
                        "args": ["serve-hostname", "--tcp", "--http=false", "--port", "9377"],
                    },
                    {
                        "name": "udp",
                        "image": AGNHOST,
                        "args": ["serve-hostname", "--udp", "--http=false", "--port", "9378"],
                    },
                ],
            },
        ),
        # NewAgnhostPod(..., "netexec", "--http-port", "8080", "--udp-port", "8081")
        _pod(
            "netexec",
            {
                "nodeName": "n2",
                "containers": [
                    {
                        "name": "agnhost-container",
                        "image": AGNHOST,
                        "args": ["netexec", "--http-port", "8080", "--udp-port", "8081"],
                        "ports": [{"containerPort": 8080, "name": "http"}],
                    }
                ],
            },
        ),
        _service("netexec", {"pod": "netexec"}, [{"port": 80, "targetPort": 8080, "name": "http"}]),
        _service(
            "netexec-np",
            {"pod": "netexec"},
            [{"port": 80, "targetPort": 8080, "nodePort": 30080}],
            "NodePort",
        ),
        # the guides' init-container shape: each waits, in order, then the app runs
        _pod(
            "myapp-pod",
            {
                "nodeName": "n1",
                "containers": [
                    {
                        "name": "myapp-container",
                        "image": "busybox:1.28",
                        "command": ["sh", "-c", "echo The app is running! && sleep 3600"],
                    }
                ],
                "initContainers": [
                    {
                        "name": "init-first",
                        "image": "busybox:1.28",
                        "command": ["sh", "-c", "echo first; hostname"],
                    },
                    {
                        "name": "init-gate",
                        "image": "busybox:1.28",
                        "command": ["sh", "-c", f"test -e {gate} || {{ echo waiting; exit 1; }}"],
                    },
                ],
            },
            {"app": "myapp"},
        ),
        _pod(
            "never",
            {
                "restartPolicy": "Never",
                "containers": [
                    {"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 3"]}
                ],
            },
        ),
        _pod(
            "done",
            {
                "restartPolicy": "OnFailure",
                "containers": [{"name": "c", "image": "busybox", "args": ["true"]}],
            },
        ),
        _pod(
            "crashing",
            {"containers": [{"name": "c", "image": "busybox", "command": ["false"]}]},
        ),
        # ready only once the file exists: out of its Service's endpoints until then
        _pod(
            "gated",
            {
                "containers": [
                    {
                        "name": "agnhost",
                        "image": AGNHOST,
                        "args": ["serve-hostname"],
                        "readinessProbe": {
                            "exec": {"command": ["test", "-e", ready]},
                            "periodSeconds": 1,
                        },
                    }
                ]
            },
        ),
        _service("gated", {"pod": "gated"}, [{"port": 80, "targetPort": 9376}]),
        # the kubelet's probes from the node: one that passes, one to a port nobody serves
        _pod(
            "probed",
            {
                "containers": [
                    {
                        "name": "agnhost",
                        "image": AGNHOST,
                        "args": ["netexec", "--http-port=8080"],
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "readinessProbe": {
                            "httpGet": {"path": "/readyz", "port": "http"},
                            "periodSeconds": 1,
                        },
                    },
                    {
                        "name": "closed",
                        "image": AGNHOST,
                        "args": ["pause"],
                        "readinessProbe": {"tcpSocket": {"port": 9999}, "periodSeconds": 1},
                    },
                ]
            },
        ),
    ]


class Cluster(ClusterUnderTest):
    def pods(self) -> dict[str, dict]:
        listed = json.loads(self.netsim("get", "pods", "-o", "json", check=True).stdout)
        return {p["name"]: p for p in listed["items"]}

    def status(self, pod: str) -> tuple[str, str, int]:
        item = self.pods()[pod]
        return item["ready"], item["status"], item["restarts"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("workloads"))
    c.gate, c.ready = str(c.dir / "gate"), str(c.dir / "ready")
    Path(c.file).write_text(yaml.safe_dump_all(documents(c.name, c.gate, c.ready), sort_keys=False))
    try:
        run_netsim("apply", "-f", c.file, check=True)
        c.ips = {n: p["ip"] for n, p in c.pods().items()}
        yield c
    finally:
        run_netsim("down", c.name)
        from netsim import teardown

        teardown.gc(c.name)
        assert not c.namespaces()


def _http(live, src: str, url: str) -> str:
    """One GET from a pod, retried while the container is still starting."""
    found = {}

    def answered() -> bool:
        out = live.netsim("curl", src, url, "--count", "1")
        found["text"] = out.stdout
        return out.returncode == 0

    wait_for(answered, 15, f"{url} answered from {src}", interval=0.2)
    return found["text"].strip()


def test_serve_hostname_as_the_e2e_tests_run_it(live):
    ip = live.ips["hostnames"]
    assert _http(live, "netexec", f"http://{ip}:9376/anything") == "hostnames"
    netns = f"netsim.{live.name}.pod.netexec"

    def tcp() -> bytes:
        with nsmod.entered(netns):
            sock = socket.create_connection((ip, 9377), timeout=2)
        with sock:
            return sock.recv(100)

    def udp() -> bytes:
        with nsmod.entered(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(1)
            sock.sendto(b"x", (ip, 9378))
            return sock.recv(100)

    assert tcp() == b"hostnames"  # --tcp: the name, then the connection closes
    assert udp() == b"hostnames"
    assert live.status("hostnames") == ("3/3", "Running", 0)


def test_netexec_answers_as_agnhost_and_shows_the_client_address(live):
    ip = live.ips["netexec"]
    assert _http(live, "hostnames", f"http://{ip}:8080/hostname") == "netexec"
    assert _http(live, "hostnames", f"http://{ip}:8080/echo?msg=hello") == "hello"
    # through a ClusterIP: the source a pod sees is the calling pod's own address
    record = live.record()
    service_ip = record.services["netexec"].cluster_ip
    seen = _http(live, "hostnames", f"http://{service_ip}:80/clientip")
    assert seen.rsplit(":", 1)[0] == live.ips["hostnames"]
    # through a NodePort from outside: kube-proxy masquerades, the pod sees a node's address
    node_ip = record.nodes["n1"].ip
    seen = _http(live, "client", f"http://{node_ip}:30080/clientip")
    client_ip = record.clients["client"].ip
    assert seen.rsplit(":", 1)[0] != client_ip
    assert _http(live, "hostnames", f"http://{ip}:8080/shell?cmd=id") == (
        "netsim: /shell is disabled"
    )
    netns = f"netsim.{live.name}.pod.hostnames"
    with nsmod.entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(2)
        sock.sendto(b"hostname", (ip, 8081))
        assert sock.recv(100) == b"netexec"


def test_init_containers_run_in_order_retry_then_the_app_runs(live):
    def state() -> str:
        return live.status("myapp-pod")[1]

    # the gate is closed: the second init container fails and is retried with back-off
    wait_for(lambda: state() in ("Init:Error", "Init:CrashLoopBackOff"), 20, "init retried")
    ready, shown, restarts = live.status("myapp-pod")
    assert ready == "0/1" and restarts >= 1
    assert live.netsim("logs", "myapp-pod", "-c", "init-first").stdout == "first\nmyapp-pod\n"
    assert live.netsim("logs", "myapp-pod", "-c", "init-gate").stdout == "waiting\n"
    waiting = live.netsim("logs", "myapp-pod")  # not started: kubectl's answer
    assert waiting.returncode == 1 and "is waiting to start: PodInitializing" in waiting.stderr
    item = live.pods()["myapp-pod"]
    first, gate = item["initContainerStatuses"]
    assert first["state"]["terminated"]["exitCode"] == 0
    assert (
        first["state"]["terminated"]["finishedAt"] <= gate["lastState"]["terminated"]["startedAt"]
    )
    Path(live.gate).touch()
    wait_for(lambda: state() == "Running", 40, "myapp-pod Running after the gate opened")
    assert live.netsim("logs", "myapp-pod").stdout == "The app is running!\n"
    assert live.netsim("logs", "myapp-pod", "-c", "init-gate", "--previous").stdout == "waiting\n"
    assert live.netsim("logs", "myapp-pod", "-c", "nope").returncode != 0


def test_restart_policies_and_kubectl_status(live):
    wait_for(lambda: live.status("never")[1] == "Error", 10, "never: Error")
    assert live.status("never") == ("0/1", "Error", 0)
    described = live.netsim("describe", "pod", "never", check=True).stdout
    assert "Status:        Error (phase Failed, ready 0/1)" in described
    assert "  c: Terminated (Error, exit code 3), ready false, restarts 0" in described
    wait_for(lambda: live.status("done")[1] == "Completed", 10, "done: Completed")
    assert live.status("done") == ("0/1", "Completed", 0)
    # Always: restarted at once the first time, then after a back-off of 10 s
    wait_for(lambda: live.status("crashing")[1] == "CrashLoopBackOff", 10, "CrashLoopBackOff")
    assert live.status("crashing")[2] >= 1
    item = live.pods()["crashing"]["containerStatuses"][0]
    assert item["lastState"]["terminated"]["exitCode"] == 1
    # 0 s, then 10 s, 20 s...: a handful of restarts in the minute this module takes
    assert re.match(r"back-off (10|20|40)s restarting", item["state"]["waiting"]["message"])
    assert item["restartCount"] <= 4


def test_a_container_gets_the_services_environment_and_its_hostname(live):
    docs = list(yaml.safe_load_all(Path(live.file).read_text()))
    docs.append(
        _pod(
            "env",
            {
                "containers": [
                    {
                        "name": "c",
                        "image": "busybox",
                        "command": ["sh", "-c", "env | sort; sleep 3600"],
                        "env": [{"name": "GREETING", "value": "hi"}],
                    }
                ]
            },
        )
    )
    Path(live.file).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    run_netsim("apply", "-f", live.file, check=True)
    record = live.record()
    ip = record.services["netexec"].cluster_ip

    def env() -> dict[str, str]:
        out = live.netsim("logs", "env").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    wait_for(lambda: "HOSTNAME" in env(), 10, "the env pod printed its environment")
    found = env()
    assert found["HOSTNAME"] == "env" and found["GREETING"] == "hi"
    assert found["NETEXEC_SERVICE_HOST"] == ip
    assert found["NETEXEC_SERVICE_PORT"] == "80"
    assert found["NETEXEC_SERVICE_PORT_HTTP"] == "80"
    assert found["NETEXEC_PORT"] == f"tcp://{ip}:80"
    assert found["NETEXEC_PORT_80_TCP"] == f"tcp://{ip}:80"
    assert found["NETEXEC_PORT_80_TCP_PROTO"] == "tcp"
    assert found["NETEXEC_PORT_80_TCP_PORT"] == "80"
    assert found["NETEXEC_PORT_80_TCP_ADDR"] == ip
    assert "NETEXEC_NP_SERVICE_HOST" in found  # '-' becomes '_'
    # -f: what is there, then what comes, until interrupted (^C ends it quietly)
    import signal
    import subprocess
    import sys

    follow = subprocess.Popen(
        [sys.executable, "-m", "netsim", "--cluster", live.name, "logs", "-f", "env"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = follow.stdout.readline()
        assert "=" in first
    finally:
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0


def test_a_pod_serves_its_service_only_once_ready(live):
    def endpoints() -> list:
        listed = json.loads(live.netsim("get", "endpoints", "-o", "json").stdout)["items"]
        return next(s["endpoints"] for s in listed if s["name"] == "gated")

    def answers() -> bool:
        ip = live.record().services["gated"].cluster_ip
        return live.netsim("curl", "hostnames", f"http://{ip}:80/").returncode == 0

    assert live.status("gated")[:2] == ("0/1", "Running")  # running, not ready
    assert endpoints() == [] and not answers()
    Path(live.ready).touch()
    wait_for(lambda: live.status("gated")[0] == "1/1", 10, "the probe passed")
    wait_for(lambda: [e["pod"] for e in endpoints()] == ["gated"], 10, "gated in its endpoints")
    wait_for(answers, 10, "the Service answers")
    Path(live.ready).unlink()  # three failures in a row: out again
    wait_for(lambda: endpoints() == [], 15, "gated out of its endpoints")


def test_http_and_tcp_probes_are_sent_from_the_node_to_the_pod(live):
    def states() -> dict[str, bool]:
        item = live.pods()["probed"]
        return {c["name"]: c["ready"] for c in item["containerStatuses"]}

    wait_for(lambda: states().get("agnhost"), 15, "the httpGet probe on /readyz passed")
    assert states()["closed"] is False  # nothing listens on 9999 in the pod
    assert live.status("probed")[0] == "1/2"


def test_containers_die_with_their_agent_and_come_back_with_it(live):
    """kill -9 of a node's agent takes its pods' containers with it (nothing outlives it
    unrecorded); the next apply starts the agent, whose kubelet starts them again."""
    import os
    import signal

    from netsim.kernel import proc

    before = live.pods()["netexec"]["containerStatuses"][0]
    pids = live.record().pods["netexec"].pids
    assert pids and before["state"].get("running")
    agent = live.record().nodes["n2"].agent
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: not any(proc.alive(p, proc.start_time(p) or 0) for p in pids), 5, "gone")
    run_netsim("apply", "-f", live.file, check=True)
    ip = live.ips["netexec"]
    assert _http(live, "hostnames", f"http://{ip}:8080/hostname") == "netexec"
    assert live.record().pods["netexec"].pids != pids
