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
    env_path = os.path.join(state.node_dir(record["cluster"], name), "subnet.env")
    with open(env_path) as fh:
        env = fh.read()
    lease = os.path.join(state.cluster_dir(record["cluster"]), "etcd") + flannel.lease_key(
        entry["subnet"])
    with open(lease) as fh:
        lease_value = fh.read()
    pods = [p for p, e in record["pods"].items() if e["node"] == name]
    head = [
        f"Name:          {name}",
        f"Cluster:       {record['cluster']}",
        f"Mode:          {record['mode']}",
        f"Netns:         {entry['netns']}   (ip netns exec {entry['netns']} ...)",
        f"InternalIP:    {entry['ip']}/{entry['prefixlen']} on segment {entry['segment']}",
        f"PodCIDR:       {entry['subnet']}",
        f"Tunnel:        {mode.tunnel or 'none (routes via peer node IPs)'}",
        f"Agent:         pid {agent.get('pid')} "
        f"{'running' if running else 'NOT RUNNING'}",
        f"Pods:          {len(pods)} ({', '.join(pods[:8])}{' ...' if len(pods) > 8 else ''})",
        f"Lease:         {flannel.lease_key(entry['subnet'])} = {lease_value}",
    ]
    out = ["\n".join(head), _section("subnet.env", env)]
    if mode.tunnel:
        out.append(_section(f"ip -d link show {mode.tunnel}",
                            _ip(entry["netns"], "ip", "-d", "link", "show", mode.tunnel)))
        out.append(_section(f"ip neigh show dev {mode.tunnel}",
                            _ip(entry["netns"], "ip", "neigh", "show", "dev", mode.tunnel)))
        out.append(_section(f"bridge fdb show dev {mode.tunnel}",
                            _ip(entry["netns"], "bridge", "fdb", "show", "dev", mode.tunnel)))
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
        f"Host veth:     {entry['veth']} (on the node, in cni0)",
        f"Labels:        {', '.join(f'{k}={v}' for k, v in entry['labels'].items()) or '<none>'}",
        f"Controlled By: {'Deployment/' + entry['owner'] if entry['owner'] else '<none>'}",
        f"Serving:       hostname on {', '.join(map(str, entry['ports'])) or '<none>'}",
    ]
    return "\n\n".join(["\n".join(head),
                        _section("ip addr show eth0",
                                 _ip(entry["netns"], "ip", "addr", "show", "eth0")),
                        _section("ip route", _ip(entry["netns"], "ip", "route"))])
