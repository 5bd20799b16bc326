"""Cluster DNS: how long a lookup takes, asked over UDP from inside the namespace the server
serves (1,000 lookups, one at a time, p50 and p99), and how long a rebuild of the zone from the
store's view takes at 10,000 endpoints (what every Service or Endpoints change costs).

    .venv/bin/python -m pytest -s bench/test_dns.py --benchmark-columns=min,median,max

Goal (the issue): p50 under 1 ms per lookup. Printed, not asserted: the figure depends on the
machine. A lookup's time includes the client's own encoding and decoding (dnspython).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import time
import uuid

import dns.message
import dns.query
import pytest
from conftest import needs_root

from netsim import registry
from netsim.dns.server import ClusterDns, DnsServer
from netsim.dns.zone import Zone
from netsim.kernel import netns as nsmod
from netsim.store.client import KeyValue

pytestmark = needs_root
LOOKUPS = 1000
SERVICES, ENDPOINTS_EACH = 1000, 10  # 10,000 endpoints


def _objects(services: int, each: int) -> tuple[dict, dict]:
    """`services` Services (every tenth headless), `each` endpoints apiece, keyed <ns>/<name>."""
    specs, eps = {}, {}
    for i in range(services):
        name = f"svc-{i}"
        cluster_ip = "None" if i % 10 == 0 else f"10.96.{i // 250}.{i % 250 + 1}"
        specs[f"default/{name}"] = {
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": cluster_ip,
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            },
        }
        addresses = [
            {"ip": f"10.244.{(i * each + j) // 250}.{(i * each + j) % 250 + 1}", "nodeName": "n"}
            for j in range(each)
        ]
        eps[f"default/{name}"] = {
            "subsets": [
                {
                    "addresses": addresses,
                    "ports": [{"name": "http", "port": 9376, "protocol": "TCP"}],
                }
            ]
        }
    return specs, eps


@pytest.fixture
def served():
    """A server in a throwaway namespace (lo up) with 100 Services; stopped and removed after."""
    netns = f"netsim-test-dnsb-{uuid.uuid4().hex[:6]}"
    nsmod.create(netns)
    server = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=10)
        server = DnsServer(Zone.from_view(*_objects(100, 10)), 53, netns, log=lambda line: None)
        server.start()
        yield netns
    finally:
        if server is not None:
            server.stop()
        nsmod.remove(netns)


def test_lookup_latency_over_udp(benchmark, served):
    with nsmod.entered(served):  # the client's socket lives in the pod's namespace too
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    names = [f"svc-{i % 100}.default.svc.cluster.local" for i in range(LOOKUPS)]
    samples: list[float] = []

    def lookups() -> None:
        samples.clear()
        for name in names:
            query = dns.message.make_query(name, "A")
            began = time.perf_counter()
            response = dns.query.udp(query, "127.0.0.1", timeout=2, sock=sock)
            samples.append(time.perf_counter() - began)
            assert response.answer, name

    try:
        benchmark.pedantic(lookups, rounds=1, iterations=1)
    finally:
        sock.close()
    p50 = statistics.median(samples) * 1000
    p99 = statistics.quantiles(samples, n=100)[98] * 1000
    benchmark.extra_info.update(p50_ms=round(p50, 3), p99_ms=round(p99, 3))
    print(f"\ndns over udp, {len(samples)} lookups: p50 {p50:.3f} ms, p99 {p99:.3f} ms")


def test_zone_rebuild_at_10000_endpoints(benchmark):
    """What the server does on every change: decode the stored objects, build the Zone."""
    specs, eps = _objects(SERVICES, ENDPOINTS_EACH)
    view = {registry.SERVICES_ALL: {}}
    for prefix, objects in ((registry.SERVICES, specs), (registry.ENDPOINTS, eps)):
        for key, obj in objects.items():
            view[registry.SERVICES_ALL][prefix + key] = KeyValue(
                prefix + key, json.dumps(obj).encode(), 1, 1
            )
    daemon = ClusterDns(DnsServer(None), log=lambda line: None)
    benchmark.pedantic(daemon.sync, args=(view,), rounds=5, iterations=1)
    only_zone = min(_timed(lambda: Zone.from_view(specs, eps)) for _ in range(5))
    whole = benchmark.stats.stats.median * 1000
    print(
        f"\nzone rebuild, {SERVICES} services, {SERVICES * ENDPOINTS_EACH} endpoints: "
        f"{whole:.1f} ms with JSON decoding (median), Zone alone {only_zone:.1f} ms (min)"
    )


def _timed(work) -> float:
    began = time.perf_counter()
    work()
    return (time.perf_counter() - began) * 1000
