"""Deployments as the guides drive them with kubectl: create deployment, expose a NodePort,
scale, set image with a rolling update, rollout status / history / undo, selectors and
labels, describe, delete; flags anywhere. One cluster for the module (flannel-vxlan, two
nodes, an external client), pods named as Kubernetes names them (<replicaset>-<5 chars>)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import yaml
from conftest import ClusterUnderTest, cluster_document, run_netsim, wait_for

from netsim import rollout, state
from netsim import store as storemod

pytestmark = pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="netsim creates namespaces: needs root"
)

AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.39"
AGNHOST_NEXT = "registry.k8s.io/e2e-test-images/agnhost:2.40"
POD_NAME = r"hello-[bcdfghjklmnpqrstvwxz2456789]{6,10}-[bcdfghjklmnpqrstvwxz2456789]{5}"


class Cluster(ClusterUnderTest):
    def ok(self, *argv: str) -> str:
        return self.netsim(*argv, check=True).stdout

    def pods(self, *selector: str) -> dict[str, dict]:
        listed = json.loads(self.ok("get", "pods", "-o", "json", *selector))
        return {p["name"]: p for p in listed["items"]}

    def curl(self, src: str, url: str, count: int = 1) -> list[str]:
        out = self.netsim("curl", src, url, "--count", str(count))
        assert out.returncode == 0, out.stdout + out.stderr
        # with --count, each line is "<n>: <answer>"
        return [line.split(": ", 1)[-1].strip() for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("deployments"))
    doc = cluster_document(c.name, ["n1", "n2"], ("client",))
    doc["spec"]["controlPlane"] = {"podNames": "ReplicaSet"}
    with open(c.file, "w") as fh:
        yaml.safe_dump(doc, fh)
    try:
        run_netsim("apply", "-f", c.file, check=True)
        yield c
    finally:
        run_netsim("down", c.name)
        from netsim import teardown

        teardown.gc(c.name)
        assert not c.namespaces()


def _hashes(live: Cluster) -> set[str]:
    return {p["labels"][rollout.HASH_LABEL] for p in live.pods("-l", "app=hello").values()}


def test_the_guides_walk(live):
    # kubectl create deployment hello-node --image=...agnhost -- /agnhost netexec --http-port=8080
    out = live.ok(
        "create",
        "deployment",
        "hello",
        f"--image={AGNHOST}",
        "--",
        "/agnhost",
        "netexec",
        "--http-port=8080",
    )
    assert out.strip() == "deployment.apps/hello created"
    (pod,) = live.pods()  # flags after the verb: --cluster is given before it by live.netsim
    assert re.fullmatch(POD_NAME, pod)
    assert live.ok("get", "deployments").splitlines()[1].split()[:4] == ["hello", "1/1", "1", "1"]

    live.ok("expose", "deployment/hello", "--type=NodePort", "--port=8080")
    service = json.loads(live.ok("get", "services", "-o", "json"))["items"]
    node_port = next(s for s in service if s["name"] == "hello")["ports"][0]["node_port"]
    node_ip = live.record().nodes["n1"].ip
    url = f"http://{node_ip}:{node_port}/hostname"
    wait_for(lambda: live.netsim("curl", "client", url).returncode == 0, 15, "NodePort answers")
    assert live.curl("client", url) == [pod]

    live.ok("scale", "deployment/hello", "--replicas=4")
    pods = live.pods("-l", "app=hello")
    assert len(pods) == 4 and all(p["status"] == "Running" for p in pods.values())
    answered = set(live.curl("client", url, 20))
    assert len(answered) >= 2 and answered <= set(pods)

    first = _hashes(live)
    out = live.ok("set", "image", "deployment/hello", f"agnhost={AGNHOST_NEXT}")
    assert out.strip() == "deployment.apps/hello image updated"
    status = live.ok("rollout", "status", "deployment/hello", "--timeout=60").splitlines()
    assert status[-1] == 'deployment "hello" successfully rolled out'
    assert all(line.startswith('Waiting for deployment "hello" rollout') for line in status[:-1])
    second = _hashes(live)
    assert len(second) == 1 and second != first
    rs = [line.split() for line in live.ok("get", "rs").splitlines()[1:]]
    assert sorted((r[0], r[1]) for r in rs) == sorted(
        [(f"hello-{first.pop()}", "0"), (f"hello-{next(iter(second))}", "4")]
    )
    assert live.curl("client", url)[0] in live.pods("-l", "app=hello")

    history = live.ok("rollout", "history", "deployment/hello").splitlines()
    assert history[0] == "deployment.apps/hello"
    assert [h.split()[0] for h in history[2:]] == ["1", "2"]
    assert "agnhost:2.40" in live.ok("rollout", "history", "deployment/hello", "--revision=2")
    assert (
        live.ok("rollout", "undo", "deployment/hello").strip()
        == "deployment.apps/hello rolled back"
    )
    live.ok("rollout", "status", "deployment/hello", "--timeout=60")
    assert _hashes(live) != second
    history = live.ok("rollout", "history", "deployment/hello").splitlines()
    assert [h.split()[0] for h in history[2:]] == ["2", "3"]  # revision 1 came back as 3

    one = sorted(live.pods())[0]
    assert live.ok("label", "pod", one, "version=v1").strip() == f"pod/{one} labeled"
    assert list(live.pods("-l", "version=v1")) == [one]
    assert len(live.pods("-l", "app in (hello,other),version!=v1")) == 3
    assert len(live.pods("-l", "!version")) == 3
    refused = live.netsim("label", "pod", one, "version=v2")
    assert refused.returncode == 1
    assert "'version' already has a value (v1), and --overwrite is false" in refused.stderr
    live.ok("label", "pod", one, "version=v2", "--overwrite")
    assert list(live.pods("-l", "version=v2")) == [one]

    described = live.ok("describe", "deployment", "hello")
    assert re.search(r"Replicas:\s+4 desired \| 4 updated \| 4 total \| 4 available", described)
    assert re.search(r"RollingUpdateStrategy:\s+25% max unavailable, 25% max surge", described)
    assert re.search(r"NewReplicaSet:\s+hello-\w+ \(4/4 replicas created\)", described)
    assert "Scaled down replica set" in described
    described = live.ok("describe", "service", "hello")
    assert re.search(rf"NodePort:\s+<unset>\s+{node_port}/TCP", described)
    endpoints = re.search(r"Endpoints:\s+(\S+)", described).group(1).split(",")
    assert len(endpoints) == 4

    assert live.ok("delete", "service", "hello").strip() == 'service "hello" deleted'
    assert "hello" not in live.ok("get", "services")
    assert live.ok("delete", "deployment/hello").strip() == 'deployment.apps "hello" deleted'
    assert not live.pods("-l", "app=hello")
    assert live.ok("get", "deploy").splitlines()[1:] == []  # the header alone


def test_flags_go_anywhere_and_bad_input_is_refused(live):
    after = run_netsim("get", "pods", "--cluster", live.name, "-n", "kube-system")
    assert after.returncode == 0 and "coredns-0" in after.stdout
    for argv, words in (
        (("set", "image", "deployment/nothing", "a=b"), 'deployments.apps "nothing" not found'),
        (("rollout", "status", "pod/x"), "write deployment/NAME"),
        (("get", "pods", "-l", "a in (b"), "unable to parse requirement"),
        (("label", "pod", "x"), "write at least one label"),
    ):
        out = live.netsim(*argv)
        assert out.returncode in (1, 2) and words in out.stderr, (argv, out.stderr)
        assert "Traceback" not in out.stderr


def test_a_rollout_keeps_within_surge_and_unavailable_at_every_step(live):
    """maxSurge 2, maxUnavailable 1 on 6 replicas with a readiness probe: never more than 8
    pods, never fewer than 5 ready, watched from the store while it rolls."""
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bounded"},
        "spec": {
            "replicas": 6,
            "selector": {"matchLabels": {"app": "bounded"}},
            "strategy": {"rollingUpdate": {"maxSurge": 2, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": "bounded"}},
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "image": AGNHOST,
                            "args": ["netexec", "--http-port=8080"],
                            "readinessProbe": {
                                "httpGet": {"port": 8080, "path": "/readyz"},
                                "periodSeconds": 1,
                            },
                        }
                    ]
                },
            },
        },
    }
    objects = live.dir / "bounded.yaml"
    objects.write_text(yaml.safe_dump(body))
    live.ok("apply", "-f", str(objects))
    live.ok("rollout", "status", "deployment/bounded", "--timeout=60")
    record = state.load(live.name)
    store = storemod.of(live.name, record.spec.datastore)
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def watch() -> None:
        from netsim.daemons.kubelet import POD_STATUS

        while not done.is_set():
            pods = [kv.json() for kv in store.range("/registry/pods/default/bounded-", prefix=True)]
            statuses = {
                kv.key.rsplit("/", 1)[1]: kv.json() for kv in store.range(POD_STATUS, prefix=True)
            }
            ready = sum(statuses.get(p["metadata"]["name"], {}).get("ready", False) for p in pods)
            samples.append((len(pods), ready))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        live.ok("set", "image", "deployment/bounded", f"web={AGNHOST_NEXT}")
        live.ok("rollout", "status", "deployment/bounded", "--timeout=90")
    finally:
        done.set()
        watcher.join()
    assert len(samples) > 20
    assert max(total for total, _ in samples) <= 8
    assert min(ready for _, ready in samples) >= 5
    assert max(total for total, _ in samples) > 6  # it did surge
    live.ok("delete", "-f", str(objects))


def test_global_flags_are_read_anywhere_before_the_double_dash():
    """kubectl's -n, -A and --context may sit between a kind and its name; after `--` every
    word is the command's."""
    from netsim.cli import hoisted

    assert hoisted(["describe", "pod", "-n", "y", "c"]) == ["-n", "y", "describe", "pod", "c"]
    assert hoisted(["get", "pods", "-A", "--cluster=demo"]) == [
        "-A",
        "--cluster=demo",
        "get",
        "pods",
    ]
    # after `exec POD` the words are the command's, `--` or not (exec reads a -n there itself)
    assert hoisted(["exec", "web", "ping", "-n", "10.0.0.1"]) == [
        "exec",
        "web",
        "ping",
        "-n",
        "10.0.0.1",
    ]
    assert hoisted(["-A", "exec", "web", "--", "ip", "-n", "z"]) == [
        "-A",
        "exec",
        "web",
        "--",
        "ip",
        "-n",
        "z",
    ]
    missing = []
    hoisted(["get", "pods", "-n"], missing.append)
    assert missing == ["argument -n: expected one argument"]
