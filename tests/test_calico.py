"""Calico's data planes and flannel's udp backend in real namespaces: the kernel state a Calico
user expects inside a node, pods reaching each other, and the wire format decoded by scapy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import TOPOLOGIES, capture, ip_json, needs_root, run_netsim, wait_for
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.vxlan import VXLAN

from netsim import topology
from netsim.errors import TopologyError
from netsim.kernel import features, ipip_bpf

pytestmark = needs_root


def apply(cluster, source: str, replicas: int = 3, edit=None, cni: str = "") -> dict:
    cluster.write(source, replicas=replicas)
    if edit:
        Path(cluster.file).write_text(edit(Path(cluster.file).read_text()))
    run_netsim("apply", "-f", cluster.file, *(["--cni", cni] if cni else []), check=True)
    return cluster.record()


def node_ns(record: dict, node: str) -> str:
    return record.nodes[node].netns


def ping(record: dict, src: str, dst: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", record.pods[src].netns, "ping", "-c1", "-W2", record.pods[dst].ip],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def pinger(record: dict, src: str, dst: str):
    return lambda: ping(record, src, dst)


def test_calico_vxlan_kernel_state_and_wire(cluster):
    record = apply(cluster, "calico-vxlan.yaml")
    w1, w2 = record.nodes["worker-1"], record.nodes["worker-2"]
    ns = w1.netns
    link = ip_json(ns, "-d", "link", "show", "vxlan.calico")[0]
    data = link["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["learning"], link["mtu"]) == (4096, 4789, False, 1450)
    assert data["local"] == w1.ip
    addrs = ip_json(ns, "addr", "show", "vxlan.calico")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
        (w1.tunnel_ip, 32)
    ]
    assert w1.blocks == ["192.168.0.0/26"] and w1.tunnel_ip == "192.168.0.0"
    neigh = ip_json(ns, "neigh", "show", "dev", "vxlan.calico")
    assert {"dst": w2.tunnel_ip, "lladdr": w2.vtep_mac, "state": ["PERMANENT"]} in [
        {k: n[k] for k in ("dst", "lladdr", "state")} for n in neigh
    ]
    fdb = subprocess.run(
        ["bridge", "-n", ns, "fdb", "show", "dev", "vxlan.calico"], capture_output=True, text=True
    ).stdout
    assert f"{w2.vtep_mac} dst {w2.ip} self permanent" in fdb
    routes = ip_json(ns, "route")
    assert {
        "dst": "192.168.0.64/26",
        "gateway": w2.tunnel_ip,
        "dev": "vxlan.calico",
        "protocol": "80",
        "flags": ["onlink"],
    } in routes
    assert {"type": "blackhole", "dst": "192.168.0.0/26", "protocol": "80", "flags": []} in routes
    pod = record.pods["web-0"]
    assert {"dst": pod.ip, "dev": pod.veth, "scope": "link", "flags": []} in routes
    cali = ip_json(ns, "link", "show", pod.veth)[0]
    assert cali["address"] == "ee:ee:ee:ee:ee:ee" and pod.veth.startswith("cali")
    assert len(pod.veth) == 15
    inside = {(r["dst"], r.get("gateway")) for r in ip_json(pod.netns, "route")}
    assert inside == {("default", "169.254.1.1"), ("169.254.1.1", None)}
    peer_pod = next(p for p in record.pods.values() if p.node == "worker-2")
    peer_name = next(n for n, p in record.pods.items() if p is peer_pod)
    packets = capture(
        w2.netns, "eth0", "udp port 4789", pinger(record, "web-0", peer_name), count=2
    )
    vx = [p for p in packets if p.haslayer(VXLAN)]
    assert vx, "no VXLAN packet reached worker-2's eth0"
    first = vx[0]
    assert (first[IP].src, first[IP].dst, first[UDP].dport) == (w1.ip, w2.ip, 4789)
    assert first[VXLAN].vni == 4096
    inner = first[VXLAN].payload[IP]
    assert (inner.src, inner.dst) == (pod.ip, peer_pod.ip) and inner.haslayer(ICMP)


CARRIERS = [
    pytest.param(
        "kernel",
        marks=pytest.mark.skipif(
            not features.link_kinds().get("ipip"), reason="this kernel has no ipip module"
        ),
    ),
    pytest.param(
        "ebpf",
        marks=pytest.mark.skipif(
            not ipip_bpf.available(), reason=str(ipip_bpf.unavailable_reason())
        ),
    ),
    "userspace",
]


@pytest.mark.parametrize("carrier", CARRIERS)
def test_calico_ipip_carrier_puts_protocol_4_on_the_wire(cluster, carrier):
    record = apply(
        cluster,
        "calico-ipip.yaml",
        edit=lambda t: t.replace(
            "ipipMode: Always", f"ipipMode: Always\n      ipipCarrier: {carrier}"
        ),
    )
    w1, w2 = record.nodes["worker-1"], record.nodes["worker-2"]
    assert w1.carrier == carrier
    device = "eth0" if carrier == "ebpf" else "tunl0"
    assert {
        "dst": "192.168.0.64/26",
        "gateway": w2.ip,
        "dev": device,
        "protocol": "80",
        "flags": ["onlink"],
    } in ip_json(w1.netns, "route")
    if carrier != "ebpf":
        assert ip_json(w1.netns, "link", "show", "tunl0")[0]["mtu"] == 1480
    tunnel_on = "lo" if carrier == "ebpf" else "tunl0"  # the node's tunnel address, a /32
    assert (w1.tunnel_ip, 32) in {
        (a["local"], a["prefixlen"])
        for a in ip_json(w1.netns, "addr", "show", tunnel_on)[0]["addr_info"]
        if a["family"] == "inet"
    }
    assert {r["dst"] for r in ip_json(w1.netns, "route", "show", "type", "blackhole")} == set(
        w1.blocks
    )
    assert ip_json(record.pods["web-0"].netns, "link", "show", "eth0")[0]["mtu"] == 1480
    dst = next(n for n, p in record.pods.items() if p.node == "worker-2")
    packets = capture(w2.netns, "eth0", "ip proto 4", pinger(record, "web-0", dst), count=2)
    assert packets, "no protocol-4 packet reached worker-2's eth0"
    outer = packets[0][IP]
    assert (outer.src, outer.dst, outer.proto) == (w1.ip, w2.ip, 4)
    inner = outer.payload
    assert (inner.src, inner.dst) == (record.pods["web-0"].ip, record.pods[dst].ip)
    described = cluster.netsim("describe", "node", "worker-1", check=True).stdout
    assert f"carrier: {carrier}" in described


def across_racks(record: dict, wire_filter: str) -> tuple[dict, list]:
    """worker-1's route to a block in its own rack (worker-2) and in the other (worker-3),
    checking the first is native and that pod traffic within the rack crosses eth0 bare;
    returns the other route and what a ping to worker-3's pod put on worker-3's eth0."""
    w1, w2, w3 = (record.nodes[f"worker-{i}"] for i in (1, 2, 3))
    routes = ip_json(w1.netns, "route")
    same_rack = next(r for r in routes if r["dst"] == w2.blocks[0])
    assert (same_rack["gateway"], same_rack["dev"]) == (w2.ip, "eth0")
    on = {p.node: n for n, p in record.pods.items()}
    bare = capture(
        w2.netns, "eth0", "icmp", pinger(record, on["worker-1"], on["worker-2"]), count=2
    )
    assert bare and bare[0][IP].src == record.pods[on["worker-1"]].ip
    other_rack = next(r for r in routes if r["dst"] == w3.blocks[0])
    wrapped = capture(
        w3.netns, "eth0", wire_filter, pinger(record, on["worker-1"], on["worker-3"]), count=2
    )
    assert wrapped, f"nothing matching {wire_filter!r} reached worker-3 from the other rack"
    assert (wrapped[0][IP].src, wrapped[0][IP].dst) == (w1.ip, w3.ip)  # via the router
    ping(record, on["worker-4"], on["worker-1"])
    return other_rack, wrapped


def test_crosssubnet_encapsulates_only_between_racks(cluster):
    record = apply(cluster, "calico-crosssubnet.yaml", replicas=4)
    other_rack, wrapped = across_racks(record, "udp port 4789")
    w3 = record.nodes["worker-3"]
    assert (other_rack["gateway"], other_rack["dev"]) == (w3.tunnel_ip, "vxlan.calico")
    assert wrapped[0][VXLAN].vni == 4096


@pytest.mark.parametrize("carrier", CARRIERS)
def test_ipip_crosssubnet_across_racks(cluster, carrier):
    """ipipMode CrossSubnet on two racks: native within a rack, protocol 4 between racks,
    the outer packet routed by the router. eth0 (the eBPF carrier) must resolve its next hop
    on its own link, so a peer in the other rack is reached via the rack's router."""
    record = apply(
        cluster,
        "calico-crosssubnet.yaml",
        replicas=4,
        edit=lambda t: t.replace("mode: calico-vxlan", "mode: calico-ipip").replace(
            "vxlanMode: CrossSubnet", f"ipipMode: CrossSubnet\n      ipipCarrier: {carrier}"
        ),
    )
    w1, w3 = record.nodes["worker-1"], record.nodes["worker-3"]
    assert w1.carrier == carrier
    other_rack, _ = across_racks(record, "ip proto 4")
    assert (other_rack["gateway"], other_rack["dev"], other_rack["flags"]) == (
        w1.gateway if carrier == "ebpf" else w3.ip,
        "eth0" if carrier == "ebpf" else "tunl0",
        ["onlink"],
    )


@pytest.mark.parametrize("cni", ["", "exec"])
def test_a_full_block_makes_the_node_claim_another(cluster, cni):
    """Blocks of /29: the tunnel address and 7 pods fill worker-1's first block; the 8th pod
    comes from a second block, which gets a blackhole on worker-1 and routes on its peers —
    also when the plugin executable (`--cni exec`) claimed the block."""

    def pin(text: str) -> str:
        return text.replace("blockSize: 26", "blockSize: 29").replace(
            "    spec:\n      containers:", "    spec:\n      nodeName: worker-1\n      containers:"
        )

    record = apply(cluster, "calico-vxlan.yaml", replicas=8, edit=pin, cni=cni)
    w1 = record.nodes["worker-1"]
    assert w1.blocks == ["192.168.0.0/29", "192.168.0.24/29"]
    blackholes = {r["dst"] for r in ip_json(w1.netns, "route", "show", "type", "blackhole")}
    assert blackholes == {"192.168.0.0/29", "192.168.0.24/29"}
    last = max(record.pods.values(), key=lambda p: tuple(map(int, p.ip.split("."))))
    assert last.ip == "192.168.0.24"
    w2 = node_ns(record, "worker-2")
    assert "192.168.0.24/29" in {r["dst"] for r in ip_json(w2, "route")}
    done = subprocess.run(
        ["ip", "netns", "exec", w2, "ping", "-c1", "-W2", last.ip], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


def test_flannel_udp_carries_pods_in_udp_8285(cluster):
    record = apply(cluster, "flannel-udp.yaml")
    w1, w2 = record.nodes["worker-1"], record.nodes["worker-2"]
    flannel0 = ip_json(w1.netns, "addr", "show", "flannel0")[0]
    assert flannel0["mtu"] == 1472
    assert {"dst": "10.244.0.0/16", "dev": "flannel0"}.items() <= next(
        r for r in ip_json(w1.netns, "route") if r["dst"] == "10.244.0.0/16"
    ).items()
    dst = next(n for n, p in record.pods.items() if p.node == "worker-2")
    packets = capture(w2.netns, "eth0", "udp port 8285", pinger(record, "web-0", dst), count=2)
    assert packets, "no UDP 8285 datagram reached worker-2's eth0"
    first = packets[0]
    assert (first[IP].src, first[IP].dst, first[UDP].dport) == (w1.ip, w2.ip, 8285)
    inner = IP(bytes(first[UDP].payload))
    assert (inner.src, inner.dst) == (record.pods["web-0"].ip, record.pods[dst].ip)


BASE = """apiVersion: netsim.dev/v1alpha1
kind: Cluster
metadata: {name: t}
spec:
  cni:
    mode: MODE
    calico: CALICO
  underlay: {segments: [{name: lan, subnet: 172.18.0.0/24}]}
  nodes: [{name: n1}, {name: n2}]
"""


def parse(mode: str, calico: str):
    return topology.parse(BASE.replace("MODE", mode).replace("CALICO", calico), "c.yaml")


@pytest.mark.parametrize(
    "mode,calico,field,words",
    [
        (
            "calico-vxlan",
            "{ipPool: {cidr: 172.18.0.0/16}}",
            "spec.cni.calico.ipPool.cidr",
            "overlaps 172.18.0.0/24",
        ),
        (
            "calico-vxlan",
            "{ipPool: {blockSize: 19}}",
            "spec.cni.calico.ipPool.blockSize",
            "block size 19 is out of range",
        ),
        (
            "calico-bgp",
            "{bgp: {asNumber: 0}}",
            "spec.cni.calico.bgp.asNumber",
            "AS number 0 is out of range",
        ),
        (
            "calico-bgp",
            "{bgp: {routeReflectors: [n9]}}",
            "spec.cni.calico.bgp.routeReflectors[0]",
            "'n9' is not a node",
        ),
        ("calico-ipip", "{ipipCarrier: magic}", "spec.cni.calico.ipipCarrier", "unknown carrier"),
        (
            "calico-vxlan",
            "{ipPool: {vxlanMode: Never}}",
            "spec.cni.calico.ipPool.vxlanMode",
            "carries nothing",
        ),
    ],
)
def test_bad_calico_input_names_the_field(mode, calico, field, words):
    with pytest.raises(TopologyError) as info:
        parse(mode, calico)
    assert info.value.field == field and words in str(info.value), str(info.value)


def test_crosssubnet_on_one_segment_is_a_warning():
    cluster, notes = parse("calico-vxlan", "{ipPool: {vxlanMode: CrossSubnet}}")
    assert cluster.calico.vxlan_mode == "CrossSubnet"
    assert any("CrossSubnet with a single underlay segment" in n for n in notes)


def test_calico_bgp_across_segments_is_a_warning():
    text = (
        (TOPOLOGIES / "calico-crosssubnet.yaml")
        .read_text()
        .replace("mode: calico-vxlan", "mode: calico-bgp")
        .replace("vxlanMode: CrossSubnet", "")
    )
    notes = topology.parse(text)[1]
    assert any("calico-bgp across underlay segments" in n and "CrossSubnet" in n for n in notes), (
        notes
    )
    assert not any(
        "across underlay segments" in n
        for n in topology.parse((TOPOLOGIES / "calico-bgp.yaml").read_text())[1]
    )


def learned(netns: str) -> set[tuple[str, str]]:
    """Routes BIRD installed, as (block, via); each must leave through the underlay's eth0."""
    routes = ip_json(netns, "route", "show", "proto", "bird")
    assert all(r["dev"] == "eth0" for r in routes), routes
    return {(r["dst"], r["gateway"]) for r in routes}


def test_calico_bgp_full_mesh_and_a_stopped_bird(cluster):
    from netsim.bgp import bird
    from netsim.kernel import proc

    record = apply(cluster, "calico-bgp.yaml")
    nodes = record.nodes
    for name, node in nodes.items():
        expected = {(p.blocks[0], p.ip) for n, p in nodes.items() if n != name}
        assert learned(node.netns) == expected
    status = cluster.netsim("bgp", "status", check=True).stdout
    assert status.count("Established") == 6
    on = {p.node: n for n, p in record.pods.items()}
    bare = capture(
        nodes["worker-2"].netns,
        "eth0",
        "icmp",
        pinger(record, on["worker-1"], on["worker-2"]),
        count=2,
    )
    assert bare and bare[0][IP].dst == record.pods[on["worker-2"]].ip  # no tunnel
    # worker-3's BIRD stops: its block leaves the others' tables; a new BIRD brings it back
    w3 = nodes["worker-3"]
    proc.stop([(w3.bird.pid, w3.bird.start)])
    w1 = nodes["worker-1"].netns
    wait_for(
        lambda: (w3.blocks[0], w3.ip) not in learned(w1),
        10,
        "worker-3's block withdrawn from worker-1",
        interval=0.1,
    )
    with open(os.path.join(w3.bird.dir, "bird.conf")) as fh:
        config = fh.read()
    pid, start = bird.start(w3.netns, w3.bird.dir, config)
    try:
        wait_for(
            lambda: (w3.blocks[0], w3.ip) in learned(w1),
            10,
            "worker-3's block back on worker-1",
            interval=0.1,
        )
    finally:
        proc.stop([(pid, start)])


def test_route_reflector_and_top_of_rack_peer(cluster):
    record = apply(cluster, "calico-bgp-rr.yaml", replicas=4)
    nodes = record.nodes
    w2, w3 = nodes["worker-2"], nodes["worker-3"]
    # worker-2 peers only with the reflector, yet learns worker-3's block with worker-3 as hop
    assert (w3.blocks[0], w3.ip) in learned(w2.netns)
    status = cluster.netsim("bgp", "status", check=True).stdout.splitlines()
    w2_peers = {line.split()[1] for line in status[1:] if line.split()[0] == "worker-2"}
    assert w2_peers == {"worker-1", "tor"}
    tor = record.clients["tor"]
    assert learned(tor.netns) == {(n.blocks[0], n.ip) for n in nodes.values()}
    on = {p.node: n for n, p in record.pods.items()}
    ping(record, on["worker-2"], on["worker-3"])


def test_no_ipip_carrier_at_all_says_what_to_install(monkeypatch):
    from netsim.modes import calico_ipip

    monkeypatch.setattr(features, "link_kinds", lambda: {"ipip": False})
    monkeypatch.setattr(ipip_bpf, "available", lambda: False)
    monkeypatch.setattr(
        ipip_bpf,
        "unavailable_reason",
        lambda: "the IPIP eBPF carrier needs clang: apt-get install clang",
    )
    real_exists = os.path.exists
    monkeypatch.setattr(
        calico_ipip.os.path, "exists", lambda p: False if p == "/dev/net/tun" else real_exists(p)
    )
    carrier, why = calico_ipip.choose_carrier()
    assert carrier == ""
    assert "modprobe ipip" in why and "apt-get install clang" in why and "modprobe tun" in why


def test_doctor_names_the_ipip_carrier_this_host_uses():
    from netsim.modes.calico_ipip import choose_carrier

    done = run_netsim("doctor", check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("calico-ipip"))
    carrier, why = choose_carrier()
    assert f"carrier {carrier}: {why}" in line
    kinds = {
        x.split()[0]: x.split()[1]
        for x in done.stdout.splitlines()
        if len(x.split()) == 2 and x.split()[1] in ("yes", "MISSING")
    }
    assert kinds["ipip"] == ("yes" if features.link_kinds().get("ipip") else "MISSING")
