"""What flannel's backends share: subnet leases in etcd (the network config, one lease per
node bound to an etcd lease), the bridge pod side with host-local IPAM, subnet.env, the
masquerade rules."""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address, IPv4Network
from typing import NamedTuple

from netsim.errors import NetsimError
from netsim.modes.base import Mode

CNI_NETWORK = "cbr0"  # the network name in kube-flannel's CNI config


class FlannelBackend(Mode):
    family = "flannel"
    daemon = "flanneld"
    cni_network = CNI_NETWORK
    backend = ""  # flannel's Backend.Type
    watches = ("/coreos.com/network/subnets/",)  # SUBNETS

    def plan_nodes(self, cluster, cluster_dir: str, names=None) -> dict[str, dict]:
        """A subnet per node, as flanneld picks one: the lease the store holds for the node's
        PublicIP if there is one, else the first free subnet (leases of other hosts kept)."""
        from netsim import store as storemod

        held = storemod.of(cluster.name, cluster.datastore).range(SUBNETS, prefix=True)
        by_ip = {}
        for kv in held:
            try:
                by_ip[kv.json().get("PublicIP")] = key_subnet(kv.key)
            except (ValueError, AttributeError):
                continue  # not a lease flannel could read either
        leased = {n.name: by_ip[n.ip] for n in cluster.nodes if n.ip in by_ip}
        others = set(by_ip.values()) - set(leased.values())
        subnets = allocate_subnets(
            cluster.pod_network, cluster.subnet_len, [n.name for n in cluster.nodes], leased, others
        )
        return {name: {"subnet": subnet} for name, subnet in subnets.items()}

    def store_keys(self, cluster, record) -> dict[str, str]:
        return {
            CONFIG: network_config(
                cluster.pod_network, cluster.subnet_len, self.backend, self.backend_options()
            )
        }

    def publish(self, store, cluster, record) -> list[str]:
        """The network config, then each node's lease bound to an etcd lease of flannel's TTL
        (a node's agent renews it before it ends): created with a transaction that holds only
        while the key is absent, or taken over when it already names this node's PublicIP. A
        lease the store still holds as it should is left alone."""
        written = super().publish(store, cluster, record)
        leases = {name: self.lease(node) for name, node in record.nodes.items()}
        held = store.get_many([key for key, _ in leases.values()])
        for name, node in record.nodes.items():
            key, value = leases[name]
            current = held[key]
            if current is not None and current.value.decode() == value and current.lease:
                node.lease = current.lease  # the agent may have taken a new one
                continue
            node.lease = store.grant(cluster.lease_ttl)
            written.append(key)
            if not store.take(key, value, node.lease, mine=held_by(node.ip)):
                raise NetsimError(
                    f"flannel lease {key} for node {node.name} is held by another host in "
                    f"{store}: delete it, or give the node another address"
                )
        return written

    @property
    def pod_side(self):
        from cni.bridge import BridgePodSide

        return BridgePodSide()

    def ipam(self, cluster, cluster_dir: str, node):
        from cni.ipam import HostLocal

        return HostLocal(
            os.path.join(cluster_dir, "nodes", node.name, "ipam"), CNI_NETWORK, node.subnet
        )

    def host_veth(self, namespace: str, pod: str) -> str:
        """From the container ID, as the bridge plugin's names come from it; netsim's
        container ID is the pod's key, unique in the cluster (netsim.model.object_key)."""
        from cni.bridge import veth_name
        from netsim.model import object_key

        return veth_name(object_key(namespace, pod), "eth0")

    def pod_routes(self, cluster, node) -> list[tuple[str, str | None]]:
        from cni.bridge import pod_routes

        return pod_routes(cluster.pod_network, node.subnet)

    def pod_prefixlen(self, node) -> int:
        return IPv4Network(node.subnet).prefixlen

    def cni_config(self, cluster, node, cluster_dir: str, node_dir: str) -> dict:
        """netsim's plugin entry of the node's config list: what subnet.env carries (network,
        subnet, MTU) and a host-local compatible store whose routes reach the whole network."""
        return {
            "type": "netsim",
            "mode": self.name,
            "node": {
                "network": cluster.pod_network,
                "subnet": node.subnet,
                "mtu": self.pod_mtu(cluster.mtu),
                "tunnel": self.tunnel,
            },
            "isDefaultGateway": True,
            "ipam": {
                "type": "netsim-host-local",
                "ranges": [[{"subnet": node.subnet}]],
                "routes": [{"dst": cluster.pod_network}],
                "dataDir": os.path.join(node_dir, "ipam"),
            },
        }

    def node_files(self, cluster, node) -> dict[str, str]:
        return {
            "subnet.env": subnet_env(cluster.pod_network, node.subnet, self.pod_mtu(cluster.mtu))
        }

    def lease(self, node) -> tuple[str, str]:
        return lease_key(node.subnet), lease_value(node.ip, self.backend, self.backend_data(node))

    def peer_routes(self, rtnl, node, network: str, oif: int) -> dict[str, dict]:
        """The node's routes out of `oif` to other subnets of the network: subnet -> route."""
        network = IPv4Network(network)
        found = {}
        for route in rtnl.routes():
            if route["oif"] != oif or route["dst"] in ("default", node.subnet):
                continue
            dst = IPv4Network(route["dst"])
            if dst.subnet_of(network) and dst.prefixlen == IPv4Network(node.subnet).prefixlen:
                found[route["dst"]] = route
        return found

    def backend_data(self, node) -> dict | None:
        return None

    def backend_options(self) -> dict:
        """The backend's settings in the network config beside Type (vxlan: VNI and Port)."""
        return {}

    def masquerade(self, cluster, node) -> str:
        return masquerade_ruleset(cluster.name, cluster.pod_network, node.subnet)

    def describe_node(self, record, node, run) -> list[tuple[str, str]]:
        from netsim import state
        from netsim import store as storemod

        with open(os.path.join(state.node_dir(record.cluster, node.name), "subnet.env")) as fh:
            sections = [("subnet.env", fh.read())]
        store = storemod.of(record.cluster, record.spec.datastore)
        try:
            lease = store.get(lease_key(node.subnet))
        except NetsimError as exc:  # the kernel's view is worth showing without the store
            lease, missing = None, str(exc)
        else:
            missing = "(not in the store: its etcd lease expired or it was deleted)"
        if lease is None:
            text = missing
        else:
            remaining, granted = store.time_to_live(lease.lease) if lease.lease else (-1, 0)
            text = lease.value.decode() + (
                f"\nTTL {remaining} s of {granted} s (etcd lease {lease.lease:x})"
                if lease.lease
                else ""
            )
        return (
            sections + [(f"etcd {lease_key(node.subnet)}", text)] + self.describe_tunnel(node, run)
        )

    def describe_tunnel(self, node, run) -> list[tuple[str, str]]:
        if not self.tunnel:
            return []
        return [(f"ip -d link show {self.tunnel}", run("ip", "-d", "link", "show", self.tunnel))]


CONFIG = "/coreos.com/network/config"
SUBNETS = "/coreos.com/network/subnets/"


class LeasePeer(NamedTuple):
    """Another node as its lease tells flanneld of it (what add_peer needs of a peer)."""

    subnet: str
    ip: str  # PublicIP
    vtep_mac: str = ""  # vxlan's BackendData.VtepMAC

    @classmethod
    def of(cls, kv, backend: str) -> LeasePeer | None:
        """The peer a lease names, or None for a lease of another backend or one flannel
        could not read either."""
        try:
            attrs = kv.json()
            if attrs.get("BackendType") != backend:
                return None
            subnet = str(IPv4Network(key_subnet(kv.key)))
            ip = str(IPv4Address(attrs["PublicIP"]))
            mac = (attrs.get("BackendData") or {}).get("VtepMAC", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(subnet, ip, mac)


def lease_key(subnet: str) -> str:
    """flannel's etcd key for a node's lease: /coreos.com/network/subnets/10.244.1.0-24."""
    return SUBNETS + subnet.replace("/", "-")


def key_subnet(key: str) -> str:
    """The subnet a lease key names (10.244.1.0-24 -> 10.244.1.0/24)."""
    return key[len(SUBNETS) :].replace("-", "/")


def held_by(public_ip: str):
    """Whether a lease as stored names this PublicIP (flanneld takes such a lease over)."""
    return lambda kv: kv.json().get("PublicIP") == public_ip


def lease_value(public_ip: str, backend: str, backend_data: dict | None) -> str:
    value = {"PublicIP": public_ip, "BackendType": backend}
    if backend_data is not None:
        value["BackendData"] = backend_data
    return json.dumps(value, separators=(",", ":"))


def network_config(network: str, subnet_len: int, backend: str, options: dict) -> str:
    """The value of /coreos.com/network/config (kube-flannel's net-conf.json), with the
    defaults flannel's CheckNetworkConfig fills in written out: SubnetMin is the network's
    second subnet, SubnetMax its last."""
    net = IPv4Network(network)
    step = 2 ** (32 - subnet_len)
    return json.dumps(
        {
            "Network": network,
            "SubnetLen": subnet_len,
            "SubnetMin": str(net.network_address + step),
            "SubnetMax": str(net.broadcast_address + 1 - step),
            "Backend": {"Type": backend, **options},
        }
    )


def allocate_subnets(
    network: str,
    subnet_len: int,
    nodes: list[str],
    leased: dict[str, str],
    taken_by_others: set[str] = frozenset(),
) -> dict[str, str]:
    """A /SubnetLen per node, starting at SubnetMin (the network's second subnet) as flannel
    does; a node keeps the lease it already holds. The subnets are counted, not listed: a /8
    cut into /28s has a million of them."""
    net = IPv4Network(network)
    step = 2 ** (32 - subnet_len)

    def subnet(i: int) -> str:
        return str(IPv4Network((int(net.network_address) + i * step, subnet_len)))

    def leasable(lease: object) -> bool:
        try:
            sub = IPv4Network(lease)
        except (TypeError, ValueError):
            return False
        return (
            sub.prefixlen == subnet_len
            and sub.subnet_of(net)
            and str(sub) == lease
            and sub.network_address != net.network_address
        )

    result = {n: leased[n] for n in nodes if leasable(leased.get(n))}
    taken = set(result.values()) | set(taken_by_others)
    free = (s for s in map(subnet, range(1, 2 ** (subnet_len - net.prefixlen))) if s not in taken)
    for node in nodes:
        if node not in result:
            result[node] = next(free)
    return result


def subnet_env(network: str, subnet: str, mtu: int) -> str:
    """/run/flannel/subnet.env as flannel writes it on a node."""
    net = IPv4Network(subnet)
    return (
        f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={net.network_address + 1}/{net.prefixlen}\n"
        f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n"
    )


def masquerade_ruleset(cluster: str, network: str, subnet: str) -> str:
    """flannel's FLANNEL-POSTRTG chain in nftables form: pod traffic that leaves the cluster
    network is masqueraded, traffic between pods is not. Lives in the node's namespace."""
    return f"""table ip flannel
delete table ip flannel
table ip flannel {{
  comment "netsim cluster {cluster}: flannel masquerade"
  chain FLANNEL-POSTRTG {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 return comment "kube-proxy masquerades these"
    ip saddr {subnet} ip daddr {network} return comment "flanneld masq"
    ip saddr {network} ip daddr {subnet} return comment "flanneld masq"
    ip saddr != {network} ip daddr {subnet} return comment "flanneld masq"
    ip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random comment "flanneld masq"
    ip saddr != {network} ip daddr {network} masquerade fully-random comment "flanneld masq"
  }}
}}
"""
