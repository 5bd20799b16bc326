"""Fixtures: a uniquely named cluster per test, always deleted; helpers to read the kernel with
iproute2's JSON output inside a namespace; a snapshot of the host's own network state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"
NETSIM = [sys.executable, "-m", "netsim"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="netsim creates namespaces: needs root")


def ip_json(netns: str, *argv: str):
    """`ip -j ARGS` inside the namespace, decoded."""
    out = subprocess.run(["ip", "-n", netns, "-j", *argv], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out or "[]")


def run_netsim(*argv: str, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run([*NETSIM, *argv], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
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


def agent_pids(cluster: str) -> list[int]:
    """Live agent processes of a cluster, found by reading /proc (for assertions only)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"netsim.agent" in cmd and cluster.encode() in cmd:
                pids.append(int(entry))
    return pids


@pytest.fixture
def cluster(tmp_path):
    """A fresh cluster name; whatever the test made is removed even if it failed."""
    c = ClusterUnderTest(tmp_path)
    yield c
    run_netsim("down", c.name)
    from netsim import cluster as clustermod

    clustermod.gc(c.name)
    assert not c.namespaces(), f"cleanup left namespaces: {c.namespaces()}"


def assert_nothing_left(cluster: ClusterUnderTest) -> None:
    """No namespace, agent process or state file of the cluster remains."""
    from netsim import state

    assert cluster.namespaces() == []
    assert agent_pids(cluster.name) == []
    assert not os.path.exists(state.cluster_dir(cluster.name))


def host_snapshot() -> dict[str, str]:
    """The root namespace's links, addresses, routes, rules, nftables ruleset, forwarding."""
    def out(*argv):
        return subprocess.run(list(argv), capture_output=True, text=True).stdout

    links = json.loads(out("ip", "-j", "link", "show") or "[]")
    return {
        "links": json.dumps(sorted((link["ifname"], link.get("address", ""),
                                    link.get("mtu")) for link in links)),
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


def capture(netns: str, iface: str, bpf: str, action, count: int = 4, timeout: float = 5.0):
    """Packets matching a BPF filter on one interface of a namespace while `action()` runs,
    decoded by scapy. tcpdump is started and ended by PID, bounded by count and time."""
    import tempfile
    import time

    from scapy.utils import rdpcap

    with tempfile.TemporaryDirectory() as tmp:
        pcap = os.path.join(tmp, "cap.pcap")
        proc = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-U",
                                 "-Z", "root", "--immediate-mode",
                                 "-n", "-c", str(count), "-w", pcap, bpf],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # tcpdump says so once it listens
                line = proc.stderr.readline().decode()
                if "listening on" in line or not line:
                    break
            action()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return list(rdpcap(pcap)) if os.path.exists(pcap) else []
