"""Network policy's costs (issue 16's figures).

- One policy change programmed on every node, on 10 nodes x 50 pods: from the write of a
  NetworkPolicy to etcd until every node's felix reports (its status key) that its table holds
  it; p50 of 20 (half add a policy, half delete it). Goal < 100 ms.
- The connection rate through a pod that 100 policies select (a client on another node opens
  fresh TCP connections to agnhost serve-hostname, reading each answer), against the same pod
  with no policy; best of three alternating runs of each. Goal >= 0.9x.

    .venv/bin/python -m pytest -s bench/test_netpol.py
    NETSIM_NETPOL_MODES=calico-bgp .venv/bin/python -m pytest -s bench/test_netpol.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
import uuid
from pathlib import Path

import pytest
import yaml

from netsim import cluster as clustermod
from netsim import registry, state, teardown, topology
from netsim import store as storemod
from netsim.kernel import netns as nsmod
from netsim.kernel import nft

NODES, PODS_PER_NODE, ROUNDS = 10, 50, 20
MODES = os.environ.get("NETSIM_NETPOL_MODES", "flannel-vxlan,calico-vxlan").split(",")
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _cluster(mode: str, nodes: int) -> dict:
    path = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"
    cluster = next(yaml.safe_load_all(path.read_text()))
    cluster["metadata"]["name"] = "np" + uuid.uuid4().hex[:6]
    cluster["spec"]["cni"] = {"mode": mode}
    cluster["spec"]["nodes"] = [{"name": f"worker-{i}"} for i in range(1, nodes + 1)]
    return cluster


def _policy(name: str, spec: dict) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def _allow_from(name: str, selected: dict, role: str, port: int = 8080) -> dict:
    peer = {"podSelector": {"matchLabels": {"role": role}}}
    return _policy(
        name,
        {
            "podSelector": {"matchLabels": selected},
            "ingress": [{"from": [peer], "ports": [{"port": port}]}],
        },
    )


@pytest.mark.parametrize("mode", MODES)
def test_one_policy_change_on_every_node(mode):
    path = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0] = _cluster(mode, NODES)
    docs[1]["spec"]["replicas"] = NODES * PODS_PER_NODE
    # a policy already in place: every node's felix holds the pods and its table
    docs.append(_allow_from("base", {"app": "web"}, "client", 80))
    model = topology.parse(yaml.safe_dump_all(docs))[0]
    try:
        clustermod.apply(model)
        record = state.load(model.name)
        store = storemod.of(record.cluster, record.spec.datastore)
        samples = []
        for i in range(ROUNDS):
            key = f"{registry.NETWORK_POLICIES}default/bench-{i}"
            body = _allow_from(f"bench-{i}", {"app": "web"}, f"role-{i}", 9376)
            written = time.time()
            revision = store.put(key, json.dumps(body))
            samples.append(_applied_by_all(store, record, revision) - written)
            written = time.time()
            store.delete(key)
            samples.append(_applied_by_all(store, record, store.writes[key]) - written)
        p50 = statistics.median(samples)
        print(
            f"\n{mode}: one policy change, write to every node's felix applied "
            f"({NODES} x {PODS_PER_NODE} pods): p50 {p50 * 1000:.1f} ms, "
            f"max {max(samples) * 1000:.1f} ms over {len(samples)}"
        )
        assert p50 < 0.1
    finally:
        teardown.delete(model.name)


def _applied_by_all(store, record, revision: int, timeout: float = 10.0) -> float:
    """The latest time any node reported having applied the policies at `revision`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = [kv.json() for kv in store.range(storemod.STATUS, prefix=True)]
        done = [s for s in statuses if s["applied"].get(registry.NETWORK_POLICIES, 0) >= revision]
        if len(done) == len(record.nodes):
            return max(s["time"] for s in done)
        time.sleep(0.005)
    raise AssertionError(f"not every node applied the policies at {revision} in {timeout} s")


def _server_pods() -> list[dict]:
    server = {
        "name": "serve",
        "image": AGNHOST,
        "args": ["serve-hostname", "--tcp", "--http=false", "--port=8080"],
        "ports": [{"containerPort": 8080}],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "server", "labels": {"app": "server"}},
            "spec": {"nodeName": "worker-1", "containers": [server]},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "labels": {"role": "client"}},
            "spec": {"nodeName": "worker-2", "containers": [{"name": "hostname"}]},
        },
    ]


def _rate(netns: str, address: str, seconds: float = 2.0, most: int = 20000) -> float:
    """Fresh TCP connections per second from the namespace, each answer read to its end."""
    done, started = 0, time.monotonic()
    while done < most and time.monotonic() - started < seconds:
        with nsmod.entered(netns):
            sock = socket.socket()
        with sock:
            sock.settimeout(2)
            sock.connect((address, 8080))
            while sock.recv(256):
                pass
        done += 1
    return done / (time.monotonic() - started)


@pytest.mark.parametrize("mode", MODES)
def test_connection_rate_through_100_policies(mode):
    docs = [_cluster(mode, 2), *_server_pods()]
    policies = [_allow_from(f"p{i:03d}", {"app": "server"}, f"nobody-{i}") for i in range(99)]
    policies.append(_allow_from("p099", {"app": "server"}, "client"))  # the last one allows
    plain = topology.parse(yaml.safe_dump_all(docs))[0]
    guarded = topology.parse(yaml.safe_dump_all(docs + policies))[0]
    try:
        clustermod.apply(plain)
        record = state.load(plain.name)
        client, server = record.pods["client"], record.pods["server"]
        deadline = time.monotonic() + 30
        while True:  # the server's container starts after apply
            try:
                _rate(client.netns, server.ip, 0.1, 1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        rates: dict[str, list[float]] = {"none": [], "100 policies": []}
        for _ in range(3):
            for label, model in (("none", plain), ("100 policies", guarded)):
                clustermod.apply(model)
                rates[label].append(_rate(client.netns, server.ip))
        best = {k: max(v) for k, v in rates.items()}
        ratio = best["100 policies"] / best["none"]
        runs = "; ".join(f"{k} " + ", ".join(f"{r:.0f}" for r in v) for k, v in rates.items())
        print(
            f"\n{mode}: new connections/s through a pod, best of 3: no policy "
            f"{best['none']:.0f}, 100 policies selecting it {best['100 policies']:.0f} "
            f"({ratio:.2f}x); runs: {runs}"
        )
        listed = nft.ruleset(record.nodes["worker-1"].netns)
        assert listed.count("chain cali-pi-") == 100  # the 100 policies are in the kernel
        assert ratio >= 0.9
    finally:
        teardown.delete(plain.name)
