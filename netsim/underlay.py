"""The underlay: one bridge per segment in the underlay namespace, a router namespace with a
leg on every segment holding its .1 (it routes between the racks' subnets, as a top-of-rack /
spine pair would), and every node and external client attached to its segment by a veth, with
its address and a default route via the segment's router; and the master namespace, where
netsim runs the cluster's etcd, on the first segment."""

from __future__ import annotations

import os

from netsim import naming
from netsim.kernel import netns as nsmod
from netsim.kernel import sysctl
from netsim.model import Cluster, ExternalClient
from netsim.record import ClientRecord, Host, Master, NodeRecord, Router, RouterLeg, Underlay
from netsim.transaction import Changes, Transaction

MASTER = "master"
MASTER_PORT = "p_master"  # "_" is in no node's name (DNS-1123 labels), so no port is called so


def build(
    cluster: Cluster, tx: Transaction, changes: Changes
) -> tuple[Underlay, Router, dict[str, NodeRecord], dict[str, ClientRecord], Master | None]:
    """Every namespace of the underlay and its hosts, wired; hosts get no mode state yet. With
    netsim's own etcd, the master namespace too (on the first segment)."""
    from netsim.kernel.netlink import IFINDEX, Rtnl

    name = cluster.name
    underlay = Underlay(naming.ns_name(name, "underlay"))
    tx.netns(underlay.netns)
    changes.created.append(f"netns {underlay.netns}")
    bridges = {}
    with Rtnl(underlay.netns) as ul:
        ul.link_up(IFINDEX.LO, "lo")
        for i, seg in enumerate(cluster.segments):
            bridges[seg.name] = IFINDEX.ETH0 + i
            ul.bridge(f"br-{seg.name}", bridges[seg.name], mtu=cluster.mtu)
        ul.commit()
        underlay.bridges = {s: f"br-{s}" for s in bridges}
        router = _router(cluster, tx, ul, bridges, changes)
        nodes: dict[str, NodeRecord] = {}
        clients: dict[str, ClientRecord] = {}
        hosts = [("node", n) for n in cluster.nodes] + [("ext", c) for c in cluster.clients]
        if cluster.datastore.own:
            first = cluster.segments[0].name
            hosts.append(("master", ExternalClient(MASTER, first, cluster.datastore.master_ip)))
        master = None
        for i, (role, host) in enumerate(hosts):
            attached = _attach(cluster, ul, role, host, IFINDEX.FIRST_DYNAMIC + i, bridges, tx)
            changes.created.append(f"netns {attached.netns}")
            if role == "node":
                nodes[host.name] = NodeRecord(**vars(attached))
            elif role == "ext":
                clients[host.name] = ClientRecord(**vars(attached), asn=host.asn)
            else:
                master = Master(attached.netns, host.ip, host.segment, attached.port)
                addressed = attached
    hosts_up = [*nodes.values(), *clients.values()] + ([addressed] if master else [])
    for host in hosts_up:
        _address(host)
    return underlay, router, nodes, clients, master


def _attach(cluster: Cluster, ul, role: str, host, index: int, bridges: dict, tx) -> Host:
    """The host's namespace, plugged into its segment's bridge by a veth (queued on ul and
    sent); its address comes later (_address)."""
    from netsim.kernel.netlink import IFINDEX

    netns = naming.ns_name(cluster.name, role, "" if role == "master" else host.name)
    port = MASTER_PORT if role == "master" else naming.port_name(host.name)
    tx.netns(netns)
    fd = nsmod.open_fd(netns)
    try:
        ul.veth(
            port,
            index,
            "eth0",
            IFINDEX.ETH0,
            fd,
            cluster.mtu,
            master=bridges[host.segment],
            alias=host.name,
        )
        ul.commit()
    finally:
        os.close(fd)
    segment = cluster.segment(host.segment)
    return Host(
        name=host.name,
        netns=netns,
        ip=host.ip,
        segment=host.segment,
        prefixlen=segment.prefixlen,
        port=port,
        gateway=segment.router_ip,
    )


def _address(host: Host) -> None:
    from netsim.kernel.netlink import IFINDEX, Rtnl

    with Rtnl(host.netns) as rt:
        rt.link_up(IFINDEX.LO, "lo")
        rt.link_up(IFINDEX.ETH0, "eth0")
        rt.address(IFINDEX.ETH0, host.ip, host.prefixlen, "eth0")
        # the segment's router is every host's gateway: it joins the racks, and a node's
        # default route is what makes Calico's proxy ARP answer for 169.254.1.1
        rt.route("default", IFINDEX.ETH0, gateway=host.gateway)
        rt.commit()


def join(cluster: Cluster, underlay: Underlay, node, tx: Transaction) -> NodeRecord:
    """A node joining a running cluster: its namespace on its segment's bridge, addressed."""
    from netsim.kernel.netlink import IFINDEX, Rtnl

    with Rtnl(underlay.netns) as ul:
        links = {link["name"]: link["index"] for link in ul.links()}
        bridges = {seg: links[name] for seg, name in underlay.bridges.items()}
        index = max(max(links.values()) + 1, IFINDEX.FIRST_DYNAMIC)
        attached = _attach(cluster, ul, "node", node, index, bridges, tx)
    _address(attached)
    return NodeRecord(**vars(attached))


def set_port(underlay: Underlay, host: Host, up: bool) -> None:
    """The host's port on its segment bridge up or down: down, nothing reaches the host and
    nothing leaves it (a power cut, or a pulled cable)."""
    from netsim.kernel.netlink import Rtnl

    with Rtnl(underlay.netns) as ul:
        link = ul.link(host.port)
        if link is not None:
            ul.link_set(link["index"], host.port, up=up)
            ul.commit()


def _router(cluster: Cluster, tx: Transaction, ul, bridges: dict, changes: Changes) -> Router:
    from netsim.kernel.netlink import IFINDEX, Rtnl

    router = Router(naming.ns_name(cluster.name, "router"))
    tx.netns(router.netns)
    changes.created.append(f"netns {router.netns}")
    fd = nsmod.open_fd(router.netns)
    try:
        for i, seg in enumerate(cluster.segments):
            leg = RouterLeg(f"r-{seg.name}", IFINDEX.FIRST_DYNAMIC + i, f"rp-{seg.name}")
            router.legs[seg.name] = leg
            ul.veth(
                leg.port,
                IFINDEX.FIRST_DYNAMIC + 500 + i,
                leg.ifname,
                leg.index,
                fd,
                cluster.mtu,
                master=bridges[seg.name],
                alias=f"router leg on {seg.name}",
            )
        ul.commit()
    finally:
        os.close(fd)
    with Rtnl(router.netns) as rt:
        rt.link_up(IFINDEX.LO, "lo")
        for seg in cluster.segments:
            leg = router.legs[seg.name]
            rt.link_up(leg.index, leg.ifname)
            rt.address(leg.index, seg.router_ip, seg.prefixlen, leg.ifname)
        rt.commit()
    sysctl.set_in(router.netns, {"net.ipv4.ip_forward": "1"})
    return router
