"""Cluster DNS in a running cluster (flannel-vxlan, 3 nodes, the default topology): lookups
from a pod on another node than the coredns pod, through kube-proxy to the kube-dns ClusterIP
(1,000, one at a time: p50 and p99), and how soon a new Service's name resolves after it is
written to etcd, as the API server writes it (20 rounds: p50 and max).

    .venv/bin/python -m pytest -s bench/test_cluster_dns.py

Goals (issue 14): a lookup under 1 ms p50; records updated within 100 ms of a change.
Printed, not asserted: the figures depend on the machine.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
import uuid
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from netsim import cluster as clustermod
from netsim import registry, teardown, topology
from netsim import store as storemod
from netsim.kernel import netns as nsmod

LOOKUPS, ROUNDS = 1000, 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def running():
    path = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0]["metadata"]["name"] = "dns" + uuid.uuid4().hex[:6]
    model = topology.parse(yaml.safe_dump_all(docs))[0]
    try:
        clustermod.apply(model)
        from netsim import state

        yield state.load(model.name)
    finally:
        for sock in _sockets.values():
            sock.close()
        _sockets.clear()
        teardown.delete(model.name)


_sockets: dict[str, socket.socket] = {}


def _ask(netns: str, name: str, timeout: float = 1.0):
    """One query from the pod, over a UDP socket opened in its namespace once (as a resolver
    library keeps one), to the kube-dns ClusterIP."""
    if netns not in _sockets:
        with nsmod.entered(netns):
            _sockets[netns] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _sockets[netns].setblocking(False)  # dnspython waits with its own timeout
    query = dns.message.make_query(name, "A")
    return dns.query.udp(query, "10.96.0.10", timeout=timeout, sock=_sockets[netns])


def test_lookups_from_a_pod(running):
    dns_node = next(p.node for p in running.pods.values() if p.pod.namespace == "kube-system")
    client = next(p for p in running.pods.values() if p.node != dns_node)
    name = "web.default.svc.cluster.local."
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the coredns container starts with the cluster
        try:
            _ask(client.netns, name)
            break
        except dns.exception.Timeout:
            time.sleep(0.2)
    took = []
    for _ in range(LOOKUPS):
        start = time.perf_counter()
        reply = _ask(client.netns, name)
        took.append((time.perf_counter() - start) * 1000)
        assert reply.answer
    took.sort()
    print(
        f"\n{LOOKUPS} lookups from {client.name} (node {client.node}; coredns on {dns_node}): "
        f"p50 {statistics.median(took):.3f} ms, p99 {took[int(len(took) * 0.99)]:.3f} ms"
    )


def test_a_new_service_resolves_soon_after_it_is_written(running):
    store = storemod.of(running.cluster, running.spec.datastore)
    client = next(p for p in running.pods.values() if p.pod.namespace == "default")
    took = []
    for i in range(ROUNDS):
        name = f"bench-{uuid.uuid4().hex[:6]}"
        obj = {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": f"10.96.1.{i + 1}", "ports": [{"port": 80}]},
        }
        key = f"{registry.SERVICES}default/{name}"
        start = time.perf_counter()
        store.put(key, json.dumps(obj))
        while True:
            reply = _ask(client.netns, f"{name}.default.svc.cluster.local.")
            if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                break
            if time.perf_counter() - start > 5:
                raise AssertionError(f"{name} did not resolve within 5 s")
            time.sleep(0.001)
        took.append((time.perf_counter() - start) * 1000)
        store.delete(key)
    print(
        f"\na Service written to etcd -> its name resolves from a pod: p50 "
        f"{statistics.median(took):.1f} ms, max {max(took):.1f} ms ({ROUNDS} rounds)"
    )
