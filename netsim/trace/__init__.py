"""Packet path tracing and captures.

`trace()` works out which interfaces a packet from one pod (node, client) to another crosses,
starts one tcpdump per interface inside its namespace, sends ONE probe crafted with scapy from
the source namespace, waits for the reply, stops every tcpdump by PID and decodes what each one
saw: the probe is found at every hop by a unique marker (IP id plus ICMP id/seq, TCP sequence
number or UDP source port), with its outer and inner addresses, VXLAN VNI and UDP port, IPIP,
flannel's UDP 8285, kube-proxy's DNAT and the TTL. `capture()` is tcpdump inside one namespace.

The kernel forwards the probe exactly as any other packet: nothing here touches the data plane,
and only the namespaces of the cluster are entered. The parts: path.py predicts the hops,
tcpdump.py runs the captures, pcap.py reads and decodes them; this module sends the probe,
matches the copies to the hops and gives the verdict.
"""

from __future__ import annotations

import os
import random
import select
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.model import Service
from netsim.record import PodRecord, Record
from netsim.trace import nftrace
from netsim.trace.path import (
    HopSpec,
    dedupe,
    link_names,
    namespace_target,
    predict_path,
    route_get,
    unknown,
)
from netsim.trace.pcap import (
    IPLayer,
    Marker,
    decode,
    find_probe,
    inner_offset,
    ip_offset,
    read_pcap,
    write_pcapng,
)
from netsim.trace.tcpdump import STARTED_PIDS, Tcpdump, running, tcpdump_binary, wait_listening

__all__ = ["STARTED_PIDS", "Hop", "IPLayer", "Trace", "capture", "format_trace", "trace"]

PROTOCOLS = {"icmp": socket.IPPROTO_ICMP, "tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES = {1: "ICMP", 4: "IPIP", 6: "TCP", 17: "UDP", 47: "GRE"}
MAX_ENDPOINTS = 16  # Service endpoints whose paths are captured at once
SETTLE = 0.15  # seconds the captures keep running after the reply, for the last copies


# -- results --------------------------------------------------------------------------------


@dataclass
class Hop:
    index: int
    owner: str  # pod, node or client name, "underlay" or "router"
    netns: str
    iface: str
    seen: bool = False
    time: float | None = None  # capture timestamp (seconds since the epoch)
    layers: list[IPLayer] = field(default_factory=list)  # outermost first; the last is the probe
    dnat: str | None = None  # "10.96.0.10:80 -> 10.244.2.2:9376" where the ClusterIP is gone
    snat: str | None = None  # "10.244.2.2 -> 172.18.0.3" where masquerade rewrote the source
    reply_seen: bool = False
    note: str = ""

    @property
    def outer(self) -> IPLayer | None:
        return self.layers[0] if self.layers else None

    @property
    def inner(self) -> IPLayer | None:
        return self.layers[-1] if self.layers else None

    @property
    def encapsulation(self) -> str | None:
        """vxlan, ipip, flannel-udp or None for a bare packet."""
        return self.layers[0].encap if len(self.layers) > 1 else None

    @property
    def vni(self) -> int | None:
        return next((x.vni for x in self.layers if x.vni is not None), None)

    @property
    def udp_port(self) -> int | None:
        """The outer UDP destination port of an encapsulated packet."""
        return self.layers[0].dport if self.encapsulation not in (None, "ipip") else None

    @property
    def ttl(self) -> int | None:
        return self.inner.ttl if self.inner else None


@dataclass
class Trace:
    src: str
    dst: str
    proto: str
    port: int | None
    src_ip: str
    dst_ip: str  # the probe's destination as sent (a ClusterIP for a Service)
    target_ip: str | None  # where it was meant to end: the endpoint chosen by DNAT, or dst_ip
    target: str | None  # the name owning target_ip
    hops: list[Hop]
    delivered: bool
    reply: str | None  # the reply in words, None if none came back
    rtt_ms: float | None
    verdict: str
    notes: list[str] = field(default_factory=list)
    pcap: str | None = None
    pids: list[int] = field(default_factory=list)  # the tcpdumps used, all stopped
    rules: list[str] = field(default_factory=list)  # what nftables decided, traced


# -- the probe ------------------------------------------------------------------------------


def _craft(proto: int, src_ip: str, dst_ip: str, port: int | None, marker: Marker) -> bytes:
    """The probe as bytes, built with scapy (imported here: the CLI must start fast)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP

    ip = IP(src=src_ip, dst=dst_ip, id=marker.ip_id, ttl=64)
    payload = marker.token
    if proto == 1:
        pkt = ip / ICMP(type=8, id=marker.icmp_id, seq=marker.seq) / payload
    elif proto == 6:
        pkt = ip / TCP(sport=marker.sport, dport=port, flags="S", seq=marker.seq, window=64240)
    else:
        pkt = ip / UDP(sport=marker.sport, dport=port) / payload
    return bytes(pkt)


def _send_and_wait(
    netns: str, probe: bytes, dst_ip: str, marker: Marker, timeout: float
) -> tuple[float, str | None, float | None, bool]:
    """Send the probe from a raw socket opened in the namespace; wait for the reply on raw
    sockets of the same namespace. Returns (send time, reply in words, rtt ms, whether the
    destination itself answered rather than an ICMP error from the way)."""
    socks = []
    try:
        with nsmod.entered(netns):
            tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            socks.append(tx)
            for proto in sorted({marker.proto, socket.IPPROTO_ICMP}):
                socks.append(socket.socket(socket.AF_INET, socket.SOCK_RAW, proto))
        receivers = socks[1:]
        sent_at = time.time()
        start = time.monotonic()
        tx.sendto(probe, (dst_ip, 0))
        deadline = start + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select(receivers, [], [], max(0.0, deadline - time.monotonic()))
            for sock in ready:
                data = sock.recv(65535)
                layers = decode(data, 0)
                if layers and marker.is_reply(data, 0, layers[0]):
                    rtt = (time.monotonic() - start) * 1000
                    answered = layers[0].src == dst_ip and "unreachable" not in layers[0].detail
                    return (
                        sent_at,
                        f"{layers[0].src} > {layers[0].dst} {layers[0].detail}",
                        rtt,
                        answered,
                    )
        return sent_at, None, None, False
    except OSError as exc:
        raise NetsimError(f"sending the probe from {netns}: {exc}") from None
    finally:
        for sock in socks:
            sock.close()


# -- trace ----------------------------------------------------------------------------------


def trace(
    record: Record,
    src: str,
    dst: str,
    proto: str | None = None,
    port: int | None = None,
    pcap: str | None = None,
    timeout: float = 3.0,
) -> Trace:
    """Follow ONE probe from src to dst through every interface on its way (see module doc).
    proto: icmp (default), tcp or udp; for a Service, its first port's protocol and port."""
    if not 0 < timeout <= 60:
        raise NetsimError(f"timeout {timeout}: give 0 < timeout <= 60 seconds")
    source = record.place(src)
    if source is None:
        raise unknown(src)
    dst_place = record.place(dst)
    service = None if dst_place is not None else record.service(dst)
    if dst_place is None and service is None:
        # only the cluster's own addresses: a probe never heads for the outside world
        raise NetsimError(
            f"no pod, node, client or Service named {dst}; `netsim get pods` "
            "and `netsim get services` list them"
        )
    proto, port, endpoints = _protocol(record, service, proto, port)
    dst_ip = service.cluster_ip if service else (dst_place.ip if dst_place else dst)
    tcpdump_binary()
    notes: list[str] = []

    # candidate paths: one per endpoint a Service may pick (DNAT decides when the probe flies)
    candidates: list[tuple[str | None, str, list[HopSpec]]] = []
    if service:
        if not endpoints:
            notes.append(f"Service {service.name} has no endpoints: kube-proxy rejects the probe")
        if record.kube_proxy is not None and record.kube_proxy.mode == "userspace":
            notes.append(
                "kube-proxy runs in userspace mode: the node's proxy ends the probe's "
                "connection and opens its own to an endpoint, so the probe stops there"
            )
        if len(endpoints) > MAX_ENDPOINTS:
            notes.append(
                f"{len(endpoints)} endpoints: only the paths to the first "
                f"{MAX_ENDPOINTS} are captured"
            )
        for pod in endpoints[:MAX_ENDPOINTS]:
            candidates.append(
                (
                    pod.name,
                    pod.ip,
                    predict_path(record, source, pod.ip, record.place(pod.name), True),
                )
            )
        if not candidates:
            candidates.append((None, dst_ip, predict_path(record, source, dst_ip, None)))
    else:
        candidates.append(
            (
                dst_place.name if dst_place else None,
                dst_ip,
                predict_path(record, source, dst_ip, dst_place),
            )
        )

    specs = dedupe([h for _, _, path in candidates for h in path])
    specs, missing = _existing(specs)
    notes += missing
    src_ip = source.ip
    if source.kind != "pod":
        src_ip = route_get(source.netns, candidates[0][1]).get("prefsrc") or source.ip
    proto_num = PROTOCOLS[proto]
    marker = Marker(
        proto_num,
        random.randint(1, 0xFFFF),
        random.randint(1, 0xFFFF),
        1,
        random.randint(33000, 60999),
        b"netsim-trace-%016x" % random.getrandbits(64),
    )
    if proto_num == socket.IPPROTO_TCP:
        marker.seq = random.getrandbits(32)
    probe = _craft(proto_num, src_ip, dst_ip, port, marker)

    with tempfile.TemporaryDirectory(prefix="netsim-trace-") as tmp:
        runs = [
            (ns, iface, os.path.join(tmp, f"{i}.pcap")) for i, (_, ns, iface) in enumerate(specs)
        ]
        nodes = {n.name: n.netns for n in record.nodes.values() if n.netns in {s[1] for s in specs}}
        word = {1: f"icmp id {marker.icmp_id}", 6: f"tcp sport {marker.sport}"}
        match = f"ip saddr {src_ip} " + word.get(proto_num, f"udp sport {marker.sport}")
        with running(runs) as dumps, nftrace.watching(record.cluster, nodes, match) as steps:
            pids = [d.proc.pid for d in dumps]
            _, reply, rtt, answered = _send_and_wait(source.netns, probe, dst_ip, marker, timeout)
            time.sleep(SETTLE)
        captured = {(ns, iface): read_pcap(f) for ns, iface, f in runs}
        found = {
            key: find_probe(linktype, frames, marker)
            for key, (linktype, frames) in captured.items()
        }
        if pcap:
            _merge(pcap, specs, captured, marker)

    def hops_of(path: list[HopSpec]) -> list[Hop]:
        """One Hop per interface crossing; the n-th crossing of an interface is its n-th copy."""
        hops, crossings = [], {}
        for owner, ns, iface in path:
            if (ns, iface) not in found:
                continue
            copies, reply_seen = found[(ns, iface)]
            n = crossings[(ns, iface)] = crossings.get((ns, iface), -1) + 1
            hop = Hop(len(hops) + 1, owner, ns, iface, reply_seen=reply_seen)
            if n < len(copies):
                hop.seen, hop.time, hop.layers = True, copies[n][0], copies[n][1]
                if service and hop.inner and hop.inner.dst != dst_ip:
                    hop.dnat = f"{dst_ip}:{port} -> {hop.inner.dst}:{hop.inner.dport or port}"
                if hop.inner and hop.inner.src != src_ip:
                    hop.snat = f"{src_ip} -> {hop.inner.src}"
            hops.append(hop)
        return hops

    # the path actually taken: the candidate whose endpoint the probe was DNAT-ed to
    chosen = candidates[0]
    if service:
        picked = {layers[-1].dst for copies, _ in found.values() for _, layers in copies}
        match = [c for c in candidates if c[1] in picked]
        if match:
            chosen = match[0]
        else:
            common = [h for h in candidates[0][2] if all(h in c[2] for c in candidates)]
            chosen = (None, dst_ip, common)
    hops = hops_of(chosen[2])
    target, target_ip = chosen[0], chosen[1]
    if service or dst_place is not None:
        delivered = bool(hops) and hops[-1].seen and (target is not None or not service)
    else:  # an address outside the cluster's records: only an answer from it proves delivery
        delivered = answered
    result = Trace(
        src,
        dst,
        proto,
        port,
        src_ip,
        dst_ip,
        target_ip if target else None,
        target,
        hops,
        delivered,
        reply,
        rtt,
        "",
        notes,
        pcap,
        pids,
    )
    result.verdict = _verdict(result, timeout)
    result.rules = _rules(record, steps)
    return result


def _rules(record: Record, steps: list[nftrace.Step]) -> list[str]:
    """What nftables did to the probe, in words: Felix's verdict for each endpoint it
    crossed, and any rule elsewhere (kube-proxy's) that dropped it."""
    from netsim import policy_check, policy_table

    lines = [
        line.strip() for line in policy_check.decision_lines(policy_check.explain(record, steps))
    ]
    drop = nftrace.dropped([s for s in steps if s.table != policy_table.TABLE])
    if drop is not None:
        lines.append(f"dropped at {drop.node} by ip {drop.table} {drop.chain}: {drop.rule}")
    return lines


def _protocol(
    record: Record, service: Service | None, proto: str | None, port: int | None
) -> tuple[str, int | None, list[PodRecord]]:
    """(proto, port, the Service's endpoint pods) checked against the Service."""
    if proto is not None and proto.lower() not in PROTOCOLS:
        raise NetsimError(f"protocol {proto}: use icmp, tcp or udp")
    proto = proto.lower() if proto else None
    if service is None:
        proto = proto or ("tcp" if port is not None else "icmp")
        if proto != "icmp" and port is None:
            raise NetsimError(f"a {proto} probe needs a port")
        if proto != "icmp" and not 0 < port < 65536:
            raise NetsimError(f"port {port}: give 1-65535")
        return proto, (None if proto == "icmp" else port), []
    from netsim.services import endpoints

    name, ports = service.name, service.ports
    if not ports:
        raise NetsimError(f"Service {name} has no ports")
    if proto == "icmp":
        have = ", ".join(f"{p.port}/{p.protocol}" for p in ports)
        raise NetsimError(
            f"Service {name}: a ClusterIP answers only on its ports ({have}), "
            "not to ping; trace with tcp or udp"
        )
    if port is None:
        chosen = next((p for p in ports if proto is None or p.protocol.lower() == proto), None)
        if chosen is None:
            have = ", ".join(f"{p.port}/{p.protocol}" for p in ports)
            raise NetsimError(f"Service {name} has no {proto.upper()} port; it has {have}")
    else:
        chosen = next(
            (p for p in ports if p.port == port and (proto is None or p.protocol.lower() == proto)),
            None,
        )
        if chosen is None:
            have = ", ".join(f"{p.port}/{p.protocol}" for p in ports)
            raise NetsimError(
                f"Service {name} has no port {port}"
                + (f"/{proto.upper()}" if proto else "")
                + f"; it has {have}"
            )
    return chosen.protocol.lower(), chosen.port, endpoints(record, service)


def _existing(specs: list[HopSpec]) -> tuple[list[HopSpec], list[str]]:
    """Keep the hops whose interface exists; say which do not (a pod gone, a carrier without
    tunl0)."""
    links: dict[str, list[str]] = {}
    kept, notes = [], []
    for owner, ns, iface in specs:
        if ns not in links:
            links[ns] = link_names(ns) if nsmod.exists(ns) else []
        if iface in links[ns]:
            kept.append((owner, ns, iface))
        else:
            notes.append(f"{owner} has no {iface}: not captured")
    return kept, notes


def _merge(
    path: str, specs: list[HopSpec], captured: dict[tuple[str, str], Any], marker: Marker
) -> None:
    """Every captured packet of every hop into one pcapng, in time order; the probe's copies
    carry a comment naming the hop. Bare-IP devices (flannel0, tunl0) get a zero Ethernet
    header so that every interface has one link type: tcpdump -r (libpcap) refuses a file
    that mixes them; the interface description says so."""
    interfaces, packets = [], []
    for i, (owner, ns, iface) in enumerate(specs):
        linktype, frames = captured[(ns, iface)]
        bare = linktype in (12, 14, 101, 228)
        interfaces.append(
            (
                f"{owner}:{iface}",
                1 if bare or not linktype else linktype,
                f"netns {ns}"
                + ("; bare IP device, Ethernet header added by netsim" if bare else ""),
            )
        )
        for ts, raw in frames:
            comment = ""
            frame = b"\0" * 12 + b"\x08\x00" + raw if bare else raw
            offset = ip_offset(1 if bare else linktype, frame)
            if offset is not None:
                layers = decode(frame, offset)
                inner = inner_offset(frame, offset, layers) if layers else None
                if inner is not None and marker.is_probe(frame, inner, layers[-1]):
                    comment = f"netsim trace probe at {owner} {iface}"
            packets.append((ts, i, frame, comment))
    packets.sort(key=lambda p: p[0])
    try:
        write_pcapng(path, interfaces, packets)
    except OSError as exc:
        raise NetsimError(f"writing {path}: {exc}") from None


def _verdict(t: Trace, timeout: float) -> str:
    reply = (
        f"reply {t.reply} after {t.rtt_ms:.2f} ms" if t.reply else f"no reply within {timeout:g} s"
    )
    last_seen = max((h.index for h in t.hops if h.seen), default=0)
    if t.delivered:
        where = f"{t.target} ({t.target_ip})" if t.target else (t.target_ip or t.dst_ip)
        return f"delivered to {where}; {reply}"
    if not t.hops or last_seen == 0:
        return f"not seen at any hop; {reply}"
    hop = t.hops[last_seen - 1]
    after = f"lost after hop {hop.index} ({hop.owner} {hop.iface})"
    if last_seen < len(t.hops):
        nxt = t.hops[last_seen]
        after += f": not seen at hop {nxt.index} ({nxt.owner} {nxt.iface})"
    elif t.target is None and t.dst_ip != (t.hops[-1].inner.dst if t.hops[-1].inner else None):
        after += ": no hop after DNAT saw it"
    return f"{after}; {reply}"


# -- output ---------------------------------------------------------------------------------


def _summary(hop: Hop) -> str:
    if not hop.seen or not hop.layers:
        return "-- not seen"
    outer, inner = hop.layers[0], hop.layers[-1]
    bare = f"{inner.src} > {inner.dst} {inner.detail} ttl={inner.ttl}"
    if len(hop.layers) == 1:
        text = bare
    else:
        short = (
            f"{inner.src} > {inner.dst} {PROTO_NAMES.get(inner.proto, inner.proto)} ttl={inner.ttl}"
        )
        if outer.encap == "vxlan":
            text = (
                f"{outer.src} > {outer.dst} UDP {outer.dport} VXLAN vni={outer.vni} "
                f"ttl={outer.ttl} [{short}]"
            )
        elif outer.encap == "ipip":
            text = f"{outer.src} > {outer.dst} IPIP (IP proto 4) ttl={outer.ttl} [{short}]"
        else:
            text = (
                f"{outer.src} > {outer.dst} UDP {outer.dport} flannel-udp ttl={outer.ttl} [{short}]"
            )
    return text


def format_trace(t: Trace) -> str:
    """One line per hop, then the verdict."""
    what = t.proto.upper() + (f" port {t.port}" if t.port else "")
    lines = [f"trace {t.src} ({t.src_ip}) -> {t.dst} ({t.dst_ip}) {what}"]
    first = min((h.time for h in t.hops if h.seen and h.time), default=None)
    shown: set[str] = set()
    for hop in t.hops:
        line = f"{hop.index:>3}  {hop.owner:<10} {hop.iface:<16} {_summary(hop)}"
        for kind, change in (("DNAT", hop.dnat), ("SNAT", hop.snat)):
            if change and kind not in shown:
                line += f"  {kind} {change}"
                shown.add(kind)
        if hop.seen and first is not None and hop.time is not None:
            line += f"  +{(hop.time - first) * 1000:.3f} ms"
        lines.append(line)
    lines.extend(f"  note: {n}" for n in t.notes)
    lines.extend(f"  nftables: {r}" for r in t.rules)
    if t.pcap:
        lines.append(f"  pcap: {t.pcap} (every packet of every hop; the probe's are commented)")
    lines.append(f"  {t.verdict}")
    return "\n".join(lines)


# -- capture --------------------------------------------------------------------------------


def capture(
    record: Record,
    target: str,
    iface: str | None = None,
    out: str = "capture.pcap",
    count: int = 100,
    duration: float = 10.0,
    ready: Callable[[], None] | None = None,
) -> int:
    """tcpdump on one interface of a node, pod, client, "underlay" or "router" into a pcap
    Wireshark opens; ends after `count` packets or `duration` seconds. `ready` is called once
    tcpdump listens (to start traffic). Returns the number of packets written."""
    if not 0 < count <= 10_000_000:
        raise NetsimError(f"count {count}: give 1-10000000")
    if not 0 < duration <= 86400:
        raise NetsimError(f"duration {duration}: give 0 < duration <= 86400 seconds")
    netns, owner, default = namespace_target(record, target)
    iface = iface or default
    if not nsmod.exists(netns):
        raise NetsimError(f"{owner}: its namespace {netns} does not exist; is the cluster up?")
    names = link_names(netns)
    if iface not in names:
        raise NetsimError(f"{owner} has no interface {iface}; it has: {', '.join(names)}")
    dumps: list[Tcpdump] = []
    try:
        dump = Tcpdump(netns, iface, out, dumps, count=count)
        wait_listening(dumps)
        if ready is not None:
            ready()
        try:
            dump.proc.wait(timeout=duration)
        except subprocess.TimeoutExpired:
            pass
    finally:
        for started in dumps:
            started.stop()
    return len(read_pcap(out)[1])
