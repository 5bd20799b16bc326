"""kube-proxy: a full sync of 1000 Services x 10 endpoints into one node, an update of one
endpoint among them, and the connection rate through a ClusterIP against straight to a pod.

    .venv/bin/python -m pytest bench/test_kubeproxy.py --benchmark-columns=min,median,max

Goals (issue 5): full sync < 1 s; one-endpoint update < 50 ms; nftables ClusterIP connection
rate within 10% of direct (printed with -s, and in --benchmark-json's extra_info).
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from pathlib import Path

import pytest
import yaml

from netsim import cluster as clustermod
from netsim import probe, state, teardown, topology
from netsim.kernel import netns as nsmod
from netsim.kernel import nft, nftnl
from netsim.kubeproxy import nftables as kp
from netsim.kubeproxy.ports import Endpoint, ProxyPort

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
SERVICES, ENDPOINTS, CONNECTIONS = 1000, 10, 200


def _ports(changed: bool = False) -> list[ProxyPort]:
    ports = []
    for s in range(SERVICES):
        eps = [Endpoint(f"10.{100 + s // 250}.{s % 250}.{e + 2}", 8080) for e in range(ENDPOINTS)]
        if changed and s == SERVICES // 2:
            eps[3] = Endpoint("10.99.0.99", 8080)
        ports.append(
            ProxyPort(
                "default",
                f"svc-{s}",
                "http",
                "TCP",
                f"10.96.{s // 250}.{s % 250 + 1}",
                80,
                30000 + s,
                tuple(eps),
                10800 if s % 10 == 0 else None,
            )
        )
    return ports


@pytest.fixture
def node():
    name = f"netsim.bkp{uuid.uuid4().hex[:6]}.node"
    nsmod.create(name)
    yield name
    nsmod.remove(name)


def test_full_sync_1000_services(benchmark, node):
    """kube-proxy's first sync of a node as netsim does it, from the Services to the kernel:
    the fixed part by `nft -f`, every Service built in Python and sent as one batch."""

    def sync() -> None:
        base, batch = kp.first_sync(_ports(), "10.244.0.0/16")
        nft.apply(node, base)
        batch.commit(node)

    def setup():
        nft.apply(node, f"table ip {kp.TABLE}\ndelete table ip {kp.TABLE}\n")  # none again
        return (), {}

    benchmark.pedantic(sync, setup=setup, rounds=3, iterations=1)


def test_full_table_by_nft_alone(benchmark, node):
    """The same 1000 x 10 table as one `nft -f` text: what the first sync would cost if nft
    parsed the Services too."""

    def sync() -> None:
        nft.apply(node, kp.full(kp.compute(_ports(), "10.244.0.0/16")))

    benchmark.pedantic(sync, rounds=3, iterations=1)


def test_full_table_in_the_kernel_alone(benchmark, node):
    """The floor under the full sync: the same 1000 x 10 table sent as a netlink batch built
    in advance, so only the kernel's own work is timed (no nft parser, no Python)."""
    started = time.perf_counter()
    batch = kp.changes([], _ports(), "10.244.0.0/16")
    batch._encode()
    built = time.perf_counter() - started
    nft.apply(node, kp.full(kp.compute([], "10.244.0.0/16")))
    batch.commit(node)  # warm: the encoding is cached in the batch
    benchmark.extra_info["python_build_s"] = built
    print(f"\nbuilding the {len(batch)} messages in Python took {built:.2f} s")

    def setup():
        nft.apply(node, kp.full(kp.compute([], "10.244.0.0/16")))  # an empty table again
        return (node,), {}

    benchmark.pedantic(batch.commit, setup=setup, rounds=3, iterations=1)
    benchmark.extra_info["messages"] = len(batch)


def test_one_dnat_rule_in_the_full_table(benchmark, node):
    """What any change with a jump, goto or DNAT costs in the kernel however small: it
    re-validates every chain reachable from the NAT hooks (one rule into a spare chain)."""
    nft.apply(node, kp.full(kp.compute(_ports(), "10.244.0.0/16")))
    nft.apply(node, f"add chain ip {kp.TABLE} spare\n")
    batch = nftnl.Batch(kp.TABLE)
    batch.flush_chain("spare")
    rule = kp.Rule(
        "meta l4proto tcp dnat to 10.0.0.1:80",
        lambda: kp._dnat("tcp", Endpoint("10.0.0.1", 80)).code,
    )
    batch.add_rule("spare", rule.code, rule.text)
    benchmark.pedantic(batch.commit, args=(node,), rounds=10, iterations=1)


def test_one_endpoint_update(benchmark, node):
    """What a sync does after one endpoint changed, as a running kube-proxy does it: find the
    service ports that differ, compute their chains, send the difference as one nf_tables
    batch."""
    inputs = [_ports(), _ports(True)]
    nft.apply(node, kp.full(kp.compute(inputs[0], "10.244.0.0/16")))
    turn = [0]

    def update() -> None:
        old, new = inputs[turn[0]], inputs[turn[0] ^ 1]
        turn[0] ^= 1
        kp.changes(old, new, "10.244.0.0/16").commit(node)

    benchmark.pedantic(update, rounds=10, iterations=1)


def _cluster(backend: str):
    path = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0]["metadata"]["name"] = "bkp" + uuid.uuid4().hex[:6]
    docs[0]["spec"]["kubeProxy"] = {"mode": backend}
    model = topology.parse(yaml.safe_dump_all(docs))[0]
    clustermod.apply(model)
    return model


@pytest.fixture(scope="module", params=["nftables", "userspace"])
def kube_proxy(request):
    model = _cluster(request.param)
    yield request.param, state.load(model.name)
    teardown.delete(model.name)


def test_connection_rate(benchmark, kube_proxy):
    """CONNECTIONS fresh HTTP connections from web-0 through the Service (timed), each round
    preceded by the same number straight to its pods (timed by hand, in the untimed setup), so
    the two alternate and the ratio of their medians holds up on a noisy machine."""
    backend, record = kube_proxy
    netns = record.pods["web-0"].netns
    service = [(record.services["web"].cluster_ip, 80)]
    pods = [(p.ip, 9376) for p in record.pods.values()]
    direct: list[float] = []
    benchmark.group = "connections through a ClusterIP"

    def connect(targets: list[tuple[str, int]]) -> None:
        for i in range(CONNECTIONS):
            ip, port = targets[i % len(targets)]
            assert probe.http_get(netns, ip, port).error is None

    def straight_to_pods() -> None:
        started = time.perf_counter()
        connect(pods)
        direct.append(time.perf_counter() - started)

    benchmark.pedantic(connect, args=(service,), setup=straight_to_pods, rounds=15, iterations=1)
    ratio = benchmark.stats.stats.median / statistics.median(direct)
    benchmark.extra_info.update(
        connections_per_round=CONNECTIONS,
        backend=backend,
        direct_median_s=statistics.median(direct),
        clusterip_to_direct=ratio,
    )
    print(
        f"\n{backend}: {CONNECTIONS} connections through the ClusterIP take {ratio:.2f}x "
        f"the time straight to the pods (medians of 15 alternating rounds)"
    )
