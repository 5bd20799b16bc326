"""The cluster's record, typed: what netsim made for a cluster, so it can change or remove
exactly that, and what every reader (get, describe, trace, graph, bench) reads.

Plain dataclasses with a JSON round trip (msgspec encodes and decodes them, checking every
field's type on the way in), so the same objects can live in a file today and in a datastore
tomorrow. The desired objects of model.py (Pod, Service) are held as they are; the record adds
what was made for them (namespace, address, veth, processes). No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from netsim.errors import NetsimError
from netsim.model import (
    CalicoSpec,
    Cluster,
    Datastore,
    Deployment,
    ExternalClient,
    Node,
    Pod,
    Segment,
    Service,
)
from netsim.netpol import Policy
from netsim.rollout import RolloutState


@dataclass
class Process:
    """A process netsim started, known by PID and start time (so a reused PID is not ours)."""

    pid: int
    start: int
    dir: str = ""  # where a daemon keeps its config, socket and log (BIRD)


@dataclass
class TunnelSpec:
    """A userspace carrier a node agent serves: its TUN and where each peer prefix goes."""

    kind: str  # udp (flannel's 8285) | ipip
    name: str  # the TUN device
    local_ip: str
    mtu: int
    peers: dict[str, str]  # prefix -> peer node IP
    address: str  # the TUN's address/prefix


@dataclass
class Host:
    """A namespace attached to an underlay segment: a node or an external client."""

    name: str
    netns: str
    ip: str
    segment: str
    prefixlen: int
    port: str  # its port on the segment's bridge, in the underlay namespace
    gateway: str  # the segment's router address
    bird: Process | None = None  # Calico BGP: its BIRD; a top-of-rack router's too


@dataclass
class ClientRecord(Host):
    asn: int = 0  # a top-of-rack BGP router when set


@dataclass
class NodeRecord(Host):
    """A node, with the facts its mode planned for it (the rest stay empty)."""

    subnet: str = ""  # flannel: the node's lease, its podCIDR
    lease: int = 0  # flannel: the etcd lease its subnet lease is bound to (the agent renews it)
    blocks: list[str] = field(default_factory=list)  # Calico: IPAM blocks affine to the node
    encap: str = "Never"  # Calico: the pool's ipipMode or vxlanMode
    tunnel_ip: str = ""  # Calico VXLAN / IPIP: the node's tunnel address
    vtep_mac: str = ""  # VXLAN modes: the node's VTEP MAC
    carrier: str = ""  # calico-ipip: kernel | ebpf | userspace
    tunnel_index: int = 0  # the tunnel's interface index, where routes need it
    agent: Process | None = None
    agent_tunnel: TunnelSpec | None = None  # a userspace carrier served by the agent
    down: bool = False  # stopped by `netsim node stop` (a power cut) until `node start`
    evicted: bool = False  # NotReady past the eviction timeout: no pods go there until Ready

    @property
    def pod_cidrs(self) -> list[str]:
        """The node's pod address ranges: its flannel lease, or its Calico blocks."""
        return [self.subnet] if self.subnet else list(self.blocks)


@dataclass
class PodRecord:
    """A pod as declared (after scheduling) and what was made for it."""

    pod: Pod
    netns: str
    ip: str
    veth: str  # the host end, in the node's namespace
    ifindex: int = 0  # the host end's index (0: the kernel chose, by name)
    via: str = "in-process"  # or "cni-exec": wired by executing the node's CNI chain
    pids: list[int] = field(default_factory=list)  # of its container commands
    ready: bool = True  # as its kubelet last reported it to apply (the controller follows it)

    @property
    def name(self) -> str:
        """The pod's key (netsim.model.object_key): its name in `default`."""
        return self.pod.key

    @property
    def node(self) -> str:
        return self.pod.node

    @property
    def labels(self) -> dict[str, str]:
        return self.pod.labels


@dataclass
class RouterLeg:
    ifname: str  # in the router namespace
    index: int
    port: str  # its port on the segment's bridge


@dataclass
class Underlay:
    netns: str
    bridges: dict[str, str] = field(default_factory=dict)  # segment -> bridge name


@dataclass
class Master:
    """The control plane's namespace on the first segment, where netsim runs the cluster's
    etcd (as the guides run it on their master)."""

    netns: str
    ip: str
    segment: str
    port: str  # its port on the segment's bridge
    etcd: Process | None = None
    etcd_started_s: float = 0.0  # how long etcd took to answer, reported apart from apply


@dataclass
class Router:
    netns: str
    legs: dict[str, RouterLeg] = field(default_factory=dict)  # segment -> leg


@dataclass
class ClusterSpec:
    """The cluster-level part of a topology, which an apply may not change in place."""

    mode: str
    pod_network: str
    subnet_len: int
    service_cidr: str
    mtu: int
    segments: list[Segment]
    nodes: list[Node]
    clients: list[ExternalClient]
    calico: CalicoSpec | None
    cni_version: str
    cni_plugins: list[dict]
    proxy_mode: str
    datastore: Datastore = field(default_factory=Datastore)
    lease_ttl: int = 86400
    node_grace: int = 40
    eviction_timeout: int = 300
    lb_addresses: tuple[str, ...] = ()  # changes in place: the agents' speakers follow

    def cluster(self, name: str) -> Cluster:
        """The cluster-level facts as a model Cluster (what the modes and the daemons read),
        without its pods and Services."""
        from dataclasses import fields

        return Cluster(name, **{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class KubeProxy:
    """Which kube-proxy the nodes run (each node's daemon keeps what it programmed)."""

    mode: str  # nftables | userspace


class Place(NamedTuple):
    """Somewhere a probe can start or end: a pod, node or client."""

    kind: str  # pod | node | client
    name: str
    netns: str
    ip: str
    node: str  # the node a pod runs on; the node itself for a node; "" for a client


@dataclass
class Record:
    cluster: str
    spec: ClusterSpec
    underlay: Underlay
    router: Router
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    pods: dict[str, PodRecord] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # declared: labels
    policies: dict[str, Policy] = field(default_factory=dict)  # netpol.key -> as applied
    kube_proxy: KubeProxy | None = None
    master: Master | None = None  # netsim's own etcd; None when the user's etcd is used
    controller: Process | None = None  # the node lifecycle controller (netsim/controller.py)
    zygote: Process | None = None  # forks the node agents (netsim/zygote.py)
    cni_exec: bool = False  # pods are wired by executing each node's CNI chain (--cni exec)
    source: str = ""  # the topology file, absolute
    overrides: dict = field(default_factory=dict)  # what scale, expose, delete pod changed
    deployments: dict[str, Deployment] = field(default_factory=dict)  # as last applied
    rollouts: dict[str, RolloutState] = field(default_factory=dict)  # their ReplicaSets

    @property
    def mode(self) -> str:
        return self.spec.mode

    def hosts(self) -> list[Host]:
        return [*self.nodes.values(), *self.clients.values()]

    def place(self, target: str) -> Place | None:
        """A pod, node or client by name, else by IP."""
        for by_ip in (False, True):
            for kind, group in (("pod", self.pods), ("node", self.nodes), ("client", self.clients)):
                for name, item in group.items():
                    if (item.ip if by_ip else name) == target:
                        node = item.node if kind == "pod" else name if kind == "node" else ""
                        return Place(kind, name, item.netns, item.ip, node)
        return None

    def service(self, target: str) -> Service | None:
        """A Service by name or ClusterIP."""
        return self.services.get(target) or next(
            (s for s in self.services.values() if s.cluster_ip == target), None
        )

    def pods_on(self, node: str) -> list[PodRecord]:
        return [p for p in self.pods.values() if p.node == node]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)


def encode(record: Record, indent: int = 0) -> bytes:
    data = _encoder.encode(record)
    return msgspec.json.format(data, indent=indent) if indent else data


def decode(data: bytes, where: str = "the record", cluster: str = "<name>") -> Record:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise NetsimError(
            f"{where} cannot be read ({exc}): it was written by another netsim "
            f"version or damaged; `netsim --cluster {cluster} gc` removes the cluster by its "
            "names and the processes it records"
        ) from None
