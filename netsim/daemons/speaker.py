"""MetalLB's speaker in layer 2 mode, on every node: LoadBalancer addresses are answered for in
ARP by one node each, and kube-proxy on that node takes the traffic from there.

The election is MetalLB's, and stateless: the nodes that may announce an address (Ready,
on the address's segment, and with a ready endpoint of the Service when its
externalTrafficPolicy is Local) sorted by sha256("<node>#<address>"); the first announces.
Every speaker computes the same answer from the store, so none talks to another. The one
that takes an address over sends a gratuitous ARP (request and reply, as MetalLB does), so the
segment's hosts update their caches at once when it moves.

The answers come from a raw AF_PACKET socket on the node's eth0, as MetalLB's speaker answers
from user space: the address is on no interface, and the node's kernel, which does not own it,
stays silent. (ARP's 28 bytes are packed here with struct: no library is worth a dependency
for them.)
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable

from netsim import registry

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ARP_HEAD = struct.Struct("!HHBBH")  # hardware type, protocol type, sizes, operation
REQUEST, REPLY = 1, 2


def winner(nodes: list[str], address: str) -> str | None:
    """The node that announces `address`: MetalLB's order, sha256 of "<node>#<address>"."""
    ranked = sorted(nodes, key=lambda n: hashlib.sha256(f"{n}#{address}".encode()).digest())
    return ranked[0] if ranked else None


def arp(op: int, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str) -> bytes:
    """An Ethernet frame holding one ARP packet (IPv4 over Ethernet)."""
    dst = BROADCAST if target_mac == b"\0" * 6 else target_mac
    return (
        dst
        + sender_mac
        + struct.pack("!H", ETH_P_ARP)
        + ARP_HEAD.pack(1, 0x0800, 6, 4, op)
        + sender_mac
        + socket.inet_aton(sender_ip)
        + target_mac
        + socket.inet_aton(target_ip)
    )


class Speaker:
    name = "speaker"
    prefixes = (registry.SERVICES_ALL, registry.NODES)

    def __init__(self, node, event: Callable[[str], None], iface: str = "eth0"):
        self.node, self.event, self.iface = node, event, iface
        self.subnet = ipaddress.ip_network(f"{node.ip}/{node.prefixlen}", strict=False)
        self.announced: dict[str, str] = {}  # address -> the Service it belongs to
        self.responder: Responder | None = None

    def sync(self, view: dict) -> None:
        from netsim.controller import is_ready

        nodes = {}
        for kv in view[registry.NODES].values():
            obj = kv.json()
            address = next(
                (a["address"] for a in obj["status"]["addresses"] if a["type"] == "InternalIP"),
                "",
            )
            if is_ready(obj) and address and ipaddress.ip_address(address) in self.subnet:
                nodes[obj["metadata"]["name"]] = address
        objects = view[registry.SERVICES_ALL]
        mine: dict[str, str] = {}
        for key, kv in objects.items():
            if not key.startswith(registry.SERVICES) or b'"ingress"' not in kv.value:
                continue
            svc = kv.json()
            where = key[len(registry.SERVICES) :]
            eligible = list(nodes)
            if svc["spec"].get("externalTrafficPolicy") == "Local":
                ends = objects.get(registry.ENDPOINTS + where)
                serving = {
                    a.get("nodeName")
                    for subset in (ends.json().get("subsets", []) if ends else [])
                    for a in subset.get("addresses", [])
                }
                eligible = [n for n in eligible if n in serving]
            for ingress in svc["status"]["loadBalancer"]["ingress"]:
                ip = ingress.get("ip", "")
                in_segment = ip and ipaddress.ip_address(ip) in self.subnet
                if in_segment and winner(eligible, ip) == self.node.name:
                    mine[ip] = where
        if mine and self.responder is None:
            self.responder = Responder(self.node.netns, self.iface)
        if self.responder is not None:
            self.responder.addresses = frozenset(mine)
            for ip in sorted(mine.keys() - self.announced.keys()):
                self.responder.gratuitous(ip)
                self.event(f"announcing {ip} (service {mine[ip]}) on {self.iface}: gratuitous ARP")
        for ip in sorted(self.announced.keys() - mine.keys()):
            self.event(f"no longer announcing {ip} (service {self.announced[ip]})")
        self.announced = mine


class Responder:
    """Answers ARP requests for its addresses on one interface of a namespace."""

    def __init__(self, netns: str, iface: str):
        from netsim.kernel import netns as nsmod

        self.addresses: frozenset[str] = frozenset()
        with nsmod.entered(netns):  # the socket belongs to the node's namespace
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.bind((iface, ETH_P_ARP))
        self.mac = self.sock.getsockname()[4]
        threading.Thread(target=self._answer, daemon=True, name="arp-responder").start()

    def gratuitous(self, ip: str) -> None:
        for op in (REQUEST, REPLY):
            self.sock.send(arp(op, self.mac, ip, b"\0" * 6, ip))

    def _answer(self) -> None:
        while True:
            frame = self.sock.recv(128)
            if len(frame) < 42:
                continue
            _, _, _, _, op = ARP_HEAD.unpack_from(frame, 14)
            target = socket.inet_ntoa(frame[38:42])
            if op != REQUEST or target not in self.addresses:
                continue
            asker_mac, asker_ip = frame[22:28], socket.inet_ntoa(frame[28:32])
            if asker_ip == target:  # another host's gratuitous ARP for it
                continue
            self.sock.send(arp(REPLY, self.mac, target, asker_mac, asker_ip))
