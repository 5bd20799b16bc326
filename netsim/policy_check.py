"""`netsim policy check SRC DST --port P [--udp]`: would a connection from a pod to a pod or
Service be allowed, and by which policy? Answered from the kernel: one real connection attempt
from SRC, traced by nftables in the nodes it crosses (netsim/trace/nftrace.py); the verdict of
Felix's chains in each direction — egress at the source's node, ingress at the destination's —
is read from the rules the packet met, and named by their comments.
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field

from netsim import netpol, policy_table, services
from netsim.errors import UsageError
from netsim.kernel import netns as nsmod
from netsim.record import PodRecord, Record
from netsim.trace import nftrace
from netsim.trace.nftrace import Step

POLICY_CHAINS = ("cali-pi-", "cali-po-")
PROFILE_CHAINS = ("cali-pri-", "cali-pro-")


@dataclass
class Decision:
    """What Felix's chains of one endpoint decided."""

    direction: str  # egress | ingress
    pod: str
    node: str
    allowed: bool
    because: str  # in words
    policies: list[str] = field(default_factory=list)  # the policies that selected the pod


@dataclass
class Result:
    src: str
    dst: str
    address: str
    port: int
    protocol: str
    allowed: bool
    outcome: str  # connected, answered, refused (nothing listens), no answer
    decisions: list[Decision]
    notes: list[str]


def check(
    record: Record, src: str, dst: str, port: int, protocol: str = "TCP", timeout: float = 1.0
) -> Result:
    source = record.pods.get(src)
    if source is None:  # (exit 2: 1 means denied)
        raise UsageError(f"no pod named {src}; `netsim get pods -A` lists them")
    target = record.pods.get(dst)
    service = record.services.get(dst) if target is None else None
    if target is None and service is None:
        raise UsageError(
            f"no pod or Service named {dst}; `netsim get pods -A` and "
            "`netsim get services -A` list them"
        )
    if service is not None:
        if not any(p.port == port and p.protocol == protocol for p in service.ports):
            offered = ", ".join(f"{p.port}/{p.protocol}" for p in service.ports)
            raise UsageError(f"Service {dst} has no port {port}/{protocol}: it has {offered}")
        address = service.cluster_ip
        behind = services.endpoints(record, service)
    else:
        address, behind = target.ip, [target]
    nodes = {
        record.nodes[n].name: record.nodes[n].netns
        for n in {source.node, *(p.node for p in behind)}
        if n in record.nodes
    }
    with nsmod.entered(source.netns):
        sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM if protocol == "TCP" else socket.SOCK_DGRAM
        )
    try:
        sock.bind(("0.0.0.0", 0))
        sport = sock.getsockname()[1]
        match = f"ip saddr {source.ip} {protocol.lower()} sport {sport}"
        with nftrace.watching(record.cluster, nodes, match) as steps:
            outcome = _attempt(sock, address, port, protocol, timeout)
    finally:
        sock.close()
    decisions = explain(record, steps)
    notes = []
    if not record.policies:
        notes.append("no policy exists in the cluster: every pod is open")
    rejected = [s for s in steps if s.table != policy_table.TABLE and s.verdict == "drop"]
    notes += [f"dropped by {s.table} {s.chain}: {s.rule}" for s in rejected]
    allowed = all(d.allowed for d in decisions) and not rejected
    shown = _name(target) if target else f"{service.namespace}/{service.name}"
    return Result(_name(source), shown, address, port, protocol, allowed, outcome, decisions, notes)


def _attempt(sock: socket.socket, address: str, port: int, protocol: str, timeout: float) -> str:
    """What one connection attempt came to: connected, answered, refused, no answer."""
    sock.setblocking(False)
    with selectors.DefaultSelector() as selector:
        sock.connect_ex((address, port))
        if protocol == "TCP":
            selector.register(sock, selectors.EVENT_WRITE)
        else:
            try:
                sock.send(b"hostname")
            except OSError:
                return "refused"
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if selector.select(left):
                if protocol == "TCP":
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    return "connected" if code == 0 else "refused"
                try:
                    return "answered" if sock.recv(512) else "no answer"
                except OSError:
                    return "refused"
    return "no answer"


def explain(record: Record, steps: list[Step]) -> list[Decision]:
    """Each endpoint chain the packet entered (from the dispatch maps), and what decided."""
    pods = _pods_by_chain(record)
    decisions = []
    felix = [s for s in steps if s.table == policy_table.TABLE]
    for i, step in enumerate(felix):
        entered = step.verdict.removeprefix("jump ")
        if step.chain not in ("cali-FORWARD", "cali-INPUT") or not entered.startswith(
            ("cali-tw-", "cali-fw-")
        ):
            continue
        direction = "Ingress" if entered.startswith("cali-tw-") else "Egress"
        inside = []  # the steps until the endpoint chain returned or dropped
        for later in felix[i + 1 :]:
            if later.node != step.node or later.chain in ("cali-FORWARD", "cali-INPUT"):
                break
            inside.append(later)
        pod = pods.get(entered)
        selected = [p.title for p in selecting(record, pod, direction)] if pod else []
        logged = [s.comment for s in inside if s.comment.endswith(": Log")]
        drop = nftrace.dropped(inside)
        if drop is not None:
            allowed = False
            if drop.chain.startswith(POLICY_CHAINS):
                because = drop.comment or drop.chain
            elif selected:
                because = f"no selecting policy allowed it ({drop.chain}: {drop.comment})"
            else:
                because = f"{drop.chain}: {drop.comment or drop.rule}"
        else:
            allowed = True
            decider = [
                s
                for s in inside
                if s.chain.startswith(POLICY_CHAINS + PROFILE_CHAINS) and s.verdict == "return"
            ]
            last = decider[-1] if decider else None
            if last is None:
                because = f"{entered} returned"
            elif last.chain.startswith(PROFILE_CHAINS):
                passed = [s.comment for s in decider if s.comment.endswith(": Pass")]
                because = (
                    f"passed to the profiles by {passed[-1]}; "
                    if passed
                    else "no policy selects it; "
                ) + f"its namespace's profile allows ({last.chain})"
            else:
                because = last.comment or last.chain
        if logged:
            because += "; logged by " + ", ".join(logged)
        decisions.append(
            Decision(
                direction.lower(),
                _name(pod) if pod else entered,
                step.node,
                allowed,
                because,
                selected,
            )
        )
    return sorted(decisions, key=lambda d: d.direction != "egress")  # the way it went


def selecting(record: Record, pod: PodRecord, direction: str) -> list:
    """The policies that select the pod for this direction, in Felix's order."""
    from netsim.model import SYSTEM_NAMESPACES

    spaces = {n: {"kubernetes.io/metadata.name": n} for n in SYSTEM_NAMESPACES}
    spaces |= record.namespaces
    info = netpol.PodInfo(pod.pod.namespace, pod.pod.name, pod.labels, pod.ip)
    chosen = policy_table.selecting(list(record.policies.values()), info, spaces)
    return [p for p in chosen if direction in p.types]


def _pods_by_chain(record: Record) -> dict[str, PodRecord]:
    found = {}
    for pod in record.pods.values():
        for direction in netpol.TYPES:
            found[policy_table.endpoint_chain(pod.veth, direction)] = pod
    return found


def _name(pod: PodRecord) -> str:
    return f"{pod.pod.namespace}/{pod.pod.name}"


def describe(result: Result) -> str:
    verdict = "allowed" if result.allowed else "denied"
    lines = [
        f"{result.src} -> {result.dst} ({result.address}) {result.protocol} {result.port}: "
        f"{verdict} ({result.outcome})"
    ]
    lines += decision_lines(result.decisions)
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def decision_lines(decisions: list[Decision]) -> list[str]:
    lines = []
    for d in decisions:
        chosen = f"selected by {', '.join(d.policies)}; " if d.policies else ""
        word = "allowed" if d.allowed else "denied"
        lines.append(f"  {d.direction:<7} {d.pod} at {d.node}: {word} — {chosen}{d.because}")
    return lines
