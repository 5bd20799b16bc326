"""kube-proxy on a node (nftables mode): watch Services and their Endpoints and keep the node's
`ip kube-proxy` table in step — the whole table on the first sync, then one nf_tables batch of
only what changed (netsim/kubeproxy/nftables.py computes both).

Each sync is computed and sent by a short-lived child of the agent (fork, then exit): a sync
of one Service of 10,000 endpoints peaks at tens of MiB of rules, which a long-lived Python
process would keep as heap, in every one of a hundred agents. The agent keeps only the
objects as stored (their JSON) that the table was last synced to.

What a sync sends is a pure function of the objects before and after (every node programs
every Service the same way), so the agents of one host share it: the first to need a plan
computes it under a lock and leaves it in the cluster's directory, keyed by the digest of its
inputs; the others load it and send it to their own node. A hundred kube-proxies on two cores
would otherwise compute the same 10,000-endpoint rule set a hundred times."""

from __future__ import annotations

import fcntl
import os
import pickle
import time
from collections.abc import Callable

from netsim import registry


class KubeProxy:
    name = "kube-proxy"
    prefixes = (registry.SERVICES_ALL,)

    def __init__(
        self,
        netns: str,
        cluster_cidr: str,
        event: Callable[[str], None],
        plans: str,
        node: str = "",
    ):
        self.netns, self.cluster_cidr, self.event = netns, cluster_cidr, event
        self.plans = plans  # the directory of shared plans
        self.node = node
        self.synced: dict[str, bytes] | None = None  # what the table holds; None: nothing yet
        self.health = HealthChecks(netns)

    def sync(self, view: dict) -> None:
        from netsim.kernel import proc

        current = {key: kv.value for key, kv in view[registry.SERVICES_ALL].items()}
        if current == self.synced:
            return
        previous = self.synced
        proc.in_child(lambda: self._program(previous, current))
        self.synced = current
        self.health.sync(current, self.node)

    def _program(self, previous: dict | None, current: dict) -> None:
        """In the child: the plan (shared, or computed), then the node's table."""
        from netsim.kernel import nft

        # a Service with a Local traffic policy is programmed per node: its own endpoints
        node = self.node if _local(previous) or _local(current) else ""
        key = _digest(previous, current, self.cluster_cidr + "/" + node)
        base, batch, summary = _shared(
            self.plans, key, lambda: _plan(previous, current, self.cluster_cidr, node)
        )
        if base is not None:
            nft.apply(self.netns, base)
        if len(batch):
            batch.commit(self.netns)
        if summary:
            self.event(summary)


class UserspaceKubeProxy:
    """kube-proxy's legacy userspace mode: the agent's proxy serves every Service port on a
    port of its own, and the node's nftables send ClusterIP and NodePort traffic there."""

    name = "kube-proxy"
    prefixes = (registry.SERVICES_ALL,)

    def __init__(self, netns: str, node_ip: str, proxy: Callable[[], object], event):
        self.netns, self.node_ip, self.proxy, self.event = netns, node_ip, proxy, event
        self.synced: dict[str, bytes] | None = None

    def sync(self, view: dict) -> None:
        from netsim.kernel import nft
        from netsim.kubeproxy import userspace_rules

        current = {key: kv.value for key, kv in view[registry.SERVICES_ALL].items()}
        if current == self.synced:
            return
        ports = _ports(current)
        listen = self.proxy().sync(userspace_rules.table(ports))
        fresh = self.synced is None
        nft.apply(self.netns, userspace_rules.ruleset(ports, listen, self.node_ip, fresh))
        self.synced = current
        self.event(f"userspace proxy: {len(listen)} service ports")


def _local(objects: dict | None) -> bool:
    return any(b'TrafficPolicy":"Local"' in v for v in (objects or {}).values())


def _plan(previous: dict | None, current: dict, cluster_cidr: str, node: str = "") -> tuple:
    """(the table's fixed part as nft -f text on a first sync, else None; the batch; what
    the sync did, in words)."""
    from netsim.kubeproxy import nftables as kp

    ports = _ports(current, node)
    if previous is None:
        base, batch = kp.first_sync(ports, cluster_cidr)
        return base, batch, f"synced the table: {len(ports)} service ports"
    before = _ports(previous, node)
    batch = kp.changes(before, ports, cluster_cidr)
    return None, batch, _summary(before, ports) if len(batch) else ""


def _digest(previous: dict | None, current: dict, cluster_cidr: str) -> str:
    import hashlib

    h = hashlib.sha256(cluster_cidr.encode())
    for label, objects in ((b"before", previous), (b"after", current)):
        h.update(label if objects is not None else b"none")
        for key in sorted(objects or {}):
            h.update(key.encode() + b"\0" + objects[key] + b"\0")
    return h.hexdigest()[:32]


KEEP_PLANS = 60.0  # seconds: every agent has long since loaded a plan by then


def _shared(directory: str, key: str, make: Callable[[], tuple]) -> tuple:
    """The plan under `key`: loaded if another agent made it, else made and left for them
    (under an flock, so a hundred agents woken by one write compute it once)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, key)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh)
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        plan = make()
        with open(path + ".tmp", "wb") as fh:
            pickle.dump(plan, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(path + ".tmp", path)
    now = time.time()
    for name in os.listdir(directory):  # plans everyone has had time to load
        try:
            if now - os.stat(os.path.join(directory, name)).st_mtime > KEEP_PLANS:
                os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    return plan


def _ports(objects: dict[str, bytes], node: str = "") -> list:
    import json

    from netsim.model import object_key

    services, endpoints = {}, {}
    for key, value in objects.items():
        for prefix, into in ((registry.SERVICES, services), (registry.ENDPOINTS, endpoints)):
            if key.startswith(prefix):
                namespace, name = key[len(prefix) :].split("/", 1)
                into[object_key(namespace, name)] = json.loads(value)
    return registry.proxy_ports(services, endpoints, node)


def _summary(before: list, after: list) -> str:
    old = {p.key: p for p in before}
    new = {p.key: p for p in after}
    parts = []
    for key in sorted(new.keys() - old.keys()):
        parts.append(f"added {key} ({len(new[key].endpoints)} endpoints)")
    for key in sorted(old.keys() - new.keys()):
        parts.append(f"removed {key}")
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key]:
            parts.append(f"updated {key} ({len(new[key].endpoints)} endpoints)")
    return "; ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")


class HealthChecks:
    """kube-proxy's health check node ports (pkg/proxy/healthcheck/service_health.go): for
    each LoadBalancer Service with externalTrafficPolicy Local, an HTTP server on its
    healthCheckNodePort in the node's namespace answering 200 while the node has endpoints
    of it, else 503, so a load balancer sends traffic only to nodes that serve it."""

    def __init__(self, netns: str):
        self.netns = netns
        self.servers: dict[int, object] = {}  # port -> its server
        self.answers: dict[int, tuple[int, bytes]] = {}  # port -> (status, body)

    def sync(self, objects: dict[str, bytes], node: str) -> None:
        import json

        wanted: dict[int, tuple[int, bytes]] = {}
        for key, value in objects.items():
            if not key.startswith(registry.SERVICES) or b"healthCheckNodePort" not in value:
                continue
            svc = json.loads(value)
            port = svc["spec"].get("healthCheckNodePort")
            if not port:
                continue
            where = key[len(registry.SERVICES) :]
            ends = objects.get(registry.ENDPOINTS + where)
            addresses = [
                a
                for subset in (json.loads(ends).get("subsets", []) if ends else [])
                for a in subset.get("addresses", [])
            ]
            local = len({a["ip"] for a in addresses if a.get("nodeName") == node})
            namespace, name = where.split("/", 1)
            body = {
                "service": {"namespace": namespace, "name": name},
                "localEndpoints": local,
                "serviceProxyHealthy": True,
            }
            wanted[port] = (200 if local else 503, json.dumps(body).encode())
        self.answers = wanted
        for port in [p for p in self.servers if p not in wanted]:
            self.servers.pop(port).shutdown()
        for port in wanted:
            if port not in self.servers:
                self.servers[port] = self._serve(port)

    def _serve(self, port: int):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from netsim.kernel import netns as nsmod

        checks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- http.server's name
                status, body = checks.answers.get(port, (503, b"{}"))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        with nsmod.entered(self.netns):  # the listening socket lives in the node's namespace
            server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True, name=f"healthz-{port}").start()
        return server
