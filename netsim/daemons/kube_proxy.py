"""kube-proxy on a node (nftables mode): watch Services and their Endpoints and keep the node's
`ip kube-proxy` table in step — the whole table on the first sync, then one nf_tables batch of
only what changed (netsim/kubeproxy/nftables.py computes both)."""

from __future__ import annotations

from collections.abc import Callable

from netsim import registry


class KubeProxy:
    name = "kube-proxy"
    prefixes = (registry.SERVICES_ALL,)

    def __init__(self, netns: str, cluster_cidr: str, event: Callable[[str], None]):
        self.netns, self.cluster_cidr, self.event = netns, cluster_cidr, event
        self.ports = None  # what the table holds; None until the first sync

    def sync(self, view: dict) -> None:
        from netsim.kernel import nft
        from netsim.kubeproxy import nftables as kp

        kvs = view[registry.SERVICES_ALL].values()
        ports = registry.proxy_ports(
            registry.by_name(kvs, registry.SERVICES), registry.by_name(kvs, registry.ENDPOINTS)
        )
        if self.ports is None:
            base, batch = kp.first_sync(ports, self.cluster_cidr)
            nft.apply(self.netns, base)
            batch.commit(self.netns)
            self.event(f"synced the table: {len(ports)} service ports")
        else:
            batch = kp.changes(self.ports, ports, self.cluster_cidr)
            if len(batch):
                batch.commit(self.netns)
                self.event(_summary(self.ports, ports))
        self.ports = ports


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
