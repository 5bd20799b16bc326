"""Services and their endpoints: which pods a selector picks, what a named targetPort means
in each, the ClusterIP and NodePort each Service keeps across applies, and the Service ports
as kube-proxy programs them. Pure: reads and changes the record only."""

from __future__ import annotations

from dataclasses import replace

from netsim.model import Cluster, Service, ServicePort
from netsim.record import PodRecord, Record
from netsim.topology import NODE_PORT_RANGE, allocate_cluster_ips, lb_pool
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


def reconcile(cluster: Cluster, record: Record, changes: Changes) -> None:
    """Services with their ClusterIPs and node ports (kept across applies once given)."""
    ips = allocate_cluster_ips(cluster, {n: s.cluster_ip for n, s in record.services.items()})
    node_ports = _allocate_node_ports(cluster, record)
    external = _allocate_lb_ips(cluster, record)
    wanted = {}
    for svc in cluster.services:
        ports = tuple(
            replace(p, node_port=node_ports[(svc.key, i)]) if svc.node_ports else p
            for i, p in enumerate(svc.ports)
        )
        wanted[svc.key] = replace(
            svc,
            cluster_ip=ips[svc.key],
            ports=ports,
            load_balancer_ip=external.get(svc.key, ""),
            health_check_node_port=node_ports.get((svc.key, "health")),
        )
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


def _wanted_ports(svc: Service) -> list:
    """What a Service takes from the node port range: a port for each of its ports
    (NodePort, LoadBalancer), and its health check port (LoadBalancer, Local)."""
    wanted: list = list(range(len(svc.ports))) if svc.node_ports else []
    if svc.type == "LoadBalancer" and svc.external_policy == "Local":
        wanted.append("health")
    return wanted


def _allocate_node_ports(cluster: Cluster, record: Record) -> dict[tuple[str, int | str], int]:
    """NodePorts (and health check node ports): as written, else as before, else the lowest
    free of 30000-32767."""
    result: dict = {}
    for s in cluster.services:
        for i in _wanted_ports(s):
            given = s.health_check_node_port if i == "health" else s.ports[i].node_port
            if given:
                result[(s.key, i)] = given
    before: dict = {}
    for n, svc in record.services.items():
        for i, p in enumerate(svc.ports):
            if p.node_port:
                before[(n, i)] = p.node_port
        if svc.health_check_node_port:
            before[(n, "health")] = svc.health_check_node_port
    for svc in cluster.services:
        for i in _wanted_ports(svc):
            key = (svc.key, i)
            if key not in result and before.get(key) and before[key] not in result.values():
                result[key] = before[key]
    free = (
        p for p in range(NODE_PORT_RANGE[0], NODE_PORT_RANGE[1] + 1) if p not in result.values()
    )
    for svc in cluster.services:
        for i in _wanted_ports(svc):
            if (svc.key, i) not in result:
                result[(svc.key, i)] = next(free)
    return result


def _allocate_lb_ips(cluster: Cluster, record: Record) -> dict[str, str]:
    """LoadBalancer addresses from the cluster's pool, as MetalLB's controller assigns them:
    as asked (spec.loadBalancerIP), else as before, else the first free. A Service the pool
    has no room for gets none (kubectl shows it <pending>)."""
    from ipaddress import IPv4Address

    pool = [str(IPv4Address(a)) for a in lb_pool(cluster)]
    balanced = [s for s in cluster.services if s.type == "LoadBalancer"]
    result: dict[str, str] = {}
    for svc in balanced:  # an address held stays with its Service (if it still wants it)
        old = record.services.get(svc.key)
        ip = old.load_balancer_ip if old else ""
        if ip in pool and svc.load_balancer_ip in ("", ip):
            result[svc.key] = ip
    asked = [s for s in balanced if s.key not in result and s.load_balancer_ip]
    for svc in asked:  # asked for and free; taken by another: <pending>, as MetalLB leaves it
        if svc.load_balancer_ip not in result.values():
            result[svc.key] = svc.load_balancer_ip
    taken = {s.key for s in asked}
    free = (ip for ip in pool if ip not in result.values())
    for svc in balanced:
        if svc.key not in result and svc.key not in taken:
            ip = next(free, None)
            if ip is not None:
                result[svc.key] = ip
    return result
