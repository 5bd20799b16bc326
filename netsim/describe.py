"""`netsim describe`: the record of a node or pod, then the kernel's own view of it, printed
by iproute2 inside its namespace, so the user sees exactly what `ip` would show on a real node."""

from __future__ import annotations

import os
import subprocess

from cni import modes
from cni.modes import flannel
from netsim import state
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.kernel import proc


def _ip(netns: str, *argv: str) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True,
                            preexec_fn=lambda: nsmod.enter_for_exec(netns))
    return (result.stdout or result.stderr).rstrip()


def _section(title: str, body: str) -> str:
    lines = body.splitlines() or ["<none>"]
    return f"{title}:\n" + "\n".join("  " + line for line in lines)


def node(record: dict, name: str) -> str:
    entry = record["nodes"].get(name)
    if entry is None:
        raise NetsimError(f"no node named {name!r}; `netsim get nodes` lists them")
    mode = modes.get(record["mode"])
    agent = entry.get("agent", {})
    running = agent and proc.alive(agent["pid"], agent["start"])
    node_dir = state.node_dir(record["cluster"], name)
    pods = [p for p, e in record["pods"].items() if e["node"] == name]
    tunnel = mode.tunnel or "none (routes via peer node IPs)"
    if entry.get("carrier"):
        tunnel += f", carrier: {entry['carrier']}" + (
            " (tc eBPF on eth0: routes name eth0)" if entry["carrier"] == "ebpf" else "")
    if "agent_tunnel" in entry:
        tunnel += " (a TUN served by the node agent)"
    head = [
        f"Name:          {name}",
        f"Cluster:       {record['cluster']}",
        f"Mode:          {record['mode']}",
        f"Netns:         {entry['netns']}   (ip netns exec {entry['netns']} ...)",
        f"InternalIP:    {entry['ip']}/{entry['prefixlen']} on segment {entry['segment']}, "
        f"gateway {entry.get('gateway', '-')}",
        f"PodCIDR:       {entry.get('subnet') or ', '.join(entry.get('blocks', []))}"
        + (" (Calico IPAM blocks)" if "blocks" in entry else ""),
        f"Tunnel:        {tunnel}" + (f", address {entry['tunnel_ip']}/32"
                                      if entry.get("tunnel_ip") else ""),
        f"Agent:         pid {agent.get('pid')} "
        f"{'running' if running else 'NOT RUNNING'}",
        f"Pods:          {len(pods)} ({', '.join(pods[:8])}{' ...' if len(pods) > 8 else ''})",
        f"CNI config:    {os.path.join(node_dir, 'net.d', '10-' + record['mode'] + '.conflist')}",
    ]
    out = ["\n".join(head)]
    if "subnet" in entry:
        lease = os.path.join(state.cluster_dir(record["cluster"]), "etcd") + \
            flannel.lease_key(entry["subnet"])
        for title, path in (("subnet.env", os.path.join(node_dir, "subnet.env")),
                            (f"etcd {flannel.lease_key(entry['subnet'])}", lease)):
            with open(path) as fh:
                out.append(_section(title, fh.read()))
    if mode.tunnel:
        out.append(_section(f"ip -d link show {mode.tunnel}",
                            _ip(entry["netns"], "ip", "-d", "link", "show", mode.tunnel)))
        if "vxlan" in (getattr(mode, "backend", "") + mode.tunnel):
            out.append(_section(f"ip neigh show dev {mode.tunnel}",
                                _ip(entry["netns"], "ip", "neigh", "show", "dev", mode.tunnel)))
            out.append(_section(f"bridge fdb show dev {mode.tunnel}",
                                _ip(entry["netns"], "bridge", "fdb", "show", "dev",
                                    mode.tunnel)))
    if entry.get("carrier") == "ebpf":
        out.append(_section("tc filter show dev eth0 egress",
                            _ip(entry["netns"], "tc", "filter", "show", "dev", "eth0", "egress")))
    out.append(_section("ip route", _ip(entry["netns"], "ip", "route")))
    return "\n\n".join(out)


def pod(record: dict, name: str) -> str:
    entry = record["pods"].get(name)
    if entry is None:
        raise NetsimError(f"no pod named {name!r}; `netsim get pods` lists them")
    head = [
        f"Name:          {name}",
        f"Node:          {entry['node']} ({record['nodes'][entry['node']]['ip']})",
        f"IP:            {entry['ip']}",
        f"Netns:         {entry['netns']}",
        f"Host veth:     {entry['veth']} (on the node"
        + (", in cni0)" if "subnet" in record["nodes"][entry["node"]] else ", proxy ARP)"),
        f"Labels:        {', '.join(f'{k}={v}' for k, v in entry['labels'].items()) or '<none>'}",
        f"Controlled By: {'Deployment/' + entry['owner'] if entry['owner'] else '<none>'}",
        f"Serving:       hostname on {', '.join(map(str, entry['ports'])) or '<none>'}",
    ]
    return "\n\n".join(["\n".join(head),
                        _section("ip addr show eth0",
                                 _ip(entry["netns"], "ip", "addr", "show", "eth0")),
                        _section("ip route", _ip(entry["netns"], "ip", "route"))])
