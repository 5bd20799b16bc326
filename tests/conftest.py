"""Fixtures: a uniquely named cluster per test, always deleted; helpers to read the kernel with
iproute2's JSON output inside a namespace; polling with a deadline (wait_for); packet capture
with tcpdump (Capture, capture); and the host's own network state, compared after the whole
run (pytest_sessionfinish)."""

from __future__ import annotations

import difflib
import json
import os
import select
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"
NETSIM = [sys.executable, "-m", "netsim"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="netsim creates namespaces: needs root")


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> float:
    """Poll `condition` until it is true; the seconds that took. Not true within `timeout`
    seconds: AssertionError naming `what`."""
    start = time.monotonic()
    deadline = start + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)
    return time.monotonic() - start


def assert_sticky(
    ask: Callable[[], str], timeout: float, hold: float, deadline: float = 60.0
) -> str:
    """ClientIP affinity slides: `ask()` (one fresh connection; the name of the pod that
    answered) keeps reaching one pod for `hold` (> `timeout`) seconds while it is used every
    timeout/6 s, each use renewing the binding. A pause of the host between two uses longer
    than `timeout` lets the binding expire rightly: that attempt is void and a new one starts,
    until `deadline`. Returns the pod."""
    give_up = time.monotonic() + deadline
    previous = time.monotonic()
    pod = ask()
    held_since = time.monotonic()
    while time.monotonic() - held_since < hold:
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {deadline} s: uses less than {timeout} s apart")
        time.sleep(timeout / 6)
        began = time.monotonic()
        answer = ask()
        if time.monotonic() - previous < timeout:  # the binding cannot have expired
            assert answer == pod, f"the binding to {pod} ended while in use: {answer} answered"
        else:
            pod, held_since = answer, time.monotonic()
        previous = began
    return pod


def ip_batch(netns: str, *commands: str) -> None:
    """Lines of `ip -batch` run inside the namespace (test scaffolding, not netsim's path)."""
    result = subprocess.run(
        ["ip", "-n", netns, "-batch", "-"],
        input="\n".join(commands) + "\n",
        text=True,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, f"ip -n {netns} -batch: {result.stderr}"


def ip_json(netns: str, *argv: str):
    """`ip -j ARGS` inside the namespace, decoded."""
    out = subprocess.run(
        ["ip", "-n", netns, "-j", *argv], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out or "[]")


def run_netsim(*argv: str, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run([*NETSIM, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"netsim {' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    return result


def topology_text(source: str, name: str, replicas: int | None = None, **cluster_spec) -> str:
    """A shipped topology, renamed to `name`, with replicas or Cluster spec fields changed."""
    docs = list(yaml.safe_load_all((TOPOLOGIES / source).read_text()))
    for doc in docs:
        if doc["kind"] == "Cluster":
            doc["metadata"]["name"] = name
            doc["spec"].update(cluster_spec)
            # the tests name a Deployment's pods web-0, web-1 ... (ReplicaSet names: test_rollout)
            doc["spec"].setdefault("controlPlane", {}).setdefault("podNames", "Ordinal")
        if doc["kind"] == "Deployment" and replicas is not None:
            doc["spec"]["replicas"] = replicas
    return yaml.safe_dump_all(docs, sort_keys=False)


class ClusterUnderTest:
    """A cluster name owned by one test; `write()` makes its topology file."""

    def __init__(self, tmp_path: Path):
        self.name = "t" + uuid.uuid4().hex[:8]
        self.dir = tmp_path
        self.file = str(tmp_path / "topology.yaml")

    def write(self, source: str = "flannel-vxlan.yaml", **kw) -> str:
        Path(self.file).write_text(topology_text(source, self.name, **kw))
        return self.file

    def apply(self, **kw) -> subprocess.CompletedProcess:
        self.write(**kw)
        return run_netsim("apply", "-f", self.file, check=True)

    def netsim(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        """A netsim command aimed at this cluster (other clusters may exist on the machine)."""
        return run_netsim("--cluster", self.name, *argv, check=check)

    def record(self) -> dict:
        from netsim import state

        return state.load(self.name)

    def namespaces(self) -> list[str]:
        from netsim import state
        from netsim.kernel import netns

        return [n for n in netns.names() if n.startswith(state.netns_prefix(self.name))]


def _pids(matches: Callable[[list[bytes]], bool]) -> list[int]:
    """Live processes whose command line (argv as bytes) `matches`, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if matches(cmd):
                pids.append(int(entry))
    return pids


def etcd_pids(cluster: str) -> list[int]:
    """Live etcd processes whose data lives under the cluster's directory (for assertions)."""
    from netsim import state

    where = state.cluster_dir(cluster).encode() + b"/"
    return _pids(lambda cmd: cmd[0].endswith(b"etcd") and any(a.startswith(where) for a in cmd))


def netns_cookie(netns: str) -> int:
    """The namespace's cookie (SO_NETNS_COOKIE): never reused, unlike its nsfs inode number,
    which a namespace made after another was freed may get again."""
    import socket

    from netsim.kernel import netns as nsmod

    with nsmod.entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, 71, 8), sys.byteorder)


# netsim's own processes: agents keep the command line of the zygote that forked them
NETSIM_PROCESSES = (b"netsim.agent", b"netsim.zygote", b"netsim.controller")
STATE = b"/run/netsim/"


def netsim_pids(names: Callable[[bytes], bool]) -> list[int]:
    """Live netsim processes with an argument naming a cluster that `names` accepts: the
    zygote's argument, or a path in the cluster's state directory (the controller's
    configuration, etcd's data)."""

    def cluster_of(arg: bytes) -> bytes:
        return arg[len(STATE) :].split(b"/")[0] if arg.startswith(STATE) else arg

    def match(cmd: list[bytes]) -> bool:
        ours = any(o in cmd for o in NETSIM_PROCESSES) or cmd[0].endswith(b"etcd")
        return ours and any(names(cluster_of(a.split(b"=")[-1])) for a in cmd[1:])

    return _pids(match)


def agent_pids(cluster: str) -> list[int]:
    """Live agents of a cluster, its zygote and node controller (and etcd), found by reading
    /proc (for assertions only)."""
    return netsim_pids(lambda name: name == cluster.encode())


@pytest.fixture
def cluster(tmp_path):
    """A fresh cluster name; whatever the test made is removed even if it failed."""
    c = ClusterUnderTest(tmp_path)
    yield c
    run_netsim("down", c.name)
    from netsim import teardown

    teardown.gc(c.name)
    assert not c.namespaces(), f"cleanup left namespaces: {c.namespaces()}"


class EtcdUnderTest:
    """A real etcd in a namespace of the test's own, on its loopback: `store` speaks to it,
    `netns` and `url` are what a topology's spec.datastore.etcd names."""

    def __init__(self, tmp_path: Path):
        from netsim.kernel import netns as nsmod
        from netsim.store import server
        from netsim.store.client import Store

        self.netns = f"netsim-test-etcd-{uuid.uuid4().hex[:6]}"  # not a cluster's name
        nsmod.create(self.netns)
        try:
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
            self.url = "http://127.0.0.1:2379"
            self.dir = tmp_path / "etcd-server"
            self.process = server.start(str(self.dir), self.netns, "external", "127.0.0.1")
        except BaseException:
            nsmod.remove(self.netns)
            raise
        self.store = Store([self.url], self.netns)

    def etcdctl(self, *argv: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, "etcdctl", *argv],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        ).stdout

    def stop(self) -> None:
        from netsim.kernel import proc

        proc.stop([self.process])

    def restart(self) -> None:
        """Start it again on the same data, as after a crash."""
        from netsim.store import server

        self.process = server.start(str(self.dir), self.netns, "external", "127.0.0.1")

    def close(self) -> None:
        from netsim.kernel import netns as nsmod
        from netsim.kernel import tmpfs
        from netsim.store import server

        self.stop()
        nsmod.remove(self.netns)
        tmpfs.remove(server.directory(str(self.dir)))  # etcd's data is on a ramfs


@pytest.fixture
def etcd(tmp_path) -> Iterator[EtcdUnderTest]:
    """A real etcd of the test's own, stopped and removed after it, whatever happened."""
    server = EtcdUnderTest(tmp_path)
    try:
        yield server
    finally:
        server.close()


def assert_nothing_left(cluster: ClusterUnderTest) -> None:
    """No namespace, agent process or state file of the cluster remains."""
    from netsim import state

    assert cluster.namespaces() == []
    # a kubelet's or kube-proxy's child dies with its agent (PDEATHSIG), a moment after it
    wait_for(lambda: agent_pids(cluster.name) == [], 5, "no process of the cluster left")
    assert etcd_pids(cluster.name) == []
    assert not os.path.exists(state.cluster_dir(cluster.name))
    with open("/proc/self/mountinfo") as fh:  # its tmpfs: the namespaces', the directory's
        mounts = fh.read()
    assert f" {state.netns_dir(cluster.name)}" not in mounts
    assert f" {state.cluster_dir(cluster.name)} " not in mounts
    assert not os.path.exists(state.netns_dir(cluster.name))
    from netsim.kernel import netns

    assert not [n for n in netns.etc_names() if n.startswith(state.netns_prefix(cluster.name))]


def cluster_document(name: str, nodes: list[str], clients: tuple[str, ...] = ()) -> dict:
    """A flannel-vxlan Cluster document: these nodes and external clients on one segment."""
    spec: dict = {
        "cni": {"mode": "flannel-vxlan"},
        "underlay": {"segments": [{"name": "underlay", "subnet": "172.18.0.0/24"}]},
        "nodes": [{"name": n, "segment": "underlay"} for n in nodes],
        "controlPlane": {"podNames": "Ordinal"},  # pods web-0, web-1 ...
    }
    if clients:
        spec["externalClients"] = [{"name": c, "segment": "underlay"} for c in clients]
    return {
        "apiVersion": "netsim.dev/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": spec,
    }


def host_snapshot() -> dict[str, str]:
    """The root namespace's links, addresses, routes, rules, nftables ruleset, forwarding."""

    def out(*argv):
        return subprocess.run(list(argv), capture_output=True, text=True).stdout

    links = json.loads(out("ip", "-j", "link", "show") or "[]")
    return {
        "links": "".join(
            sorted(
                f"{link['ifname']} {link.get('address', '')} mtu {link.get('mtu')}\n"
                for link in links
            )
        ),
        "addrs": out("ip", "-br", "addr"),
        "routes": out("ip", "route", "show", "table", "all"),
        "rules": out("ip", "rule"),
        "nft": out("nft", "list", "ruleset"),
        "forwarding": Path("/proc/sys/net/ipv4/ip_forward").read_text()
        + Path("/proc/sys/net/ipv4/conf/all/forwarding").read_text(),
    }


SNAPSHOT_BEFORE: dict[str, str] = {}


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        SNAPSHOT_BEFORE.update(host_snapshot())


def pytest_sessionfinish(session, exitstatus):
    """After the whole run, whatever ran: the root namespace is as the run found it, or the
    session fails (exit status 1) and prints what changed."""
    if not SNAPSHOT_BEFORE:
        return
    after = host_snapshot()
    changed = [key for key, before in SNAPSHOT_BEFORE.items() if after.get(key) != before]
    if not changed:
        return
    lines = []
    for key in changed:
        lines += difflib.unified_diff(
            SNAPSHOT_BEFORE[key].splitlines(),
            after.get(key, "").splitlines(),
            f"{key} before the run",
            f"{key} after the run",
            lineterm="",
        )
    title = f"the test run changed the root network namespace: {', '.join(changed)}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")  # end the progress line
        reporter.write_sep("=", title, red=True, bold=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print(title, *lines, sep="\n", file=sys.stderr)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class Capture:
    """tcpdump writing a pcap of the packets matching `bpf` on one interface of a namespace,
    from the moment it listens (the constructor waits for that) until stop(), or until `count`
    packets. Started and ended by its PID; the autouse `captures` fixture stops any a test
    left running."""

    running: list[Capture] = []

    def __init__(
        self, netns: str, iface: str, bpf: str, path: str | Path, count: int | None = None
    ):
        self.path = Path(path)
        argv = [
            "ip",
            "netns",
            "exec",
            netns,
            "tcpdump",
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            iface,
            "-w",
            str(self.path),
        ]
        self.proc = subprocess.Popen(
            argv + (["-c", str(count)] if count else []) + [bpf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        Capture.running.append(self)
        ready, deadline = False, time.monotonic() + 10
        while not ready and time.monotonic() < deadline:  # tcpdump says so once it listens
            if select.select([self.proc.stderr], [], [], 0.5)[0]:
                line = self.proc.stderr.readline()
                ready = "listening on" in line
                if not line:
                    break
        if not ready:
            self.stop()
            raise AssertionError(f"tcpdump did not start in {netns}")

    def written(self) -> int:
        """Complete packet records in the pcap so far (tcpdump -U writes each at once)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        n, offset = 0, 24
        while offset + 16 <= len(data):
            offset += 16 + struct.unpack_from(order + "I", data, offset + 8)[0]
            if offset > len(data):
                break
            n += 1
        return n

    def stop(self, expect: int = 0, timeout: float = 5.0) -> list:
        """End tcpdump and return the packets it wrote, decoded by scapy. It is ended once the
        file holds `expect` packets (at once for 0), or tcpdump stopped on its own (count), or
        `timeout` seconds passed."""
        if self in Capture.running:
            Capture.running.remove(self)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and self.written() < expect and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc.stderr.close()
        import scapy.layers.inet  # noqa: F401  (registers IP/UDP/ICMP for decoding)
        import scapy.layers.l2  # noqa: F401  (registers Ethernet, the capture's link type)
        from scapy.utils import rdpcap

        return list(rdpcap(str(self.path))) if self.path.exists() else []


@pytest.fixture(autouse=True)
def captures() -> Iterator[None]:
    """Stop every tcpdump a test left running."""
    yield
    while Capture.running:
        Capture.running[-1].stop()


def capture(netns: str, iface: str, bpf: str, action, count: int = 4, timeout: float = 5.0):
    """Packets matching a BPF filter on one interface of a namespace while `action()` runs,
    decoded by scapy: up to `count` packets, waiting at most `timeout` seconds for them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cap = Capture(netns, iface, bpf, os.path.join(tmp, "cap.pcap"), count=count)
        try:
            action()
        except BaseException:
            cap.stop()
            raise
        return cap.stop(expect=count, timeout=timeout)
