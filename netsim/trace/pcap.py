"""Reading and writing capture files, and decoding what they hold: every IPv4 header of a
packet through its encapsulations, and finding the probe among the frames by its marker."""

from __future__ import annotations

import functools
import socket
import struct
from dataclasses import dataclass

from netsim import modes
from netsim.errors import NetsimError

PROTO_NAMES = {1: "ICMP", 4: "IPIP", 6: "TCP", 17: "UDP", 47: "GRE"}


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
    endian = {
        b"\xd4\xc3\xb2\xa1": "<",
        b"\x4d\x3c\xb2\xa1": "<",
        b"\xa1\xb2\xc3\xd4": ">",
        b"\xa1\xb2\x3c\x4d": ">",
    }.get(magic)
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
        packets.append((sec + frac / (1e9 if nano else 1e6), data[pos : pos + caplen]))
        pos += caplen
    return linktype, packets


def write_pcapng(
    path: str, interfaces: list[tuple[str, int, str]], packets: list[tuple[float, int, bytes, str]]
) -> None:
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
            body = (
                struct.pack(
                    "<IIIII", ifid, micros >> 32, micros & 0xFFFFFFFF, len(frame), len(frame)
                )
                + frame
                + b"\0" * (-len(frame) % 4)
            )
            if comment:
                body += option(1, comment.encode()) + option(0, b"")
            fh.write(block(6, body))


# -- decoding -------------------------------------------------------------------------------


def ip_offset(linktype: int, frame: bytes) -> int | None:
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


@functools.cache
def udp_carriers() -> dict[int, str]:
    """UDP port -> what it carries, asked of the modes: "vxlan", or the mode's name."""
    return {
        m.udp_port: "vxlan" if m.encapsulation == "vxlan" else m.name
        for m in modes.every()
        if m.udp_port
    }


def _ip4(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def decode(frame: bytes, offset: int) -> list[IPLayer]:
    """Every IPv4 header of a packet, outermost first, unwrapping IPIP and the UDP
    encapsulations the modes use (VXLAN on 8472 and 4789, flannel's udp on 8285)."""
    carriers = udp_carriers()
    layers: list[IPLayer] = []
    for _ in range(4):
        if offset + 20 > len(frame) or frame[offset] >> 4 != 4:
            break
        ihl = (frame[offset] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, offset + 2)[0]
        ident = struct.unpack_from("!H", frame, offset + 4)[0]
        ttl, proto = frame[offset + 8], frame[offset + 9]
        layer = IPLayer(
            _ip4(frame[offset + 12 : offset + 16]),
            _ip4(frame[offset + 16 : offset + 20]),
            proto,
            ttl,
            ident,
        )
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
            carried = carriers.get(layer.dport) or carriers.get(layer.sport)
            if carried == "vxlan" and payload + 8 + 14 <= end and frame[payload] & 0x08:
                layer.encap = "vxlan"
                layer.vni = int.from_bytes(frame[payload + 4 : payload + 7], "big")
                inner = ip_offset(1, frame[payload + 8 : end])
                if inner is None:
                    break
                offset = payload + 8 + inner
                continue
            if carried and carried != "vxlan":
                layer.encap = carried
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
        reasons = (
            {
                0: "net",
                1: "host",
                3: "port",
                9: "net prohibited",
                10: "host prohibited",
                13: "administratively prohibited",
            }
            if kind == 3
            else {}
        )
        return f"{text} ({reasons[code]})" if code in reasons else f"{text} code={code}"
    if proto == 6 and l4 + 14 <= end:
        seq = struct.unpack_from("!I", frame, l4 + 4)[0]
        flags = frame[l4 + 13]
        letters = "".join(
            c for bit, c in ((2, "S"), (16, "."), (1, "F"), (4, "R"), (8, "P")) if flags & bit
        )
        return f"TCP {layer.sport} > {layer.dport} [{letters}] seq={seq}"
    if proto == 17:
        return f"UDP {layer.sport} > {layer.dport}"
    return PROTO_NAMES.get(proto, f"proto {proto}")


@dataclass
class Marker:
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
            return frame[l4 : l4 + 1] == b"\x08" and frame[l4 + 8 :].startswith(self.token)
        if self.proto == 6:
            return frame[l4 + 4 : l4 + 8] == struct.pack("!I", self.seq)
        return frame[l4 + 8 :].startswith(self.token)

    def is_reply(self, frame: bytes, offset: int, layer: IPLayer) -> bool:
        l4 = offset + (frame[offset] & 0x0F) * 4
        if layer.proto == 1 and self._icmp_error(frame, l4):
            return True
        if layer.proto != self.proto:
            return False
        if self.proto == 1:
            return frame[l4 : l4 + 1] == b"\x00" and frame[l4 + 8 :].startswith(self.token)
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


def find_probe(
    linktype: int,
    frames: list[tuple[float, bytes]],
    marker: Marker,
) -> tuple[list[tuple[float, list[IPLayer]]], bool]:
    """Every copy of the probe in a capture (time, layers), and whether a reply was seen."""
    copies: list[tuple[float, list[IPLayer]]] = []
    reply = False
    for ts, frame in frames:
        offset = ip_offset(linktype, frame)
        if offset is None:
            continue
        layers = decode(frame, offset)
        inner = inner_offset(frame, offset, layers)
        if not layers or inner is None:
            continue
        if marker.is_probe(frame, inner, layers[-1]):
            copies.append((ts, layers))
        elif marker.is_reply(frame, inner, layers[-1]):
            reply = True
    return copies, reply


def inner_offset(frame: bytes, offset: int, layers: list[IPLayer]) -> int | None:
    """Where the innermost IPv4 header of `layers` starts (walks the same encapsulations)."""
    for layer in layers[:-1]:
        l4 = offset + (frame[offset] & 0x0F) * 4
        if layer.encap == "ipip":
            offset = l4
        elif layer.encap == "vxlan":
            inner = ip_offset(1, frame[l4 + 16 :])
            if inner is None:
                return None
            offset = l4 + 16 + inner
        elif layer.encap in udp_carriers().values():  # a userspace carrier: IP in UDP
            offset = l4 + 8
        else:
            return None
    return offset
