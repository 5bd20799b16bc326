"""The live cluster: each node's daemons watch etcd and change only their own node. A lease or
an Endpoints object written into the store by hand (etcdctl, as another host or a controller
would) reaches every node's kernel; the watch itself sees puts and deletes in order."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from ipaddress import ip_address, ip_network

import pytest
from conftest import NETSIM, ip_json, needs_root, wait_for

pytestmark = needs_root

SUBNETS = "/coreos.com/network/subnets/"


def _web(record) -> set[str]:
    """The pods of the topology's Deployment (not the cluster DNS's)."""
    return {name for name in record.pods if name.startswith("web-")}


def test_watch_sees_puts_and_deletes_from_a_revision(etcd):
    from netsim.store.client import Compacted

    store = etcd.store
    start = store.put("/w/a", "1")
    store.put("/w/b", "2")
    store.delete("/w/a")
    seen, stopped = [], threading.Event()

    def handle(revision, events):
        seen.extend((e.type, e.kv.key, e.kv.mod_revision) for e in events)
        if len(seen) == 4:
            stopped.set()

    thread = threading.Thread(
        target=lambda: store.watch("/w/", start, handle, stopped), daemon=True
    )
    thread.start()
    store.put("/w/c", "3")  # one more after the watch began: it ends the test's wait
    store.put("/x/outside", "not under the prefix")
    thread.join(10)
    assert not thread.is_alive()
    assert [(t, k) for t, k, _ in seen] == [
        ("PUT", "/w/a"),
        ("PUT", "/w/b"),
        ("DELETE", "/w/a"),
        ("PUT", "/w/c"),
    ]
    assert [r for *_, r in seen] == sorted(r for *_, r in seen)
    # a revision etcd has compacted away: the watcher must list again
    now = store.put("/w/d", "4")
    store.call("kv/compaction", {"revision": now, "physical": True})
    with pytest.raises(Compacted):
        store.watch("/w/", start, lambda *_: None, threading.Event())


def _peer_state(netns: str, subnet: str, vtep: str) -> tuple[bool, bool, bool]:
    routes = {r["dst"] for r in ip_json(netns, "route", "show")}
    arp = {n["dst"] for n in ip_json(netns, "neigh", "show", "dev", "flannel.1")}
    out = subprocess.run(
        ["bridge", "-n", netns, "-j", "fdb", "show", "dev", "flannel.1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fdb = {f.get("dst") for f in json.loads(out)}
    return subnet in routes, vtep in arp, "172.18.0.250" in fdb


def test_a_lease_written_to_etcd_reaches_every_node_and_its_removal_too(cluster):
    """What a host joining (flanneld on it takes a lease) looks like to every node."""
    from netsim import store as storemod

    cluster.apply()
    record = cluster.record()
    store = storemod.of(record.cluster, record.spec.datastore)
    lease = {
        "PublicIP": "172.18.0.250",
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "02:aa:bb:cc:dd:ee"},
    }
    for present, what in ((True, "reach the new lease's subnet"), (False, "drop it")):
        if present:
            store.put(SUBNETS + "10.244.200.0-24", json.dumps(lease))
        else:
            store.delete(SUBNETS + "10.244.200.0-24")
        for node in record.nodes.values():  # route, ARP and FDB entries: all or none
            wait_for(
                lambda n=node, p=present: (
                    _peer_state(n.netns, "10.244.200.0/24", "10.244.200.0") == (p, p, p)
                ),
                10,
                f"{node.name} to {what}",
            )
    events = cluster.netsim("get", "events", check=True).stdout
    assert "added the route to 10.244.200.0/24 via node 172.18.0.250" in events
    assert "removed the route to 10.244.200.0/24" in events
    described = cluster.netsim("describe", "node", "worker-1", check=True).stdout
    assert "/coreos.com/network/subnets/ at" in described  # among the prefixes applied


def test_an_endpoints_object_written_to_etcd_reaches_every_kube_proxy(cluster):
    """kube-proxy follows the Endpoints in the store, whoever wrote them."""
    from netsim import store as storemod
    from netsim.kernel import nft

    cluster.apply()
    record = cluster.record()
    store = storemod.of(record.cluster, record.spec.datastore)
    key = "/registry/services/endpoints/default/web"
    endpoints = store.get(key).json()
    endpoints["subsets"][0]["addresses"].append({"ip": "10.244.9.9", "nodeName": "nowhere"})
    store.put(key, json.dumps(endpoints))
    for node in record.nodes.values():
        wait_for(
            lambda n=node: "10.244.9.9" in nft.ruleset(n.netns),
            10,
            f"{node.name}'s kube-proxy to add the endpoint",
        )


def _flannel_routes(netns: str) -> set[str]:
    return {r["dst"] for r in ip_json(netns, "route", "show") if r.get("dev") == "flannel.1"}


def _nodes_doc(path: str, names: list[str]) -> None:
    """The topology file with exactly these nodes on the one segment."""
    import yaml

    docs = list(yaml.safe_load_all(open(path)))
    for doc in docs:
        if doc["kind"] == "Cluster":
            doc["spec"]["nodes"] = [{"name": n, "segment": "underlay"} for n in names]
    with open(path, "w") as fh:
        yaml.safe_dump_all(docs, fh, sort_keys=False)


def test_a_node_joins_and_serves_then_another_drains(cluster):
    cluster.apply()
    before = cluster.record()
    _nodes_doc(cluster.file, ["worker-1", "worker-2", "worker-3", "worker-4"])
    cluster.netsim("apply", "-f", cluster.file, check=True)
    record = cluster.record()
    joined = record.nodes["worker-4"]
    # nothing running moved: pods, their addresses and the other nodes' addresses
    assert {n: p.ip for n, p in record.pods.items()} == {n: p.ip for n, p in before.pods.items()}
    assert {n: h.ip for n, h in before.nodes.items()} == {
        n: record.nodes[n].ip for n in before.nodes
    }
    assert joined.ip not in {h.ip for h in record.hosts() if h is not joined}
    for node in record.nodes.values():
        others = {n.subnet for n in record.nodes.values() if n is not node}
        assert _flannel_routes(node.netns) == others, node.name
    # worker-2 drains: its pod is made again elsewhere and answers through the Service
    _nodes_doc(cluster.file, ["worker-1", "worker-3", "worker-4"])
    cluster.netsim("apply", "-f", cluster.file, check=True)
    record = cluster.record()
    assert "worker-2" not in record.nodes
    assert all(p.node != "worker-2" for p in record.pods.values())
    assert not [n for n in cluster.namespaces() if n.endswith(".worker-2")]
    for node in record.nodes.values():
        others = {n.subnet for n in record.nodes.values() if n is not node}
        assert _flannel_routes(node.netns) == others, node.name
    from netsim import probe

    client = record.pods["web-0"].netns  # fresh connections, as the README's `netsim curl`
    ip = record.services["web"].cluster_ip
    answered = {probe.http_get(client, ip, 80).body for _ in range(12)}
    assert answered == _web(record), answered
    gets = cluster.netsim("get", "nodes", check=True).stdout
    assert "worker-4" in gets and "worker-2" not in gets


def _fdb(netns: str, device: str) -> list[dict]:
    out = subprocess.run(
        ["bridge", "-n", netns, "-j", "fdb", "show", "dev", device],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def _kernel_state(netns: str, tunnel: str = "flannel.1") -> dict:
    return {
        "routes": ip_json(netns, "route", "show"),
        "neigh": ip_json(netns, "neigh", "show", "nud", "permanent"),
        "fdb": _fdb(netns, tunnel),
        "nft": _objects(netns),
    }


@pytest.mark.parametrize("source", ["calico-vxlan.yaml", "calico-bgp.yaml"])
def test_calico_nodes_join_and_leave_and_every_peer_follows(cluster, source):
    """felix (VXLAN: route, ARP and FDB entry per peer) or BIRD reconfigured by confd (BGP)
    reach a joining node's block on every peer; when a node leaves, its block, affinity and
    Node resource leave the store and every peer drops its routes."""
    from netsim import store as storemod

    bgp = source == "calico-bgp.yaml"
    cluster.apply(source=source)
    _nodes_doc(cluster.file, ["worker-1", "worker-2", "worker-3", "worker-4"])
    cluster.netsim("apply", "-f", cluster.file, check=True)

    def follows(record) -> None:
        for node in record.nodes.values():
            peers = [n for n in record.nodes.values() if n is not node]
            wanted = {b for p in peers for b in p.blocks}
            if bgp:

                def learned(netns=node.netns):
                    return {r["dst"] for r in ip_json(netns, "route", "show", "proto", "bird")}

                wait_for(lambda w=wanted, f=learned: f() == w, 20, f"BGP routes on {node.name}")
                continue
            routes = ip_json(node.netns, "route", "show", "dev", "vxlan.calico")
            assert {r["dst"] for r in routes} == wanted, node.name
            arp = ip_json(node.netns, "neigh", "show", "dev", "vxlan.calico")
            assert {(n["dst"], n["lladdr"]) for n in arp} == {
                (p.tunnel_ip, p.vtep_mac) for p in peers
            }, node.name
            fdb = _fdb(node.netns, "vxlan.calico")
            assert {(f["mac"], f["dst"]) for f in fdb} == {(p.vtep_mac, p.ip) for p in peers}

    follows(cluster.record())
    _nodes_doc(cluster.file, ["worker-1", "worker-3", "worker-4"])
    cluster.netsim("apply", "-f", cluster.file, check=True)
    record = cluster.record()
    follows(record)
    store = storemod.of(record.cluster, record.spec.datastore)
    left = store.range("/calico/", prefix=True)
    assert not [kv.key for kv in left if "worker-2" in kv.key + kv.value.decode()], left
    from netsim import probe

    client = record.pods["web-0"].netns
    ip = record.services["web"].cluster_ip
    answered = {probe.http_get(client, ip, 80).body for _ in range(12)}
    assert answered == _web(record), answered


def _objects(netns: str) -> list[str]:
    """The namespace's nftables objects, each as JSON without its handle, sorted: the same
    tables, chains, rules, sets and maps whatever order they were made in."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def bare(item):
        if isinstance(item, dict):
            return {k: bare(v) for k, v in item.items() if k != "handle"}
        if isinstance(item, list):
            return [bare(v) for v in item]
        return item

    return sorted(json.dumps(bare(o), sort_keys=True) for o in json.loads(out)["nftables"])


def test_flannel_peers_keep_a_stopped_nodes_routes_until_its_lease_expires(cluster):
    """`node stop` is a power cut: after the node-monitor grace period the node is NotReady
    and its pods leave every kube-proxy; the others keep its routes until its lease's TTL ends,
    then drop them; `node start` brings it back to exactly the kernel state it had."""
    from netsim.kernel import nft

    flannel = {"Network": "10.244.0.0/16", "SubnetLen": 24, "leaseTTL": 10}
    cluster.apply(
        cni={"mode": "flannel-vxlan", "flannel": flannel},
        controlPlane={"nodeMonitorGracePeriod": 3},
    )
    record = cluster.record()
    w1, w3 = record.nodes["worker-1"], record.nodes["worker-3"]
    gone_pod = next(
        p for p in record.pods.values() if p.node == "worker-3" and p.name.startswith("web-")
    )
    before = _kernel_state(w3.netns)
    cluster.netsim("node", "stop", "worker-3", check=True)
    assert w3.subnet in _flannel_routes(w1.netns)  # its lease is still live
    assert cluster.netsim("ping", "web-0", gone_pod.ip, "-c", "1").returncode != 0
    wait_for(
        lambda: f"dnat to {gone_pod.ip}" not in nft.ruleset(w1.netns),
        10,
        "worker-3's pod to leave worker-1's kube-proxy after the 3 s grace",
    )
    assert w3.subnet in _flannel_routes(w1.netns)  # NotReady, but its lease is not over yet
    nodes = cluster.netsim("get", "nodes", check=True).stdout
    assert next(line for line in nodes.splitlines() if "worker-3" in line).split()[1] == "NotReady"
    cluster.netsim("scale", "deployment/web", "--replicas", "5", check=True)
    assert all(p.node != "worker-3" for p in cluster.record().pods.values() if p.name > "web-2")
    cluster.netsim("scale", "deployment/web", "--replicas", "3", check=True)
    wait_for(
        lambda: w3.subnet not in _flannel_routes(w1.netns),
        15,
        "worker-1 to drop worker-3's route when its 10 s lease expired",
    )
    cluster.netsim("node", "start", "worker-3", check=True)
    wait_for(lambda: w3.subnet in _flannel_routes(w1.netns), 5, "the lease taken again")
    wait_for(
        lambda: f"dnat to {gone_pod.ip}" in nft.ruleset(w1.netns), 5, "its pod back in Services"
    )
    assert _kernel_state(w3.netns) == before
    assert cluster.netsim("ping", "web-0", "web-2", "-c", "1").returncode == 0
    events = cluster.netsim("get", "events", check=True).stdout
    assert f"removed the route to {w3.subnet}" in events
    assert "node is NotReady" in events and "node is Ready" in events
    # back after a short cut: its agent renews the lease at once, as flanneld does at start
    from netsim import store as storemod

    store = storemod.of(record.cluster, record.spec.datastore)
    cluster.netsim("node", "stop", "worker-3", check=True)
    cluster.netsim("node", "start", "worker-3", check=True)
    held = store.get("/coreos.com/network/subnets/" + w3.subnet.replace("/", "-"))
    wait_for(lambda: store.time_to_live(held.lease)[0] >= 9, 3, "the lease renewed at start")


def test_two_applies_racing_leave_every_node_as_the_store_says(cluster):
    """Applies take the cluster's lock in turn; whichever ran last, every node's kube-proxy
    ends with exactly the endpoints the store holds and every node has reported them."""
    import re

    from netsim import store as storemod
    from netsim.kernel import nft

    cluster.apply()
    racers = [
        subprocess.Popen(
            [*NETSIM, "--cluster", cluster.name, "scale", "deployment/web", "--replicas", n],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in ("5", "2", "4")
    ]
    assert all(p.wait(120) == 0 for p in racers), [p.stderr.read() for p in racers]
    record = cluster.record()
    store = storemod.of(record.cluster, record.spec.datastore)
    held = store.get("/registry/services/endpoints/default/web").json()
    wanted = {a["ip"] for s in held["subsets"] for a in s["addresses"]}
    assert wanted == {p.ip for p in record.pods.values() if p.name in _web(record)}
    for node in record.nodes.values():
        programmed = set(re.findall(r"dnat to ([\d.]+):", nft.ruleset(node.netns)))
        dns = {p.ip for p in record.pods.values() if p.pod.namespace == "kube-system"}
        assert programmed - dns == wanted, node.name


def test_calico_bgp_peers_withdraw_a_stopped_nodes_routes_after_the_hold_time(cluster):
    """A power cut sends no BGP NOTIFICATION or FIN: the peers' BIRD keep the node's block
    until their hold timer (9 s) ends, then withdraw it; `node start` brings BIRD back."""
    import time

    cluster.apply(source="calico-bgp.yaml")
    record = cluster.record()
    w1, w3 = record.nodes["worker-1"], record.nodes["worker-3"]

    def bird_routes() -> set[str]:
        return {r["dst"] for r in ip_json(w1.netns, "route", "show", "proto", "bird")}

    assert set(w3.blocks) <= bird_routes()
    cluster.netsim("node", "stop", "worker-3", check=True)
    stopped = time.monotonic()
    wait_for(lambda: not set(w3.blocks) & bird_routes(), 20, "the hold timer to withdraw")
    assert time.monotonic() - stopped > 3  # not at once: nothing told the peers
    cluster.netsim("node", "start", "worker-3", check=True)
    wait_for(lambda: set(w3.blocks) <= bird_routes(), 20, "worker-3's block announced again")
    assert cluster.netsim("ping", "web-0", "web-2", "-c", "1").returncode == 0


def test_fresh_connections_survive_a_node_joining_and_another_draining(cluster):
    """Continuous fresh connections to the Service from a pod on a node that stays, while
    worker-4 joins and worker-3 drains: at least 99.9% are answered."""
    import time

    from netsim import probe

    cluster.apply(replicas=6)
    record = cluster.record()
    client = next(
        p for p in record.pods.values() if p.node == "worker-1" and p.name.startswith("web-")
    )
    ip = record.services["web"].cluster_ip
    results: list[str | None] = []
    stop = threading.Event()

    def connect() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            results.append(probe.http_get(client.netns, ip, 80, timeout=2).error)

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        time.sleep(0.5)
        _nodes_doc(cluster.file, ["worker-1", "worker-2", "worker-3", "worker-4"])
        cluster.netsim("apply", "-f", cluster.file, check=True)
        time.sleep(0.5)
        _nodes_doc(cluster.file, ["worker-1", "worker-2", "worker-4"])
        cluster.netsim("apply", "-f", cluster.file, check=True)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
    failed = [e for e in results if e]
    print(f"\n{len(results) - len(failed)} of {len(results)} connections answered")
    assert len(results) > 100 and len(failed) <= 0.001 * len(results), failed[:5]
    assert {p.node for p in cluster.record().pods.values()} == {"worker-1", "worker-2", "worker-4"}


@pytest.mark.parametrize(
    ("source", "tunnel"),
    [("flannel-vxlan.yaml", "flannel.1"), ("calico-vxlan.yaml", "vxlan.calico")],
)
def test_an_agent_killed_is_restarted_by_apply_and_resyncs_to_the_same_kernel_state(
    cluster, source, tunnel
):
    """kill -9 of a node's agent (its daemons and pods' servers die with it); the next apply
    starts it again, its daemons list the store and watch, and its node's kernel is exactly
    as it was; its pod answers again."""
    import os
    import signal

    from netsim import probe

    cluster.apply(source=source)
    record = cluster.record()
    node = record.nodes["worker-2"]
    before = _kernel_state(node.netns, tunnel)
    os.kill(node.agent.pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{node.agent.pid}/status"), 5, "the agent to die")
    result = cluster.netsim("apply", "-f", cluster.file, check=True)
    assert "agent of worker-2 (restarted)" in result.stdout + result.stderr or (
        "the agent of node worker-2 was not running" in result.stdout + result.stderr
    )
    assert cluster.record().nodes["worker-2"].agent.pid != node.agent.pid
    assert _kernel_state(node.netns, tunnel) == before
    pod = next(
        p for p in record.pods.values() if p.node == "worker-2" and p.name.startswith("web-")
    )
    answer = probe.http_get(record.pods["web-0"].netns, pod.ip, 9376)
    assert answer.body == pod.name, answer


def test_a_dead_nodes_deployment_pods_are_made_again_elsewhere_after_the_eviction_timeout(
    cluster,
):
    """NotReady after the 2 s grace, then the 3 s eviction timeout: the node controller
    taints worker-3 and its Deployment's pod is made again on a Ready node, answering through
    the Service; back Ready, the taint goes and new pods may land on it again."""
    from netsim import probe

    cluster.apply(
        source="calico-vxlan.yaml",
        controlPlane={"nodeMonitorGracePeriod": 2, "podEvictionTimeout": 3},
    )
    record = cluster.record()
    lost = next(
        p.name for p in record.pods.values() if p.node == "worker-3" and p.name.startswith("web-")
    )
    cluster.netsim("node", "stop", "worker-3", check=True)
    wait_for(  # (while it is remade, the record has it in neither place)
        lambda: cluster.record().pods.get(lost, record.pods[lost]).node != "worker-3",
        30,
        f"{lost} to be made again on another node",
    )
    after = cluster.record()
    assert after.nodes["worker-3"].evicted
    assert after.pods[lost].ip != record.pods[lost].ip  # a new pod, from its new node's block
    ip = after.services["web"].cluster_ip
    answered = {probe.http_get(after.pods["web-0"].netns, ip, 80).body for _ in range(12)}
    assert answered == _web(after), answered
    events = cluster.netsim("get", "events", check=True).stdout
    assert f"evicted 1 pod(s), made again elsewhere: {lost}" in events, events
    assert "taint removed" not in events
    cluster.netsim("node", "start", "worker-3", check=True)
    wait_for(lambda: not cluster.record().nodes["worker-3"].evicted, 10, "the taint removed")
    assert "Ready again: taint removed" in cluster.netsim("get", "events", check=True).stdout
    # its kubelet deleted what it had of the pod, not the pod made again elsewhere
    assert not os.listdir(f"/run/netsim/{cluster.name}/nodes/worker-3/pods")
    moved = cluster.record().pods[lost]
    assert probe.http_get(after.pods["web-0"].netns, moved.ip, 9376).body == lost
    cluster.netsim("scale", "deployment/web", "--replicas", "6", check=True)
    assert "worker-3" in {p.node for p in cluster.record().pods.values()}


def test_the_kubelet_makes_the_pods_bound_to_its_node_and_deletes_those_unbound(cluster):
    """A pod bound by hand in etcd (as a scheduler would) is made by its node's kubelet: its
    namespace, address and veth, published as its status, and it answers; unbound, the
    kubelet deletes it and frees its address."""
    from netsim import probe
    from netsim import store as storemod

    cluster.apply(replicas=1)
    record = cluster.record()
    store = storemod.of(record.cluster, record.spec.datastore)
    netns = f"netsim.{cluster.name}.pod.byhand"
    hostname = {"name": "hostname", "argv": None}  # the agent's hostname server
    spec = {"netns": netns, "ports": [9376], "containers": [hostname], "via": "in-process"}
    store.put("/netsim.dev/kubelet/worker-2/byhand", json.dumps(spec))
    status_key = "/netsim.dev/pods/worker-2/byhand"
    wait_for(lambda: store.get(status_key) is not None, 10, "the kubelet's status")
    status = store.get(status_key).json()
    assert status["node"] == "worker-2" and status["netns"] == netns
    node = record.nodes["worker-2"]
    assert ip_address(status["ip"]) in ip_network(node.subnet)  # from the node's own subnet
    links = {link["ifname"] for link in ip_json(node.netns, "link", "show")}
    assert status["veth"] in links
    answer = probe.http_get(record.pods["web-0"].netns, status["ip"], 9376)
    assert answer.body == "byhand", answer
    ipam = f"/run/netsim/{cluster.name}/nodes/worker-2/ipam/cbr0/{status['ip']}"
    assert open(ipam).read().split()[0] == "byhand"  # host-local's file: the container ID
    store.delete("/netsim.dev/kubelet/worker-2/byhand")
    wait_for(lambda: store.get(status_key) is None, 10, "the kubelet deleting it")
    assert netns not in cluster.namespaces()
    assert status["veth"] not in {link["ifname"] for link in ip_json(node.netns, "link", "show")}
    assert not os.path.exists(ipam)


def test_a_kubelet_killed_in_the_middle_of_an_add_leaves_nothing_its_successor_trips_on(cluster):
    """A checkpoint still marked `making` (its kubelet died during the ADD, after the
    namespace and veth were made): the restarted kubelet deletes what it left (veth,
    namespace, address) and makes the pod again, which answers; one veth of it remains."""
    import signal

    from netsim import probe

    cluster.apply()
    record = cluster.record()
    node = record.nodes["worker-2"]
    pod = next(
        p for p in record.pods.values() if p.node == "worker-2" and p.name.startswith("web-")
    )
    os.kill(node.agent.pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{node.agent.pid}/status"), 5, "the agent to die")
    path = f"/run/netsim/{cluster.name}/nodes/worker-2/pods/{pod.name}.json"
    checkpoint = json.load(open(path))
    with open(path, "w") as fh:
        json.dump({**checkpoint, "making": True}, fh)
    old_inode = os.stat(f"/run/netns/{pod.netns}").st_ino
    cluster.netsim("apply", "-f", cluster.file, check=True)
    assert "making" not in json.load(open(path))
    assert os.stat(f"/run/netns/{pod.netns}").st_ino != old_inode  # made again
    veths = [link["ifname"] for link in ip_json(node.netns, "link", "show")]
    assert veths.count(pod.veth) == 1
    after = cluster.record().pods[pod.name]  # as its kubelet published it again
    answer = probe.http_get(record.pods["web-0"].netns, after.ip, 9376)
    assert answer.body == pod.name, answer
    ip = record.services["web"].cluster_ip  # and its Service's endpoints follow
    answered = {probe.http_get(record.pods["web-0"].netns, ip, 80).body for _ in range(12)}
    assert answered == _web(record), answered
