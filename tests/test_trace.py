"""Packet path tracing in real namespaces: one probe followed through every interface of the
path, its encapsulation decoded per mode, kube-proxy's DNAT seen on the node's egress, the
merged pcap and node captures readable by scapy, clear errors, and no tcpdump left behind."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import needs_root, run_netsim

from netsim import modes, probe, trace
from netsim.errors import NetsimError

pytestmark = needs_root


def apply(cluster, source: str, replicas: int = 3) -> dict:
    cluster.write(source, replicas=replicas)
    run_netsim("apply", "-f", cluster.file, check=True)
    return cluster.record()


def cross_node_pair(record: dict) -> tuple[str, str]:
    """Two pods on different nodes."""
    pods = sorted(p for p in record.pods if record.pods[p].pod.namespace == "default")
    for a in pods:
        for b in pods:
            if record.pods[a].node != record.pods[b].node:
                return a, b
    raise AssertionError("no two pods on different nodes")


def hop_at(t: trace.Trace, owner: str, iface: str) -> trace.Hop:
    found = [h for h in t.hops if h.owner == owner and h.iface == iface]
    assert found, f"no hop {owner} {iface} in\n{trace.format_trace(t)}"
    return found[0]


def assert_reaped(pids: list[int]) -> None:
    """Every tcpdump started is gone (exited and reaped: no /proc entry left)."""
    assert pids
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        assert b"tcpdump" not in cmd, f"tcpdump {pid} still running"


def assert_delivered(t: trace.Trace, dst_pod: str, record: dict) -> None:
    text = trace.format_trace(t)
    assert t.delivered, text
    assert t.reply is not None and "echo-reply" in t.reply, text
    assert t.hops[0].seen and t.hops[0].iface == "eth0"
    last = t.hops[-1]
    assert (last.owner, last.iface, last.seen) == (dst_pod, "eth0", True), text
    assert last.inner.dst == record.pods[dst_pod].ip
    assert all(h.seen for h in t.hops), text
    assert "delivered" in text.splitlines()[-1]


def test_flannel_vxlan_trace_pcap_and_service(cluster, tmp_path):
    record = apply(cluster, "flannel-vxlan.yaml")
    src, dst = cross_node_pair(record)
    src_node = record.nodes[record.pods[src].node]
    dst_node = record.nodes[record.pods[dst].node]
    before = len(trace.STARTED_PIDS)
    pcap = str(tmp_path / "trace.pcapng")

    t = trace.trace(record, src, dst, pcap=pcap)
    print(trace.format_trace(t))
    assert_delivered(t, dst, record)
    ifaces = [(h.owner, h.iface) for h in t.hops]
    assert ("underlay", dst_node.port) in ifaces
    assert (record.pods[src].node, "cni0") in ifaces
    tunnel = hop_at(t, record.pods[src].node, "flannel.1")
    assert tunnel.encapsulation is None and tunnel.ttl == 63  # routed once, not yet wrapped
    wire = hop_at(t, record.pods[src].node, "eth0")
    assert wire.encapsulation == "vxlan" and wire.vni == 1 and wire.udp_port == 8472
    assert (wire.outer.src, wire.outer.dst) == (src_node.ip, dst_node.ip)
    assert (wire.inner.src, wire.inner.dst) == (record.pods[src].ip, record.pods[dst].ip)
    assert "UDP 8472 VXLAN vni=1" in trace.format_trace(t)

    # the merged capture: scapy reads it, the probe is in it at several hops, in time order
    from scapy.utils import rdpcap

    packets = rdpcap(pcap)
    marked = [p for p in packets if getattr(p, "comments", None)]
    assert len(marked) >= 8
    assert len({p.sniffed_on for p in marked}) >= 8
    times = [float(p.time) for p in packets]
    assert times == sorted(times)

    # a Service: kube-proxy's DNAT, seen as the endpoint's address leaving the source node
    service = record.services["web"]
    for _ in range(4):  # round robin: within three probes one goes to another node
        t = trace.trace(record, src, service.cluster_ip, proto="tcp", port=80)
        if t.target != src:
            break
    print(trace.format_trace(t))
    assert t.delivered and t.reply and "[S.]" in t.reply, trace.format_trace(t)
    pod_ips = {p.ip for p in record.pods.values()}
    assert t.hops[0].inner.dst == service.cluster_ip
    egress = hop_at(t, record.pods[src].node, "eth0")
    assert egress.inner.dst in pod_ips and egress.inner.dport == 9376
    assert egress.dnat and egress.dnat.startswith(f"{service.cluster_ip}:80 -> ")
    assert "DNAT 10.96.0.11:80 -> " in trace.format_trace(t)  # .10 is kube-dns's
    by_name = trace.trace(record, src, "web")  # the Service by name: its first port, TCP 80
    assert (by_name.proto, by_name.port, by_name.delivered) == ("tcp", 80, True)

    assert_reaped(trace.STARTED_PIDS[before:])


def test_trace_errors_and_cleanup_on_interrupt(cluster, monkeypatch):
    record = apply(cluster, "flannel-vxlan.yaml", replicas=2)
    with pytest.raises(NetsimError, match="no pod, node or client named nosuch"):
        trace.trace(record, "nosuch", "web-0")
    with pytest.raises(NetsimError, match="no pod, node, client or Service named nosuch"):
        trace.trace(record, "web-0", "nosuch")
    with pytest.raises(NetsimError, match="Service web has no port 81"):
        trace.trace(record, "web-0", "web", proto="tcp", port=81)
    with pytest.raises(NetsimError, match="not to ping"):
        trace.trace(record, "web-0", "web", proto="icmp")

    # an interrupt while the probe is out: every tcpdump is still stopped and reaped
    before = len(trace.STARTED_PIDS)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(trace, "_send_and_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trace.trace(record, "web-0", "web-1")
    assert_reaped(trace.STARTED_PIDS[before:])


@pytest.mark.parametrize("source, vni, port", [("calico-vxlan.yaml", 4096, 4789)])
def test_calico_vxlan_trace(cluster, source, vni, port):
    record = apply(cluster, source)
    src, dst = cross_node_pair(record)
    t = trace.trace(record, src, dst)
    print(trace.format_trace(t))
    assert_delivered(t, dst, record)
    node = record.pods[src].node
    assert hop_at(t, node, record.pods[src].veth).seen  # the cali veth, no bridge
    wire = hop_at(t, node, "eth0")
    assert (wire.encapsulation, wire.vni, wire.udp_port) == ("vxlan", vni, port)
    assert (wire.outer.src, wire.outer.dst) == (
        record.nodes[node].ip,
        record.nodes[record.pods[dst].node].ip,
    )
    assert hop_at(t, record.pods[dst].node, "vxlan.calico").encapsulation is None


def test_calico_ipip_trace(cluster):
    record = apply(cluster, "calico-ipip.yaml")
    src, dst = cross_node_pair(record)
    t = trace.trace(record, src, dst)
    print(trace.format_trace(t))
    assert_delivered(t, dst, record)
    node, far = record.pods[src].node, record.pods[dst].node
    for hop in (hop_at(t, node, "eth0"), hop_at(t, far, "eth0")):
        assert hop.encapsulation == "ipip" and hop.outer.proto == 4
        assert (hop.outer.src, hop.outer.dst) == (record.nodes[node].ip, record.nodes[far].ip)
        assert hop.inner.dst == record.pods[dst].ip
    assert "IPIP (IP proto 4)" in trace.format_trace(t)


def test_calico_bgp_trace_has_no_encapsulation(cluster):
    record = apply(cluster, "calico-bgp.yaml")
    src, dst = cross_node_pair(record)
    t = trace.trace(record, src, dst)
    print(trace.format_trace(t))
    assert_delivered(t, dst, record)
    for node in (record.pods[src].node, record.pods[dst].node):
        wire = hop_at(t, node, "eth0")
        assert wire.encapsulation is None and len(wire.layers) == 1
        assert (wire.outer.src, wire.outer.dst) == (record.pods[src].ip, record.pods[dst].ip)
    assert not any(h.iface in {m.tunnel for m in modes.every() if m.tunnel} for h in t.hops)


def test_capture_node_eth0(cluster, tmp_path):
    record = apply(cluster, "flannel-vxlan.yaml")
    # a node without the cluster DNS pod, whose server may still be connecting to etcd
    dns = {p.node for p in record.pods.values() if p.pod.namespace == "kube-system"}
    src = next(p for p in sorted(record.pods) if record.pods[p].node not in dns)
    dst = next(
        p for p in sorted(record.pods) if record.pods[p].node not in (*dns, record.pods[src].node)
    )
    node = record.pods[src].node
    before = len(trace.STARTED_PIDS)
    out = str(tmp_path / "node.pcap")
    pinging: list[threading.Thread] = []

    def start_ping():
        thread = threading.Thread(
            target=probe.ping,
            args=(record.pods[src].netns, record.pods[dst].ip),
            kwargs={"count": 6},
        )
        thread.start()
        pinging.append(thread)

    # eight packets: ARP and IPv6 neighbour traffic between the nodes may come first
    n = trace.capture(record, node, out=out, count=8, duration=8.0, ready=start_ping)
    for thread in pinging:
        thread.join(timeout=10)
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    packets = rdpcap(out)
    assert n == len(packets) == 8
    assert any(VXLAN in p for p in packets), [p.summary() for p in packets]  # wrapped

    with pytest.raises(NetsimError, match="has no interface nope0; it has: .*eth0"):
        trace.capture(record, node, iface="nope0", out=str(tmp_path / "x.pcap"))
    with pytest.raises(NetsimError, match="no pod, node or client named nobody"):
        trace.capture(record, "nobody", out=str(tmp_path / "x.pcap"))
    # a quiet interface: the duration bounds it, and the pcap is still a valid, empty one
    quiet = str(tmp_path / "quiet.pcap")
    assert trace.capture(record, node, iface="lo", out=quiet, duration=0.3) == 0
    assert os.path.getsize(quiet) == 24
    assert_reaped(trace.STARTED_PIDS[before:])


def test_cli_trace_capture_and_graph(cluster, tmp_path):
    """The verbs as a user types them: exit codes, what they print, the files they write."""
    cluster.write("flannel-host-gw.yaml", replicas=2)
    run_netsim("apply", "-f", cluster.file, check=True)
    done = cluster.netsim("trace", "web-0", "web-1", "--pcap", str(tmp_path / "t.pcapng"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].strip().startswith("delivered to web-1")
    assert (tmp_path / "t.pcapng").stat().st_size > 0
    missing = cluster.netsim("trace", "web-0", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = cluster.netsim("capture", "worker-1", "eth9", "-w", str(tmp_path / "c.pcap"))
    assert bad.returncode == 1 and "eth9" in bad.stderr
    drawn = cluster.netsim("graph", "-o", str(tmp_path / "c.dot"), check=True)
    assert "wrote" in drawn.stdout and "web-0" in (tmp_path / "c.dot").read_text()


def test_udp_and_tcp_probes_to_a_pod_ip_a_lost_probe_and_a_pod_capture(cluster, tmp_path):
    """A UDP datagram and a TCP SYN to a pod given by IP; a probe blackholed on the
    destination node is reported lost after the last hop that saw it; `netsim capture` of a
    pod's eth0 writes what crossed it."""
    record = apply(cluster, "flannel-host-gw.yaml", replicas=2)
    src, dst = cross_node_pair(record)
    dst_ip, dst_node = record.pods[dst].ip, record.pods[dst].node
    udp = trace.trace(record, src, dst_ip, proto="udp", port=9376)
    assert udp.delivered and udp.target == dst and udp.proto == "udp", trace.format_trace(udp)
    assert udp.hops[-1].inner.dport == 9376
    syn = trace.trace(record, src, dst_ip, proto="tcp", port=9376)
    assert syn.delivered and syn.reply and "[S.]" in syn.reply, trace.format_trace(syn)

    subprocess.run(
        ["ip", "-n", record.nodes[dst_node].netns, "route", "add", "blackhole", f"{dst_ip}/32"],
        check=True,
    )
    lost = trace.trace(record, src, dst, timeout=1.0)
    text = trace.format_trace(lost)
    assert not lost.delivered and lost.reply is None, text
    seen = [h for h in lost.hops if h.seen]
    assert (seen[-1].owner, seen[-1].iface) == (dst_node, "eth0"), text
    assert f"lost after hop {seen[-1].index} ({dst_node} eth0)" in text.splitlines()[-1]
    subprocess.run(
        ["ip", "-n", record.nodes[dst_node].netns, "route", "del", "blackhole", f"{dst_ip}/32"],
        check=True,
    )

    out = tmp_path / "pod.pcap"
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", record.pods[src].netns, "ping", "-c", "20", "-i", "0.2", dst_ip],
        stdout=subprocess.DEVNULL,
    )
    try:
        done = cluster.netsim("capture", dst, "-w", str(out), "-c", "6", "--duration", "8")
    finally:
        pinger.wait(timeout=15)
    assert done.returncode == 0 and "wrote 6 packets" in done.stdout, done.stderr
    from scapy.layers.inet import ICMP, IP
    from scapy.utils import rdpcap

    packets = rdpcap(str(out))
    pings = [p for p in packets if ICMP in p]  # besides them, an ARP exchange may be there
    assert len(packets) == 6 and len(pings) >= 2
    assert {p[IP].src for p in pings} <= {record.pods[src].ip, dst_ip}
