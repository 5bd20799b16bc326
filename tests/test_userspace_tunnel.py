"""The userspace encapsulators between two throwaway nodes, each with one pod: pods reach each
other through tunl0 (IPIP) and flannel0 (flannel udp), the underlay carries the standard wire
format, packets from unknown outer sources are dropped, and close() removes the TUN device."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import Capture, ip_batch, needs_root, wait_for

from netsim.kernel import netns as nsmod
from netsim.kernel.netlink import Rtnl
from netsim.userspace_tunnel import FLANNEL_UDP_PORT, Tunnel, default_mtu

NODE_A, NODE_B, STRANGER = "10.88.0.2", "10.88.0.3", "10.88.0.9"
IPIP_NETS = ("192.168.1", "192.168.2")  # Calico-style blocks, one per node (/24 for brevity)
UDP_NETS = ("10.244.1", "10.244.2")  # flannel subnets of 10.244.0.0/16


@dataclass
class Nodes:
    node_a: str
    node_b: str
    pod_a: str
    pod_b: str
    net_a: str
    net_b: str

    @property
    def all(self) -> list[str]:
        return [self.pod_a, self.pod_b, self.node_a, self.node_b]

    @property
    def pod_a_ip(self) -> str:
        return f"{self.net_a}.2"

    @property
    def pod_b_ip(self) -> str:
        return f"{self.net_b}.2"


def in_ns(netns: str, *argv: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout, **kw
    )


def build(prefix: str, nets: tuple[str, str], pod_mtu: int) -> Nodes:
    """Two nodes on one veth 'underlay', forwarding on, each with a pod behind a veth whose
    MTU is the tunnel's (as the CNI plugin sets it)."""
    nodes = Nodes(f"{prefix}nodea", f"{prefix}nodeb", f"{prefix}poda", f"{prefix}podb", *nets)
    for name in nodes.all:
        nsmod.create(name)
    ip_batch(nodes.node_a, f"link add eth0 type veth peer name eth0 netns {nodes.node_b}")
    for node, pod, addr, net in (
        (nodes.node_a, nodes.pod_a, NODE_A, nodes.net_a),
        (nodes.node_b, nodes.pod_b, NODE_B, nodes.net_b),
    ):
        ip_batch(
            node,
            "link set lo up",
            f"addr add {addr}/24 dev eth0",
            "link set eth0 up",
            f"link add veth0 mtu {pod_mtu} type veth peer name eth0 netns {pod}",
            f"addr add {net}.1/24 dev veth0",
            "link set veth0 up",
        )
        ip_batch(
            pod,
            "link set lo up",
            f"link set eth0 mtu {pod_mtu} up",
            f"addr add {net}.2/24 dev eth0",
            f"route add default via {net}.1",
        )
        in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
    return nodes


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique namespace prefix; every namespace under it is removed afterwards."""
    name = f"netsim.tut{uuid.uuid4().hex[:8]}."
    yield name
    for ns in nsmod.names():
        if ns.startswith(name):
            nsmod.remove(ns)
    assert not [ns for ns in nsmod.names() if ns.startswith(name)]


def ping(src_ns: str, dst: str) -> subprocess.CompletedProcess:
    return in_ns(src_ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst)


def link_exists(netns: str, name: str) -> bool:
    with Rtnl(netns) as rtnl:
        return rtnl.link(name) is not None


def iperf3(nodes: Nodes) -> float:
    """TCP throughput pod A -> pod B over 3 s, in Gbit/s (server ended by its PID)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", nodes.pod_b, "iperf3", "-s", "-1", "-B", nodes.pod_b_ip],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                in_ns(nodes.pod_b, "ss", "-Hltn", "sport = :5201").stdout
                or server.poll() is not None
            ),
            15,
            "the iperf3 server listens",
        )
        if server.poll() is not None:
            raise AssertionError(f"iperf3 server did not listen: {server.communicate(5)[0]}")
        result = in_ns(nodes.pod_a, "iperf3", "-c", nodes.pod_b_ip, "-t", "3", "-J", timeout=30)
        report = json.loads(result.stdout or "{}")
        assert "error" not in report and result.returncode == 0, result.stdout[-500:]
        return report["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        if server.poll() is None:
            server.terminate()
        server.communicate(timeout=10)


# -- without a kernel -----------------------------------------------------------------------------


def test_longest_prefix_match():
    tunnel = Tunnel("unused", "ipip", "tunl0", NODE_A, 1480)
    tunnel.update_peers(
        {"192.168.0.0/16": "10.0.0.1", "192.168.2.0/26": "10.0.0.2", "192.168.2.0/24": "10.0.0.3"}
    )
    for dst, peer in (
        ("192.168.2.5", "10.0.0.2"),
        ("192.168.2.200", "10.0.0.3"),
        ("192.168.9.1", "10.0.0.1"),
        ("10.1.1.1", None),
    ):
        found = tunnel._lookup(socket.inet_aton(dst))
        assert (found[0] if found else None) == peer, dst
    tunnel.update_peers({})
    assert tunnel._lookup(socket.inet_aton("192.168.2.5")) is None
    with pytest.raises(ValueError):
        tunnel.update_peers({"192.168.2.1/24": "10.0.0.2"})  # host bits set: a typo
    assert default_mtu("ipip") == 1480 and default_mtu("udp") == 1472


# -- IPIP -----------------------------------------------------------------------------------------


@needs_root
def test_ipip_tunnel(prefix, tmp_path):
    nodes = build(prefix, IPIP_NETS, default_mtu("ipip"))
    a = b = None
    try:
        a = Tunnel.open(
            nodes.node_a,
            "ipip",
            "tunl0",
            NODE_A,
            default_mtu("ipip"),
            {f"{nodes.net_b}.0/24": NODE_B},
            address=f"{nodes.net_a}.64/32",
        )
        b = Tunnel.open(
            nodes.node_b,
            "ipip",
            "tunl0",
            NODE_B,
            default_mtu("ipip"),
            {f"{nodes.net_a}.0/24": NODE_A},
            address=f"{nodes.net_b}.64/32",
        )
        a.start()
        b.start()
        # Calico's route shape: <remote block> via <remote node IP> dev tunl0 onlink
        ip_batch(nodes.node_a, f"route add {nodes.net_b}.0/24 via {NODE_B} dev tunl0 onlink")
        ip_batch(nodes.node_b, f"route add {nodes.net_a}.0/24 via {NODE_A} dev tunl0 onlink")
        link = json.loads(in_ns(nodes.node_a, "ip", "-j", "link", "show", "tunl0").stdout)[0]
        assert link["mtu"] == 1480 and "UP" in link["flags"]

        capture = Capture(nodes.node_b, "eth0", "ip proto 4", tmp_path / "ipip.pcap")
        result = ping(nodes.pod_a, nodes.pod_b_ip)
        packets = capture.stop(expect=6)  # 3 requests, 3 replies
        assert result.returncode == 0, result.stdout + result.stderr

        from scapy.layers.inet import ICMP, IP

        outer = [p[IP] for p in packets if IP in p and p[IP].proto == 4]
        requests = [
            p
            for p in outer
            if p.src == NODE_A
            and p.dst == NODE_B
            and isinstance(p.payload, IP)
            and ICMP in p.payload
            and p.payload.src == nodes.pod_a_ip
            and p.payload.dst == nodes.pod_b_ip
            and p.payload[ICMP].type == 8
        ]
        replies = [
            p
            for p in outer
            if p.src == NODE_B
            and p.dst == NODE_A
            and isinstance(p.payload, IP)
            and p.payload.src == nodes.pod_b_ip
        ]
        assert len(requests) == 3 and len(replies) == 3, [p.summary() for p in packets]
        first = requests[0]
        assert first.ihl == 5 and first.len == 20 + first.payload.len
        assert first.ttl == first.payload.ttl  # inherited, as the kernel's tunl0 does
        recomputed = first.copy()
        del recomputed.chksum
        assert IP(bytes(recomputed)).chksum == first.chksum  # the kernel filled it in

        # An IPIP packet from an outer source that is no peer node is dropped; the same packet
        # from node A's address is delivered (positive control for the capture).
        pod_capture = Capture(nodes.pod_b, "eth0", "icmp and icmp[0] == 8", tmp_path / "pod.pcap")
        with nsmod.entered(nodes.node_a):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with raw:

            def send(source: str, ident: int) -> None:
                packet = (
                    IP(src=source, dst=NODE_B, proto=4)
                    / IP(src=nodes.pod_a_ip, dst=nodes.pod_b_ip)
                    / ICMP(id=ident)
                )
                raw.sendto(bytes(packet), (NODE_B, 0))

            rx = b.stats["rx"]
            send(STRANGER, 0x4242)
            wait_for(lambda: b.stats["unknown_peer"] == 1, 3, "the stranger's packet dropped")
            send(NODE_A, 0x4243)
            wait_for(lambda: b.stats["rx"] > rx, 3, "node A's packet received")
        delivered = [p[ICMP].id for p in pod_capture.stop(expect=1) if ICMP in p]
        assert delivered == [0x4243]
        assert b.stats["unknown_peer"] == 1

        print(f"\nuserspace IPIP (tunl0 TUN + raw socket): {iperf3(nodes):.2f} Gbit/s")
    finally:
        for tunnel in (a, b):
            if tunnel is not None:
                tunnel.close()
    assert not link_exists(nodes.node_a, "tunl0") and not link_exists(nodes.node_b, "tunl0")


# -- flannel udp ----------------------------------------------------------------------------------


@needs_root
def test_flannel_udp_tunnel(prefix, tmp_path):
    nodes = build(prefix, UDP_NETS, default_mtu("udp"))
    a = b = None
    try:
        # flannel's udp backend: flannel0 holds <subnet>.0/16, so the kernel adds the one route
        # for the whole Network: 10.244.0.0/16 dev flannel0
        a = Tunnel.open(
            nodes.node_a,
            "udp",
            "flannel0",
            NODE_A,
            default_mtu("udp"),
            {f"{nodes.net_b}.0/24": NODE_B},
            address=f"{nodes.net_a}.0/16",
        )
        b = Tunnel.open(
            nodes.node_b,
            "udp",
            "flannel0",
            NODE_B,
            default_mtu("udp"),
            {f"{nodes.net_a}.0/24": NODE_A},
            address=f"{nodes.net_b}.0/16",
        )
        a.start()
        b.start()
        routes = in_ns(nodes.node_a, "ip", "route", "show", "dev", "flannel0").stdout
        assert "10.244.0.0/16" in routes, routes
        link = json.loads(in_ns(nodes.node_a, "ip", "-j", "link", "show", "flannel0").stdout)[0]
        assert link["mtu"] == 1472 and "UP" in link["flags"]

        capture = Capture(
            nodes.node_b, "eth0", f"udp port {FLANNEL_UDP_PORT}", tmp_path / "udp.pcap"
        )
        result = ping(nodes.pod_a, nodes.pod_b_ip)
        packets = capture.stop(expect=6)  # 3 requests, 3 replies
        assert result.returncode == 0, result.stdout + result.stderr

        from scapy.layers.inet import ICMP, IP, UDP

        requests = []
        for p in packets:
            if UDP in p and p[IP].src == NODE_A and p[IP].dst == NODE_B:
                assert p[UDP].sport == FLANNEL_UDP_PORT and p[UDP].dport == FLANNEL_UDP_PORT
                inner = IP(bytes(p[UDP].payload))  # the payload is the raw inner packet
                if ICMP in inner and inner.src == nodes.pod_a_ip and inner.dst == nodes.pod_b_ip:
                    requests.append(inner)
        assert len(requests) == 3, [p.summary() for p in packets]

        # A datagram from an address that is no peer node is dropped.
        with nsmod.entered(nodes.node_a):
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with stranger:
            ip_batch(nodes.node_a, f"addr add {STRANGER}/24 dev eth0")
            stranger.bind((STRANGER, 0))
            inner = IP(src=nodes.pod_a_ip, dst=nodes.pod_b_ip) / ICMP(id=0x4242)
            stranger.sendto(bytes(inner), (NODE_B, FLANNEL_UDP_PORT))
            wait_for(lambda: b.stats["unknown_peer"] == 1, 3, "the stranger's datagram dropped")

        print(f"\nuserspace flannel udp (flannel0 TUN + UDP 8285): {iperf3(nodes):.2f} Gbit/s")
    finally:
        for tunnel in (a, b):
            if tunnel is not None:
                tunnel.close()
    assert not link_exists(nodes.node_a, "flannel0")
    assert not link_exists(nodes.node_b, "flannel0")


@needs_root
def test_open_fails_cleanly_when_name_taken(prefix):
    """A second tunnel with the same name is refused, and the first keeps working."""
    node = f"{prefix}node"
    nsmod.create(node)
    ip_batch(
        node,
        "link add veth0 type veth peer name veth1",
        f"addr add {NODE_A}/24 dev veth0",
        "link set veth0 up",
    )
    first = Tunnel.open(node, "udp", "flannel0", NODE_A, 1472, {})
    try:
        from netsim.errors import KernelError

        with pytest.raises(KernelError):
            Tunnel.open(node, "ipip", "flannel0", NODE_A, 1480, {})
        assert link_exists(node, "flannel0")
    finally:
        first.close()
    assert not link_exists(node, "flannel0")
