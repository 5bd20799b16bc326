"""Failure paths: bad input changes nothing, a failed apply undoes itself, a killed apply is
collected by gc, and a run that changed the host's own namespace fails (conftest's
pytest_sessionfinish compares it after the whole run)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    NETSIM,
    ROOT,
    assert_nothing_left,
    needs_root,
    run_netsim,
)

from netsim import cluster as clustermod
from netsim import state, topology
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod

pytestmark = needs_root


def test_invalid_topology_exits_2_and_creates_nothing(cluster, tmp_path):
    text = open(cluster.write()).read().replace("10.96.0.0/12", "10.244.0.0/16")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = run_netsim("apply", "-f", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"netsim: error: {bad}: document 1 (Cluster {cluster.name})"
        ": spec.serviceCIDR: 10.244.0.0/16 overlaps"
    )
    assert cluster.namespaces() == [] and state.load(cluster.name) is None


def test_failed_first_apply_rolls_back_everything(cluster, monkeypatch):
    """A failure once the kubelets have made the pods: everything goes, theirs too."""
    from netsim import pods

    model, _ = topology.parse(open(cluster.write()).read(), cluster.file)

    def fail(*args, **kwargs):
        assert original(*args, **kwargs)  # the pods are made
        raise NetsimError("injected failure")

    original = pods._statuses
    monkeypatch.setattr(pods, "_statuses", fail)
    with pytest.raises(
        NetsimError, match="apply failed, this apply's changes were undone: injected failure"
    ):
        clustermod.apply(model)
    assert_nothing_left(cluster)


def test_failed_scale_up_keeps_the_running_cluster(cluster):
    cluster.apply()
    before = cluster.record()
    squatter = f"{state.netns_prefix(cluster.name)}pod.web-3"
    nsmod.create(squatter)  # the name the next pod needs is taken
    try:
        cluster.write(replicas=4)
        result = run_netsim("apply", "-f", cluster.file)
        assert result.returncode == 1
        assert f"create netns {squatter}" in result.stderr and "undone" in result.stderr
        after = cluster.record()
        assert after.pods.keys() == before.pods.keys()
        ipam = f"{state.node_dir(cluster.name, 'worker-1')}/ipam/cbr0"
        held = sorted(p.ip for p in before.pods.values() if p.node == "worker-1")
        assert sorted(f for f in os.listdir(ipam) if f[0].isdigit()) == held
        assert cluster.netsim("curl", "web-0", "http://web-1:9376/").stdout.strip() == "web-1"
    finally:
        nsmod.remove(squatter)


def test_gc_collects_a_killed_apply(cluster):
    cluster.write(replicas=150)
    proc = subprocess.Popen(
        [*NETSIM, "apply", "-f", cluster.file],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not any(".pod." in n for n in cluster.namespaces()) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("apply finished before it could be killed")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cluster.namespaces(), "the killed apply should have left namespaces"
    assert state.load(cluster.name) is None  # it never committed
    result = cluster.netsim("gc", check=True)  # other runs' clusters may be on this machine
    assert f"cluster/{cluster.name}: netns" in result.stdout
    assert_nothing_left(cluster)


def test_gc_leaves_a_healthy_cluster_alone(cluster):
    cluster.apply()
    namespaces = cluster.namespaces()
    cluster.netsim("gc", check=True)
    assert cluster.namespaces() == namespaces
    assert cluster.netsim("ping", "web-0", "web-1").returncode == 0


def test_a_changed_host_namespace_fails_the_session(tmp_path):
    """The session-end check in conftest fails a run whose tests all passed, and shows the
    change; a run that changed nothing passes. (The change is pretended, in the snapshot.)"""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_it.py").write_text(
        "import os\nimport conftest\n\n\ndef test_it():\n"
        "    if os.environ.get('PRETEND'):\n"
        "        conftest.SNAPSHOT_BEFORE['routes'] += 'blackhole 203.0.113.0/24\\n'\n"
    )

    def run(**env):
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_it.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=120,
        )

    clean = run()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "root network namespace" not in clean.stdout
    changed = run(PRETEND="1")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "1 passed" in changed.stdout
    assert "the test run changed the root network namespace: routes" in changed.stdout
    assert "-blackhole 203.0.113.0/24" in changed.stdout


def test_a_cluster_level_change_is_refused_naming_the_field(cluster):
    cluster.apply()
    text = Path(cluster.file).read_text().replace("mtu: 1500", "mtu: 1400")
    assert text != Path(cluster.file).read_text()
    Path(cluster.file).write_text(text)
    refused = run_netsim("apply", "-f", cluster.file)
    assert refused.returncode == 1
    assert f"cluster {cluster.name} exists with another spec.underlay.mtu; " in refused.stderr
    assert f"netsim down {cluster.name}" in refused.stderr


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--port", "70000"], "netsim expose: --port: 70000 is not a port — use 1 to 65535"),
        (["--port", "80", "--name", "Bad Name"], "netsim expose: --name: 'Bad Name' is not a"),
    ],
)
def test_expose_names_the_flag_that_is_wrong(argv, words):
    done = run_netsim("expose", "deployment/web", *argv)
    assert done.returncode == 2 and words in done.stderr, done.stderr


def test_namespaces_are_links_that_ip_netns_follows_and_go_with_one_unmount(cluster):
    """Every namespace of a cluster is mounted on its own tmpfs and named by a link in
    /run/netns: `ip netns list`, `ip netns exec` and `ip netns del` work on it as on any
    other, and delete unmounts the lot at once, leaving no mount behind."""
    cluster.apply()
    record = cluster.record()
    first, second = record.pods["web-0"], record.pods["web-1"]
    group = state.netns_dir(cluster.name)
    short = first.netns.removeprefix(state.netns_prefix(cluster.name))
    target = os.path.join(
        os.path.dirname(nsmod.path(first.netns)), os.readlink(nsmod.path(first.netns))
    )
    assert (
        os.path.normpath(target) == f"{group}/{short}"
        and len(os.readlink(nsmod.path(first.netns))) < 60
    )
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert first.netns in listed.split()
    shown = subprocess.run(
        ["ip", "netns", "exec", first.netns, "ip", "-4", "-o", "addr", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f" {first.ip}/" in shown
    with open("/proc/self/mountinfo") as fh:
        mounted = [line.split()[4] for line in fh if f" {group}" in line]
    prefix = state.netns_prefix(cluster.name)
    assert sorted(mounted) == sorted(
        [group] + [f"{group}/{n.removeprefix(prefix)}" for n in cluster.namespaces()]
    )
    subprocess.run(["ip", "netns", "del", second.netns], check=True)
    assert second.netns not in cluster.namespaces()
    with open("/proc/self/mountinfo") as fh:
        assert f" {group}/{second.netns.removeprefix(prefix)} " not in fh.read()
    lost = cluster.netsim("exec", "web-1", "--", "true")
    assert lost.returncode != 0 and "Traceback" not in lost.stderr
    assert f"pod web-1 is Lost: its namespace {second.netns} was removed outside netsim" in (
        lost.stderr
    )
    # the pod is replaced in a namespace of the same name (the file `ip netns del` left)
    assert cluster.netsim("delete", "pod", "web-1").returncode == 0
    assert cluster.netsim("ping", "web-0", "web-1").returncode == 0
    assert run_netsim("down", cluster.name).returncode == 0
    assert_nothing_left(cluster)


def test_cni0_keeps_its_mac_as_pods_come_and_go(cluster):
    """cni0's MAC is set when it is made, as the bridge plugin sets it: a bridge whose MAC
    was never set takes its lowest port's, and every pod's ARP entry for the gateway would
    then point at another pod."""
    cluster.apply()
    node = cluster.record().nodes["worker-1"].netns

    def cni0() -> tuple[str, str]:
        read = ["ip", "netns", "exec", node, "cat", "/sys/class/net/cni0/address"]
        kind = read[:-1] + ["/sys/class/net/cni0/addr_assign_type"]
        return tuple(  # ip netns exec mounts the namespace's own /sys
            subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
            for argv in (read, kind)
        )

    before = cni0()
    assert before[1] == "3"  # NET_ADDR_SET
    cluster.write(replicas=12)
    assert run_netsim("apply", "-f", cluster.file).returncode == 0
    assert cni0() == before
