"""Packet path tracing and captures.

`trace()` works out which interfaces a packet from one pod (node, client) to another crosses,
starts one tcpdump per interface inside its namespace, sends ONE probe crafted with scapy from
the source namespace, waits for the reply, stops every tcpdump by PID and decodes what each one
saw: the probe is found at every hop by a unique marker (IP id plus ICMP id/seq, TCP sequence
number or UDP source port), with its outer and inner addresses, VXLAN VNI and UDP port, IPIP,
flannel's UDP 8285, kube-proxy's DNAT and the TTL. `capture()` is tcpdump inside one namespace.

The kernel forwards the probe exactly as any other packet: nothing here touches the data plane,
and only the namespaces of the cluster are entered.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod

TUNNEL_DEVICES = ("flannel.1", "vxlan.calico", "tunl0", "flannel0")
VXLAN_PORTS = (8472, 4789)  # flannel's (the kernel's old default) and IANA's, Calico's
FLANNEL_UDP_PORT = 8285
PROTOCOLS = {"icmp": socket.IPPROTO_ICMP, "tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES = {1: "ICMP", 4: "IPIP", 6: "TCP", 17: "UDP", 47: "GRE"}
MAX_ENDPOINTS = 16  # Service endpoints whose paths are captured at once
LISTEN_TIMEOUT = 3.0  # seconds for a tcpdump to report that it listens
SETTLE = 0.15  # seconds the captures keep running after the reply, for the last copies

# Every tcpdump this process started, in order: tests check by PID that none is left running.
STARTED_PIDS: list[int] = []


# -- results --------------------------------------------------------------------------------


@dataclass
class IPLayer:
    """One IPv4 header of a captured packet; `encap` says what the next layer is carried in."""

    src: str
    dst: str
    proto: int
    ttl: int
    ident: int
    sport: int | None = None
    dport: int | None = None
    encap: str | None = None  # "vxlan", "ipip", "flannel-udp": the next layer is inside this
    vni: int | None = None
    detail: str = ""  # the L4 header in words: "ICMP echo id=0x1a2b seq=1", "TCP 4000 > 80 [S]"


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
        return self.layers[0].dport if self.encapsulation in ("vxlan", "flannel-udp") else None

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


# -- names and places -----------------------------------------------------------------------


@dataclass
class _Place:
    kind: str  # pod, node, client
    name: str
    netns: str
    ip: str
    node: str | None  # the node a pod runs on; the node itself for a node


def _place(record: dict, name: str) -> _Place | None:
    """A pod, node or client by name or IP."""
    for kind, group in (("pod", "pods"), ("node", "nodes"), ("client", "clients")):
        for n, item in (record.get(group) or {}).items():
            if name in (n, item.get("ip")):
                node = item.get("node") if kind == "pod" else (n if kind == "node" else None)
                return _Place(kind, n, item["netns"], item["ip"], node)
    return None


def _unknown(name: str) -> NetsimError:
    return NetsimError(f"no pod, node or client named {name}; `netsim get pods` lists them")


def _service(record: dict, name: str) -> tuple[str, dict] | None:
    for n, svc in (record.get("services") or {}).items():
        if name in (n, svc.get("clusterIP")):
            return n, svc
    return None


def _links(netns: str) -> list[str]:
    """Interface names in a namespace (netlink, no process)."""
    from netsim.kernel.netlink import Rtnl

    try:
        with Rtnl(netns) as rtnl:
            return [link["name"] for link in rtnl.links()]
    except NetsimError:
        return []


def _route_get(netns: str, dst: str) -> dict:
    """`ip route get` inside the namespace: the device and source the kernel would use."""
    try:
        out = subprocess.run(["ip", "-j", "-n", netns, "route", "get", dst], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetsimError(f"ip route get {dst} in {netns}: {exc}") from None
    if out.returncode != 0:
        return {}
    routes = json.loads(out.stdout or "[]")
    return routes[0] if routes else {}


def _namespace_target(record: dict, target: str) -> tuple[str, str, str]:
    """(netns, owner label, default interface) of a capture target."""
    if target == "underlay":
        bridges = list((record.get("underlay") or {}).get("bridges", {}).values())
        return record["underlay"]["netns"], "underlay", bridges[0] if bridges else "eth0"
    if target == "router" and record.get("router"):
        legs = [leg["ifname"] for leg in record["router"].get("legs", {}).values()]
        return record["router"]["netns"], "router", legs[0] if legs else "eth0"
    place = _place(record, target)
    if place is None:
        raise _unknown(target)
    return place.netns, place.name, "eth0"


# -- the path -------------------------------------------------------------------------------


HopSpec = tuple[str, str, str]  # (owner, netns, iface)


def _path(record: dict, src: _Place, dst_ip: str, dst: _Place | None,
          service: bool = False) -> list[HopSpec]:
    """The interfaces a packet from src to dst_ip crosses, in order. The source side follows
    the kernel's own route lookup in the source node (so CrossSubnet's native routes and the
    eBPF IPIP carrier, which has no tunl0, come out right); the far side mirrors it. An
    interface listed twice is crossed twice (a pod reaching itself through its Service)."""
    nodes = record["nodes"]
    flannel = record.get("mode", "").startswith("flannel")
    hops: list[HopSpec] = []
    if dst is not None and dst.name == src.name and dst.kind == src.kind:
        if not service or src.kind != "pod":
            return [(src.name, src.netns, "lo")]  # to itself: the kernel loops it back
        node = nodes[src.node]
        veth = (src.node, node["netns"], record["pods"][src.name]["veth"])
        there = [(src.name, src.netns, "eth0"), veth]
        if flannel:
            there.append((src.node, node["netns"], "cni0"))
            return [*there, veth, there[0]]  # hairpin: out of the bridge the way it came
        return [*there, veth, there[0]]
    if src.kind == "pod":
        node = nodes[src.node]
        hops.append((src.name, src.netns, "eth0"))
        hops.append((src.node, node["netns"], record["pods"][src.name]["veth"]))
        if flannel:
            hops.append((src.node, node["netns"], "cni0"))
        route_ns, route_owner = node["netns"], src.node
    else:
        route_ns, route_owner = src.netns, src.name
    dst_node = dst.node if dst is not None else None
    if dst is not None and dst.kind == "pod" and dst_node == (src.node or src.name):
        # same node: bridged (flannel) or routed straight to the other cali veth
        if flannel and src.kind != "pod":
            hops.append((route_owner, route_ns, "cni0"))
        hops.append((dst_node, nodes[dst_node]["netns"], record["pods"][dst.name]["veth"]))
        hops.append((dst.name, dst.netns, "eth0"))
        return _dedupe(hops)
    if dst is not None and dst.kind != "pod" and dst.name == src.name:
        return _dedupe(hops)
    route = _route_get(route_ns, dst_ip)
    tunnel = route.get("dev") if route.get("dev") in TUNNEL_DEVICES else None
    if tunnel:
        hops.append((route_owner, route_ns, tunnel))
    hops.append((route_owner, route_ns, "eth0"))
    near = nodes.get(route_owner) or (record.get("clients") or {}).get(route_owner) or {}
    far = None
    if dst is not None:
        far = nodes.get(dst_node) if dst_node else (record.get("clients") or {}).get(dst.name)
    router = record.get("router") or {}
    legs = router.get("legs", {})
    # the router is on the way when the segments differ, or when the route goes to a gateway
    # that is not the far host (a client's default route towards pod addresses)
    via_router = far is not None and near.get("segment") != far.get("segment")
    if not tunnel and route.get("gateway") and route["gateway"] != (far or {}).get("ip"):
        via_router = True
    if via_router and router:
        segments = [near.get("segment")]
        if far is not None and far.get("segment") != near.get("segment"):
            segments.append(far.get("segment"))
        for segment in segments:
            if segment in legs:
                hops.append(("router", router["netns"], legs[segment]["ifname"]))
    if dst is None or far is None:
        return _dedupe(hops)
    if record.get("underlay") and far.get("port"):
        hops.append(("underlay", record["underlay"]["netns"], far["port"]))
    far_owner = dst_node or dst.name
    hops.append((far_owner, far["netns"], "eth0"))
    if dst.kind != "pod":
        return _dedupe(hops)
    if tunnel:
        hops.append((far_owner, far["netns"], tunnel))
    if flannel:
        hops.append((far_owner, far["netns"], "cni0"))
    hops.append((far_owner, far["netns"], record["pods"][dst.name]["veth"]))
    hops.append((dst.name, dst.netns, "eth0"))
    return _dedupe(hops)


def _dedupe(hops: list[HopSpec]) -> list[HopSpec]:
    seen: set[tuple[str, str]] = set()
    out = []
    for hop in hops:
        if (hop[1], hop[2]) not in seen:
            seen.add((hop[1], hop[2]))
            out.append(hop)
    return out


# -- tcpdump --------------------------------------------------------------------------------


def _tcpdump_binary() -> str:
    binary = shutil.which("tcpdump")
    if binary is None:
        raise NetsimError("tcpdump not found: apt-get install tcpdump")
    return binary


class _Tcpdump:
    """One tcpdump inside a namespace, writing a pcap; ended by its PID."""

    def __init__(self, netns: str, iface: str, out: str, registry: list[_Tcpdump],
                 count: int | None = None):
        self.netns, self.iface, self.out = netns, iface, out
        argv = [_tcpdump_binary(), "-i", iface, "-n", "-Z", "root", "--immediate-mode", "-U",
                "-s", "262144", "-w", out]
        if count is not None:
            argv[1:1] = ["-c", str(count)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            close_fds=True, preexec_fn=lambda: nsmod.enter_for_exec(netns))
        registry.append(self)  # at once: whoever holds the registry stops it
        STARTED_PIDS.append(self.proc.pid)
        self.listening = False
        self.message = ""

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM (tcpdump flushes and closes its file), SIGKILL after the grace; reaped."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace)
        if self.proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                self.message += self.proc.stderr.read().decode(errors="replace")
            self.proc.stderr.close()


def _wait_listening(dumps: list[_Tcpdump], timeout: float = LISTEN_TIMEOUT) -> None:
    """Until every tcpdump has said "listening on"; a tcpdump that fails is an error."""
    waiting = {d.proc.stderr.fileno(): d for d in dumps if d.proc.stderr is not None}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(waiting), [], [], deadline - time.monotonic())
        for fd in ready:
            dump = waiting[fd]
            chunk = os.read(fd, 4096).decode(errors="replace")
            dump.message += chunk
            if "listening on" in dump.message:
                dump.listening = True
                del waiting[fd]
            elif not chunk:  # tcpdump exited
                del waiting[fd]
    for dump in dumps:
        if not dump.listening:
            problem = dump.message.strip().splitlines()
            raise NetsimError(f"tcpdump on {dump.iface} in {dump.netns} did not start: "
                              + (problem[-1] if problem else f"silent for {timeout:.0f} s"))


@contextlib.contextmanager
def _running(specs: list[tuple[str, str, str]]) -> Iterator[list[_Tcpdump]]:
    """Start one tcpdump per (netns, iface, file); every one is stopped and reaped on the way
    out, whatever happened (errors, KeyboardInterrupt)."""
    dumps: list[_Tcpdump] = []
    try:
        for netns, iface, out in specs:
            _Tcpdump(netns, iface, out, dumps)
        _wait_listening(dumps)
        yield dumps
    finally:
        for dump in dumps:
            if dump.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    dump.proc.send_signal(signal.SIGTERM)
        for dump in dumps:
            dump.stop()


# -- pcap files -----------------------------------------------------------------------------


def read_pcap(path: str) -> tuple[int, list[tuple[float, bytes]]]:
    """(linktype, [(timestamp, frame)]) of a classic pcap file as tcpdump writes it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return 0, []
    if len(data) < 24:
        return 0, []
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<",
              b"\xa1\xb2\xc3\xd4": ">", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None:
        raise NetsimError(f"{path}: not a pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0xFFFF
    packets = []
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from(endian + "IIII", data, pos)
        pos += 16
        if pos + caplen > len(data):
            break  # a record cut short by a kill
        packets.append((sec + frac / (1e9 if nano else 1e6), data[pos:pos + caplen]))
        pos += caplen
    return linktype, packets


def write_pcapng(path: str, interfaces: list[tuple[str, int, str]],
                 packets: list[tuple[float, int, bytes, str]]) -> None:
    """A pcapng file: one interface block per hop (name, linktype, description), so Wireshark
    shows which interface each packet was seen on, and the packets (timestamp, interface
    number, frame, comment) in the order given."""

    def block(kind: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", kind, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    def option(code: int, value: bytes) -> bytes:
        return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)

    with open(path, "wb") as fh:
        fh.write(block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)))
        for name, linktype, description in interfaces:
            opts = option(2, name.encode())
            if description:
                opts += option(3, description.encode())
            opts += option(0, b"")
            fh.write(block(1, struct.pack("<HHI", linktype, 0, 262144) + opts))
        for ts, ifid, frame, comment in packets:
            micros = int(round(ts * 1e6))
            body = struct.pack("<IIIII", ifid, micros >> 32, micros & 0xFFFFFFFF, len(frame),
                               len(frame)) + frame + b"\0" * (-len(frame) % 4)
            if comment:
                body += option(1, comment.encode()) + option(0, b"")
            fh.write(block(6, body))


# -- decoding -------------------------------------------------------------------------------


def _ip_offset(linktype: int, frame: bytes) -> int | None:
    """Where the IPv4 header starts in a frame of this link type, None if it is not IPv4."""
    if linktype == 1:  # Ethernet
        pos, ethertype = 12, None
        while pos + 2 <= len(frame):
            ethertype = struct.unpack_from("!H", frame, pos)[0]
            if ethertype in (0x8100, 0x88A8):
                pos += 4
                continue
            break
        return pos + 2 if ethertype == 0x0800 else None
    if linktype in (12, 14, 101, 228):  # raw IP: TUN (flannel0), tunl0
        return 0 if frame and frame[0] >> 4 == 4 else None
    if linktype == 113:  # Linux cooked
        return 16 if len(frame) >= 16 and frame[14:16] == b"\x08\x00" else None
    if linktype == 276:  # Linux cooked v2
        return 20 if len(frame) >= 20 and frame[0:2] == b"\x08\x00" else None
    return None


def _ip4(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def decode(frame: bytes, offset: int) -> list[IPLayer]:
    """Every IPv4 header of a packet, outermost first, unwrapping VXLAN (8472/4789), IPIP and
    flannel's UDP 8285 encapsulation."""
    layers: list[IPLayer] = []
    for _ in range(4):
        if offset + 20 > len(frame) or frame[offset] >> 4 != 4:
            break
        ihl = (frame[offset] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, offset + 2)[0]
        ident = struct.unpack_from("!H", frame, offset + 4)[0]
        ttl, proto = frame[offset + 8], frame[offset + 9]
        layer = IPLayer(_ip4(frame[offset + 12:offset + 16]), _ip4(frame[offset + 16:offset + 20]),
                        proto, ttl, ident)
        layers.append(layer)
        l4 = offset + ihl
        end = min(len(frame), offset + total) if total else len(frame)
        if proto == 4:
            layer.encap, layer.detail = "ipip", "IPIP"
            offset = l4
            continue
        if proto in (6, 17) and l4 + 4 <= end:
            layer.sport, layer.dport = struct.unpack_from("!HH", frame, l4)
        if proto == 17 and layer.dport is not None:
            payload = l4 + 8
            if (layer.dport in VXLAN_PORTS or layer.sport in VXLAN_PORTS) \
                    and payload + 8 + 14 <= end and frame[payload] & 0x08:
                layer.encap = "vxlan"
                layer.vni = int.from_bytes(frame[payload + 4:payload + 7], "big")
                inner = _ip_offset(1, frame[payload + 8:end])
                if inner is None:
                    break
                offset = payload + 8 + inner
                continue
            if FLANNEL_UDP_PORT in (layer.dport, layer.sport):
                layer.encap = "flannel-udp"
                offset = payload
                continue
        layer.detail = _l4_detail(proto, frame, l4, end, layer)
        break
    return layers


def _l4_detail(proto: int, frame: bytes, l4: int, end: int, layer: IPLayer) -> str:
    if proto == 1 and l4 + 8 <= end:
        kind, code = frame[l4], frame[l4 + 1]
        ident, seq = struct.unpack_from("!HH", frame, l4 + 4)
        names = {8: "echo", 0: "echo-reply", 3: "unreachable", 11: "time-exceeded"}
        text = f"ICMP {names.get(kind, f'type {kind}')}"
        if kind in (0, 8):
            return f"{text} id={ident:#06x} seq={seq}"
        reasons = {0: "net", 1: "host", 3: "port", 9: "net prohibited", 10: "host prohibited",
                   13: "administratively prohibited"} if kind == 3 else {}
        return f"{text} ({reasons[code]})" if code in reasons else f"{text} code={code}"
    if proto == 6 and l4 + 14 <= end:
        seq = struct.unpack_from("!I", frame, l4 + 4)[0]
        flags = frame[l4 + 13]
        letters = "".join(c for bit, c in ((2, "S"), (16, "."), (1, "F"), (4, "R"), (8, "P"))
                          if flags & bit)
        return f"TCP {layer.sport} > {layer.dport} [{letters}] seq={seq}"
    if proto == 17:
        return f"UDP {layer.sport} > {layer.dport}"
    return PROTO_NAMES.get(proto, f"proto {proto}")


@dataclass
class _Marker:
    """What makes the probe (and its reply) recognisable at every hop, through NAT: the IP id
    (no NAT changes it) and, for ICMP and UDP, a random payload; for a TCP SYN its random
    sequence number. Masquerade may rewrite the ICMP id and the source port, so neither counts.
    """

    proto: int
    ip_id: int
    icmp_id: int
    seq: int  # ICMP sequence or TCP sequence number
    sport: int
    token: bytes

    def is_probe(self, frame: bytes, offset: int, layer: IPLayer) -> bool:
        if layer.ident != self.ip_id or layer.proto != self.proto:
            return False
        l4 = offset + (frame[offset] & 0x0F) * 4
        if self.proto == 1:
            return frame[l4:l4 + 1] == b"\x08" and frame[l4 + 8:].startswith(self.token)
        if self.proto == 6:
            return frame[l4 + 4:l4 + 8] == struct.pack("!I", self.seq)
        return frame[l4 + 8:].startswith(self.token)

    def is_reply(self, frame: bytes, offset: int, layer: IPLayer) -> bool:
        l4 = offset + (frame[offset] & 0x0F) * 4
        if layer.proto == 1 and self._icmp_error(frame, l4):
            return True
        if layer.proto != self.proto:
            return False
        if self.proto == 1:
            return frame[l4:l4 + 1] == b"\x00" and frame[l4 + 8:].startswith(self.token)
        if layer.dport != self.sport:
            return False
        if self.proto == 6 and l4 + 12 <= len(frame):
            ack = struct.unpack_from("!I", frame, l4 + 8)[0]
            return ack == (self.seq + 1) & 0xFFFFFFFF
        return self.proto == 17

    def _icmp_error(self, frame: bytes, l4: int) -> bool:
        """An ICMP unreachable or time-exceeded quoting the probe."""
        if l4 + 28 > len(frame) or frame[l4] not in (3, 11):
            return False
        return struct.unpack_from("!H", frame, l4 + 12)[0] == self.ip_id


def _find(linktype: int, frames: list[tuple[float, bytes]], marker: _Marker,
          ) -> tuple[list[tuple[float, list[IPLayer]]], bool]:
    """Every copy of the probe in a capture (time, layers), and whether a reply was seen."""
    copies: list[tuple[float, list[IPLayer]]] = []
    reply = False
    for ts, frame in frames:
        offset = _ip_offset(linktype, frame)
        if offset is None:
            continue
        layers = decode(frame, offset)
        inner_offset = _inner_offset(frame, offset, layers)
        if not layers or inner_offset is None:
            continue
        if marker.is_probe(frame, inner_offset, layers[-1]):
            copies.append((ts, layers))
        elif marker.is_reply(frame, inner_offset, layers[-1]):
            reply = True
    return copies, reply


def _inner_offset(frame: bytes, offset: int, layers: list[IPLayer]) -> int | None:
    """Where the innermost IPv4 header of `layers` starts (walks the same encapsulations)."""
    for layer in layers[:-1]:
        l4 = offset + (frame[offset] & 0x0F) * 4
        if layer.encap == "ipip":
            offset = l4
        elif layer.encap == "vxlan":
            inner = _ip_offset(1, frame[l4 + 16:])
            if inner is None:
                return None
            offset = l4 + 16 + inner
        elif layer.encap == "flannel-udp":
            offset = l4 + 8
        else:
            return None
    return offset


# -- the probe ------------------------------------------------------------------------------


def _craft(proto: int, src_ip: str, dst_ip: str, port: int | None, marker: _Marker) -> bytes:
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


def _send_and_wait(netns: str, probe: bytes, dst_ip: str, marker: _Marker,
                   timeout: float) -> tuple[float, str | None, float | None, bool]:
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
                    return (sent_at, f"{layers[0].src} > {layers[0].dst} {layers[0].detail}", rtt,
                            answered)
        return sent_at, None, None, False
    except OSError as exc:
        raise NetsimError(f"sending the probe from {netns}: {exc}") from None
    finally:
        for sock in socks:
            sock.close()


# -- trace ----------------------------------------------------------------------------------


def trace(record: dict, src: str, dst: str, proto: str | None = None, port: int | None = None,
          pcap: str | None = None, timeout: float = 3.0) -> Trace:
    """Follow ONE probe from src to dst through every interface on its way (see module doc).
    proto: icmp (default), tcp or udp; for a Service, its first port's protocol and port."""
    if not 0 < timeout <= 60:
        raise NetsimError(f"timeout {timeout}: give 0 < timeout <= 60 seconds")
    source = _place(record, src)
    if source is None:
        raise _unknown(src)
    dst_place = _place(record, dst)
    service = None if dst_place is not None else _service(record, dst)
    if dst_place is None and service is None:
        # only the cluster's own addresses: a probe never heads for the outside world
        raise NetsimError(f"no pod, node, client or Service named {dst}; `netsim get pods` "
                          "and `netsim get services` list them")
    proto, port, endpoints = _protocol(record, service, proto, port)
    dst_ip = service[1]["clusterIP"] if service else (dst_place.ip if dst_place else dst)
    _tcpdump_binary()
    notes: list[str] = []

    # candidate paths: one per endpoint a Service may pick (DNAT decides when the probe flies)
    candidates: list[tuple[str | None, str, list[HopSpec]]] = []
    if service:
        if not endpoints:
            notes.append(f"Service {service[0]} has no endpoints: kube-proxy rejects the probe")
        if (record.get("kube_proxy") or {}).get("mode") == "userspace":
            notes.append("kube-proxy runs in userspace mode: the node's proxy ends the probe's "
                         "connection and opens its own to an endpoint, so the probe stops there")
        if len(endpoints) > MAX_ENDPOINTS:
            notes.append(f"{len(endpoints)} endpoints: only the paths to the first "
                         f"{MAX_ENDPOINTS} are captured")
        for pod, ip in endpoints[:MAX_ENDPOINTS]:
            candidates.append((pod, ip, _path(record, source, ip, _place(record, pod), True)))
        if not candidates:
            candidates.append((None, dst_ip, _path(record, source, dst_ip, None)))
    else:
        candidates.append((dst_place.name if dst_place else None, dst_ip,
                           _path(record, source, dst_ip, dst_place)))

    specs = _dedupe([h for _, _, path in candidates for h in path])
    specs, missing = _existing(specs)
    notes += missing
    src_ip = source.ip
    if source.kind != "pod":
        src_ip = _route_get(source.netns, candidates[0][1]).get("prefsrc") or source.ip
    proto_num = PROTOCOLS[proto]
    marker = _Marker(proto_num, random.randint(1, 0xFFFF), random.randint(1, 0xFFFF), 1,
                     random.randint(33000, 60999), b"netsim-trace-%016x" % random.getrandbits(64))
    if proto_num == socket.IPPROTO_TCP:
        marker.seq = random.getrandbits(32)
    probe = _craft(proto_num, src_ip, dst_ip, port, marker)

    with tempfile.TemporaryDirectory(prefix="netsim-trace-") as tmp:
        runs = [(ns, iface, os.path.join(tmp, f"{i}.pcap")) for i, (_, ns, iface) in
                enumerate(specs)]
        with _running(runs) as dumps:
            pids = [d.proc.pid for d in dumps]
            _, reply, rtt, answered = _send_and_wait(source.netns, probe, dst_ip, marker,
                                                     timeout)
            time.sleep(SETTLE)
        captured = {(ns, iface): read_pcap(f) for ns, iface, f in runs}
        found = {key: _find(linktype, frames, marker)
                 for key, (linktype, frames) in captured.items()}
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
    result = Trace(src, dst, proto, port, src_ip, dst_ip, target_ip if target else None, target,
                   hops, delivered, reply, rtt, "", notes, pcap, pids)
    result.verdict = _verdict(result, timeout)
    return result


def _protocol(record: dict, service: tuple[str, dict] | None, proto: str | None,
              port: int | None) -> tuple[str, int | None, list[tuple[str, str]]]:
    """(proto, port, the Service's endpoints as (pod, ip)) checked against the Service."""
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
    from netsim.cluster import endpoints

    name, svc = service
    ports = svc.get("ports") or []
    if not ports:
        raise NetsimError(f"Service {name} has no ports")
    if proto == "icmp":
        have = ", ".join(f"{p['port']}/{p['protocol']}" for p in ports)
        raise NetsimError(f"Service {name}: a ClusterIP answers only on its ports ({have}), "
                          "not to ping; trace with tcp or udp")
    if port is None:
        chosen = next((p for p in ports if proto is None or p["protocol"].lower() == proto), None)
        if chosen is None:
            have = ", ".join(f"{p['port']}/{p['protocol']}" for p in ports)
            raise NetsimError(f"Service {name} has no {proto.upper()} port; it has {have}")
    else:
        chosen = next((p for p in ports if p["port"] == port
                       and (proto is None or p["protocol"].lower() == proto)), None)
        if chosen is None:
            have = ", ".join(f"{p['port']}/{p['protocol']}" for p in ports)
            raise NetsimError(f"Service {name} has no port {port}"
                              + (f"/{proto.upper()}" if proto else "") + f"; it has {have}")
    return chosen["protocol"].lower(), chosen["port"], endpoints(record, svc)


def _existing(specs: list[HopSpec]) -> tuple[list[HopSpec], list[str]]:
    """Keep the hops whose interface exists; say which do not (a pod gone, a carrier without
    tunl0)."""
    links: dict[str, list[str]] = {}
    kept, notes = [], []
    for owner, ns, iface in specs:
        if ns not in links:
            links[ns] = _links(ns) if nsmod.exists(ns) else []
        if iface in links[ns]:
            kept.append((owner, ns, iface))
        else:
            notes.append(f"{owner} has no {iface}: not captured")
    return kept, notes


def _merge(path: str, specs: list[HopSpec], captured: dict[tuple[str, str], Any],
           marker: _Marker) -> None:
    """Every captured packet of every hop into one pcapng, in time order; the probe's copies
    carry a comment naming the hop. Bare-IP devices (flannel0, tunl0) get a zero Ethernet
    header so that every interface has one link type: tcpdump -r (libpcap) refuses a file
    that mixes them; the interface description says so."""
    interfaces, packets = [], []
    for i, (owner, ns, iface) in enumerate(specs):
        linktype, frames = captured[(ns, iface)]
        bare = linktype in (12, 14, 101, 228)
        interfaces.append((f"{owner}:{iface}", 1 if bare or not linktype else linktype,
                           f"netns {ns}" + ("; bare IP device, Ethernet header added by netsim"
                                            if bare else "")))
        for ts, raw in frames:
            comment = ""
            frame = b"\0" * 12 + b"\x08\x00" + raw if bare else raw
            offset = _ip_offset(1 if bare else linktype, frame)
            if offset is not None:
                layers = decode(frame, offset)
                inner = _inner_offset(frame, offset, layers) if layers else None
                if inner is not None and marker.is_probe(frame, inner, layers[-1]):
                    comment = f"netsim trace probe at {owner} {iface}"
            packets.append((ts, i, frame, comment))
    packets.sort(key=lambda p: p[0])
    try:
        write_pcapng(path, interfaces, packets)
    except OSError as exc:
        raise NetsimError(f"writing {path}: {exc}") from None


def _verdict(t: Trace, timeout: float) -> str:
    reply = (f"reply {t.reply} after {t.rtt_ms:.2f} ms" if t.reply
             else f"no reply within {timeout:g} s")
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
        short = (f"{inner.src} > {inner.dst} {PROTO_NAMES.get(inner.proto, inner.proto)} "
                 f"ttl={inner.ttl}")
        if outer.encap == "vxlan":
            text = (f"{outer.src} > {outer.dst} UDP {outer.dport} VXLAN vni={outer.vni} "
                    f"ttl={outer.ttl} [{short}]")
        elif outer.encap == "ipip":
            text = f"{outer.src} > {outer.dst} IPIP (IP proto 4) ttl={outer.ttl} [{short}]"
        else:
            text = (f"{outer.src} > {outer.dst} UDP {outer.dport} flannel-udp "
                    f"ttl={outer.ttl} [{short}]")
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
    if t.pcap:
        lines.append(f"  pcap: {t.pcap} (every packet of every hop; the probe's are commented)")
    lines.append(f"  {t.verdict}")
    return "\n".join(lines)


# -- capture --------------------------------------------------------------------------------


def capture(record: dict, target: str, iface: str | None = None, out: str = "capture.pcap",
            count: int = 100, duration: float = 10.0,
            ready: Callable[[], None] | None = None) -> int:
    """tcpdump on one interface of a node, pod, client, "underlay" or "router" into a pcap
    Wireshark opens; ends after `count` packets or `duration` seconds. `ready` is called once
    tcpdump listens (to start traffic). Returns the number of packets written."""
    if not 0 < count <= 10_000_000:
        raise NetsimError(f"count {count}: give 1-10000000")
    if not 0 < duration <= 86400:
        raise NetsimError(f"duration {duration}: give 0 < duration <= 86400 seconds")
    netns, owner, default = _namespace_target(record, target)
    iface = iface or default
    if not nsmod.exists(netns):
        raise NetsimError(f"{owner}: its namespace {netns} does not exist; is the cluster up?")
    names = _links(netns)
    if iface not in names:
        raise NetsimError(f"{owner} has no interface {iface}; it has: {', '.join(names)}")
    dumps: list[_Tcpdump] = []
    try:
        dump = _Tcpdump(netns, iface, out, dumps, count=count)
        _wait_listening(dumps)
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
