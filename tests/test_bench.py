"""netsim bench end to end on a small matrix: every requested cell in the JSON with plausible
values, ratios from the same run's floor, CSV and PNG outputs, nothing left behind."""

from __future__ import annotations

import csv
import json
import os

import pytest
from conftest import needs_root, netsim_pids, run_netsim

from netsim import bench
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod

PNG = b"\x89PNG\r\n\x1a\n"


def bench_processes() -> set[int]:
    """PIDs of iperf3 servers and clients, and of bench clusters' processes (agents, zygote,
    controller, etcd)."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if argv and argv[0].endswith(b"iperf3"):
            found.add(int(entry))
    return found | set(netsim_pids(lambda name: name.startswith(b"bench-")))


@needs_root
def test_small_matrix_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    before = bench_processes()
    done = run_netsim(
        "bench",
        "--modes",
        "flannel-vxlan",
        "--paths",
        "pod-cross-node,pod-clusterip",
        "--repetitions",
        "1",
        "--seconds",
        "1",
        "--json",
        str(out),
        "--csv",
        str(tmp_path / "bench.csv"),
        "--png",
        str(tmp_path / "charts"),
        "--sweep",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not bench_processes() - before  # nothing it started is left running
    assert "flannel-vxlan" in done.stdout and "plain-routing" in done.stdout
    ratios = done.stdout.split("as ratios to the floor:")[1].splitlines()
    vxlan = next(
        line.split()
        for line in ratios
        if line.startswith("flannel-vxlan") and "pod-cross-node" in line
    )
    assert vxlan[-2] == f"{1450 / 1500:.2f}x"  # the MTU column: VXLAN's 50 bytes
    result = json.loads(out.read_text())
    assert not [s["errors"] for s in result["samples"] if s["errors"]], done.stderr[-2000:]
    cells = {(r["mode"], r["path"]): r for r in result["medians"]}
    assert set(cells) == {
        ("flannel-vxlan", "pod-cross-node"),
        ("flannel-vxlan", "pod-clusterip"),
        ("flannel-host-gw", "underlay"),
        ("flannel-host-gw", "plain-routing"),
    }
    floor = cells[("flannel-host-gw", "plain-routing")]
    for row in cells.values():
        assert row["tcp_gbps"] > 0 and row["tcp_multi_gbps"] > 0 and row["udp_gbps"] > 0
        assert row["rr_per_s"] is None or row["rr_per_s"] > 0
        assert row["tcp_gbps_ratio"] == pytest.approx(row["tcp_gbps"] / floor["tcp_gbps"])
    assert cells[("flannel-vxlan", "pod-cross-node")]["mtu"] == 1450  # VXLAN's 50 bytes
    assert cells[("flannel-host-gw", "underlay")]["mtu"] == 1500
    assert 0 < cells[("flannel-vxlan", "pod-cross-node")]["ping_p50_ms"] < 50
    assert result["machine"]["kernel"] and len(result["samples"]) == 4
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert len(rows) == 4 and float(rows[0]["tcp_gbps"]) > 0
    for name in ("throughput.png", "latency.png"):
        assert (tmp_path / "charts" / name).read_bytes()[:8] == PNG
    assert not [n for n in nsmod.names() if n.startswith("netsim.bench-")]
    sweep = result["sweep"]["flannel-vxlan"]
    assert sorted(int(m) for m in sweep) == bench.SWEEP_SIZES and all(v > 0 for v in sweep.values())
    assert "TCP Gb/s by MSS" in done.stdout
    udp = result["udp_sweep"]["flannel-vxlan"]
    assert sorted(int(m) for m in udp) == bench.UDP_SWEEP_SIZES
    assert all(v["gbps"] > 0 and 0 <= v["loss_pct"] <= 100 for v in udp.values())
    assert "UDP Gb/s received (loss %) by datagram payload" in done.stdout


def test_unknown_mode_or_path_is_one_clear_line():
    for argv, words in (
        (["--modes", "weave"], "unknown mode 'weave'"),
        (["--paths", "moon"], "unknown path 'moon'"),
    ):
        done = run_netsim("bench", *argv)
        assert done.returncode != 0
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_missing_iperf3_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bench.shutil, "which", lambda tool: None)
    with pytest.raises(NetsimError, match="iperf3 is not installed: apt-get install iperf3"):
        bench.check(bench.Options())


def test_every_mode_means_every_mode_this_host_can_run(monkeypatch):
    """By default a mode the host lacks a part for is left out and named; asked for by name,
    it is an error that says what to install."""
    real_which, real_exists = bench.shutil.which, bench.os.path.exists
    monkeypatch.setattr(bench.shutil, "which", lambda t: None if t == "bird" else real_which(t))
    monkeypatch.setattr(
        bench.os.path, "exists", lambda p: False if p == "/dev/net/tun" else real_exists(p)
    )
    options = bench.Options()
    bench.check(options)
    assert "calico-bgp" not in options.modes and "flannel-udp" not in options.modes
    assert "apt-get install bird2" in options.skipped["calico-bgp"]
    assert "flannel-vxlan" in options.modes
    shown = bench.table({"medians": [], "modes": {}, "options": options.__dict__})
    assert "not measured: flannel-udp: /dev/net/tun is missing" in shown
    with pytest.raises(
        NetsimError,
        match="mode calico-bgp cannot run on this host: bird is "
        "not installed: apt-get install bird2",
    ):
        bench.check(bench.Options(modes=["calico-bgp"]))
