"""The cluster DNS server: the `Zone` of netsim/dns/zone.py served over UDP and TCP on one port
of a pod's namespace, rebuilt from the store whenever a Service or Endpoints object changes —
what CoreDNS with kubeadm's Corefile is in a cluster, without its forwarding: netsim answers
its own zones and refuses the rest, so no query leaves the host.

The sockets are opened with the thread inside the namespace they serve (a socket stays in the
namespace it was made in); the store is reached from another (netsim/store/client.py). One
thread serves UDP and accepts TCP through a selector; each TCP connection has a short-lived
thread of its own (DNS over TCP is the rare path: truncated answers, zone-sized replies). A new
Zone replaces the old one in one assignment, so a query sees one snapshot or the next.

    python -m netsim.dns CONFIG.json

CONFIG.json: {"domain": "cluster.local", "service_cidr": "10.96.0.0/12",
"pod_networks": ["10.244.0.0/16"], "listen_netns": "<name, or empty: where it runs>",
"port": 53, "store": {"endpoints": ["http://10.0.0.2:2379"], "netns": "<name, or empty>"}}
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.message

from netsim import registry
from netsim.dns.zone import Zone, not_ready
from netsim.errors import NetsimError, TopologyError
from netsim.kernel import netns as nsmod

DEFAULT_PORT = 53
CONFIG_ENV = "NETSIM_DNS_CONFIG"  # the coredns container's configuration, as JSON text
UDP_PLAIN_SIZE = 512  # RFC 1035: without EDNS a UDP answer fits 512 bytes, or says TC
TCP_IDLE = 10.0  # seconds a TCP connection may wait between queries (CoreDNS: 10 s)
MAX_TCP = 128  # connections served at once; more are closed at once


@dataclass
class Config:
    """What `python -m netsim.dns` serves, and where."""

    domain: str = "cluster.local"
    service_cidr: str = "10.96.0.0/12"
    pod_networks: list[str] = field(default_factory=lambda: ["10.244.0.0/16"])
    listen_netns: str = ""  # empty: the namespace the process runs in
    port: int = DEFAULT_PORT
    store_endpoints: list[str] = field(default_factory=list)
    store_netns: str = ""


def load_config(path: str, text: str | None = None) -> Config:
    """The configuration file (or its `text`, named `path`), checked field by field:
    TopologyError (exit status 2) names the first field that is wrong and how to fix it."""

    def bad(name: str, problem: str, fix: str = "") -> TopologyError:
        return TopologyError(path, "dns config", name, problem, fix)

    try:
        if text is None:
            with open(path) as fh:
                text = fh.read()
        raw = json.loads(text)
    except OSError as exc:
        raise bad("", f"cannot read it: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise bad("", f"not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(raw, dict):
        raise bad("", "not a JSON object", 'write {"domain": ..., "store": {...}}')
    known = {"domain", "service_cidr", "pod_networks", "listen_netns", "port", "store"}
    for name in raw:
        if name not in known:
            raise bad(name, "unknown field", f"use one of {', '.join(sorted(known))}")
    config = Config()
    domain = raw.get("domain", config.domain)
    if not isinstance(domain, str) or not _is_domain(domain):
        raise bad("domain", f"{domain!r} is not a DNS domain", "e.g. cluster.local")
    config.domain = domain.rstrip(".").lower()
    config.service_cidr = _cidr(raw.get("service_cidr", config.service_cidr), "service_cidr", bad)
    networks = raw.get("pod_networks", config.pod_networks)
    if not isinstance(networks, list) or not networks:
        raise bad("pod_networks", "must be a non-empty list of CIDRs", 'e.g. ["10.244.0.0/16"]')
    config.pod_networks = [_cidr(n, f"pod_networks[{i}]", bad) for i, n in enumerate(networks)]
    listen = raw.get("listen_netns", "")
    if not isinstance(listen, str):
        raise bad("listen_netns", "must be a namespace name, or empty for the current one")
    if listen and not nsmod.exists(listen):
        raise bad("listen_netns", f"no network namespace {listen!r}", "create the pod first")
    config.listen_netns = listen
    port = raw.get("port", DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise bad("port", f"{port!r} is not a port", "a number from 1 to 65535, usually 53")
    config.port = port
    store = raw.get("store")
    if not isinstance(store, dict):
        raise bad("store", "missing: where etcd is", '{"endpoints": [...], "netns": "..."}')
    endpoints = store.get("endpoints")
    if (
        not isinstance(endpoints, list)
        or not endpoints
        or not all(isinstance(e, str) and e for e in endpoints)
    ):
        raise bad("store.endpoints", "must be a non-empty list of URLs", "http://IP:2379")
    store_netns = store.get("netns", "")
    if not isinstance(store_netns, str):
        raise bad("store.netns", "must be a namespace name, or empty for the current one")
    if store_netns and not nsmod.exists(store_netns):
        raise bad("store.netns", f"no network namespace {store_netns!r}")
    config.store_endpoints, config.store_netns = list(endpoints), store_netns
    return config


def _cidr(value: object, name: str, bad: Callable[..., TopologyError]) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise bad(name, f"{value!r} is not a CIDR: {exc}", "e.g. 10.96.0.0/12") from None


def _is_domain(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return bool(text.strip(".")) and all(
        0 < len(label) < 64 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )


def wire(response: dns.message.Message, tcp: bool) -> bytes:
    """The response as sent: over UDP cut to the client's EDNS size (512 without EDNS) with
    TC set, over TCP whole, behind its length."""
    if tcp:
        return response.to_wire(max_size=65535, prefer_truncation=True, prepend_length=True)
    size = response.request_payload if response.edns >= 0 else UDP_PLAIN_SIZE
    return response.to_wire(max_size=max(size, UDP_PLAIN_SIZE), prefer_truncation=True)


class DnsServer:
    """Serves the current `zone` on UDP and TCP `port` of a namespace (None: this thread's).
    Until a zone is set it answers SERVFAIL, as a resolver would whose data is not there yet:
    never an NXDOMAIN that clients would cache."""

    def __init__(
        self,
        zone: Zone | None = None,
        port: int = DEFAULT_PORT,
        netns: str | None = None,
        address: str = "0.0.0.0",
        log: Callable[[str], None] = print,
    ):
        self.zone = zone  # replaced whole (ClusterDns.sync), read once per query
        self.port, self.netns, self.address, self.log = port, netns, address, log
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Open both sockets in the namespace and serve. NetsimError when they cannot be."""
        where = f"{self.address}:{self.port}" + (f" in netns {self.netns}" if self.netns else "")
        udp = tcp = None
        try:
            with nsmod.entered(self.netns):  # a socket belongs to the namespace it is made in
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                udp.bind((self.address, self.port))
                tcp.bind((self.address, self.port))
                tcp.listen(64)
        except BaseException as exc:
            for sock in (udp, tcp):
                if sock is not None:
                    sock.close()
            if isinstance(exc, OSError):
                raise NetsimError(f"dns: cannot listen on {where}: {exc.strerror}") from None
            raise
        udp.setblocking(False)
        tcp.setblocking(False)
        self._udp, self._tcp = udp, tcp
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dns")
        self._thread.start()
        self.log(f"dns: serving {where} (udp, tcp)")

    def stop(self) -> None:
        """Stop serving and close every socket, the open TCP connections too."""
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._thread = None
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._udp = self._tcp = None

    def respond(self, data: bytes, tcp: bool) -> bytes | None:
        """The reply to one query's bytes (None: no reply)."""
        zone = self.zone
        response = not_ready(data) if zone is None else zone.answer(data)
        return None if response is None else wire(response, tcp)

    # -- the threads ---------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ, "udp")
            selector.register(self._tcp, selectors.EVENT_READ, "tcp")
            selector.register(self._wake_r, selectors.EVENT_READ, "stop")
            while True:
                for key, _ in selector.select():
                    if key.data == "stop":
                        return
                    if key.data == "udp":
                        self._udp_ready()
                    else:
                        self._accept()

    def _udp_ready(self) -> None:
        """Answer every datagram waiting, then wait again."""
        assert self._udp is not None
        for _ in range(256):  # then let TCP and stop have a turn
            try:
                data, peer = self._udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error from an earlier reply: nothing to do
                continue
            reply = self._safely(data, tcp=False)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(reply, peer)

    def _accept(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        with self._lock:
            if len(self._conns) >= MAX_TCP:
                conn.close()
                return
            self._conns.add(conn)
        threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True, name="dns-tcp").start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        """Queries on one connection, each behind its 2-byte length, until the client closes
        it or is idle for TCP_IDLE seconds."""
        conn.setblocking(True)
        conn.settimeout(TCP_IDLE)
        try:
            while True:
                head = _read(conn, 2)
                if head is None:
                    return
                data = _read(conn, int.from_bytes(head, "big"))
                if data is None:
                    return
                reply = self._safely(data, tcp=True)
                if reply is None:
                    return
                conn.sendall(reply)
        except OSError:  # timeout, reset, or stop() shut it down
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _safely(self, data: bytes, tcp: bool) -> bytes | None:
        """`respond`, where a bug met by one odd query is logged, not fatal to the server."""
        try:
            return self.respond(data, tcp)
        except Exception as exc:  # one query's failure must not stop the server
            self.log(f"dns: no answer to a query of {len(data)} bytes: {exc!r}")
            return None


def _read(conn: socket.socket, size: int) -> bytes | None:
    """Exactly `size` bytes, or None at the end of the stream."""
    chunks, left = [], size
    while left:
        chunk = conn.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class ClusterDns:
    """The informer's daemon: every change under /registry/services/ builds the Zone anew
    from the whole cache and hands it to the server."""

    name = "coredns"
    prefixes = (registry.SERVICES_ALL,)

    def __init__(
        self,
        server: DnsServer,
        domain: str = "cluster.local",
        service_cidr: str = "10.96.0.0/12",
        pod_networks: tuple[str, ...] | list[str] = ("10.244.0.0/16",),
        log: Callable[[str], None] = print,
    ):
        self.server, self.domain, self.log = server, domain, log
        self.service_cidr, self.pod_networks = service_cidr, tuple(pod_networks)
        self.applied: dict[str, int] = {}  # the informer's report: revisions served

    def sync(self, view: dict) -> None:
        began = time.perf_counter()
        services, endpoints = {}, {}
        for key, kv in view[registry.SERVICES_ALL].items():
            for prefix, into in ((registry.SERVICES, services), (registry.ENDPOINTS, endpoints)):
                if key.startswith(prefix):
                    into[key[len(prefix) :]] = kv.json()
        zone = Zone.from_view(
            services,
            endpoints,
            self.domain,
            self.service_cidr,
            self.pod_networks,
            serial=int(time.time()),  # as CoreDNS's: when it last saw a change
        )
        self.server.zone = zone
        took = (time.perf_counter() - began) * 1000
        self.log(
            f"dns: zone rebuilt: {zone.services} services, {len(endpoints)} endpoints, "
            f"{len(zone.names)} names in {took:.1f} ms"
        )

    def report(self, applied: dict[str, int]) -> None:
        self.applied = applied


def main(argv: list[str] | None = None) -> int:
    """`python -m netsim.dns CONFIG.json`: serve until SIGTERM (or SIGINT), then exit 0. As
    the coredns image's container (`-conf /etc/coredns/Corefile`, netsim/addons.py), the
    configuration is the JSON text of $NETSIM_DNS_CONFIG."""
    argv = sys.argv[1:] if argv is None else argv
    text = None
    if argv[:1] == ["-conf"] and os.environ.get(CONFIG_ENV):
        argv, text = [f"${CONFIG_ENV}"], os.environ[CONFIG_ENV]
    if len(argv) != 1:
        print("usage: python -m netsim.dns CONFIG.json", file=sys.stderr)
        return 2
    # every thread started from here on inherits the mask: the signals wait for sigwait
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        config = load_config(argv[0], text)
        server = DnsServer(None, config.port, config.listen_netns or None, log=_log)
        server.start()
    except NetsimError as exc:
        print(f"netsim dns: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    from netsim.daemons.informer import Informer
    from netsim.store.client import Store

    store = Store(config.store_endpoints, config.store_netns or None)
    daemon = ClusterDns(server, config.domain, config.service_cidr, config.pod_networks, log=_log)
    informer = Informer(store, [daemon], daemon.report, log=_log)
    informer.start()
    _log(f"dns: pid {os.getpid()}, zone {config.domain}, following {store!r}")
    received = signal.sigwait(stop_signals)
    informer.stop()
    server.stop()
    _log(f"dns: stopped ({signal.Signals(received).name})")
    return 0


def _log(line: str) -> None:
    print(line, flush=True)
