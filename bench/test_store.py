"""Reads of the whole store: `netsim get pods` of a 10,000-pod cluster lists every pod from
etcd's /registry/pods (one range read, JSON decoded) beside what the record holds locally.

    .venv/bin/python -m pytest -s bench/test_store.py --benchmark-columns=min,median,max

Goal (issue 12): under 0.5 s.
"""

from __future__ import annotations

import json
import os

import pytest

from netsim import registry
from netsim.model import Container, Pod
from netsim.record import PodRecord

PODS = 10_000
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def test_get_pods_of_10000_from_etcd(benchmark, etcd):
    """The same read `netsim get pods` makes, and the table it prints."""
    from netsim import cli

    node_ip = "172.18.0.2"
    items = {}
    for i in range(PODS):
        pod = PodRecord(
            Pod(f"web-{i}", {"app": "web"}, (Container("web", (9376,)),), f"worker-{i // 100}"),
            f"netsim.bench.pod.web-{i}",
            f"10.{i // 60000}.{i // 250 % 240}.{i % 250 + 2}",
            f"veth{i:08x}",
        )
        items[f"{registry.PODS}default/{pod.name}"] = json.dumps(registry.pod_object(pod, node_ip))
    etcd.store.put_all(items)

    def get_pods() -> list:
        listed = registry.listed(etcd.store, registry.PODS)
        rows = [
            [o["metadata"]["name"], o["status"]["podIP"], o["spec"]["nodeName"]] for o in listed
        ]
        cli.table(rows, ["NAME", "IP", "NODE"])
        return listed

    listed = benchmark.pedantic(get_pods, rounds=5, iterations=1)
    assert len(listed) == PODS
