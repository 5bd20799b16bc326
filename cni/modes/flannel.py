"""What flannel's backends share: subnet leases, subnet.env and the masquerade rules."""

from __future__ import annotations

import json
from ipaddress import IPv4Network


class FlannelBackend:
    """What every flannel backend's mode shares: the node's CNI network config."""

    name = ""

    def pod_mtu(self, underlay_mtu: int) -> int:
        return underlay_mtu

    def cni_config(self, network: str, node: dict, underlay_mtu: int, data_dir: str) -> dict:
        """netsim's plugin entry of the node's config list: what subnet.env carries (network,
        subnet, MTU) and a host-local compatible store whose routes reach the whole network."""
        return {"type": "netsim", "mode": self.name,
                "node": {"network": network, "subnet": node["subnet"],
                         "mtu": self.pod_mtu(underlay_mtu)},
                "isDefaultGateway": True,
                "ipam": {"type": "netsim-host-local", "ranges": [[{"subnet": node["subnet"]}]],
                         "routes": [{"dst": network}], "dataDir": data_dir}}


def lease_key(subnet: str) -> str:
    """flannel's etcd key for a node's lease: /coreos.com/network/subnets/10.244.1.0-24."""
    return "/coreos.com/network/subnets/" + subnet.replace("/", "-")


def lease_value(public_ip: str, backend: str, backend_data: dict | None) -> str:
    value = {"PublicIP": public_ip, "BackendType": backend}
    if backend_data is not None:
        value["BackendData"] = backend_data
    return json.dumps(value, separators=(",", ":"))


def network_config(network: str, subnet_len: int, backend: str) -> str:
    """The value of /coreos.com/network/config (kube-flannel's net-conf.json)."""
    return json.dumps({"Network": network, "SubnetLen": subnet_len, "Backend": {"Type": backend}})


def allocate_subnets(network: str, subnet_len: int, nodes: list[str],
                     leased: dict[str, str]) -> dict[str, str]:
    """A /SubnetLen per node, starting at SubnetMin (the network's second subnet) as flannel
    does; a node keeps the lease it already holds."""
    subnets = [str(s) for s in IPv4Network(network).subnets(new_prefix=subnet_len)][1:]
    result = {n: leased[n] for n in nodes if leased.get(n) in subnets}
    free = (s for s in subnets if s not in result.values())
    for node in nodes:
        if node not in result:
            result[node] = next(free)
    return result


def subnet_env(network: str, subnet: str, mtu: int) -> str:
    """/run/flannel/subnet.env as flannel writes it on a node."""
    net = IPv4Network(subnet)
    return (f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={net.network_address + 1}/{net.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n")


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
