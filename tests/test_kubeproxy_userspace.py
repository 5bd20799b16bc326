"""kube-proxy's userspace mode (netsim/kubeproxy/userspace.py) in throwaway namespaces: a node
with a bridge, three pods answering with their names, a pod without a server, and a client
whose traffic to the ClusterIP 10.96.0.10:80 the node redirects (nftables) to the proxy.
Checks round robin, ClientIP affinity (sliding timeout, endpoint removal, switching), dial
retries, rejection without endpoints, UDP flows, and that sync()/close() release everything."""

from __future__ import annotations

import errno
import os
import selectors
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import assert_sticky, ip_batch, needs_root, wait_for

from netsim.kernel import netns as nsmod
from netsim.kubeproxy.userspace import Balancer, Proxy

CLUSTER_IP, SVC_PORT, POD_PORT = "10.96.0.10", 80, 9376
NODE_IP, CLIENT_A, CLIENT_B = "10.80.0.1", "10.80.0.50", "10.80.0.51"
PODS = {"pod1": "10.80.0.11", "pod2": "10.80.0.12", "pod3": "10.80.0.13"}
REFUSING = "10.80.0.14"  # a pod namespace with no server: connections are refused
SILENT = "10.80.0.99"  # nobody has this address: a dial times out (ARP never answered)
NODE_PORT = 30080
TCP_KEY, UDP_KEY = "default/web:80/TCP", "default/web:80/UDP"


def eps(*ips: str) -> list[list]:
    return [[ip, POD_PORT] for ip in ips]


ALL = eps(*PODS.values())


# -- the lab -----------------------------------------------------------------------------------


class PodServers:
    """TCP and UDP servers for every pod, in one thread of the test process: TCP reads the
    request to EOF (so the client's half-close must pass the proxy), then answers
    "<pod> <bytes received>" followed by N bytes of b"x" if the request began "GET N"."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True, name="tkpu-pods")
        self.socks: list[socket.socket] = []

    def add(self, netns: str, name: str) -> None:
        with nsmod.entered(netns):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", POD_PORT))
        tcp.listen(128)
        udp.bind(("0.0.0.0", POD_PORT))
        for sock in (tcp, udp):
            sock.setblocking(False)
            self.socks.append(sock)
        self.sel.register(tcp, selectors.EVENT_READ, ("accept", name))
        self.sel.register(udp, selectors.EVENT_READ, ("udp", name))

    def _serve(self) -> None:
        requests: dict[socket.socket, bytearray] = {}
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.2):
                kind, name = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if kind == "accept":
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        requests[conn] = bytearray()
                        self.sel.register(conn, selectors.EVENT_READ, ("conn", name))
                    elif kind == "udp":
                        data, peer = sock.recvfrom(65536)
                        sock.sendto(name.encode(), peer)
                    else:
                        data = sock.recv(65536)
                        if data:
                            requests[sock].extend(data)
                            continue
                        self._answer(sock, name, requests.pop(sock))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    if kind == "conn":
                        self.sel.unregister(sock)
                        requests.pop(sock, None)
                        sock.close()
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()

    def _answer(self, conn: socket.socket, name: str, request: bytearray) -> None:
        self.sel.unregister(conn)
        body = f"{name} {len(request)}\n".encode()
        if request.startswith(b"GET "):
            body += b"x" * int(request.split()[1])
        conn.setblocking(True)
        conn.settimeout(10)
        try:
            conn.sendall(body)
        finally:
            conn.close()


@dataclass
class Lab:
    prefix: str
    servers: PodServers
    names: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        return self.prefix + "node"

    @property
    def client(self) -> str:
        return self.prefix + "client"

    def redirect(self, tcp_port: int | None = None, udp_port: int | None = None) -> None:
        """Replace the node's table: the ClusterIP's port 80 and the node's TCP NodePort go
        to the proxy's ports."""
        rules = [
            f"ip daddr {CLUSTER_IP} {proto} dport {SVC_PORT} redirect to :{port}"
            for proto, port in (("tcp", tcp_port), ("udp", udp_port))
            if port
        ]
        if tcp_port:
            rules.append(f"ip daddr {NODE_IP} tcp dport {NODE_PORT} redirect to :{tcp_port}")
        text = (
            "add table ip tkpu\ndelete table ip tkpu\ntable ip tkpu {\n"
            " chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n"
            + "".join(f"  {rule}\n" for rule in rules)
            + " }\n}\n"
        )
        run(["ip", "netns", "exec", self.node, "nft", "-f", "-"], input=text)
        listed = subprocess.run(
            ["ip", "netns", "exec", self.node, "nft", "list", "table", "ip", "tkpu"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert [line.strip() for line in listed.splitlines() if "redirect" in line] == rules


def run(argv: list[str], input: str | None = None) -> None:
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Node (bridge br0, 10.80.0.1), pods 1-3 with servers, a pod that refuses, a client with
    two addresses and a route to the service CIDR via the node. Removed afterwards, always."""
    prefix = f"netsim.tkpu{uuid.uuid4().hex[:8]}."
    servers = PodServers()
    lab = Lab(prefix, servers)
    try:
        pods = {**PODS, "pod4": REFUSING}
        for name in ["node", "client", *pods]:
            nsmod.create(prefix + name)
            lab.names.append(prefix + name)
        ip_batch(
            lab.node,
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {NODE_IP}/24 dev br0",
            "link set br0 up",
        )
        for i, (name, ip) in enumerate([*pods.items(), ("client", CLIENT_A)]):
            ns = prefix + name
            ip_batch(
                lab.node,
                f"link add v{i} type veth peer name eth0 netns {ns}",
                f"link set v{i} master br0",
                f"link set v{i} up",
            )
            ip_batch(ns, "link set lo up", "link set eth0 up", f"addr add {ip}/24 dev eth0")
        ip_batch(
            lab.client, f"addr add {CLIENT_B}/24 dev eth0", f"route add 10.96.0.0/16 via {NODE_IP}"
        )
        for name in PODS:
            servers.add(prefix + name, name)
        servers.thread.start()
        yield lab
    finally:
        servers.stop.set()
        if servers.thread.is_alive():
            servers.thread.join(timeout=5)
        else:
            for sock in servers.socks:
                sock.close()
        for ns in nsmod.names():
            if ns.startswith(prefix):
                nsmod.remove(ns)
        assert not [ns for ns in nsmod.names() if ns.startswith(prefix)]


@pytest.fixture
def proxy(lab: Lab) -> Iterator[Proxy]:
    p = Proxy(lab.node)
    p.start()
    try:
        yield p
    finally:
        p.close()
        lab.redirect()


# -- clients -----------------------------------------------------------------------------------


def client_socket(lab: Lab, kind: int, src: str) -> socket.socket:
    with nsmod.entered(lab.client):
        sock = socket.socket(socket.AF_INET, kind)
    sock.settimeout(5)
    sock.bind((src, 0))
    return sock


def ask(
    lab: Lab,
    src: str = CLIENT_A,
    payload: bytes = b"hello",
    dst: tuple[str, int] = (CLUSTER_IP, SVC_PORT),
) -> str:
    """One fresh TCP connection to the service: send, half-close, read the answer to EOF."""
    with client_socket(lab, socket.SOCK_STREAM, src) as sock:
        sock.connect(dst)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode()


def pod_of(answer: str) -> str:
    return answer.split()[0]


def ask_udp(lab: Lab, sock: socket.socket | None = None, src: str = CLIENT_A) -> str:
    own = sock is None
    sock = sock or client_socket(lab, socket.SOCK_DGRAM, src)
    try:
        sock.sendto(b"hi", (CLUSTER_IP, SVC_PORT))
        data, peer = sock.recvfrom(65536)
        assert peer == (CLUSTER_IP, SVC_PORT)  # the reply is un-NATed back to the ClusterIP
        return data.decode()
    finally:
        if own:
            sock.close()


def tcp_service(endpoints: list[list], affinity: str = "None", timeout: int = 10800) -> dict:
    return {"protocol": "TCP", "endpoints": endpoints, "affinity": affinity, "timeout": timeout}


# -- tests -------------------------------------------------------------------------------------


@needs_root
def test_round_robin_in_ip_order(lab: Lab, proxy: Proxy) -> None:
    ports = proxy.sync({TCP_KEY: tcp_service(list(reversed(ALL)))})
    lab.redirect(tcp_port=ports[TCP_KEY])
    answers = [ask(lab) for _ in range(30)]
    assert [pod_of(a) for a in answers] == ["pod1", "pod2", "pod3"] * 10
    assert all(a.split()[1] == "5" for a in answers)  # the request passed intact
    stats = proxy.stats()[TCP_KEY]
    assert stats["connections"] == {f"{ip}:{POD_PORT}": 10 for ip in PODS.values()}
    assert stats["frontends"] == {f"{CLUSTER_IP}:{SVC_PORT}": 30}
    assert stats["failed"] == stats["rejects"] == stats["dial_failures"] == 0
    assert proxy.sync({TCP_KEY: tcp_service(ALL)}) == ports  # idempotent, same port


@needs_root
def test_large_transfers_both_ways(lab: Lab, proxy: Proxy) -> None:
    ports = proxy.sync({TCP_KEY: tcp_service(ALL)})
    lab.redirect(tcp_port=ports[TCP_KEY])
    upload = b"GET 0 " + b"u" * (4 << 20)
    assert ask(lab, payload=upload).split("\n")[0].split()[1] == str(len(upload))
    answer = ask(lab, payload=b"GET 3000000")
    head, body = answer.split("\n", 1)
    assert len(body) == 3000000 and set(body) == {"x"}
    assert sum(proxy.stats()[TCP_KEY]["connections"].values()) == 2  # both through the proxy


@needs_root
def test_concurrent_clients_while_syncing(lab: Lab, proxy: Proxy) -> None:
    """sync() from another thread while connections run: none fails; NodePort traffic is
    counted apart from ClusterIP traffic by its original destination."""
    ports = proxy.sync({TCP_KEY: tcp_service(ALL)})
    lab.redirect(tcp_port=ports[TCP_KEY])
    errors: list[BaseException] = []
    answers: list[str] = []

    def client(src: str, dst: tuple[str, int]) -> None:
        try:
            for _ in range(15):
                answers.append(pod_of(ask(lab, src, dst=dst)))
        except (OSError, AssertionError) as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=client, args=(src, dst))
        for src in (CLIENT_A, CLIENT_B)
        for dst in ((CLUSTER_IP, SVC_PORT), (NODE_IP, NODE_PORT))
    ]
    for thread in threads:
        thread.start()
    sets = [ALL, ALL[:1], ALL[1:], ALL]
    for i in range(40):
        affinity = "ClientIP" if i % 3 == 0 else "None"
        assert proxy.sync({TCP_KEY: tcp_service(sets[i % 4], affinity)}) == ports
        time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(answers) == 60 and set(answers) <= set(PODS)
    frontends = proxy.stats()[TCP_KEY]["frontends"]
    assert frontends == {f"{CLUSTER_IP}:{SVC_PORT}": 30, f"{NODE_IP}:{NODE_PORT}": 30}


@needs_root
def test_client_ip_affinity(lab: Lab, proxy: Proxy) -> None:
    ports = proxy.sync({TCP_KEY: tcp_service(ALL, "ClientIP")})
    lab.redirect(tcp_port=ports[TCP_KEY])
    a = {pod_of(ask(lab, CLIENT_A)) for _ in range(10)}
    b = {pod_of(ask(lab, CLIENT_B)) for _ in range(10)}
    assert len(a) == 1 and len(b) == 1 and a != b  # .51 came second: the next endpoint
    pod_a, pod_b = a.pop(), b.pop()

    # The endpoint bound to .50 goes away: .50 moves (and sticks), .51 keeps its pod.
    proxy.sync({TCP_KEY: tcp_service([ep for ep in ALL if ep[0] != PODS[pod_a]], "ClientIP")})
    assert {pod_of(ask(lab, CLIENT_B)) for _ in range(5)} == {pod_b}
    moved = {pod_of(ask(lab, CLIENT_A)) for _ in range(5)}
    assert len(moved) == 1 and pod_a not in moved

    # Affinity off: at once, fresh connections spread again.
    proxy.sync({TCP_KEY: tcp_service(ALL, "None")})
    assert len({pod_of(ask(lab, CLIENT_A)) for _ in range(6)}) == 3
    assert proxy.stats()[TCP_KEY]["affinity_clients"] == {}

    # A 1 s timeout slides with use (2.4 s, used every 1/6 s), and expires unused: the
    # proxy drops the binding (it reaps every few seconds).
    proxy.sync({TCP_KEY: tcp_service(ALL, "ClientIP", timeout=1)})
    first = assert_sticky(lambda: pod_of(ask(lab, CLIENT_A)), 1, 2.4)
    wait_for(
        lambda: CLIENT_A not in proxy.stats()[TCP_KEY]["affinity_clients"],
        10,
        "the proxy drops the expired binding",
        interval=0.1,
    )
    after = pod_of(ask(lab, CLIENT_A))
    assert after != first  # expired: round robin gave the next endpoint
    assert pod_of(ask(lab, CLIENT_A)) == after


@needs_root
def test_dial_retry_skips_dead_endpoints(lab: Lab, proxy: Proxy) -> None:
    ports = proxy.sync({TCP_KEY: tcp_service(ALL + eps(REFUSING, SILENT))})
    lab.redirect(tcp_port=ports[TCP_KEY])
    answers = [pod_of(ask(lab)) for _ in range(20)]  # raises if any connection failed
    assert set(answers) == set(PODS)
    stats = proxy.stats()[TCP_KEY]
    assert stats["dial_failures"] >= 4 and stats["failed"] == 0
    assert set(stats["connections"]) == {f"{ip}:{POD_PORT}" for ip in PODS.values()}

    # ClientIP: a failed dial rebinds the client to the endpoint that answered.
    proxy.sync({TCP_KEY: tcp_service(eps(PODS["pod1"], REFUSING), "ClientIP")})
    assert pod_of(ask(lab, CLIENT_A)) == "pod1"  # .50 -> .11 (first in order)
    assert pod_of(ask(lab, CLIENT_B)) == "pod1"  # .51 -> .14 refused -> .11
    clients = proxy.stats()[TCP_KEY]["affinity_clients"]
    assert clients == {
        CLIENT_A: f"{PODS['pod1']}:{POD_PORT}",
        CLIENT_B: f"{PODS['pod1']}:{POD_PORT}",
    }

    # Every endpoint refuses: the client is reset promptly and its binding dropped.
    proxy.sync({TCP_KEY: tcp_service(eps(REFUSING), "ClientIP")})
    started = time.monotonic()
    # The reset may come before the send, the half-close (ENOTCONN) or the read.
    with pytest.raises((OSError, AssertionError)) as reset:
        assert ask(lab, CLIENT_A) != ""  # b"" (closed) would also be a failure
    if isinstance(reset.value, OSError):
        assert reset.value.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
    assert time.monotonic() - started < 1
    stats = proxy.stats()[TCP_KEY]
    assert stats["failed"] == 1 and stats["affinity_clients"] == {}


@needs_root
def test_no_endpoints_rejects_at_once(lab: Lab, proxy: Proxy) -> None:
    ports = proxy.sync({TCP_KEY: tcp_service([])})
    lab.redirect(tcp_port=ports[TCP_KEY])
    for _ in range(3):
        started = time.monotonic()
        with client_socket(lab, socket.SOCK_STREAM, CLIENT_A) as sock:
            try:
                sock.connect((CLUSTER_IP, SVC_PORT))
                data = sock.recv(100)
            except (ConnectionResetError, ConnectionRefusedError):
                data = b""
        assert data == b""
        assert time.monotonic() - started < 1
    assert proxy.stats()[TCP_KEY]["rejects"] == 3
    # Endpoints arrive: served at once, same listen port.
    assert proxy.sync({TCP_KEY: tcp_service(ALL)}) == ports
    assert pod_of(ask(lab)) == "pod1"


@needs_root
def test_udp_round_robin_and_flows(lab: Lab, proxy: Proxy) -> None:
    ports = proxy.sync({UDP_KEY: {"protocol": "UDP", "endpoints": ALL}})
    lab.redirect(udp_port=ports[UDP_KEY])
    # a client port of its own each, all bound at once (a port freed and handed out again
    # within the idle timeout would be the same flow): a new flow each
    socks = [client_socket(lab, socket.SOCK_DGRAM, CLIENT_A) for _ in range(30)]
    try:
        answers = [ask_udp(lab, sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert answers == ["pod1", "pod2", "pod3"] * 10
    # one flow, one endpoint: the idle timeout is raised for this check, so a scheduling
    # hiccup on a loaded host cannot end the flow between two datagrams
    proxy.udp_idle_timeout = 1.0
    with client_socket(lab, socket.SOCK_DGRAM, CLIENT_A) as sock:
        assert len({ask_udp(lab, sock) for _ in range(5)}) == 1
    wait_for(lambda: proxy.stats()[UDP_KEY]["active"] == 0, 5, "idle flows closed", interval=0.1)

    proxy.sync({UDP_KEY: {"protocol": "UDP", "endpoints": []}})
    with client_socket(lab, socket.SOCK_DGRAM, CLIENT_A) as sock:
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            ask_udp(lab, sock)
    assert proxy.stats()[UDP_KEY]["rejects"] == 1


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_root
def test_sync_removes_and_close_releases(lab: Lab) -> None:
    fds, threads = _open_fds(), set(threading.enumerate())
    proxy = Proxy(lab.node)
    try:
        ports = proxy.sync(
            {
                TCP_KEY: tcp_service(ALL),  # before start(): served inline
                UDP_KEY: {"protocol": "UDP", "endpoints": ALL},
            }
        )
        proxy.start()
        lab.redirect(tcp_port=ports[TCP_KEY], udp_port=ports[UDP_KEY])
        assert pod_of(ask(lab)) == "pod1"
        assert ask_udp(lab) == "pod1"

        assert proxy.sync({UDP_KEY: {"protocol": "UDP", "endpoints": ALL}}) == {
            UDP_KEY: ports[UDP_KEY]
        }
        with nsmod.entered(lab.node):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with probe, pytest.raises(ConnectionRefusedError):
            probe.settimeout(2)
            probe.connect((NODE_IP, ports[TCP_KEY]))

        # A connection still open when the proxy closes is reset, not leaked.
        ports = proxy.sync({TCP_KEY: tcp_service(ALL)})
        lab.redirect(tcp_port=ports[TCP_KEY])
        held = client_socket(lab, socket.SOCK_STREAM, CLIENT_A)
        held.connect((CLUSTER_IP, SVC_PORT))
        held.sendall(b"open")
        wait_for(
            lambda: proxy.stats()[TCP_KEY]["active"] == 1, 3, "the held connection", interval=0.05
        )
    finally:
        proxy.close()
        lab.redirect()
    with held:
        try:
            assert held.recv(100) == b""
        except ConnectionResetError:
            pass
    assert set(threading.enumerate()) == threads
    # the pod server closes its side of `held` on its own time
    wait_for(lambda: _open_fds() == fds, 3, f"back to {fds} open fds", interval=0.05)
    with pytest.raises(RuntimeError):
        proxy.sync({})
    proxy.close()  # twice is fine


# -- the balancer alone (no namespaces) ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_balancer_semantics() -> None:
    clock = Clock()
    bal = Balancer(clock)
    e1, e2, e3 = ("10.0.0.9", 80), ("10.0.0.10", 80), ("10.0.0.10", 81)
    bal.update([e3, e1, e2])
    assert bal.endpoints == [e1, e2, e3]  # numeric IP order, then port
    assert [bal.next_endpoint("c") for _ in range(6)] == [e1, e2, e3] * 2

    bal.update([e1, e2, e3], "ClientIP", 10)
    assert bal.next_endpoint("a") == e1 and bal.next_endpoint("b") == e2
    for _ in range(5):  # sliding: 9 s steps never let 10 s pass unused
        clock.now += 9
        assert bal.next_endpoint("a") == e1
    clock.now += 10
    assert bal.next_endpoint("a") == e3  # expired: next in turn
    assert bal.next_endpoint("a", reset=True) == e1  # a failed dial rebinds
    assert bal.clients["a"][0] == e1

    bal.update([e2, e3], "ClientIP", 10)  # e1 removed: only "a" loses its binding
    assert "a" not in bal.clients and bal.clients["b"][0] == e2
    bal.update([e2, e3], "None", 10)
    assert bal.clients == {}
    assert bal.next_endpoint("b") != bal.next_endpoint("b")

    bal.update([e2, e3], "ClientIP", 5)
    bal.next_endpoint("x")
    clock.now += 6
    bal.reap()
    assert bal.clients == {}
    bal.update([])
    assert bal.next_endpoint("x") is None


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"protocol": "SCTP"}, "protocol"),
        ({"affinity": "Cookie"}, "affinity"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": 86401}, "timeout"),
        ({"endpoints": [["10.0.0.300", 80]]}, "endpoint"),
        ({"endpoints": [["10.0.0.3", 0]]}, "endpoint"),
        ({"port": 70000}, "port"),
    ],
)
def test_sync_rejects_bad_input_before_acting(spec: dict, field: str) -> None:
    proxy = Proxy(None)
    try:
        with pytest.raises(ValueError, match=field):
            proxy.sync({"default/web:80/TCP": spec})
        assert proxy.stats() == {}
    finally:
        proxy.close()
