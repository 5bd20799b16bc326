"""The cluster's state in a real etcd: netsim's own on the master, or the user's. Read back
with etcdctl (not netsim's client): flannel's config and leases with their TTL, the /registry
objects; an external etcd used and none started; an unreachable one refused before any kernel
change; etcd stopped mid-apply and the next apply converging; the renewal of a short lease."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess

import pytest
from conftest import etcd_pids, ip_json, needs_root, run_netsim, wait_for

from netsim.kernel import nft, proc

pytestmark = needs_root

FLANNEL = {"mode": "flannel-vxlan", "flannel": {"Network": "10.244.0.0/16", "SubnetLen": 24}}


def etcdctl(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "etcdctl", *argv],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout


def test_flannel_config_leases_and_registry_as_etcdctl_reads_them(cluster):
    cluster.apply()
    record = cluster.record()
    master = record.master.netns
    config = json.loads(etcdctl(master, "get", "/coreos.com/network/config", "--print-value-only"))
    assert config == {
        "Network": "10.244.0.0/16",
        "SubnetLen": 24,
        "SubnetMin": "10.244.1.0",
        "SubnetMax": "10.244.255.0",
        "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472},
    }
    # a node reads the same store over the underlay, as flanneld reaches etcd
    node = record.nodes["worker-2"]
    out = etcdctl(
        node.netns,
        "--endpoints",
        f"http://{record.master.ip}:2379",
        "get",
        "--prefix",
        "/coreos.com/network/subnets/",
        "-w",
        "json",
    )
    leases = json.loads(out)["kvs"]
    assert len(leases) == len(record.nodes)
    by_ip = {}
    for kv in leases:
        value = json.loads(base64.b64decode(kv["value"]))
        by_ip[value["PublicIP"]] = (kv, value)
    for n in record.nodes.values():
        kv, value = by_ip[n.ip]
        key = base64.b64decode(kv["key"]).decode()
        assert key == "/coreos.com/network/subnets/" + n.subnet.replace("/", "-")
        mac = ip_json(n.netns, "link", "show", "flannel.1")[0]["address"]
        assert value["BackendType"] == "vxlan"
        assert value["BackendData"] == {"VNI": 1, "VtepMAC": mac}
        ttl = etcdctl(master, "lease", "timetolive", format(int(kv["lease"]), "x"))
        granted = int(ttl.split("granted with TTL(")[1].split("s)")[0])
        remaining = int(ttl.split("remaining(")[1].split("s)")[0])
        assert granted == 86400 and 86000 < remaining <= 86400, ttl
    pods = etcdctl(master, "get", "--prefix", "/registry/pods/", "--print-value-only").split()
    from netsim.model import object_key

    stored = {
        object_key(p["metadata"]["namespace"], p["metadata"]["name"]): p
        for p in map(json.loads, pods)
    }
    assert {n: p["status"]["podIP"] for n, p in stored.items()} == {
        n: p.ip for n, p in record.pods.items()
    }
    listed = json.loads(cluster.netsim("get", "pods", "-o", "json", check=True).stdout)["items"]
    assert {i["name"]: i["ip"] for i in listed} == {
        n: p.ip for n, p in record.pods.items() if p.pod.namespace == "default"
    }
    etcd = record.master.etcd
    cluster.netsim("delete", "-f", cluster.file, check=True)
    assert etcd_pids(cluster.name) == [] and not proc.alive(etcd.pid, etcd.start)


def test_a_short_lease_is_renewed_by_the_node_agent(cluster):
    cni = {**FLANNEL, "flannel": {**FLANNEL["flannel"], "leaseTTL": 10}}
    cluster.apply(replicas=1, cni=cni)
    record = cluster.record()
    master, node = record.master.netns, record.nodes["worker-1"]
    lease = format(node.lease, "x")
    for name in record.nodes:  # two of the three nodes have no pod: they renew all the same
        log = f"/run/netsim/{cluster.name}/nodes/{name}/agent.log"
        wait_for(  # at its start, as flanneld does, then before each TTL ends
            lambda log=log: open(log).read().count("renewed") >= 2,
            15,
            f"{name} renewing its lease twice",
        )
    ttl = etcdctl(master, "lease", "timetolive", lease)
    assert "granted with TTL(10s)" in ttl and "remaining(" in ttl, ttl
    key = "/coreos.com/network/subnets/" + node.subnet.replace("/", "-")
    value = etcdctl(master, "get", key, "--print-value-only").strip()  # past its first TTL
    assert value
    # the lease ends (as if the node had been away too long): its agent takes the subnet again
    etcdctl(master, "lease", "revoke", lease)
    assert etcdctl(master, "get", key, "--print-value-only").strip() == ""
    wait_for(
        lambda: etcdctl(master, "get", key, "--print-value-only").strip() == value,
        15,
        "worker-1's agent taking its lease again",
    )
    log = f"/run/netsim/{cluster.name}/nodes/worker-1/agent.log"
    wait_for(lambda: "taken again" in open(log).read(), 5, "the agent's log of it")  # after the put


def test_an_external_etcd_is_used_and_none_started(cluster, etcd):
    datastore = {"etcd": {"endpoints": [etcd.url], "netns": etcd.netns}}
    cluster.apply(replicas=2, datastore=datastore)
    assert not any(n.endswith(".master") for n in cluster.namespaces())
    assert etcd_pids(cluster.name) == []
    keys = etcd.etcdctl("get", "--prefix", "/", "--keys-only").split()
    assert "/coreos.com/network/config" in keys
    assert sum(k.startswith("/registry/pods/default/") for k in keys) == 2
    assert (
        "the user's etcd at http://127.0.0.1:2379"
        in cluster.netsim("describe", "cluster", check=True).stdout
    )
    assert cluster.netsim("ping", "web-0", "web-1", "-c", "1").returncode == 0
    cluster.netsim("delete", "-f", cluster.file, check=True)
    assert etcd.etcdctl("get", "--prefix", "/", "--keys-only").split() == []


def test_an_unreachable_etcd_is_one_line_before_any_kernel_change(cluster, etcd):
    cluster.write(datastore={"etcd": {"endpoints": ["http://127.0.0.1:2999"], "netns": etcd.netns}})
    result = run_netsim("apply", "-f", cluster.file)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if not line.startswith("netsim: ignoring")]
    assert len(lines) == 1 and "http://127.0.0.1:2999" in lines[0], result.stderr
    assert "not reachable" in lines[0] and "Traceback" not in result.stderr
    assert cluster.namespaces() == []


def test_etcd_stopped_mid_apply_then_the_next_apply_converges(cluster, etcd):
    datastore = {"etcd": {"endpoints": [etcd.url], "netns": etcd.netns}}
    cluster.apply(replicas=2, datastore=datastore)
    etcd.stop()
    cluster.write(replicas=3, datastore=datastore)
    failed = run_netsim("apply", "-f", cluster.file)
    assert failed.returncode != 0 and "not reachable" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    pods = sorted(p for p in cluster.record().pods if p.startswith("web"))
    assert pods == ["web-0", "web-1"]  # undone, record unchanged
    assert not any(n.endswith(".pod.web-2") for n in cluster.namespaces())
    etcd.restart()
    run_netsim("apply", "-f", cluster.file, check=True)
    keys = etcd.etcdctl("get", "--prefix", "/registry/pods/default/", "--keys-only").split()
    assert sorted(keys) == [f"/registry/pods/default/web-{i}" for i in range(3)]
    assert cluster.netsim("ping", "web-0", "web-2", "-c", "1").returncode == 0


def test_netsims_own_etcd_killed_comes_back_with_its_data(cluster):
    cluster.apply(replicas=2)
    record = cluster.record()
    os.kill(record.master.etcd.pid, signal.SIGKILL)
    wait_for(lambda: etcd_pids(cluster.name) == [], 5, "etcd to die")
    result = run_netsim("apply", "-f", cluster.file, check=True)
    assert "etcd was not running: starting it again" in result.stdout + result.stderr
    assert len(etcd_pids(cluster.name)) == 1
    keys = etcdctl(cluster.record().master.netns, "get", "--prefix", "/", "--keys-only").split()
    assert sum(k.startswith("/coreos.com/network/subnets/") for k in keys) == 3
    assert sum(k.startswith("/registry/pods/default/") for k in keys) == 2
    assert run_netsim("apply", "-f", cluster.file, check=True).stdout.count("unchanged") == 1
    # the nodes' daemons lost their watches with etcd, listed again and watch on: a change
    # reaches every node (the scale waits for every node's report)
    cluster.netsim("scale", "deployment/web", "--replicas", "3", check=True)
    ips = [p.ip for p in cluster.record().pods.values()]
    for node in cluster.record().nodes.values():
        table = nft.ruleset(node.netns)
        assert all(f"dnat to {ip}:" in table for ip in ips), node.name


@pytest.mark.parametrize(
    "field, value, phrase",
    [
        ("endpoints", ["https://10.0.0.5:2379"], "TLS and names are not supported"),
        ("endpoints", ["10.0.0.5"], "is not an etcd client URL"),
    ],
)
def test_datastore_fields_are_checked(cluster, field, value, phrase):
    cluster.write(datastore={"etcd": {field: value}})
    result = run_netsim("apply", "-f", cluster.file)
    assert result.returncode == 2 and f"spec.datastore.etcd.{field}[0]" in result.stderr
    assert phrase in result.stderr and cluster.namespaces() == []


def test_keys_lost_from_the_store_are_restored_by_the_next_apply(cluster):
    """A key deleted behind netsim's back (or lost with etcd's data) is written again, a
    flannel lease under a new etcd lease its node's agent then renews."""
    cluster.apply(replicas=1)
    record = cluster.record()
    master = record.master.netns
    gone = "/coreos.com/network/subnets/" + record.nodes["worker-3"].subnet.replace("/", "-")
    for key in ("/coreos.com/network/config", gone, "/registry/pods/default/web-0"):
        etcdctl(master, "del", key)
    result = run_netsim("apply", "-f", cluster.file, check=True)
    assert "unchanged" not in result.stdout, result.stdout
    for key in ("/coreos.com/network/config", gone, "/registry/pods/default/web-0"):
        assert etcdctl(master, "get", key, "--print-value-only").strip(), key
    assert run_netsim("apply", "-f", cluster.file, check=True).stdout.count("unchanged") == 1


def test_an_etcd_holding_another_clusters_state_is_refused(cluster, etcd):
    etcd.store.put("/netsim.dev/cluster", '{"name": "someone-else"}')
    cluster.write(datastore={"etcd": {"endpoints": [etcd.url], "netns": etcd.netns}})
    result = run_netsim("apply", "-f", cluster.file)
    assert result.returncode != 0 and "holds cluster someone-else's state" in result.stderr
    assert cluster.namespaces() == []
    etcd.store.delete("/netsim.dev/cluster")
    etcd.store.put("/registry/pods/default/x", "{}")
    result = run_netsim("apply", "-f", cluster.file)
    assert "already holds keys under /registry/" in result.stderr and cluster.namespaces() == []


def test_a_watch_stream_is_cut_into_its_lines_across_pieces():
    from netsim.store.client import _lines

    pieces = [b'{"a":', b'1}\n{"b"', b":2}\n\n", b'{"c":3}\n{"d":4}']
    assert list(_lines(iter(pieces))) == [b'{"a":1}', b'{"b":2}', b"", b'{"c":3}', b'{"d":4}']
    assert list(_lines(iter([b"x\n"]))) == [b"x"]
    assert list(_lines(iter([]))) == []
