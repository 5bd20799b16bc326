"""Calico's IPAM in a real etcd: the keys and values Calico keeps (read back with etcdctl, not
netsim's client), claims that never overlap between threads or processes, allocate/release
round trips, and the compare-and-swap that replays a session's changes over another writer's."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import needs_root

from cni.calico_ipam import BlockStore, IpamError
from netsim.store.client import Store, StoreError

pytestmark = needs_root
POOL = "192.168.0.0/16"
BLOCK = "/calico/ipam/v2/assignment/ipv4/block/"


def blocks(etcd, tmp_path: Path) -> BlockStore:
    return BlockStore(etcd.store, POOL, 26, lock_dir=str(tmp_path / "locks"))


def etcdctl_json(etcd, key: str):
    out = etcd.etcdctl("get", key, "--print-value-only")
    return json.loads(out) if out.strip() else None


def test_keys_and_values_are_calicos(etcd, tmp_path):
    store = blocks(etcd, tmp_path)
    with store.session():
        tunnel, block = store.allocate(
            "n1", "vxlan-tunnel-addr-n1", "vxlan.calico", attrs={"type": "vxlanTunnelAddress"}
        )
        pod, _ = store.allocate(
            "n1", "k8s-pod-network.c1", "eth0", attrs={"namespace": "default", "pod": "web-0"}
        )
    assert (tunnel, pod, block) == ("192.168.0.0", "192.168.0.1", "192.168.0.0/26")
    value = etcdctl_json(etcd, BLOCK + "192.168.0.0-26")
    assert value["cidr"] == "192.168.0.0/26" and value["affinity"] == "host:n1"
    assert value["allocations"][:3] == [0, 1, None] and len(value["allocations"]) == 64
    assert value["unallocated"] == list(range(2, 64))
    assert value["attributes"] == [
        {
            "handle_id": "vxlan-tunnel-addr-n1",
            "secondary": {"node": "n1", "type": "vxlanTunnelAddress"},
        },
        {
            "handle_id": "k8s-pod-network.c1",
            "secondary": {"namespace": "default", "node": "n1", "pod": "web-0"},
        },
    ]
    assert value["deleted"] is False and value["sequenceNumber"] == 1
    assert value["sequenceNumberForAllocation"] == {"0": 0, "1": 0}
    affinity = etcdctl_json(etcd, "/calico/ipam/v2/host/n1/ipv4/block/192.168.0.0-26")
    assert affinity == {"state": "confirmed", "deleted": False}
    handle = etcdctl_json(etcd, "/calico/ipam/v2/handle/k8s-pod-network.c1")
    assert handle == {"block": {"192.168.0.0/26": 1}, "deleted": False}
    config = etcdctl_json(etcd, "/calico/ipam/v2/config")
    assert config["strict_affinity"] is False and config["auto_allocate_blocks"] is True


def test_allocate_release_round_trip(etcd, tmp_path):
    store = blocks(etcd, tmp_path)
    with store.session():
        ips = [store.allocate("n1", f"h{i}", "eth0")[0] for i in range(66)]  # a second block
    assert ips[0] == "192.168.0.0" and ips[63] == "192.168.0.63" and ips[64] == "192.168.0.64"
    assert store.blocks_of("n1") == ["192.168.0.0/26", "192.168.0.64/26"]
    assert store.affinity() == {"192.168.0.0/26": "n1", "192.168.0.64/26": "n1"}
    with store.session():
        assert store.release("n1", "h1", "eth0") == ["192.168.0.1"]
        assert store.release("n1", "h1", "eth0") == []  # nothing held: no error
        store.release_ip("n1", "192.168.0.2")
    value = etcdctl_json(etcd, BLOCK + "192.168.0.0-26")
    assert len(value["attributes"]) == 62  # unused attributes are dropped, as Calico does
    assert value["unallocated"] == [1, 2]
    assert etcd.etcdctl("get", "/calico/ipam/v2/handle/h1") == ""  # its last address went
    with store.session():
        held = dict(store.allocations("n1"))
        assert "192.168.0.1" not in held and "192.168.0.2" not in held and len(held) == 64
        assert store.allocate("n1", "h-next", "eth0")[0] == "192.168.0.1"
        assert store.allocate("n1", "h-want", "eth0", "192.168.0.2")[0] == "192.168.0.2"
        with pytest.raises(IpamError, match="already allocated"):
            store.allocate("n1", "h-again", "eth0", "192.168.0.2")
        with pytest.raises(IpamError, match="not in a block of node n1"):
            store.allocate("n1", "h-far", "eth0", "10.0.0.1")


def test_a_freed_address_is_handed_out_last(etcd, tmp_path):
    """Calico appends a freed ordinal to unallocated: a new pod does not get an address that
    a pod just gave back while others are free."""
    store = blocks(etcd, tmp_path)
    with store.session():
        assert [store.allocate("n1", h, "eth0")[0] for h in "abc"] == [
            "192.168.0.0",
            "192.168.0.1",
            "192.168.0.2",
        ]
    with store.session():
        store.release("n1", "a", "eth0")
    with store.session():
        assert store.allocate("n1", "d", "eth0")[0] == "192.168.0.3"


def test_threads_claiming_at_once_never_share_a_block(etcd, tmp_path):
    def claim(node):
        store = blocks(etcd, tmp_path)
        with store.session():
            return [store.claim(node) for _ in range(5)]

    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(claim, [f"n{i}" for i in range(8)]))
    every = [b for node in claimed for b in node]
    assert len(every) == len(set(every)) == 40
    owners = blocks(etcd, tmp_path).affinity()
    assert {b: owners[b] for b in claimed[3]} == dict.fromkeys(claimed[3], "n3")


CLAIMER = """
import json, sys
from cni.calico_ipam import BlockStore
from netsim.store.client import Store
store = BlockStore(Store([sys.argv[1]], sys.argv[2]), "192.168.0.0/16", 26, lock_dir=sys.argv[4])
with store.session():
    print(json.dumps([store.claim(sys.argv[3]) for _ in range(10)]))
"""


def test_processes_claiming_at_once_never_share_a_block(etcd, tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, etcd.url, etcd.netns, f"p{i}", str(tmp_path / "l")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    claimed = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    every = [b for node in claimed for b in node]
    assert len(every) == len(set(every)) == 40


def test_a_session_replays_its_changes_over_another_writers(etcd, tmp_path):
    """Another writer changed the block after this session read it: the session's write loses
    the compare-and-swap, reads the block again, and puts its own addresses on it."""
    first, second = blocks(etcd, tmp_path), blocks(etcd, tmp_path / "other")
    with first.session():
        first.allocate("n1", "a", "eth0")
    with first.session():
        assert first.allocate("n1", "b", "eth0")[0] == "192.168.0.1"
        with second.session():  # another host's lock directory: not serialised with this one
            second.release("n1", "a", "eth0")
            assert second.allocate("n1", "c", "eth0", "192.168.0.5")[0] == "192.168.0.5"
    with first.session():
        assert sorted(first.allocations("n1")) == [("192.168.0.1", "b"), ("192.168.0.5", "c")]
    with pytest.raises(IpamError, match="192.168.0.2 was given to y by another writer"):
        with first.session():
            first.allocate("n1", "x", "eth0")
            with second.session():
                second.allocate("n1", "y", "eth0")


def test_an_unreachable_store_is_a_store_error(etcd, tmp_path):
    nowhere = Store(["http://127.0.0.1:9"], etcd.netns, timeout=1)  # nothing listens there
    store = BlockStore(nowhere, POOL, 26, str(tmp_path))
    with pytest.raises(StoreError, match="etcd is not reachable"):
        with store.session():
            store.allocate("n1", "h", "eth0")


def _cluster(etcd, **calico):
    from types import SimpleNamespace

    from netsim.model import CalicoSpec, Datastore

    return SimpleNamespace(
        name="ipamtest",
        datastore=Datastore(endpoints=(etcd.url,), netns=etcd.netns),
        pod_network=POOL,
        subnet_len=26,
        mtu=1500,
        nodes=[SimpleNamespace(name=n) for n in ("n1", "n2")],
        calico=CalicoSpec(**calico),
    )


def test_the_mode_plans_blocks_and_tunnel_addresses_in_etcd(etcd, tmp_path):
    """Each node's first block, its first address the tunnel's (under Calico's tunnel handle);
    the CNI config tells the plugin where etcd is instead of a directory."""
    from types import SimpleNamespace

    from netsim.modes import get

    mode = get("calico-vxlan")
    cluster = _cluster(etcd, vxlan_mode="Always")
    plan = mode.plan_nodes(cluster, str(tmp_path))
    assert {n: (p["blocks"], p["tunnel_ip"]) for n, p in plan.items()} == {
        "n1": (["192.168.0.0/26"], "192.168.0.0"),
        "n2": (["192.168.0.64/26"], "192.168.0.64"),
    }
    handle = etcdctl_json(etcd, "/calico/ipam/v2/handle/vxlan-tunnel-addr-n2")
    assert handle == {"block": {"192.168.0.64/26": 1}, "deleted": False}
    block = etcdctl_json(etcd, BLOCK + "192.168.0.64-26")
    assert block["attributes"][0]["secondary"] == {"node": "n2", "type": "vxlanTunnelAddress"}
    ipam = mode.ipam(cluster, str(tmp_path), SimpleNamespace(name="n1", netns=None))
    with ipam.session():
        assert ipam.allocate("web-0", "eth0") == "192.168.0.1"
    node = SimpleNamespace(name="n1", netns="netsim.ipamtest.n1", tunnel_ip="192.168.0.0")
    conf = mode.cni_config(cluster, node, str(tmp_path), "")
    assert conf["ipam"] == {
        "type": "netsim-calico-ipam",
        "etcdEndpoints": [etcd.url],
        "etcdNetns": etcd.netns,
        "dataDir": f"{tmp_path}/calico-ipam",
    }
    assert mode.new_blocks(cluster, str(tmp_path), SimpleNamespace(nodes={})) == {}


def test_store_keys_are_calicos_v3_resources(etcd):
    from types import SimpleNamespace

    from netsim.modes import get

    cluster = _cluster(etcd, ipip_mode="CrossSubnet", reflectors=("n1",))
    node = dict(prefixlen=24, segment="rack1", tunnel_ip="")
    record = SimpleNamespace(
        nodes={
            "n1": SimpleNamespace(ip="10.0.0.2", **{**node, "tunnel_ip": "192.168.0.0"}),
            "n2": SimpleNamespace(ip="10.0.0.3", **node),
        },
        clients={
            "tor1": SimpleNamespace(ip="10.0.0.254", segment="rack1", asn=65001),
            "client": SimpleNamespace(ip="10.0.0.253", segment="rack1", asn=0),
        },
    )
    keys = get("calico-ipip").store_keys(cluster, record)
    etcd.store.put_all(keys)
    v3 = "/calico/resources/v3/projectcalico.org/"
    assert sorted(k[len(v3) :] for k in keys) == [
        "bgpconfigurations/default",
        "bgppeers/peer-with-route-reflectors",
        "bgppeers/tor1",
        "ippools/default-ipv4-ippool",
        "nodes/n1",
        "nodes/n2",
    ]
    pool = etcdctl_json(etcd, v3 + "ippools/default-ipv4-ippool")
    assert pool["kind"] == "IPPool" and pool["apiVersion"] == "projectcalico.org/v3"
    assert pool["metadata"] == {"name": "default-ipv4-ippool"}
    assert pool["spec"] == {
        "cidr": POOL,
        "blockSize": 26,
        "ipipMode": "CrossSubnet",
        "vxlanMode": "Never",
        "natOutgoing": True,
        "nodeSelector": "all()",
    }
    n1 = etcdctl_json(etcd, v3 + "nodes/n1")
    assert n1["spec"] == {
        "bgp": {
            "ipv4Address": "10.0.0.2/24",
            "ipv4IPIPTunnelAddr": "192.168.0.0",
            "routeReflectorClusterID": "10.0.0.2",
        }
    }
    assert n1["metadata"]["labels"]["route-reflector"] == "true"
    assert etcdctl_json(etcd, v3 + "nodes/n2")["spec"] == {"bgp": {"ipv4Address": "10.0.0.3/24"}}
    config = etcdctl_json(etcd, v3 + "bgpconfigurations/default")["spec"]
    assert config["nodeToNodeMeshEnabled"] is False and config["asNumber"] == 64512
    tor = etcdctl_json(etcd, v3 + "bgppeers/tor1")["spec"]
    assert tor == {
        "nodeSelector": "netsim.io/segment == 'rack1'",
        "peerIP": "10.0.0.254",
        "asNumber": 65001,
    }
