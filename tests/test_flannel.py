"""flannel vxlan and host-gw end to end: real namespaces, real packets, the exact kernel state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import (
    ROOT,
    agent_pids,
    assert_nothing_left,
    ip_json,
    needs_root,
    netns_cookie,
    run_netsim,
)

from netsim import state
from netsim.kernel import nft, sysctl

pytestmark = needs_root


def _pod_on_other_node(record: dict, pod: str) -> str:
    node = record.pods[pod].node
    return next(p for p, e in record.pods.items() if e.node != node)


def test_vxlan_cluster_kernel_state_and_traffic(cluster):
    cluster.apply()
    record = cluster.record()
    nodes = record.nodes
    assert [n.subnet for n in nodes.values()] == ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    w1, w2 = nodes["worker-1"], nodes["worker-2"]

    link = ip_json(w1.netns, "-d", "link", "show", "flannel.1")[0]
    vx = link["linkinfo"]["info_data"]
    assert (vx["id"], vx["port"], vx["learning"], vx["local"]) == (1, 8472, False, w1.ip)
    assert link["mtu"] == 1450 and link["address"] == w1.vtep_mac
    addrs = ip_json(w1.netns, "addr", "show", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
        ("10.244.1.0", 32)
    ]

    neigh = ip_json(w1.netns, "neigh", "show", "dev", "flannel.1")
    assert {"dst": "10.244.2.0", "lladdr": w2.vtep_mac, "state": ["PERMANENT"]} in [
        {k: n[k] for k in ("dst", "lladdr", "state")} for n in neigh
    ]
    fdb = json.loads(os.popen(f"bridge -n {w1.netns} -j fdb show dev flannel.1").read())
    entry = next(f for f in fdb if f["mac"] == w2.vtep_mac)
    assert entry["dst"] == w2.ip and entry["state"] == "permanent" and "self" in entry["flags"]
    routes = ip_json(w1.netns, "route", "show", "10.244.2.0/24")
    assert routes == [
        {"dst": "10.244.2.0/24", "gateway": "10.244.2.0", "dev": "flannel.1", "flags": ["onlink"]}
    ]

    cni0 = ip_json(w1.netns, "addr", "show", "cni0")[0]
    assert cni0["mtu"] == 1450
    assert ("10.244.1.1", 24) in [(a["local"], a["prefixlen"]) for a in cni0["addr_info"]]
    pod = record.pods["web-0"]
    port = ip_json(w1.netns, "-d", "link", "show", pod.veth)[0]
    assert port["master"] == "cni0" and port["linkinfo"]["info_slave_data"]["hairpin"] is True
    pod_routes = {r["dst"]: r.get("gateway") for r in ip_json(pod.netns, "route")}
    assert pod_routes["default"] == "10.244.1.1" and pod_routes["10.244.0.0/16"] == "10.244.1.1"
    assert ip_json(pod.netns, "link", "show", "eth0")[0]["mtu"] == 1450
    assert sysctl.get_in(w1.netns, "net.ipv4.ip_forward") == "1"
    assert "FLANNEL-POSTRTG" in nft.ruleset(w1.netns)

    node_dir = state.node_dir(cluster.name, "worker-1")
    assert open(f"{node_dir}/subnet.env").read() == (
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )
    from netsim import store

    lease = store.of(cluster.name, record.spec.datastore).get(
        "/coreos.com/network/subnets/10.244.1.0-24"
    )
    assert lease.json() == {
        "PublicIP": w1.ip,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": w1.vtep_mac},
    }

    other = _pod_on_other_node(record, "web-0")
    ping = cluster.netsim("ping", "web-0", other)
    assert ping.returncode == 0 and "0% loss" in ping.stdout, ping.stdout + ping.stderr
    curl = cluster.netsim("curl", "web-0", f"http://{other}:9376/", "--count", "2")
    assert curl.returncode == 0 and curl.stdout.split() == ["1:", other, "2:", other]


def test_host_gw_routes_via_peer_node_ip(cluster):
    cluster.write("flannel-host-gw.yaml")
    run_netsim("apply", "-f", cluster.file, check=True)
    record = cluster.record()
    w1, w2 = record.nodes["worker-1"], record.nodes["worker-2"]
    routes = ip_json(w1.netns, "route", "show", w2.subnet)
    assert routes == [{"dst": w2.subnet, "gateway": w2.ip, "dev": "eth0", "flags": []}]
    assert not ip_json(w1.netns, "link", "show", "type", "vxlan")
    assert ip_json(record.pods["web-0"].netns, "link", "show", "eth0")[0]["mtu"] == 1500
    ping = cluster.netsim("ping", "web-0", _pod_on_other_node(record, "web-0"))
    assert ping.returncode == 0, ping.stdout + ping.stderr


def _kernel_view(record: dict) -> dict:
    """Everything an apply could change, read from every namespace of the cluster."""
    view = {}
    for entry in [
        *record.nodes.values(),
        *record.pods.values(),
        *record.clients.values(),
        record.underlay,
    ]:
        ns = entry.netns
        links = [
            {k: link.get(k) for k in ("ifindex", "ifname", "mtu", "address", "flags", "master")}
            for link in ip_json(ns, "link")
        ]
        addrs = [
            (
                a["ifname"],
                [(i["local"], i["prefixlen"]) for i in a["addr_info"] if i["family"] == "inet"],
            )
            for a in ip_json(ns, "addr")
        ]
        view[ns] = (
            links,
            addrs,
            ip_json(ns, "route"),
            ip_json(ns, "neigh", "show", "nud", "permanent"),
        )
    return view


def test_second_apply_changes_nothing_and_scaling_changes_only_the_difference(cluster):
    cluster.apply()
    before, inodes = _kernel_view(cluster.record()), _netns_ids(cluster.record())
    again = cluster.apply()
    assert "unchanged" in again.stdout
    assert _kernel_view(cluster.record()) == before

    cluster.apply(replicas=5)
    record = cluster.record()
    assert sorted(p for p in record.pods if p.startswith("web")) == [f"web-{i}" for i in range(5)]
    assert {p: i for p, i in _netns_ids(record).items() if p in inodes} == inodes
    assert cluster.netsim("curl", "web-4", "http://web-3:9376/").stdout.strip() == "web-3"

    cluster.apply(replicas=2)
    record = cluster.record()
    assert sorted(p for p in record.pods if p.startswith("web")) == ["web-0", "web-1"]
    dns = "kube-system.coredns-0"  # the cluster DNS stays where it is
    assert _netns_ids(record) == {p: inodes[p] for p in ("web-0", "web-1", dns)}
    assert sorted(n.split(".pod.")[1] for n in cluster.namespaces() if ".pod." in n) == [
        dns,
        "web-0",
        "web-1",
    ]
    for node in record.nodes.values():  # removed pods' host veths are gone at once
        vethnames = {
            link["ifname"] for link in ip_json(node.netns, "link", "show", "master", "cni0")
        }
        assert vethnames == {
            p.veth
            for p in record.pods.values()
            if p.netns and p.node == node.netns.rsplit(".", 1)[1]
        }
    ipam_files = sorted(
        f
        for n in record.nodes
        for f in os.listdir(f"{state.node_dir(cluster.name, n)}/ipam/cbr0")
        if f[0].isdigit()
    )
    assert ipam_files == sorted(p.ip for p in record.pods.values())


def _netns_ids(record: dict) -> dict[str, int]:
    """Each pod's namespace cookie: a pod made again gets a new one (its nsfs inode number may
    be reused)."""
    return {p: netns_cookie(e.netns) for p, e in record.pods.items()}


def test_delete_leaves_nothing(cluster):
    cluster.apply()
    assert agent_pids(cluster.name)
    result = run_netsim("delete", "-f", cluster.file, check=True)
    assert "deleted" in result.stdout
    assert_nothing_left(cluster)


# Root loads the interpreter and netsim's CLI, then becomes nobody and runs the verb: nobody
# itself may not be able to read the repository (under /root, mode 0700, on a fresh machine).
AS_NOBODY = """
import os, pwd, sys
from netsim import cli
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("verb", [["get", "pods"], ["apply", "-f", "x.yaml"]])
def test_non_root_gets_one_clear_line(verb):
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *verb], capture_output=True, text=True, cwd=ROOT
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "netsim: must run as root (it creates network namespaces): sudo netsim ...\n"
    )


def test_pod_containers_share_the_pod_namespace(cluster):
    cluster.write()
    extra = """---
apiVersion: v1
kind: Pod
metadata:
  name: sidecar
spec:
  nodeName: worker-2
  containers:
    - name: hostname
    - name: sleeper
      command: ["sleep", "300"]
"""
    with open(cluster.file, "a") as fh:
        fh.write(extra)
    run_netsim("apply", "-f", cluster.file, check=True)
    pod = cluster.record().pods["sidecar"]
    (pid,) = pod.pids
    assert open(f"/proc/{pid}/cmdline").read().split("\0")[0] == "sleep"
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{pod.netns}").st_ino
    assert cluster.netsim("curl", "web-0", "http://sidecar:9376/").stdout.strip() == "sidecar"
    run_netsim("delete", "-f", cluster.file, check=True)
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
