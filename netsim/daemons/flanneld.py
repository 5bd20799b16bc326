"""flanneld on a node: watch the subnet leases and reach every other node's subnet.

For each lease that is not the node's own and is of its backend, the mode programs the peer
(vxlan: ARP, then FDB, then the onlink route; host-gw: the route via the peer's address; udp:
the agent's forwarding entry); for each lease that left (deleted, or its etcd lease expired) it
removes them. What the node had programmed is read back from the kernel when the daemon starts,
so a restarted flanneld removes peers that left while it was away and duplicates nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from netsim.modes.flannel import SUBNETS, LeasePeer


class Flanneld:
    name = "flanneld"
    prefixes = (SUBNETS,)

    def __init__(self, mode, node, network: str, event: Callable[[str], None], tunnel=None):
        self.mode, self.node, self.network, self.event = mode, node, network, event
        self.tunnel = tunnel  # udp: () -> the agent's forwarding table (None until it runs)
        self.programmed: dict[str, LeasePeer] | None = None  # None: not read back yet

    def wanted(self, leases: dict) -> dict[str, LeasePeer]:
        found = {}
        for kv in leases.values():
            peer = LeasePeer.of(kv, self.mode.backend)
            if peer is not None and peer.ip != self.node.ip and peer.subnet != self.node.subnet:
                found[peer.subnet] = peer
        return found

    def sync(self, view: dict) -> None:
        from netsim.kernel.netlink import Rtnl

        wanted = self.wanted(view[SUBNETS])
        if self.tunnel is not None:  # udp: no kernel state per peer
            table = self.tunnel()
            if table is not None:
                table.update_peers({p.subnet: p.ip for p in wanted.values()})
            self._log_changes(self.programmed or {}, wanted)
            self.programmed = wanted
            return
        with Rtnl(self.node.netns, replace=True) as rt:
            programmed = self.programmed
            if programmed is None:
                programmed = self.mode.peers_in_kernel(rt, self.node, self.network)
            gone = [p for s, p in programmed.items() if wanted.get(s) != p]
            new = [p for s, p in wanted.items() if programmed.get(s) != p]
            for peer in gone:
                self.mode.remove_peer(rt, self.node, peer)
            for peer in new:
                self.mode.add_peer(rt, self.node, peer)
            rt.commit()
        self._log_changes(programmed, wanted)
        self.programmed = wanted

    def _log_changes(self, before: dict, after: dict) -> None:
        for subnet, peer in sorted(before.items()):
            if after.get(subnet) != peer:
                self.event(f"removed the route to {subnet} (node {peer.ip}): its lease left")
        for subnet, peer in sorted(after.items()):
            if before.get(subnet) != peer:
                self.event(f"added the route to {subnet} via node {peer.ip}")
