"""The tc eBPF IPIP carrier between two throwaway nodes, each with one Calico-style pod:
pods reach each other, the underlay carries standard IPIP (protocol 4), and detach leaves no
filter, qdisc or pin behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Capture, ip_batch, needs_root

from netsim.kernel import ipip_bpf
from netsim.kernel import netns as nsmod

pytestmark = [
    needs_root,
    pytest.mark.skipif(
        ipip_bpf.toolchain_missing() is not None, reason=ipip_bpf.toolchain_missing() or ""
    ),
    pytest.mark.skipif(
        shutil.which("bpftool") is None,
        reason="the carrier is loaded with bpftool: apt-get install bpftool",
    ),
]

NODE_A, NODE_B = "10.99.0.2", "10.99.0.3"
POD_A, POD_B = "192.168.10.2", "192.168.20.2"
BLOCK_A, BLOCK_B = "192.168.10.0/26", "192.168.20.0/26"
POD_MTU = 1480  # underlay 1500 - 20, as Calico sets for IPIP
HOST_MAC = "ee:ee:ee:ee:ee:ee"


@dataclass
class Topology:
    node_a: str
    node_b: str
    pod_a: str
    pod_b: str

    @property
    def all(self) -> list[str]:
        return [self.pod_a, self.pod_b, self.node_a, self.node_b]


def in_ns(netns: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, **kw
    )


def wire_pod(node: str, pod: str, host_if: str, pod_ip: str) -> None:
    """Calico's pod wiring: /32 in the pod, default via 169.254.1.1, host side ee:ee:ee:ee:ee:ee
    with proxy ARP. These nodes have no default route for proxy ARP to answer from, so the pod
    gets the gateway's neighbour entry up front."""
    ip_batch(
        node,
        f"link add {host_if} mtu {POD_MTU} address {HOST_MAC} type veth peer name eth0 netns {pod}",
        f"link set {host_if} up",
        f"route add {pod_ip}/32 dev {host_if} scope link",
    )
    ip_batch(
        pod,
        "link set lo up",
        f"link set eth0 mtu {POD_MTU} up",
        f"addr add {pod_ip}/32 dev eth0",
        "route add 169.254.1.1 dev eth0 scope link",
        "route add default via 169.254.1.1 dev eth0",
        f"neigh add 169.254.1.1 lladdr {HOST_MAC} dev eth0 nud permanent",
    )
    in_ns(
        node,
        "sysctl",
        "-qw",
        f"net.ipv4.conf.{host_if}.proxy_arp=1",
        f"net.ipv4.neigh.{host_if}.proxy_delay=0",
        check=True,
    )


def build_topology(prefix: str) -> Topology:
    topo = Topology(f"{prefix}nodea", f"{prefix}nodeb", f"{prefix}poda", f"{prefix}podb")
    for name in topo.all:
        nsmod.create(name)
    ip_batch(topo.node_a, f"link add eth0 type veth peer name eth0 netns {topo.node_b}")
    for node, addr, peer, block in (
        (topo.node_a, NODE_A, NODE_B, BLOCK_B),
        (topo.node_b, NODE_B, NODE_A, BLOCK_A),
    ):
        # Calico's IPIP route, with the underlay device in place of tunl0
        ip_batch(
            node,
            "link set lo up",
            f"addr add {addr}/24 dev eth0",
            "link set eth0 up",
            f"route add {block} via {peer} dev eth0 onlink",
        )
        in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
    wire_pod(topo.node_a, topo.pod_a, "cali0a", POD_A)
    wire_pod(topo.node_b, topo.pod_b, "cali0b", POD_B)
    return topo


def attach_carriers(topo: Topology, obj: str) -> None:
    ipip_bpf.attach(topo.node_a, "eth0", obj, NODE_A)
    ipip_bpf.add_peer(topo.node_a, BLOCK_B, NODE_B)
    ipip_bpf.attach(topo.node_b, "eth0", obj, NODE_B)
    ipip_bpf.add_peer(topo.node_b, BLOCK_A, NODE_A)


@pytest.fixture
def topo(tmp_path):
    """Two nodes with a pod each and the carrier attached; removed whatever happens."""
    prefix = f"netsim.tbpf{uuid.uuid4().hex[:8]}."
    made: Topology | None = None
    try:
        obj = ipip_bpf.build(str(tmp_path / "bpf"))
        made = build_topology(prefix)
        attach_carriers(made, obj)
        yield made
    finally:
        for node in (f"{prefix}nodea", f"{prefix}nodeb"):
            with contextlib.suppress(Exception):
                ipip_bpf.detach(node, "eth0")
        for name in nsmod.names():
            if name.startswith(prefix):
                nsmod.remove(name)
        for name in ipip_bpf.pinned_namespaces():  # pins outlive their namespace
            if name.startswith(prefix):
                ipip_bpf.remove_pins(name)


def tc_state(netns: str) -> str:
    out = [
        in_ns(netns, "tc", "filter", "show", "dev", "eth0", d, check=True).stdout
        for d in ("egress", "ingress")
    ]
    qdiscs = in_ns(netns, "tc", "qdisc", "show", "dev", "eth0", check=True).stdout
    return "".join(out) + ("clsact" if "clsact" in qdiscs else "")


def test_pods_talk_over_standard_ipip(topo: Topology, tmp_path: Path):
    from scapy.layers.inet import ICMP, IP

    assert ipip_bpf.peers(topo.node_a) == {BLOCK_B: NODE_B}
    assert ipip_bpf.peer_nodes(topo.node_b) == {NODE_A: 1}
    assert "ipip_egress" in tc_state(topo.node_a) and "ipip_ingress" in tc_state(topo.node_a)

    dump = Capture(topo.node_b, "eth0", "ip", tmp_path / "nodeb-eth0.pcap")
    ping = in_ns(topo.pod_a, "ping", "-c", "3", "-W", "1", "-i", "0.2", POD_B)
    packets = dump.stop(expect=6)  # 3 requests, 3 replies
    assert ping.returncode == 0, ping.stdout + ping.stderr

    outer = [p[IP] for p in packets if IP in p and p[IP].proto == 4]
    requests = [
        p
        for p in outer
        if (p.src, p.dst) == (NODE_A, NODE_B)
        and ICMP in p
        and (p[IP:2].src, p[IP:2].dst) == (POD_A, POD_B)
        and p[ICMP].type == 8
    ]
    replies = [
        p
        for p in outer
        if (p.src, p.dst) == (NODE_B, NODE_A)
        and ICMP in p
        and (p[IP:2].src, p[IP:2].dst) == (POD_B, POD_A)
        and p[ICMP].type == 0
    ]
    assert len(requests) == 3 and len(replies) == 3, [p.summary() for p in outer]
    for packet in requests + replies:
        assert packet.ttl == 64 and packet.ihl == 5
        assert packet.len == 20 + packet[IP:2].len
        recomputed = IP(bytes(packet))
        del recomputed.chksum
        assert IP(bytes(recomputed)).chksum == packet.chksum, "bad outer checksum"
    # no pod address travels the underlay unencapsulated
    assert not [
        p for p in packets if IP in p and p[IP].proto != 4 and POD_A in (p[IP].src, p[IP].dst)
    ]

    for node in (topo.node_a, topo.node_b):
        assert ipip_bpf.detach(node, "eth0")
        assert not os.path.exists(ipip_bpf.pin_dir(node))
        assert node not in ipip_bpf.pinned_namespaces()
        assert tc_state(node) == ""
        assert not ipip_bpf.detach(node, "eth0")  # idempotent


def test_peer_bookkeeping(topo: Topology):
    node = topo.node_a
    ipip_bpf.add_peer(node, "192.168.30.0/26", NODE_B)
    ipip_bpf.add_peer(node, "192.168.40.0/26", "10.99.0.4")
    assert ipip_bpf.peer_nodes(node) == {NODE_B: 2, "10.99.0.4": 1}
    ipip_bpf.add_peer(node, "192.168.40.0/26", NODE_B)  # re-pointed to another node
    assert ipip_bpf.peer_nodes(node) == {NODE_B: 3}
    assert not ipip_bpf.remove_peer(node, "192.168.30.0/27", NODE_B)  # only covered
    assert not ipip_bpf.remove_peer(node, "192.168.30.0/26", "10.99.0.4")  # other node
    assert ipip_bpf.remove_peer(node, "192.168.30.0/26", NODE_B)
    assert ipip_bpf.remove_peer(node, "192.168.40.0/26", NODE_B)
    assert ipip_bpf.peers(node) == {BLOCK_B: NODE_B}
    assert ipip_bpf.peer_nodes(node) == {NODE_B: 1}


def iperf(topo: Topology, seconds: int = 3) -> float:
    """Gbit/s from pod A to pod B over one TCP stream."""
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            topo.pod_b,
            "iperf3",
            "-s",
            "-1",
            "--forceflush",
        ],  # else piped output waits in a buffer
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in server.stdout or ():
            if "Server listening" in line:
                break
        else:
            raise AssertionError("iperf3 server did not start")
        client = in_ns(
            topo.pod_a, "iperf3", "-c", POD_B, "-t", str(seconds), "-J", timeout=seconds + 30
        )
        assert client.returncode == 0, client.stdout + client.stderr
        return json.loads(client.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.terminate()
        server.communicate(timeout=10)


@pytest.mark.skipif(
    not os.environ.get("NETSIM_IPERF"),
    reason="throughput is printed, not asserted: set NETSIM_IPERF=1 to run",
)
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_throughput_vs_plain_routing(topo: Topology, capsys):
    with_bpf = iperf(topo)
    for node in (topo.node_a, topo.node_b):
        ipip_bpf.detach(node, "eth0")
    plain = iperf(topo)  # the same routes, now forwarded natively
    with capsys.disabled():
        print(
            f"\npod->pod TCP: IPIP eBPF carrier {with_bpf:.2f} Gbit/s, "
            f"plain routing {plain:.2f} Gbit/s"
        )
