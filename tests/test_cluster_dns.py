"""Cluster DNS and namespaces, seen from inside pods with the system resolver (glibc's getent,
Debian's nslookup and dig): the kube-dns Service at the 10th address of the service CIDR,
each pod's resolv.conf and hosts as the kubelet writes them, Services by short name, in
another namespace, headless, SRV for named ports, PTR, NXDOMAIN; and the Kubernetes guide's
init-container example, applied as written from files of its own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ClusterUnderTest, cluster_document, run_netsim, wait_for

pytestmark = pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="netsim creates namespaces: needs root"
)

# https://kubernetes.io/docs/concepts/workloads/pods/init-containers/, as written
MYAPP = """\
apiVersion: v1
kind: Pod
metadata:
  name: myapp-pod
  labels:
    app.kubernetes.io/name: MyApp
spec:
  containers:
  - name: myapp-container
    image: busybox:1.28
    command: ['sh', '-c', 'echo The app is running! && sleep 3600']
  initContainers:
  - name: init-myservice
    image: busybox:1.28
    command: ['sh', '-c', "until nslookup myservice.$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace).svc.cluster.local; do echo waiting for myservice; sleep 2; done"]
  - name: init-mydb
    image: busybox:1.28
    command: ['sh', '-c', "until nslookup mydb.$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace).svc.cluster.local; do echo waiting for mydb; sleep 2; done"]
"""  # noqa: E501
SERVICES = """\
---
apiVersion: v1
kind: Service
metadata:
  name: myservice
spec:
  ports:
  - protocol: TCP
    port: 80
    targetPort: 9376
---
apiVersion: v1
kind: Service
metadata:
  name: mydb
spec:
  ports:
  - protocol: TCP
    port: 80
    targetPort: 9377
"""


def documents(name: str) -> list[dict]:
    def pod(name: str, namespace: str, labels: dict, node: str) -> dict:
        meta = {"name": name, "namespace": namespace, "labels": labels}
        spec = {
            "nodeName": node,
            "containers": [{"name": "c", "ports": [{"containerPort": 9376, "name": "http"}]}],
        }
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}

    def service(name: str, namespace: str, labels: dict, **spec) -> dict:
        ports = [{"name": "http", "port": 80, "targetPort": "http"}]
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": labels, "ports": ports, **spec},
        }

    return [
        cluster_document(name, ["n1", "n2"]),
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "x", "labels": {"team": "x"}},
        },
        pod("client", "default", {"app": "client"}, "n1"),
        pod("web-0", "default", {"app": "web"}, "n1"),
        pod("web-1", "default", {"app": "web"}, "n2"),
        pod("web-0", "x", {"app": "web"}, "n1"),  # the same name in another namespace, same node
        service("web", "default", {"app": "web"}),
        service("web-headless", "default", {"app": "web"}, clusterIP="None"),
        service("web", "x", {"app": "web"}),
    ]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    c = ClusterUnderTest(tmp_path_factory.mktemp("dns"))
    Path(c.file).write_text(yaml.safe_dump_all(documents(c.name), sort_keys=False))
    try:
        run_netsim("apply", "-f", c.file, check=True)
        c.ips = {}
        listed = json.loads(c.netsim("-A", "get", "pods", "-o", "json", check=True).stdout)
        for item in listed["items"]:
            c.ips[(item["namespace"], item["name"])] = item["ip"]
        c.services = {
            (s["namespace"], s["name"]): s["clusterIP"]
            for s in json.loads(c.netsim("get", "services", "-A", "-o", "json").stdout)["items"]
        }
        wait_for(lambda: _in(c, "client", "getent", "hosts", "web").returncode == 0, 20, "DNS up")
        yield c
    finally:
        run_netsim("down", c.name)
        from netsim import teardown

        teardown.gc(c.name)
        assert not c.namespaces()
        assert not [n for n in Path("/etc/netns").glob(f"netsim.{c.name}.*")]


def _in(live, pod: str, *argv: str, namespace: str = "default") -> subprocess.CompletedProcess:
    return live.netsim("-n", namespace, "exec", pod, "--", *argv)


def test_kube_dns_is_the_tenth_address_and_every_pod_is_told_so(live):
    assert live.services[("kube-system", "kube-dns")] == "10.96.0.10"
    assert live.services[("default", "web")] == "10.96.0.11"  # .10 is reserved
    coredns = [k for k in live.ips if k[0] == "kube-system"]
    assert coredns and coredns[0][1].startswith("coredns-")
    resolv = (
        "search default.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\noptions ndots:5\n"
    )
    assert _in(live, "client", "cat", "/etc/resolv.conf").stdout == resolv
    netns = f"netsim.{live.name}.pod.x.web-0"
    seen = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/etc/resolv.conf"], capture_output=True, text=True
    ).stdout
    assert seen.startswith("search x.svc.cluster.local svc.cluster.local cluster.local\n")
    hosts = _in(live, "web-0", "getent", "hosts", "web-0", namespace="x").stdout.split()
    assert hosts[0] == live.ips[("x", "web-0")]
    assert _in(live, "web-0", "hostname", namespace="x").stdout.strip() == "web-0"


def test_services_by_name_in_this_namespace_and_another(live):
    out = _in(live, "client", "getent", "hosts", "web").stdout.split()
    assert out == [live.services[("default", "web")], "web.default.svc.cluster.local"]
    out = _in(live, "client", "getent", "hosts", "web.x").stdout.split()
    assert out[0] == live.services[("x", "web")]
    out = _in(live, "web-0", "getent", "hosts", "web", namespace="x").stdout.split()
    assert out[0] == live.services[("x", "web")]  # the pod's own namespace first
    found = _in(live, "client", "nslookup", "web.x.svc.cluster.local")
    assert found.returncode == 0 and f"Address: {live.services[('x', 'web')]}" in found.stdout


def test_headless_service_is_its_pods_addresses(live):
    out = _in(live, "client", "getent", "ahostsv4", "web-headless").stdout.split("\n")
    found = {line.split()[0] for line in out if line.strip()}
    assert found == {live.ips[("default", "web-0")], live.ips[("default", "web-1")]}


def test_srv_for_named_ports_and_ptr(live):
    out = _in(live, "client", "dig", "+short", "SRV", "_http._tcp.web.default.svc.cluster.local")
    assert out.stdout.split() == ["0", "100", "80", "web.default.svc.cluster.local."]
    ip = live.services[("default", "web")]
    assert _in(live, "client", "dig", "+short", "-x", ip).stdout.strip() == (
        "web.default.svc.cluster.local."
    )


def test_names_that_do_not_exist_and_names_outside(live):
    assert _in(live, "client", "getent", "hosts", "nosuch").returncode == 2
    out = _in(live, "client", "nslookup", "nosuch.default.svc.cluster.local")
    assert out.returncode != 0 and "NXDOMAIN" in out.stdout
    out = _in(live, "client", "dig", "example.com")
    assert "status: REFUSED" in out.stdout  # no query ever leaves the host


def test_the_init_container_guide_runs_as_written(live):
    pod_file, services_file = live.dir / "myapp.yaml", live.dir / "services.yaml"
    pod_file.write_text(MYAPP)
    services_file.write_text(SERVICES)
    run_netsim("--cluster", live.name, "apply", "-f", str(pod_file), check=True)

    def status() -> str:
        listed = json.loads(live.netsim("get", "pods", "-o", "json").stdout)["items"]
        return next(p["status"] for p in listed if p["name"] == "myapp-pod")

    wait_for(
        lambda: (
            "waiting for myservice"
            in live.netsim("logs", "myapp-pod", "-c", "init-myservice").stdout
        ),
        20,
        "init waits",
    )
    assert status() == "Init:0/2"
    run_netsim("--cluster", live.name, "apply", "-f", str(services_file), check=True)
    wait_for(lambda: status() == "Running", 30, "myapp-pod Running once both Services exist")
    assert live.netsim("logs", "myapp-pod").stdout == "The app is running!\n"
    # the objects stay when the cluster's own file is applied again, and go by their file
    run_netsim("apply", "-f", live.file, check=True)
    assert status() == "Running"
    run_netsim("--cluster", live.name, "delete", "-f", str(services_file), check=True)
    names = [s["name"] for s in json.loads(live.netsim("get", "svc", "-o", "json").stdout)["items"]]
    assert "myservice" not in names and "web" in names


def test_a_bad_objects_file_is_refused_naming_its_own_file(live):
    bad = live.dir / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: lost, namespace: nope}\n")
    out = run_netsim("--cluster", live.name, "apply", "-f", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{bad}: document 1 (Pod lost): metadata.namespace:" in out.stderr
    assert 'namespaces "nope" not found' in out.stderr
