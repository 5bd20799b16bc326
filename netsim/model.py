"""The desired cluster as plain data: what the topology file asks for. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network

from netsim.netpol import Policy

HOSTNAME_PORT = 9376  # agnhost serve-hostname's port
DEFAULT_NAMESPACE = "default"
# namespaces every cluster has (kube-node-lease holds the kubelets' heartbeats)
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def object_key(namespace: str, name: str) -> str:
    """How netsim tells namespaced objects apart (record keys, pods' namespace names, kubelet
    bindings): the name in `default`, `<namespace>.<name>` elsewhere. Both are DNS-1123
    labels, which have no dot, so the key is unambiguous and safe in file and netns names."""
    return name if namespace == DEFAULT_NAMESPACE else f"{namespace}.{name}"


KUBE_DNS = object_key("kube-system", "kube-dns")  # the cluster DNS Service (netsim/addons.py)
DEFAULT_AFFINITY_TIMEOUT = 10800  # v1.DefaultClientIPServiceAffinitySeconds


@dataclass(frozen=True)
class Segment:
    """One L2 underlay segment (a bridge in the cluster's underlay namespace)."""

    name: str
    subnet: str  # CIDR, e.g. 172.18.0.0/24

    @property
    def router_ip(self) -> str:
        """.1 of each segment belongs to the router that joins the racks."""
        return str(IPv4Network(self.subnet).network_address + 1)

    @property
    def prefixlen(self) -> int:
        return int(self.subnet.partition("/")[2])


@dataclass(frozen=True)
class Node:
    name: str
    segment: str
    ip: str = ""  # filled by the topology loader when not given


@dataclass(frozen=True)
class ExternalClient:
    """A host outside the cluster on an underlay segment (for NodePort traffic); with an AS
    number, a top-of-rack BGP router peering with the nodes of its segment."""

    name: str
    segment: str
    ip: str = ""
    asn: int = 0


@dataclass(frozen=True)
class CalicoSpec:
    """The IP pool's encapsulation and the BGP settings (pool CIDR and block size are the
    cluster's pod_network and subnet_len)."""

    ipip_mode: str = "Never"  # Always | CrossSubnet | Never
    vxlan_mode: str = "Never"
    nat_outgoing: bool = True
    asn: int = 64512
    reflectors: tuple[str, ...] = ()
    ipip_carrier: str = "auto"  # auto | kernel | ebpf | userspace


@dataclass(frozen=True)
class Datastore:
    """Where the cluster's state lives: the etcd netsim runs on the master (no endpoints), or
    the user's etcd at `endpoints`, reached from the namespace `netns` ("" the host's own)."""

    endpoints: tuple[str, ...] = ()
    netns: str = ""
    master_ip: str = ""  # netsim's own etcd: the master's address on the first segment

    @property
    def own(self) -> bool:
        return not self.endpoints


@dataclass(frozen=True)
class Probe:
    """A readinessProbe: httpGet (port, path) or exec (command), with Kubernetes' timings."""

    kind: str  # httpGet | exec | tcpSocket
    port: int | str = 0  # a number, or the name of a container port
    path: str = "/"
    command: tuple[str, ...] = ()
    initial_delay: int = 0
    period: int = 10
    timeout: int = 1
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True)
class Container:
    name: str
    ports: tuple[int, ...] = ()
    command: tuple[str, ...] = ()  # Kubernetes' command: replaces the image's entrypoint
    port_names: tuple[tuple[str, int], ...] = ()  # (name, containerPort) for named ports
    image: str = ""  # "": netsim's own hostname server
    args: tuple[str, ...] = ()  # Kubernetes' args: replace the image's CMD
    env: tuple[tuple[str, str], ...] = ()  # env: [{name, value}]
    readiness: Probe | None = None
    protocols: tuple[tuple[int, str], ...] = ()  # (containerPort, UDP|SCTP): the ports not TCP

    def protocol(self, port: int) -> str:
        return dict(self.protocols).get(port, "TCP")

    @property
    def served_ports(self) -> tuple[int, ...]:
        """Where the built-in hostname server answers for this container: its ports, else
        the port of the web server its image would run (nginx: 80), else agnhost's 9376."""
        from netsim.images import IMAGE_PORTS, image_name

        return self.ports or (IMAGE_PORTS.get(image_name(self.image), HOSTNAME_PORT),)

    @property
    def builtin(self) -> bool:
        """Served by the agent's own hostname server rather than a process of its own."""
        from netsim.images import workload

        return workload(self).argv is None


RESTART_POLICIES = ("Always", "OnFailure", "Never")


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str]
    containers: tuple[Container, ...]
    node: str = ""  # nodeName, or the scheduler's choice
    owner: str = ""  # the Deployment that made it, if any
    init_containers: tuple[Container, ...] = ()  # run one after another, to completion
    restart_policy: str = "Always"
    service_links: bool = True  # enableServiceLinks: the Services' environment variables
    namespace: str = DEFAULT_NAMESPACE

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        return object_key(self.namespace, self.name)

    def named_port(self, name: str) -> int | None:
        """The containerPort a Service's named targetPort means in this pod."""
        return next((p for c in self.containers for n, p in c.port_names if n == name), None)

    @property
    def serve_ports(self) -> tuple[int, ...]:
        """Ports the built-in hostname server answers on for this pod."""
        ports = [p for c in self.containers if c.builtin for p in c.served_ports]
        return tuple(sorted(set(ports)))

    @property
    def workload(self) -> tuple:
        """What the kubelet runs: everything that makes a container differ."""
        return (self.containers, self.init_containers, self.restart_policy, self.service_links)


POD_NAMES = ("ReplicaSet", "Ordinal")  # spec.controlPlane.podNames


@dataclass(frozen=True)
class Deployment:
    """A Deployment as written (its pods come from its ReplicaSets: netsim/rollout.py)."""

    name: str
    namespace: str
    replicas: int
    template: dict  # spec.template as written: hashed, and kept with its ReplicaSet
    selector: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    strategy: str = "RollingUpdate"  # | Recreate
    max_surge: int | str = "25%"
    max_unavailable: int | str = "25%"
    min_ready: int = 0  # minReadySeconds
    history_limit: int = 10  # revisionHistoryLimit
    progress_deadline: int = 600  # progressDeadlineSeconds
    paused: bool = False
    cause: str = ""  # metadata.annotations kubernetes.io/change-cause: a new ReplicaSet keeps it

    @property
    def key(self) -> str:
        return object_key(self.namespace, self.name)


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    protocol: str = "TCP"
    name: str = ""
    node_port: int | None = None


@dataclass(frozen=True)
class Service:
    name: str
    selector: dict[str, str]
    ports: tuple[ServicePort, ...]
    type: str = "ClusterIP"
    cluster_ip: str = ""  # given in the file, or allocated
    session_affinity: str = "None"
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    namespace: str = DEFAULT_NAMESPACE
    labels: dict[str, str] = field(default_factory=dict)
    external_policy: str = "Cluster"  # externalTrafficPolicy (NodePort, LoadBalancer)
    internal_policy: str = "Cluster"  # internalTrafficPolicy
    load_balancer_ip: str = ""  # asked for (spec.loadBalancerIP), or given from the pool
    health_check_node_port: int | None = None  # LoadBalancer with externalTrafficPolicy Local

    @property
    def node_ports(self) -> bool:
        """NodePort and LoadBalancer Services are reached on every node's ports."""
        return self.type in ("NodePort", "LoadBalancer")

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        return object_key(self.namespace, self.name)


@dataclass
class Cluster:
    """Everything one topology file declares."""

    name: str
    mode: str
    pod_network: str  # flannel's Network, or Calico's IP pool
    subnet_len: int  # flannel's SubnetLen, or Calico's block size
    service_cidr: str
    mtu: int
    segments: list[Segment]
    nodes: list[Node]
    clients: list[ExternalClient] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    deployments: list[Deployment] = field(default_factory=list)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # declared: labels
    policies: list[Policy] = field(default_factory=list)  # NetworkPolicy, Calico's policies
    calico: CalicoSpec | None = None  # for the calico-* modes
    proxy_mode: str = "nftables"  # kube-proxy's backend: nftables | userspace
    cni_version: str = "1.0.0"  # of the node's CNI config list
    cni_plugins: list[dict] = field(default_factory=list)  # chained after netsim's plugin
    datastore: Datastore = field(default_factory=Datastore)
    lease_ttl: int = 86400  # flannel's subnet lease TTL (flannel fixes it at 24 h)
    node_grace: int = 40  # kube-controller-manager's --node-monitor-grace-period, seconds
    eviction_timeout: int = 300  # NotReady this long: its Deployments' pods are made elsewhere
    lb_addresses: tuple[str, ...] = ()  # spec.loadBalancer.addresses: MetalLB's L2 pool
    pod_names: str = "ReplicaSet"  # a Deployment's pods: <rs>-<5 chars>, or Ordinal <name>-<i>
    source: str = ""  # the file it came from

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)
