"""Which interfaces a probe crosses, predicted from the record and the kernel's own route
lookup in the source namespace."""

from __future__ import annotations

import json
import subprocess

from cni.bridge import BRIDGE
from netsim import modes
from netsim.errors import NetsimError
from netsim.record import Place, Record

# -- names and places -----------------------------------------------------------------------


def unknown(name: str) -> NetsimError:
    return NetsimError(f"no pod, node or client named {name}; `netsim get pods` lists them")


def link_names(netns: str) -> list[str]:
    """Interface names in a namespace (netlink, no process)."""
    from netsim.kernel.netlink import Rtnl

    try:
        with Rtnl(netns) as rtnl:
            return [link["name"] for link in rtnl.links()]
    except NetsimError:
        return []


def route_get(netns: str, dst: str) -> dict:
    """`ip route get` inside the namespace: the device and source the kernel would use."""
    try:
        out = subprocess.run(
            ["ip", "-j", "-n", netns, "route", "get", dst],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetsimError(f"ip route get {dst} in {netns}: {exc}") from None
    if out.returncode != 0:
        return {}
    routes = json.loads(out.stdout or "[]")
    return routes[0] if routes else {}


def namespace_target(record: Record, target: str) -> tuple[str, str, str]:
    """(netns, owner label, default interface) of a capture target."""
    if target == "underlay":
        bridges = list(record.underlay.bridges.values())
        return record.underlay.netns, "underlay", bridges[0] if bridges else "eth0"
    if target == "router":
        legs = [leg.ifname for leg in record.router.legs.values()]
        return record.router.netns, "router", legs[0] if legs else "eth0"
    place = record.place(target)
    if place is None:
        raise unknown(target)
    return place.netns, place.name, "eth0"


# -- the path -------------------------------------------------------------------------------


HopSpec = tuple[str, str, str]  # (owner, netns, iface)


def predict_path(
    record: Record, src: Place, dst_ip: str, dst: Place | None, service: bool = False
) -> list[HopSpec]:
    """The interfaces a packet from src to dst_ip crosses, in order. The source side follows
    the kernel's own route lookup in the source node (so CrossSubnet's native routes and the
    eBPF IPIP carrier, which has no tunl0, come out right); the far side mirrors it. An
    interface listed twice is crossed twice (a pod reaching itself through its Service)."""
    nodes, mode = record.nodes, modes.get(record.mode)
    bridged = mode.pod_side.name == "bridge"  # pods hang off cni0, not routed veths
    tunnels = {m.tunnel for m in modes.every() if m.tunnel}
    hops: list[HopSpec] = []
    if dst is not None and dst.name == src.name and dst.kind == src.kind:
        if not service or src.kind != "pod":
            return [(src.name, src.netns, "lo")]  # to itself: the kernel loops it back
        node = nodes[src.node]
        veth = (src.node, node.netns, record.pods[src.name].veth)
        there = [(src.name, src.netns, "eth0"), veth]
        if bridged:
            there.append((src.node, node.netns, BRIDGE))
        return [*there, veth, there[0]]  # hairpin: out of the bridge the way it came
    if src.kind == "pod":
        node = nodes[src.node]
        hops.append((src.name, src.netns, "eth0"))
        hops.append((src.node, node.netns, record.pods[src.name].veth))
        if bridged:
            hops.append((src.node, node.netns, BRIDGE))
        route_ns, route_owner = node.netns, src.node
    else:
        route_ns, route_owner = src.netns, src.name
    dst_node = dst.node if dst is not None else None
    if dst is not None and dst.kind == "pod" and dst_node == (src.node or src.name):
        # same node: bridged (flannel) or routed straight to the other cali veth
        if bridged and src.kind != "pod":
            hops.append((route_owner, route_ns, BRIDGE))
        hops.append((dst_node, nodes[dst_node].netns, record.pods[dst.name].veth))
        hops.append((dst.name, dst.netns, "eth0"))
        return dedupe(hops)
    if dst is not None and dst.kind != "pod" and dst.name == src.name:
        return dedupe(hops)
    route = route_get(route_ns, dst_ip)
    tunnel = route.get("dev") if route.get("dev") in tunnels else None
    if tunnel:
        hops.append((route_owner, route_ns, tunnel))
    hops.append((route_owner, route_ns, "eth0"))
    near = nodes.get(route_owner) or record.clients.get(route_owner)
    far = None
    if dst is not None:
        far = nodes.get(dst_node) if dst_node else record.clients.get(dst.name)
    # the router is on the way when the segments differ, or when the route goes to a gateway
    # that is not the far host (a client's default route towards pod addresses)
    via_router = far is not None and near.segment != far.segment
    if not tunnel and route.get("gateway") and route["gateway"] != (far.ip if far else None):
        via_router = True
    if via_router:
        segments = [near.segment]
        if far is not None and far.segment != near.segment:
            segments.append(far.segment)
        for segment in segments:
            if segment in record.router.legs:
                hops.append(("router", record.router.netns, record.router.legs[segment].ifname))
    if dst is None or far is None:
        return dedupe(hops)
    hops.append(("underlay", record.underlay.netns, far.port))
    far_owner = dst_node or dst.name
    hops.append((far_owner, far.netns, "eth0"))
    if dst.kind != "pod":
        return dedupe(hops)
    if tunnel:
        hops.append((far_owner, far.netns, tunnel))
    if bridged:
        hops.append((far_owner, far.netns, BRIDGE))
    hops.append((far_owner, far.netns, record.pods[dst.name].veth))
    hops.append((dst.name, dst.netns, "eth0"))
    return dedupe(hops)


def dedupe(hops: list[HopSpec]) -> list[HopSpec]:
    seen: set[tuple[str, str]] = set()
    out = []
    for hop in hops:
        if (hop[1], hop[2]) not in seen:
            seen.add((hop[1], hop[2]))
            out.append(hop)
    return out
