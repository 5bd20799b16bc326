"""`netsim bench`: what each data plane costs, measured on this host.

For every selected mode netsim builds a small cluster — two nodes, pods a and b on worker-1, c
on worker-2, a NodePort Service in front of c (HTTP 80, iperf3 5201 TCP and UDP), an external
client — and measures each path with iperf3 (TCP one stream and several, UDP rate and loss),
ping (RTT p50/p99), fresh TCP request/response (rate and p50/p99), the path MTU (largest
don't-fragment ping) and the CPU seconds the whole host spent per GB moved (/proc/stat during
the one-stream run). The floor is measured in the same run: node to node over the bare
underlay, and pod to pod across nodes with plain routing (flannel-host-gw). Modes are measured
in interleaved repetitions (A B C A B C ...) and medians reported, because a shared 2-core
machine is noisy; every figure is also given as a ratio to the plain-routing floor.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from netsim import columns, modes
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.kernel import proc
from netsim.record import Record

MODES = list(modes.MODES)
PATHS = ["pod-same-node", "pod-cross-node", "pod-clusterip", "client-nodeport"]
BASELINE_MODE = modes.PLAIN_ROUTING  # its pod-cross-node path is the plain-routing floor
UNDERLAY = "underlay"  # node to node over the bare underlay
METRICS = [
    "tcp_gbps",
    "tcp_multi_gbps",
    "udp_gbps",
    "udp_loss_pct",
    "ping_p50_ms",
    "ping_p99_ms",
    "rr_per_s",
    "rr_p50_ms",
    "rr_p99_ms",
    "mtu",
    "cpu_s_per_gb",
]
HIGHER_IS_BETTER = {"tcp_gbps", "tcp_multi_gbps", "udp_gbps", "rr_per_s", "mtu"}
SWEEP_SIZES = [96, 192, 384, 768, 1024, 1460]  # TCP MSS, as Kubernetes' netperf tests sweep
# UDP payload bytes: each datagram is one packet through the encapsulation (TCP hands the path
# 64 KiB GSO packets whatever its MSS); 1472 fills a 1500-byte packet, so it is fragmented
# under every tunnel's smaller MTU, and 2944 everywhere
UDP_SWEEP_SIZES = [96, 384, 1024, 1400, 1472, 2944]
IPERF_PORT, HTTP_PORT = 5201, 9376
NODEPORTS = {"http": 30080, "tcp": 30201, "udp": 30201}  # iperf3's UDP test needs TCP too


@dataclass
class Options:
    modes: list[str] = field(default_factory=lambda: list(MODES))
    paths: list[str] = field(default_factory=lambda: list(PATHS))
    repetitions: int = 3
    seconds: int = 2  # per iperf3 run (iperf3 takes whole seconds)
    streams: int = 4
    udp_rate: str = "2G"
    pings: int = 50
    requests: float = 1.0  # seconds of fresh-connection requests
    sweep: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # mode -> why it cannot run here


def unavailable(mode: str) -> str | None:
    """Why this host cannot run the mode (None: it can); checked before anything is built."""
    return modes.get(mode).unavailable()


def topology(mode: str, name: str) -> str:
    """The bench cluster of one mode, as a topology file."""
    extra = ""
    if modes.get(mode).family == "calico":
        extra = "    calico: {ipPool: {cidr: 192.168.0.0/16, blockSize: 26}}\n"
    pods = "".join(
        f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, labels: {{bench: {pod}}}}}
spec:
  nodeName: {node}
  containers: [{{name: hostname, ports: [{{containerPort: {HTTP_PORT}}}]}}]
"""
        for pod, node in (("a", "worker-1"), ("b", "worker-1"), ("c", "worker-2"))
    )
    return f"""apiVersion: netsim.dev/v1alpha1
kind: Cluster
metadata: {{name: {name}}}
spec:
  cni:
    mode: {mode}
{extra}  underlay: {{mtu: 1500, segments: [{{name: lan, subnet: 172.31.0.0/24}}]}}
  nodes: [{{name: worker-1}}, {{name: worker-2}}]
  externalClients: [{{name: client}}]
{pods}---
apiVersion: v1
kind: Service
metadata: {{name: bench}}
spec:
  type: NodePort
  selector: {{bench: c}}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}, nodePort: {NODEPORTS["http"]}}}
  - {{name: iperf, port: {IPERF_PORT}, targetPort: {IPERF_PORT}, nodePort: {NODEPORTS["tcp"]}}}
  - {{name: iperf-udp, port: {IPERF_PORT}, targetPort: {IPERF_PORT}, protocol: UDP,
     nodePort: {NODEPORTS["udp"]}}}
"""


def check(options: Options) -> None:
    """Bad input and missing tools, before anything is built."""
    for mode in options.modes:
        if mode not in MODES:
            raise NetsimError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    defaulted = options.modes == MODES  # "every mode": only those this host can run
    for mode in list(options.modes):
        why = unavailable(mode)
        if why and not defaulted:
            raise NetsimError(f"mode {mode} cannot run on this host: {why}")
        if why:
            options.modes.remove(mode)
            options.skipped[mode] = why
    for path in options.paths:
        if path not in PATHS:
            raise NetsimError(f"unknown path {path!r}: use {', '.join(PATHS)}")
    for tool, package in (("iperf3", "iperf3"), ("ping", "iputils-ping")):
        if not shutil.which(tool):
            raise NetsimError(
                f"{tool} is not installed: apt-get install {package} (./bootstrap installs it)"
            )
    if options.repetitions < 1 or options.seconds < 1:
        raise NetsimError("--repetitions and --seconds must be at least 1")


# -- measuring one cell -----------------------------------------------------------------------


@dataclass
class Endpoints:
    """Where one path starts and ends: namespaces and the address and ports to use."""

    src: str  # netns
    server: str  # netns where iperf3 listens
    dst_ip: str
    tcp_port: int = IPERF_PORT
    udp_port: int = IPERF_PORT
    http_port: int | None = HTTP_PORT
    pingable: bool = True


def endpoints(record: Record, path: str) -> Endpoints:
    pods, nodes = record.pods, record.nodes
    if path == UNDERLAY:
        return Endpoints(
            nodes["worker-1"].netns, nodes["worker-2"].netns, nodes["worker-2"].ip, http_port=None
        )
    if path == "pod-same-node":
        return Endpoints(pods["a"].netns, pods["b"].netns, pods["b"].ip)
    if path == "pod-cross-node":
        return Endpoints(pods["a"].netns, pods["c"].netns, pods["c"].ip)
    if path == "pod-clusterip":
        return Endpoints(
            pods["a"].netns,
            pods["c"].netns,
            record.services["bench"].cluster_ip,
            http_port=80,
            pingable=False,
        )
    return Endpoints(
        record.clients["client"].netns,
        pods["c"].netns,
        nodes["worker-1"].ip,
        NODEPORTS["tcp"],
        NODEPORTS["udp"],
        NODEPORTS["http"],
        pingable=False,
    )


def _run(netns: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=lambda: nsmod.enter_for_exec(netns),
    )


def _cpu_busy() -> float:
    """Seconds all CPUs spent busy so far (from /proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def iperf(
    ep: Endpoints,
    seconds: int,
    streams: int = 1,
    udp_rate: str | None = None,
    mss: int | None = None,
    length: int = 1400,
) -> dict:
    """One iperf3 run: a one-off server in the destination namespace (ended by PID), the
    client in the source; returns received Gbit/s, loss, bytes and the host's busy CPU time."""
    log = f"/tmp/netsim-bench-iperf-{os.getpid()}.log"
    server = proc.spawn(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], log, netns=ep.server)
    try:
        port = ep.udp_port if udp_rate else ep.tcp_port
        argv = [
            "iperf3",
            "-c",
            ep.dst_ip,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-J",
            "-P",
            str(streams),
        ]
        if udp_rate:
            argv += ["-u", "-b", udp_rate, "-l", str(length)]
        if mss:
            argv += ["-M", str(mss)]
        if not proc.wait_listening(server, IPERF_PORT):
            with open(log) as fh:
                said = fh.read().strip()
            raise NetsimError(
                f"iperf3 server in {ep.server} did not listen on {IPERF_PORT}"
                + (f": {said}" if said else " within 10 s")
            )
        busy = _cpu_busy()
        try:
            done = _run(ep.src, argv, timeout=seconds + 15)
        except subprocess.TimeoutExpired:
            raise NetsimError(
                f"iperf3 to {ep.dst_ip}:{port} did not finish within {seconds + 15} s"
            ) from None
        busy = _cpu_busy() - busy
        data = json.loads(done.stdout or "{}")
        if "error" in data or done.returncode != 0:
            raise NetsimError(
                f"iperf3 to {ep.dst_ip}:{port} failed: {data.get('error') or done.stderr.strip()}"
            )
        end = data["end"]
        if udp_rate:
            summary = end["sum"]
            return {
                "gbps": summary["bits_per_second"] / 1e9,
                "loss_pct": summary.get("lost_percent", 0.0),
            }
        received = end["sum_received"]
        return {
            "gbps": received["bits_per_second"] / 1e9,
            "bytes": received["bytes"],
            "cpu_s": busy,
        }
    finally:
        proc.stop([server])
        if os.path.exists(log):
            os.unlink(log)


def ping_rtts(ep: Endpoints, count: int) -> list[float]:
    done = _run(
        ep.src,
        ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", ep.dst_ip],
        timeout=count * 0.05 + 10,
    )
    return [
        float(line.split("time=")[1].split()[0])
        for line in done.stdout.splitlines()
        if "time=" in line
    ]


def path_mtu(ep: Endpoints, high: int = 1500) -> int | None:
    """The largest packet that crosses with don't-fragment set (binary search, few pings)."""

    def passes(size: int) -> bool:
        return (
            _run(
                ep.src,
                ["ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", str(size - 28), ep.dst_ip],
                timeout=5,
            ).returncode
            == 0
        )

    low, top = 576, high
    if not passes(low):
        return None
    while low < top:
        mid = (low + top + 1) // 2
        low, top = (mid, top) if passes(mid) else (low, mid - 1)
    return low


def requests(ep: Endpoints, seconds: float) -> tuple[float, list[float]]:
    """Fresh TCP connections with one HTTP request each, for `seconds`: rate and latencies."""
    from netsim import probe

    latencies, deadline = [], time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        reply = probe.http_get(ep.src, ep.dst_ip, ep.http_port, timeout=2)
        if reply.error is None:
            latencies.append(reply.ms)
    return len(latencies) / (time.monotonic() - start), latencies


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(record: Record, path: str, options: Options) -> dict:
    """Every metric of one (mode, path) cell, once."""
    ep = endpoints(record, path)
    errors: list[str] = []

    def attempt(what: str, fn, *args, **kw):
        """One measurement; a failure is recorded and the cell goes on (a long run should
        not be lost to one refused connection)."""
        try:
            return fn(*args, **kw)
        except (NetsimError, OSError, ValueError, KeyError) as exc:
            errors.append(f"{what}: {exc}")
            return None

    tcp = attempt("tcp", iperf, ep, options.seconds) or {}
    multi = attempt("tcp multi", iperf, ep, options.seconds, streams=options.streams) or {}
    udp = attempt("udp", iperf, ep, options.seconds, udp_rate=options.udp_rate) or {}
    cell = {
        "tcp_gbps": tcp.get("gbps"),
        "tcp_multi_gbps": multi.get("gbps"),
        "udp_gbps": udp.get("gbps"),
        "udp_loss_pct": udp.get("loss_pct"),
        "cpu_s_per_gb": tcp["cpu_s"] / (tcp["bytes"] / 1e9) if tcp.get("bytes") else None,
        "errors": errors,
    }
    rtts = (attempt("ping", ping_rtts, ep, options.pings) or []) if ep.pingable else []
    cell.update(
        ping_p50_ms=_pct(rtts, 0.5),
        ping_p99_ms=_pct(rtts, 0.99),
        mtu=attempt("mtu", path_mtu, ep) if ep.pingable else None,
    )
    rate, lat = (
        (attempt("requests", requests, ep, options.requests) or (None, []))
        if ep.http_port
        else (None, [])
    )
    cell.update(rr_per_s=rate or None, rr_p50_ms=_pct(lat, 0.5), rr_p99_ms=_pct(lat, 0.99))
    return cell


def sweep(record: Record, options: Options) -> dict[int, float]:
    """TCP throughput pod to pod across nodes for each MSS of the sweep."""
    ep = endpoints(record, "pod-cross-node")
    return {mss: iperf(ep, options.seconds, mss=mss)["gbps"] for mss in SWEEP_SIZES}


def udp_sweep(record: Record, options: Options) -> dict[int, dict]:
    """UDP pod to pod across nodes for each datagram size: Gbit/s received and loss %. Here
    the per-packet cost of each encapsulation shows, and where fragmentation starts."""
    ep = endpoints(record, "pod-cross-node")
    out = {}
    for size in UDP_SWEEP_SIZES:
        run = iperf(ep, options.seconds, udp_rate=options.udp_rate, length=size)
        out[size] = {"gbps": run["gbps"] * (1 - run["loss_pct"] / 100), "loss_pct": run["loss_pct"]}
    return out


# -- the run ----------------------------------------------------------------------------------


def machine() -> dict:
    uname = os.uname()
    return {
        "kernel": uname.release,
        "machine": uname.machine,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def run(options: Options, progress=lambda line: None) -> dict:
    """Build one cluster per mode (plus the floor), measure in interleaved repetitions,
    tear everything down; the samples and medians as JSON-ready data."""
    from netsim import cluster as clustermod
    from netsim import state, teardown
    from netsim import topology as topo

    check(options)
    modes = list(dict.fromkeys(options.modes + [BASELINE_MODE]))
    tag = uuid.uuid4().hex[:4]
    built: dict = {}
    result: dict = {
        "machine": machine(),
        "options": options.__dict__,
        "modes": {},
        "samples": [],
        "sweep": {},
        "udp_sweep": {},
    }
    try:
        for mode in modes:
            progress(f"building {mode}")
            model, _ = topo.parse(topology(mode, f"bench-{tag}-{mode}"), f"bench:{mode}")
            clustermod.apply(model)
            built[mode] = state.load(model.name)
            carrier = built[mode].nodes["worker-1"].carrier or None
            result["modes"][mode] = {"cluster": model.name, "carrier": carrier}
        cells = [(BASELINE_MODE, UNDERLAY), (BASELINE_MODE, "plain-routing")]
        cells += [(m, p) for m in options.modes for p in options.paths]
        for rep in range(options.repetitions):
            for i, (mode, path) in enumerate(cells, 1):
                progress(
                    f"repetition {rep + 1}/{options.repetitions}: {mode} {path} ({i}/{len(cells)})"
                )
                real = "pod-cross-node" if path == "plain-routing" else path
                sample = measure(built[mode], real, options)
                for problem in sample["errors"]:
                    progress(f"  {mode} {path}: {problem}")
                result["samples"].append(
                    {"repetition": rep + 1, "mode": mode, "path": path, **sample}
                )
        if options.sweep:
            for mode in options.modes:
                progress(f"MSS and datagram size sweeps: {mode}")
                result["sweep"][mode] = sweep(built[mode], options)
                result["udp_sweep"][mode] = udp_sweep(built[mode], options)
    finally:
        for mode, record in built.items():
            progress(f"deleting {mode}")
            teardown.delete(record.cluster)
    result["medians"] = medians(result["samples"])
    return result


def medians(samples: list[dict]) -> list[dict]:
    """The median of every metric per cell, with its ratio to the plain-routing floor."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for s in samples:
        cells.setdefault((s["mode"], s["path"]), []).append(s)
    floor = cells.get((BASELINE_MODE, "plain-routing"), [])
    base = {
        m: statistics.median(v) for m in METRICS if (v := [s[m] for s in floor if s[m] is not None])
    }
    out = []
    for (mode, path), group in cells.items():
        row: dict = {"mode": mode, "path": path, "n": len(group)}
        for metric in METRICS:
            values = [s[metric] for s in group if s[metric] is not None]
            row[metric] = statistics.median(values) if values else None
            if row[metric] is not None and base.get(metric):
                row[metric + "_ratio"] = row[metric] / base[metric]
        out.append(row)
    return out


# -- output -----------------------------------------------------------------------------------


COLUMNS = [
    ("tcp_gbps", "TCP Gb/s", "{:.2f}"),
    ("tcp_multi_gbps", "TCPxN Gb/s", "{:.2f}"),
    ("udp_gbps", "UDP Gb/s", "{:.2f}"),
    ("udp_loss_pct", "loss %", "{:.1f}"),
    ("ping_p50_ms", "ping p50", "{:.3f}"),
    ("ping_p99_ms", "p99", "{:.3f}"),
    ("rr_per_s", "req/s", "{:.0f}"),
    ("rr_p50_ms", "req p50", "{:.2f}"),
    ("mtu", "MTU", "{:.0f}"),
    ("cpu_s_per_gb", "CPU s/GB", "{:.2f}"),
]


def table(result: dict) -> str:
    """The medians, then the same cells as ratios to the floor (plain routing, pod to pod
    across nodes, measured in the same run): above 1 is more, below 1 is less."""
    labels = []
    for row in result["medians"]:
        carrier = result["modes"].get(row["mode"], {}).get("carrier")
        labels.append([row["mode"] + (f" ({carrier})" if carrier else ""), row["path"]])
    header = ["MODE", "PATH"] + [c[1] for c in COLUMNS] + ["TCP vs floor"]
    rows = [
        label
        + [fmt.format(row[key]) if row[key] is not None else "-" for key, _, fmt in COLUMNS]
        + [_ratio(row, "tcp_gbps")]
        for label, row in zip(labels, result["medians"], strict=True)
    ]
    lines = columns.aligned(header, rows, gap="  ")
    if result["medians"]:
        lines += ["", "as ratios to the floor:"]
        ratios = [
            label + [_ratio(row, key) for key, _, _ in COLUMNS]
            for label, row in zip(labels, result["medians"], strict=True)
        ]
        lines += columns.aligned(["MODE", "PATH"] + [c[1] for c in COLUMNS], ratios, gap="  ")
    if result.get("sweep"):
        lines.append("")
        lines.append(
            "TCP Gb/s by MSS, pod to pod across nodes: " + "  ".join(f"{m}" for m in SWEEP_SIZES)
        )
        for mode, values in result["sweep"].items():
            lines.append(f"  {mode}: " + "  ".join(f"{values[m]:.2f}" for m in SWEEP_SIZES))
    if result.get("udp_sweep"):
        lines.append("")
        lines.append(
            "UDP Gb/s received (loss %) by datagram payload, pod to pod across nodes: "
            + "  ".join(f"{m}" for m in UDP_SWEEP_SIZES)
        )
        for mode, values in result["udp_sweep"].items():
            lines.append(
                f"  {mode}: "
                + "  ".join(
                    f"{values[m]['gbps']:.2f} ({values[m]['loss_pct']:.0f})"
                    for m in UDP_SWEEP_SIZES
                )
            )
    for mode, why in (result["options"].get("skipped") or {}).items():
        lines.append(f"not measured: {mode}: {why}")
    return "\n".join(lines)


def _ratio(row: dict, metric: str) -> str:
    ratio = row.get(metric + "_ratio")
    return f"{ratio:.2f}x" if ratio is not None else "-"


def write_csv(result: dict, path: str) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["repetition", "mode", "path"] + METRICS)
        writer.writeheader()
        for sample in result["samples"]:
            writer.writerow({k: sample.get(k) for k in writer.fieldnames})


def write_charts(result: dict, directory: str) -> list[str]:
    """throughput.png and latency.png: one bar per mode and path, the floor marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NetsimError(
            "PNG charts need matplotlib: pip install matplotlib (./bootstrap installs it)"
        ) from None
    os.makedirs(directory, exist_ok=True)
    rows = [r for r in result["medians"] if r["path"] != UNDERLAY]
    floor = next((r for r in result["medians"] if r["path"] == "plain-routing"), None)
    written = []
    for name, metric, label in (
        ("throughput.png", "tcp_gbps", "TCP throughput, Gbit/s"),
        ("latency.png", "rr_p50_ms", "request latency p50, ms"),
    ):
        shown = [r for r in rows if r.get(metric) is not None]
        fig, ax = plt.subplots(figsize=(max(6, len(shown) * 0.5), 4.5))
        ax.bar(range(len(shown)), [r[metric] for r in shown], color="#4c72b0")
        ax.set_xticks(
            range(len(shown)), [f"{r['mode']}\n{r['path']}" for r in shown], rotation=90, fontsize=7
        )
        if floor and floor.get(metric) is not None:
            ax.axhline(
                floor[metric],
                color="#c44e52",
                linestyle="--",
                label="floor: plain routing pod to pod",
            )
            ax.legend(fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"netsim bench ({result['machine']['kernel']})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
