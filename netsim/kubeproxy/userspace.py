"""kube-proxy's original userspace mode: a proxy process that relays bytes to the endpoints.

In this mode (kubernetes pkg/proxy/userspace, removed in 1.26) NAT rules in the node send every
ClusterIP and NodePort connection to a local port on which the proxy listens, one port per
service port; the proxy picks an endpoint and relays both ways. netsim's rules are nftables
(``ip daddr <clusterIP> tcp dport <port> redirect to :<proxy port>``, written by the caller);
this module is the proxy. It follows LoadBalancerRR (roundrobin.go) and proxysocket.go:

- Endpoints of a service port are ordered by IP, then port (the real one shuffles them once per
  update; netsim is deterministic so a lab run can be repeated). Each new connection (TCP) or
  new client flow (UDP) takes the next endpoint in turn.
- ClientIP affinity: a client IP bound to an endpoint keeps it while the binding lives; the
  timeout (default 10800 s, 1-86400) slides, every use refreshes it. When the endpoints change,
  only bindings to removed endpoints are dropped. Switching affinity on or off takes effect at
  once and starts with no bindings.
- Dialling: up to four tries with kube-proxy's timeouts (250 ms, 500 ms, 1 s, 2 s); a refused or
  timed-out try moves to the next endpoint and rebinds the client (``sessionAffinityReset``).
  If every try fails the client's binding is dropped and its connection reset.
- No endpoints: an accepted TCP connection is reset at once (as REJECT would); a UDP datagram is
  dropped.
- TCP is relayed with half-close (a FIN from one side becomes ``shutdown(SHUT_WR)`` on the other
  once its bytes are written); a reset from one side resets the other. UDP: one flow per client
  address with its own socket connected to the endpoint; replies go back from the service's
  listening socket; flows idle for ``udp_idle_timeout`` (kube-proxy's --udp-timeout, 250 ms)
  are closed.

API::

    proxy = Proxy("netsim.c1.node1")            # the node's network namespace
    ports = proxy.sync({"default/web:80/TCP": {"protocol": "TCP",
                        "endpoints": [["10.244.1.2", 9376], ...],
                        "affinity": "None" | "ClientIP", "timeout": 10800,
                        "port": 0}})             # optional: a fixed listen port (0/absent: any)
    # -> {"default/web:80/TCP": 41235}: write `redirect to :41235` rules for that service port
    proxy.start()      # one daemon thread: accept, dial and relay for every service port
    proxy.stats()      # {key: {"port", "endpoints", "connections": {"ip:port": n}, ...}}
    proxy.close()      # stops the thread, closes every socket

``sync()`` is idempotent and declarative: keys absent from the argument are closed, existing keys
keep their listen port, bad input raises ValueError before anything changes. It and ``stats()``
are thread-safe: while the thread runs they are executed by it (handed over through a queue and
a wake-up socket), so the relay state has a single owner and needs no locks. The thread lives
inside the node's namespace, so listening sockets and the sockets that dial endpoints are
created there; before ``start()`` the calling thread enters the namespace for each call.

``original_dst(sock)`` reads SO_ORIGINAL_DST (what the client dialled before the redirect) from
an accepted TCP socket; ``stats()`` counts connections per original destination ("frontends"),
so ClusterIP and NodePort traffic of one service port can be told apart.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import ipaddress
import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from netsim.kernel import netns as nsmod
from netsim.kubeproxy.ports import Endpoint
from netsim.model import DEFAULT_AFFINITY_TIMEOUT

log = logging.getLogger(__name__)

MAX_AFFINITY_TIMEOUT = 86400
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)  # userspace proxier's EndpointDialTimeouts
UDP_IDLE_TIMEOUT = 0.25  # kube-proxy --udp-timeout default
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
_CHUNK = 65536  # bytes per recv
_HIGH_WATER = 256 * 1024  # stop reading a side while this much waits for the other
_BATCH = 64  # accepts / datagrams per readiness event: keeps service ports fair
_TICK = 0.05  # housekeeping period while dials or UDP flows are pending
_IDLE_TICK = 1.0
_REAP_PERIOD = 5.0  # how often stale affinity bindings are dropped
_CALL_TIMEOUT = 10.0  # how long sync()/stats() wait for the thread
_PROTOCOLS = ("TCP", "UDP")
_AFFINITIES = ("None", "ClientIP")
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _ep_text(ep: Endpoint) -> str:
    return f"{ep[0]}:{ep[1]}"


def _ep_order(ep: Endpoint) -> tuple[int, int]:
    return int(ipaddress.IPv4Address(ep[0])), ep[1]


def original_dst(sock: socket.socket) -> Endpoint | None:
    """The destination the client dialled before NAT (conntrack's view); None if not NATed."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port


def _reset_close(sock: socket.socket) -> None:
    """Close with RST, so the peer learns at once that the connection is gone."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    sock.close()


class Balancer:
    """LoadBalancerRR's state for one service port: round robin plus ClientIP affinity.

    Pure (no I/O, injectable clock) so its semantics can be tested exactly."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.endpoints: list[Endpoint] = []
        self.index = 0
        self.affinity = "None"
        self.timeout: float = DEFAULT_AFFINITY_TIMEOUT
        self.clients: dict[str, list] = {}  # client IP -> [endpoint, last used]

    def update(
        self,
        endpoints: list[Endpoint],
        affinity: str = "None",
        timeout: float = DEFAULT_AFFINITY_TIMEOUT,
    ) -> None:
        """New endpoints and policy; only bindings to removed endpoints are forgotten."""
        ordered = sorted(endpoints, key=_ep_order)
        if ordered != self.endpoints:
            kept = set(ordered)
            self.clients = {ip: b for ip, b in self.clients.items() if b[0] in kept}
            self.endpoints, self.index = ordered, 0
        if affinity != self.affinity:
            self.clients = {}
        self.affinity, self.timeout = affinity, timeout

    def next_endpoint(self, client_ip: str, reset: bool = False) -> Endpoint | None:
        """The endpoint for a new connection from client_ip (None: no endpoints). `reset`
        ignores the client's binding, as after a failed dial."""
        if not self.endpoints:
            return None
        now = self.clock()
        sticky = self.affinity == "ClientIP"
        if sticky and not reset:
            binding = self.clients.get(client_ip)
            if binding is not None and now - binding[1] < self.timeout:
                binding[1] = now
                return binding[0]
        ep = self.endpoints[self.index % len(self.endpoints)]
        self.index = (self.index + 1) % len(self.endpoints)
        if sticky:
            self.clients[client_ip] = [ep, now]
        return ep

    def forget(self, client_ip: str) -> None:
        self.clients.pop(client_ip, None)

    def reap(self) -> None:
        """Drop expired bindings (CleanupStaleStickySessions), so memory stays bounded."""
        now = self.clock()
        self.clients = {ip: b for ip, b in self.clients.items() if now - b[1] < self.timeout}


def _validate(services: dict[str, dict]) -> dict[str, dict]:
    """Normalised specs, or ValueError naming the key and field."""
    if not isinstance(services, dict):
        raise ValueError("services must be a mapping of service port key to spec")
    out = {}
    for key, spec in services.items():
        where = f"service {key!r}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: spec must be a mapping")
        protocol = spec.get("protocol", "TCP")
        if protocol not in _PROTOCOLS:
            raise ValueError(f"{where}: protocol {protocol!r}: use TCP or UDP")
        affinity = spec.get("affinity", "None") or "None"
        if affinity not in _AFFINITIES:
            raise ValueError(f"{where}: affinity {affinity!r}: use None or ClientIP")
        timeout = spec.get("timeout", DEFAULT_AFFINITY_TIMEOUT)
        if timeout is None:
            timeout = DEFAULT_AFFINITY_TIMEOUT
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT
        ):
            raise ValueError(f"{where}: timeout {timeout!r}: seconds between 1 and 86400")
        port = spec.get("port") or 0
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"{where}: port {port!r}: 0 (any) or a port number")
        endpoints = []
        for item in spec.get("endpoints") or []:
            try:
                ip, ep_port = item
                ipaddress.IPv4Address(ip)
                if not isinstance(ep_port, int) or not 1 <= ep_port <= 65535:
                    raise ValueError(ep_port)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: endpoint {item!r}: use [IPv4 address, port]") from None
            endpoints.append((str(ip), ep_port))
        out[key] = {
            "protocol": protocol,
            "affinity": affinity,
            "timeout": timeout,
            "port": port,
            "endpoints": endpoints,
        }
    return out


class _Service:
    """One service port: its listening socket, balancer, counters and (UDP) client flows."""

    def __init__(self, key: str, protocol: str, sock: socket.socket):
        self.key, self.protocol, self.sock = key, protocol, sock
        self.port: int = sock.getsockname()[1]
        self.balancer = Balancer()
        self.connections: dict[str, int] = {}
        self.frontends: dict[str, int] = {}
        self.rejects = self.dial_failures = self.failed = 0
        self.active: set[_Relay | _Flow] = set()
        self.flows: dict[Endpoint, _Flow] = {}  # UDP: client address -> flow

    def count(self, ep: Endpoint) -> None:
        text = _ep_text(ep)
        self.connections[text] = self.connections.get(text, 0) + 1


class _Dial:
    """A TCP connection accepted and waiting for its endpoint to answer."""

    def __init__(self, svc: _Service, client: socket.socket, client_ip: str):
        self.svc, self.client, self.client_ip = svc, client, client_ip
        self.attempt = 0
        self.upstream: socket.socket | None = None
        self.endpoint: Endpoint | None = None
        self.deadline = 0.0


class _Relay:
    """Bytes both ways between a client and its endpoint, with half-close and back-pressure.
    Side 0 is the client, side 1 the endpoint; bufs[i] holds bytes waiting to go to side i."""

    def __init__(self, proxy: Proxy, svc: _Service, client: socket.socket, upstream: socket.socket):
        self.proxy, self.svc = proxy, svc
        self.socks = (client, upstream)
        self.bufs = (bytearray(), bytearray())
        self.eof = [False, False]  # side i sent FIN
        self.shut = [False, False]  # we shut down writing to side i
        self.masks = [0, 0]
        self.closed = False

    def ready(self, side: int, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                self._read(side)
            for i in (0, 1):
                self._flush(i)
                if self.eof[1 - i] and not self.bufs[i] and not self.shut[i]:
                    self.socks[i].shutdown(socket.SHUT_WR)
                    self.shut[i] = True
        except OSError:  # reset, broken pipe: pass the reset on
            self.close(reset=True)
            return
        if self.shut[0] and self.shut[1]:
            self.close()
        else:
            self._update()

    def _read(self, side: int) -> None:
        try:
            data = self.socks[side].recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            self.bufs[1 - side].extend(data)
        else:
            self.eof[side] = True

    def _flush(self, side: int) -> None:
        buf = self.bufs[side]
        if buf and not self.shut[side]:
            try:
                sent = self.socks[side].send(buf)
            except (BlockingIOError, InterruptedError):
                return
            del buf[:sent]

    def _update(self) -> None:
        for i in (0, 1):
            mask = 0
            if not self.eof[i] and len(self.bufs[1 - i]) < _HIGH_WATER:
                mask |= selectors.EVENT_READ
            if self.bufs[i]:
                mask |= selectors.EVENT_WRITE
            if mask != self.masks[i]:
                self.proxy._set_mask(self.socks[i], self.masks[i], mask, partial(self.ready, i))
                self.masks[i] = mask

    def start(self) -> None:
        self._update()

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for i in (0, 1):
            self.proxy._set_mask(self.socks[i], self.masks[i], 0, None)
            self.masks[i] = 0
            if reset:
                _reset_close(self.socks[i])
            else:
                self.socks[i].close()
        self.svc.active.discard(self)
        self.proxy._live.discard(self)


class _Flow:
    """One UDP client of a service port: a socket connected to its endpoint."""

    def __init__(
        self, proxy: Proxy, svc: _Service, client: Endpoint, sock: socket.socket, endpoint: Endpoint
    ):
        self.proxy, self.svc, self.client = proxy, svc, client
        self.sock, self.endpoint = sock, endpoint
        self.last = time.monotonic()
        self.closed = False

    def ready(self, mask: int) -> None:
        """Replies from the endpoint go back to the client from the service's socket."""
        for _ in range(_BATCH):
            try:
                data = self.sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP unreachable from the endpoint: this flow is dead
                self.close()
                return
            self.last = time.monotonic()
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self.svc.sock.sendto(data, self.client)

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy._set_mask(self.sock, selectors.EVENT_READ, 0, None)
        self.sock.close()
        self.svc.active.discard(self)
        self.proxy._live.discard(self)
        if self.svc.flows.get(self.client) is self:
            del self.svc.flows[self.client]


class _Call:
    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:  # handed back to the caller's thread, which re-raises it
            self.error = exc
        self.done.set()


class Proxy:
    """The userspace proxy of one node. See the module docstring for the API."""

    def __init__(
        self,
        netns: str | None,
        address: str = "0.0.0.0",
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
        dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS,
    ):
        self.netns, self.address = netns, address
        self.udp_idle_timeout = udp_idle_timeout
        self.dial_timeouts = dial_timeouts
        self.sel = selectors.DefaultSelector()
        self._services: dict[str, _Service] = {}
        self._dials: set[_Dial] = set()
        self._live: set[_Relay | _Flow] = set()  # open relays and flows, of any service
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._queue: deque[_Call] = deque()
        self._lock = threading.Lock()  # guards _queue, _running, _closed
        self._inline = threading.Lock()  # serialises calls made while no thread runs
        self._thread: threading.Thread | None = None
        self._running = self._closed = self._stopping = False
        self._next_reap = 0.0
        self.errors = 0

    # -- public ----------------------------------------------------------------------------------

    def sync(self, services: dict[str, dict]) -> dict[str, int]:
        """Serve exactly these service ports; returns each key's listen port."""
        wanted = _validate(services)
        return self._call(partial(self._apply, wanted))

    def stats(self) -> dict[str, dict]:
        """Per service port: listen port, endpoints, connections per endpoint, rejects..."""
        return self._call(self._snapshot)

    def ports(self) -> dict[str, int]:
        return self._call(lambda: {k: s.port for k, s in self._services.items()})

    def start(self) -> None:
        """Serve in one daemon thread (inside the node's namespace) until close()."""
        with self._inline, self._lock:
            if self._closed:
                raise RuntimeError("proxy is closed")
            if self._thread is not None:
                return
            self._running = True
            self._thread = threading.Thread(
                target=self._run, daemon=True, name=f"kubeproxy-userspace@{self.netns}"
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and close every socket; connections in flight are reset. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._stopping = True
            thread = self._thread
        if thread is not None:
            self._wake()
            thread.join(timeout=_CALL_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError(f"userspace proxy thread in {self.netns} did not stop")
        with self._inline:
            self._teardown()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls from other threads ------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn where the relay state lives: on the proxy thread if it runs, else here, inside
        the namespace."""
        if threading.current_thread() is self._thread:
            return fn()
        call = _Call(fn)
        with self._inline:  # start() holds it too, so "not running" stays true while fn runs
            with self._lock:
                if self._closed:
                    raise RuntimeError("proxy is closed")
                queued = self._running
                if queued:
                    self._queue.append(call)
            if not queued:
                with nsmod.entered(self.netns):
                    return fn()
        self._wake()
        if not call.done.wait(_CALL_TIMEOUT):
            raise TimeoutError(f"userspace proxy in {self.netns} did not answer")
        if call.error is not None:
            raise call.error
        return call.result

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass
        self._run_queue()

    def _run_queue(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                call = self._queue.popleft()
            call.run()

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with nsmod.entered(self.netns):
                self._loop()
        finally:
            with self._lock:
                self._running = False
                pending = list(self._queue)
                self._queue.clear()
            for call in pending:
                call.error = RuntimeError("proxy is closed")
                call.done.set()

    def _loop(self) -> None:
        while not self._stopping:
            busy = self._dials or any(s.flows for s in self._services.values())
            for key, mask in self.sel.select(_TICK if busy else _IDLE_TICK):
                if self._stopping:
                    return
                if self.sel.get_map().get(key.fd) is not key:
                    continue  # closed or changed by an earlier handler; level-triggered, so
                    # anything still pending is reported again by the next select()
                try:
                    key.data(mask)
                except Exception:  # a bug in one connection must not stop the node's proxy
                    self.errors += 1
                    log.exception("userspace proxy: handler failed")
            self._housekeeping()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for dial in [d for d in self._dials if d.deadline <= now]:
            self._dial_failed(dial)
        for svc in self._services.values():
            for flow in [f for f in svc.flows.values() if now - f.last > self.udp_idle_timeout]:
                flow.close()
        if now >= self._next_reap:
            self._next_reap = now + _REAP_PERIOD
            for svc in self._services.values():
                svc.balancer.reap()

    def _set_mask(
        self, sock: socket.socket, old: int, new: int, handler: Callable[[int], None] | None
    ) -> None:
        if old and new:
            self.sel.modify(sock, new, handler)
        elif new:
            self.sel.register(sock, new, handler)
        elif old:
            self.sel.unregister(sock)

    # -- sync ------------------------------------------------------------------------------------

    def _listen(self, protocol: str, port: int) -> socket.socket:
        kind = socket.SOCK_STREAM if protocol == "TCP" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address, port))
            if protocol == "TCP":
                sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _apply(self, wanted: dict[str, dict]) -> dict[str, int]:
        """Converge to `wanted`: new listen sockets are opened first, so a bind failure
        changes nothing."""
        replace = {
            key
            for key, spec in wanted.items()
            if key in self._services
            and (
                self._services[key].protocol != spec["protocol"]
                or spec["port"] not in (0, self._services[key].port)
            )
        }
        fresh: dict[str, socket.socket] = {}
        try:
            for key, spec in wanted.items():
                if key not in self._services or key in replace:
                    port = spec["port"]
                    if key in replace and port == self._services[key].port:
                        continue  # same port, other protocol: reopened below after closing
                    fresh[key] = self._listen(spec["protocol"], port)
        except OSError:
            for sock in fresh.values():
                sock.close()
            raise
        for key in [k for k in self._services if k not in wanted or k in replace]:
            self._remove(key)
        for key, spec in wanted.items():
            if key not in self._services:
                sock = fresh.get(key) or self._listen(spec["protocol"], spec["port"])
                svc = _Service(key, spec["protocol"], sock)
                handler = self._accept if svc.protocol == "TCP" else self._datagrams
                self.sel.register(sock, selectors.EVENT_READ, partial(handler, svc))
                self._services[key] = svc
            self._services[key].balancer.update(
                spec["endpoints"], spec["affinity"], spec["timeout"]
            )
        return {key: self._services[key].port for key in wanted}

    def _remove(self, key: str) -> None:
        """Close a service port's listener and its UDP flows; TCP connections already
        relayed run to their end, as in kube-proxy."""
        svc = self._services.pop(key)
        self.sel.unregister(svc.sock)
        svc.sock.close()
        for flow in list(svc.flows.values()):
            flow.close()
        for dial in [d for d in self._dials if d.svc is svc]:
            self._give_up(dial)

    def _snapshot(self) -> dict[str, dict]:
        out = {}
        for key, svc in self._services.items():
            bal = svc.balancer
            out[key] = {
                "protocol": svc.protocol,
                "port": svc.port,
                "endpoints": [_ep_text(ep) for ep in bal.endpoints],
                "affinity": bal.affinity,
                "timeout": bal.timeout,
                "affinity_clients": {ip: _ep_text(b[0]) for ip, b in bal.clients.items()},
                "connections": dict(svc.connections),
                "frontends": dict(svc.frontends),
                "active": len(svc.active),
                "rejects": svc.rejects,
                "dial_failures": svc.dial_failures,
                "failed": svc.failed,
            }
        return out

    def _teardown(self) -> None:
        for key in list(self._services):
            self._remove(key)
        for dial in list(self._dials):
            self._give_up(dial)
        for conn in list(self._live):
            conn.close(reset=True)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- TCP -------------------------------------------------------------------------------------

    def _accept(self, svc: _Service, mask: int) -> None:
        for _ in range(_BATCH):
            try:
                client, addr = svc.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNABORTED and friends: that client is gone already
                continue
            client.setblocking(False)
            dst = original_dst(client)
            if dst is not None:
                text = _ep_text(dst)
                svc.frontends[text] = svc.frontends.get(text, 0) + 1
            if not svc.balancer.endpoints:
                svc.rejects += 1
                _reset_close(client)
                continue
            self._dial(_Dial(svc, client, addr[0]), reset=False)

    def _dial(self, dial: _Dial, reset: bool) -> None:
        """Start a non-blocking connect to the next endpoint; on an immediate failure try
        the one after, up to len(dial_timeouts) tries in all."""
        while dial.attempt < len(self.dial_timeouts):
            ep = dial.svc.balancer.next_endpoint(dial.client_ip, reset)
            if ep is None:
                break
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setblocking(False)
            rc = up.connect_ex(ep)
            if rc in (0, errnos.EINPROGRESS):
                dial.upstream, dial.endpoint = up, ep
                dial.deadline = time.monotonic() + self.dial_timeouts[dial.attempt]
                self.sel.register(up, selectors.EVENT_WRITE, partial(self._dialled, dial))
                self._dials.add(dial)
                return
            up.close()
            dial.svc.dial_failures += 1
            dial.attempt += 1
            reset = True
        self._give_up(dial)

    def _dialled(self, dial: _Dial, mask: int) -> None:
        assert dial.upstream is not None and dial.endpoint is not None
        err = dial.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._dial_failed(dial)
            return
        self.sel.unregister(dial.upstream)
        self._dials.discard(dial)
        dial.svc.count(dial.endpoint)
        relay = _Relay(self, dial.svc, dial.client, dial.upstream)
        dial.svc.active.add(relay)
        self._live.add(relay)
        relay.start()

    def _dial_failed(self, dial: _Dial) -> None:
        """Refused or timed out: next endpoint, rebinding the client (sessionAffinityReset)."""
        assert dial.upstream is not None
        self.sel.unregister(dial.upstream)
        dial.upstream.close()
        dial.upstream = None
        self._dials.discard(dial)
        dial.svc.dial_failures += 1
        dial.attempt += 1
        self._dial(dial, reset=True)

    def _give_up(self, dial: _Dial) -> None:
        if dial.upstream is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(dial.upstream)
            dial.upstream.close()
        self._dials.discard(dial)
        dial.svc.failed += 1
        dial.svc.balancer.forget(dial.client_ip)
        _reset_close(dial.client)

    # -- UDP -------------------------------------------------------------------------------------

    def _datagrams(self, svc: _Service, mask: int) -> None:
        for _ in range(_BATCH):
            try:
                data, client = svc.sock.recvfrom(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket: nothing to relay
                continue
            flow = svc.flows.get(client)
            if flow is None:
                flow = self._new_flow(svc, client)
                if flow is None:
                    continue
            flow.last = time.monotonic()
            try:
                flow.sock.send(data)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:  # the endpoint answered an earlier datagram with unreachable
                flow.close()

    def _new_flow(self, svc: _Service, client: Endpoint) -> _Flow | None:
        reset = False
        for _ in range(len(self.dial_timeouts)):
            ep = svc.balancer.next_endpoint(client[0], reset)
            if ep is None:
                svc.rejects += 1
                return None
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect(ep)
            except OSError:  # no route to it
                sock.close()
                svc.dial_failures += 1
                reset = True
                continue
            flow = _Flow(self, svc, client, sock, ep)
            self.sel.register(sock, selectors.EVENT_READ, flow.ready)
            svc.flows[client] = flow
            svc.active.add(flow)
            self._live.add(flow)
            svc.count(ep)
            return flow
        svc.failed += 1
        svc.balancer.forget(client[0])
        return None
