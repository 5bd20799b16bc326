"""`netsim bench --scale`: how building a cluster grows with its pods.

For each size (pods, 100 per node by default) and mode, one cluster of that many nodes on a /16
segment, one Deployment and one Service selecting every pod: `apply` timed in-process, then a
ping from the first node's first pod to the last node's last pod and a request through the
Service, a second `apply` (which must change nothing), and `delete`, each timed. Memory: the
agents' resident sets, and the kernel's unreclaimable slab growth (namespaces, devices, routes
and nftables objects live there) over the build. Clusters are deleted before the next size.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field

from netsim import columns
from netsim.errors import NetsimError

SIZES = [500, 1000, 2000, 5000, 10000]
PODS_PER_NODE = 100


def default_modes() -> list[str]:
    """flannel's and Calico's VXLAN modes: the default data planes people size clusters in."""
    from netsim import modes

    return [m.name for m in modes.every() if m.encapsulation == "vxlan"]


@dataclass
class Point:
    mode: str
    pods: int
    nodes: int
    apply_s: float = 0.0
    pods_per_s: float = 0.0
    reapply_s: float = 0.0
    delete_s: float = 0.0
    agents_pss_mib: float = 0.0  # agents and their zygote, shared pages counted once
    kernel_mib: float = 0.0  # growth of unreclaimable slab over the build
    reached: bool = False  # first pod pinged the last, and the Service answered
    errors: list[str] = field(default_factory=list)


def topology(mode: str, name: str, pods: int, per_node: int = PODS_PER_NODE) -> str:
    """One Cluster document, a Deployment of `pods` replicas and a Service over them."""
    nodes = max(1, -(-pods // per_node))
    names = ", ".join(f"{{name: w{i}}}" for i in range(1, nodes + 1))
    return f"""apiVersion: netsim.dev/v1alpha1
kind: Cluster
metadata: {{name: {name}}}
spec:
  cni:
    mode: {mode}
  underlay: {{mtu: 1500, segments: [{{name: lan, subnet: 172.20.0.0/16}}]}}
  nodes: [{names}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {pods}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers: [{{name: hostname}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 9376}}]
"""


def _slab_mib() -> float:
    with open("/proc/meminfo") as fh:
        values = dict(line.split(":", 1) for line in fh)
    return int(values["SUnreclaim"].split()[0]) / 1024


def settle(limit: float = 90.0) -> None:
    """Wait (up to `limit` s) while the kernel still frees an earlier cluster's namespaces in
    the background, so one size's memory and time are not another's teardown."""
    deadline, last = time.monotonic() + limit, _slab_mib()
    while time.monotonic() < deadline:
        time.sleep(2)
        now = _slab_mib()
        if now > last - 8:  # less than 4 MiB/s still freed: settled
            return
        last = now


def agents_pss_mib(record) -> float:
    """The memory of every node agent and of the zygote they were forked from, in MiB: the
    sum of their proportional set sizes (PSS: a page shared by n of them counts 1/n in each),
    so the code and objects they share are counted once, as the kernel holds them once."""
    total = 0
    processes = [node.agent for node in record.nodes.values()] + [record.zygote]
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
        except (OSError, AttributeError, StopIteration):
            continue
    return total / 1024


def measure(mode: str, pods: int, progress=lambda line: None) -> Point:
    """Build, check, re-apply, delete one cluster of `pods` pods; never leaves it behind."""
    from netsim import cluster, probe, state, teardown
    from netsim import topology as topo

    name = f"scale-{uuid.uuid4().hex[:4]}"
    model, _ = topo.parse(topology(mode, name, pods), f"scale:{mode}:{pods}")
    point = Point(mode, pods, len(model.nodes))
    settle()
    slab = _slab_mib()
    try:
        start = time.monotonic()
        cluster.apply(model)
        point.apply_s = time.monotonic() - start
        point.pods_per_s = pods / point.apply_s
        point.kernel_mib = _slab_mib() - slab
        record = state.load(name)
        point.agents_pss_mib = agents_pss_mib(record)
        progress(f"{mode} {pods} pods: up in {point.apply_s:.1f} s")
        first, last = min(record.pods), max(record.pods, key=lambda p: (len(p), p))
        ping = probe.ping(record.pods[first].netns, record.pods[last].ip, count=3)
        reply = probe.http_get(record.pods[last].netns, record.services["web"].cluster_ip, 80)
        point.reached = bool(ping.received) and not reply.error
        if not point.reached:
            point.errors.append(
                f"{first} -> {last}: {ping.received} replies; Service: {reply.error or 'answered'}"
            )
        start = time.monotonic()
        changes = cluster.apply(model)
        point.reapply_s = time.monotonic() - start
        if changes:
            point.errors.append(f"the second apply changed {changes.summary()}")
    except NetsimError as exc:
        point.errors.append(str(exc))
    finally:
        start = time.monotonic()
        teardown.delete(name)
        point.delete_s = time.monotonic() - start
    return point


def run(modes: list[str], sizes: list[int], progress=lambda line: None) -> list[Point]:
    if os.geteuid() != 0:
        raise NetsimError("netsim bench --scale builds namespaces: run as root")
    return [measure(mode, pods, progress) for mode in modes for pods in sizes]


def table(points: list[Point]) -> str:
    header = [
        "MODE",
        "PODS",
        "NODES",
        "APPLY s",
        "PODS/s",
        "REAPPLY s",
        "DELETE s",
        "AGENTS MiB (PSS)",
        "KERNEL MiB",
        "REACHED",
    ]
    rows = [
        [
            p.mode,
            str(p.pods),
            str(p.nodes),
            f"{p.apply_s:.1f}",
            f"{p.pods_per_s:.0f}",
            f"{p.reapply_s:.2f}",
            f"{p.delete_s:.1f}",
            f"{p.agents_pss_mib:.0f}",
            f"{p.kernel_mib:.0f}",
            "yes" if p.reached else "NO",
        ]
        for p in points
    ]
    lines = columns.aligned(header, rows)
    lines += [f"{p.mode} {p.pods}: {e}" for p in points for e in p.errors]
    return "\n".join(lines)


def as_json(points: list[Point]) -> list[dict]:
    return [asdict(p) for p in points]


def chart(points: list[Point], path: str) -> str:
    """Seconds to apply and pods per second against pods, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(p.mode for p in points):
        mine = [p for p in points if p.mode == mode]
        left.plot([p.pods for p in mine], [p.apply_s for p in mine], marker="o", label=mode)
        right.plot([p.pods for p in mine], [p.pods_per_s for p in mine], marker="o", label=mode)
    left.set(xlabel="pods (100 per node)", ylabel="netsim apply, s", title="time to build")
    right.set(xlabel="pods (100 per node)", ylabel="pods per second", title="build rate")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
