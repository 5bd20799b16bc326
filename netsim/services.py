"""Services and their endpoints: which pods a selector picks, what a named targetPort means
in each, the ClusterIP and NodePort each Service keeps across applies, and the Service ports
as kube-proxy programs them. Pure: reads and changes the record only."""

from __future__ import annotations

from dataclasses import replace

from netsim.kubeproxy.ports import Endpoint, ProxyPort
from netsim.model import Cluster, Service, ServicePort
from netsim.record import PodRecord, Record
from netsim.topology import NODE_PORT_RANGE, allocate_cluster_ips
from netsim.transaction import Changes

NAMESPACE = "default"  # where objects live when they do not say


def ip_key(ip: str) -> tuple[int, ...]:
    """An IPv4 address as a sort key: endpoints in address order, as kube-proxy orders them."""
    return tuple(int(o) for o in ip.split("."))


def endpoints(record: Record, service: Service) -> list[PodRecord]:
    """The pods of its namespace the selector matches, ordered by IP as kube-proxy orders
    them (a Service without a selector has none: its endpoints are managed by hand)."""
    if not service.selector:
        return []
    pods = [
        p
        for p in record.pods.values()
        if p.pod.namespace == service.namespace
        and all(p.labels.get(k) == v for k, v in service.selector.items())
    ]
    return sorted(pods, key=lambda p: ip_key(p.ip))


def target_port(pod: PodRecord, port: ServicePort) -> int | None:
    """A service port's targetPort in one pod: the number, or the pod's port of that name."""
    if isinstance(port.target_port, int):
        return port.target_port
    return pod.pod.named_port(port.target_port)


def proxy_ports(record: Record) -> list[ProxyPort]:
    """Every Service port with its endpoints, as kube-proxy's sync sees them."""
    found = []
    for _, svc in sorted(record.services.items()):
        if svc.cluster_ip == "None":  # headless: DNS names its pods, kube-proxy has no part
            continue
        eps = endpoints(record, svc)
        affinity = svc.affinity_timeout if svc.session_affinity == "ClientIP" else None
        for port in svc.ports:
            resolved = ((p.ip, target_port(p, port)) for p in eps)
            found.append(
                ProxyPort(
                    svc.namespace,
                    svc.name,
                    port.name,
                    port.protocol,
                    svc.cluster_ip,
                    port.port,
                    port.node_port,
                    tuple(Endpoint(ip, t) for ip, t in resolved if t),
                    affinity,
                )
            )
    return found


def reconcile(cluster: Cluster, record: Record, changes: Changes) -> None:
    """Services with their ClusterIPs and node ports (kept across applies once given)."""
    ips = allocate_cluster_ips(cluster, {n: s.cluster_ip for n, s in record.services.items()})
    node_ports = _allocate_node_ports(cluster, record)
    wanted = {}
    for svc in cluster.services:
        ports = tuple(
            replace(p, node_port=node_ports[(svc.key, i)]) if svc.type == "NodePort" else p
            for i, p in enumerate(svc.ports)
        )
        wanted[svc.key] = replace(svc, cluster_ip=ips[svc.key], ports=ports)
    for name in set(record.services) | set(wanted):
        before, after = record.services.get(name), wanted.get(name)
        if before != after:
            (
                changes.created
                if before is None
                else changes.removed
                if after is None
                else changes.updated
            ).append(f"service {name}")
    record.services = wanted


def _allocate_node_ports(cluster: Cluster, record: Record) -> dict[tuple[str, int], int]:
    """NodePorts: as written, else as before, else the lowest free of 30000-32767."""
    given = {
        (s.key, i): p.node_port
        for s in cluster.services
        if s.type == "NodePort"
        for i, p in enumerate(s.ports)
        if p.node_port
    }
    before = {
        (n, i): p.node_port
        for n, svc in record.services.items()
        for i, p in enumerate(svc.ports)
        if p.node_port
    }
    result = dict(given)
    for svc in cluster.services:
        for i, _ in enumerate(svc.ports):
            key = (svc.key, i)
            if (
                svc.type == "NodePort"
                and key not in result
                and before.get(key)
                and before[key] not in result.values()
            ):
                result[key] = before[key]
    free = (
        p for p in range(NODE_PORT_RANGE[0], NODE_PORT_RANGE[1] + 1) if p not in result.values()
    )
    for svc in cluster.services:
        for i, _ in enumerate(svc.ports):
            if svc.type == "NodePort" and (svc.key, i) not in result:
                result[(svc.key, i)] = next(free)
    return result
