"""What kube-proxy programs, as plain tuples both backends and the record share (standard
library only: the node agent's userspace proxy imports it)."""

from __future__ import annotations

from typing import NamedTuple


class Endpoint(NamedTuple):
    """One backend of a Service port: a pod's address and the port it serves on."""

    ip: str
    port: int


class ProxyPort(NamedTuple):
    """One port of one Service with its endpoints, as kube-proxy programs it. A tuple, so that
    comparing a thousand of them between syncs happens in C."""

    namespace: str
    name: str
    port_name: str
    protocol: str  # TCP | UDP
    cluster_ip: str
    port: int
    node_port: int | None
    endpoints: tuple[Endpoint, ...]
    affinity_timeout: int | None  # seconds with ClientIP affinity, None without
    external_ips: tuple[str, ...] = ()  # the load balancer's addresses (status.loadBalancer)
    external_local: bool = False  # externalTrafficPolicy: Local
    internal_local: bool = False  # internalTrafficPolicy: Local
    # with a Local policy: the endpoints on this node (each node's kube-proxy has its own)
    local_endpoints: tuple[Endpoint, ...] = ()
    health_check_port: int | None = None  # healthCheckNodePort: LoadBalancer + Local

    @property
    def key(self) -> str:
        """kube-proxy's servicePortName: namespace/name/protocol/portname."""
        return f"{self.namespace}/{self.name}/{self.protocol.lower()}/{self.port_name}"
