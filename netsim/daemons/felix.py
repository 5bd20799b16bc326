"""calico-node on a node: felix programs the routes to the other nodes' IPAM blocks and its own
blocks' blackholes; confd (BGP) renders BIRD's configuration from the store and has BIRD re-read
it.

Both read what Calico's etcdv3 datastore holds: the v3 Node resources (each node's address,
segment, tunnel address and VTEP MAC) and the IPAM affinities (which blocks each node holds).
felix owns the routes it marks with its protocol number (80): when it starts it removes those,
and the VXLAN device's ARP and FDB entries (and the eBPF carrier's map entries), that no node in
the store wants any more, so a restarted felix ends in the same kernel state and duplicates
nothing. After that it changes only what differs from what it programmed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from netsim.modes.calico import AFFINITIES, RESOURCES, CalicoPeer, peers_of


class Felix:
    name = "felix"
    prefixes = (AFFINITIES, RESOURCES)

    def __init__(self, mode, node, event: Callable[[str], None], tunnel=None):
        self.mode, self.node, self.event = mode, node, event
        self.tunnel = tunnel  # IPIP's userspace carrier: () -> its table (None until it runs)
        self.programmed: dict[str, CalicoPeer] | None = None  # None: not swept yet
        self.own: set[str] = set()

    def sync(self, view: dict) -> None:
        from netsim.kernel.netlink import Rtnl

        peers, own = peers_of(view[RESOURCES], view[AFFINITIES], self.node.name)
        node = self.node
        with Rtnl(node.netns, replace=True) as rt:
            if node.carrier in ("kernel", "userspace") and not node.tunnel_index:
                link = rt.link(self.mode.tunnel)
                if link is None:
                    raise RuntimeError(f"{self.mode.tunnel} is not there yet")
                node = self.node = dataclasses.replace(node, tunnel_index=link["index"])
            if self.programmed is None:
                self.mode.sweep(rt, node, peers, own)
                programmed: dict[str, CalicoPeer] = {}
            else:
                programmed = self.programmed
            for block in sorted(own - self.own):
                self.mode.own_block(rt, block)
            for block in sorted(self.own - own):
                rt.route_delete(block)
            for name, old in programmed.items():
                if peers.get(name) != old:
                    self.mode.remove_peer(rt, node, old, keep=peers.get(name))
            for name, new in peers.items():
                if programmed.get(name) != new:
                    self.mode.add_peer(rt, node, new)
            rt.commit()
        if self.tunnel is not None and (table := self.tunnel()) is not None:
            table.update_peers(
                {
                    block: p.ip
                    for p in peers.values()
                    if self.mode.encapsulates(node, p)
                    for block in p.blocks
                }
            )
        self._log(programmed, peers, own)
        self.programmed, self.own = peers, own

    def _log(self, before: dict, after: dict, own: set[str]) -> None:
        for block in sorted(own - self.own):
            self.event(f"blackholed own block {block}")
        if self.mode.bgp:  # BIRD learns the peers' blocks
            return
        for name, peer in sorted(before.items()):
            gone = set(peer.blocks) - set(after[name].blocks if name in after else ())
            if gone:
                self.event(f"removed the routes to {', '.join(sorted(gone))} (node {name})")
        for name, peer in sorted(after.items()):
            new = set(peer.blocks) - set(before[name].blocks if name in before else ())
            if new:
                self.event(f"added the routes to {', '.join(sorted(new))} via node {name}")


class Confd:
    """confd's bird.toml: render bird.cfg from the nodes, the BGP configuration and peers and
    the node's blocks; when it changed, check it and make BIRD re-read it (`birdc configure`,
    which is what confd's SIGHUP does). Until BIRD runs, the file is only written: BIRD reads it
    when it starts."""

    name = "confd"
    prefixes = (AFFINITIES, RESOURCES)

    def __init__(self, node, directory: str, event: Callable[[str], None]):
        self.node, self.directory, self.event = node, directory, event
        self.accepted = ""  # the config the running BIRD last took

    def sync(self, view: dict) -> None:
        from netsim.bgp import bird
        from netsim.modes.calico_bgp import config_from_store

        config = config_from_store(view[RESOURCES], view[AFFINITIES], self.node.name)
        if config is None:  # the node's own resource is not in the store (yet)
            return
        if config == self.accepted:
            return
        path = os.path.join(self.directory, bird.CONF)
        if bird.answers(self.directory):
            with open(path) as fh:
                running = fh.read()
            bird.reconfigure(self.directory, config)  # a failure: tried again at the next sync
            self.accepted = config
            if running != config:
                self.event("rendered bird.cfg and BIRD re-read it (birdc configure)")
        else:
            os.makedirs(self.directory, exist_ok=True)
            bird.install(path, config, self.node.netns)
            self.event("rendered bird.cfg (BIRD is not running yet)")
