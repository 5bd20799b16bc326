"""The node's nftables for kube-proxy's userspace mode: each Service port's ClusterIP (and
NodePort, and load balancer address) traffic goes to the port the node agent's proxy listens
on for it. The traffic policies (Local) came after this mode and were never part of it.

kube-proxy's userspace mode used iptables REDIRECT for traffic arriving from containers and DNAT
to the host's own IP for traffic the host sends. netsim DNATs both to the node's IP: Calico's
cali interfaces carry no address, so REDIRECT would have nothing to rewrite the destination to.
Affinity and round robin live in the proxy, so a sync rewrites only the `services` chain. The
table and its hooked chains stay: deleting a NAT base chain and making it again, even in one
transaction, leaves an instant in which a new connection gets no NAT, and conntrack then keeps
its retransmitted SYNs unNATed too, so that client times out.
"""

from __future__ import annotations

from netsim.kubeproxy.nftables import TABLE
from netsim.kubeproxy.ports import ProxyPort


def key(sp: ProxyPort) -> str:
    """The proxy's name for a service port: namespace/name:port/PROTOCOL."""
    return f"{sp.namespace}/{sp.name}:{sp.port}/{sp.protocol}"


def table(ports: list[ProxyPort]) -> dict[str, dict]:
    """What the node agent's proxy serves, per service port (netsim.kubeproxy.userspace)."""
    found = {}
    for p in ports:
        entry = {
            "protocol": p.protocol,
            "endpoints": [[e.ip, e.port] for e in p.endpoints],
            "affinity": "ClientIP" if p.affinity_timeout else "None",
        }
        if p.affinity_timeout is not None:  # else the proxy's default
            entry["timeout"] = p.affinity_timeout
        found[key(p)] = entry
    return found


def ruleset(ports: list[ProxyPort], listen: dict[str, int], node_ip: str, fresh: bool) -> str:
    """The table's text for `nft -f`; `fresh` (the first sync, or a switch from the nftables
    backend) replaces the whole table, later syncs only the chains' rules."""
    rules = []
    for sp in ports:
        target = listen.get(key(sp))
        if not target:
            continue
        proto = sp.protocol.lower()
        for ip in (sp.cluster_ip, *sp.external_ips):  # a load balancer's address too
            rules.append(f"    ip daddr {ip} {proto} dport {sp.port} dnat to {node_ip}:{target}")
        if sp.node_port:
            rules.append(
                f"    fib daddr type local {proto} dport {sp.node_port} dnat to {node_ip}:{target}"
            )
    body = "\n".join(rules)
    fill = (
        f"flush chain ip {TABLE} services\n"
        f"table ip {TABLE} {{\n  chain services {{\n{body}\n  }}\n}}\n"
    )
    if not fresh:
        return fill
    return (
        f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  comment "kube-proxy userspace mode (netsim): Service traffic to the node agent's proxy"
  chain services {{
  }}
  chain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{ type nat hook output priority -100; policy accept;
    jump services
  }}
}}
"""
        + fill
    )
