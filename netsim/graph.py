"""`netsim graph`: a picture of a cluster from its record, as Graphviz dot text, or rendered to
PNG/SVG by Debian's graphviz `dot`.

The picture: one box per underlay segment (its subnet and bridge), the router joining the
segments at each segment's .1, every node inside its segment with its IP, pod CIDR or Calico
blocks and tunnel device, the node's pods inside it, external clients and BGP top-of-rack
routers on their segments, Services as ellipses with arrows to their endpoint pods, and the
overlay: dashed edges between nodes labelled with the tunnel (a legend note alone when there
are too many nodes for a mesh to stay readable).

Everything here is pure apart from `render`, which runs `dot`.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

from netsim.cluster import endpoints
from netsim.errors import NetsimError

FORMATS = (".dot", ".png", ".svg")
MESH_MAX_NODES = 5  # above this the overlay is one legend note, not a full mesh of edges
MAX_PODS_PER_NODE = 24  # the rest of a node's pods are drawn as one "+N more" node
DOT_TIMEOUT = 120.0  # seconds for `dot` to lay out and write the picture

# mode -> (device, what it is) for the modes that tunnel; host-gw and BGP route natively
TUNNELS: dict[str, tuple[str, str]] = {
    "flannel-vxlan": ("flannel.1", "VXLAN VNI 1, UDP 8472"),
    "flannel-udp": ("flannel0", "TUN, UDP 8285 by the node agent"),
    "calico-vxlan": ("vxlan.calico", "VXLAN VNI 4096, UDP 4789"),
    "calico-ipip": ("tunl0", "IPIP, IP protocol 4"),
}
NATIVE: dict[str, str] = {
    "flannel-host-gw": "host-gw: no tunnel, routes to peer pod CIDRs via peer node IPs",
    "calico-bgp": "BGP (BIRD): no tunnel, peer blocks routed via peer node IPs",
}
CARRIERS = {"kernel": "kernel tunl0", "ebpf": "tc eBPF on eth0", "userspace": "userspace TUN"}


def quote(text: object) -> str:
    """A dot double-quoted string; a newline in the text becomes a centred line break."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def _attrs(**attrs: object) -> str:
    return "[" + ", ".join(f"{k}={quote(v)}" for k, v in attrs.items()) + "]"


def _ip_key(ip: str) -> tuple[int, ...]:
    try:
        return (int(ipaddress.ip_address(ip)),)
    except ValueError:
        return (1 << 129,)


def segment_subnets(record: dict) -> dict[str, str]:
    """Segment name -> subnet: from the spec where recorded, else from the hosts' IPs."""
    subnets = {s["name"]: s["subnet"] for s in record.get("spec", {}).get("segments", [])
               if s.get("name") and s.get("subnet")}
    hosts = list(record.get("nodes", {}).values()) + list(record.get("clients", {}).values())
    for host in hosts:
        seg = host.get("segment")
        if seg and seg not in subnets and host.get("ip") and host.get("prefixlen"):
            iface = ipaddress.ip_interface(f"{host['ip']}/{host['prefixlen']}")
            subnets[seg] = str(iface.network)
    return subnets


def segments(record: dict) -> list[str]:
    """Every segment named anywhere in the record, in a stable order."""
    names: list[str] = list(record.get("underlay", {}).get("bridges", {}))
    names += [s["name"] for s in record.get("spec", {}).get("segments", [])]
    names += list(record.get("router", {}).get("legs", {}))
    hosts = list(record.get("nodes", {}).values()) + list(record.get("clients", {}).values())
    names += [h["segment"] for h in hosts if h.get("segment")]
    return list(dict.fromkeys(names))


def _router_ip(record: dict, segment: str, subnet: str | None) -> str:
    """The router's address on a segment: the hosts' gateway, else the subnet's .1."""
    hosts = list(record.get("nodes", {}).values()) + list(record.get("clients", {}).values())
    for host in hosts:
        if host.get("segment") == segment and host.get("gateway"):
            return f"{host['gateway']}/{host.get('prefixlen', '')}".rstrip("/")
    if subnet:
        net = ipaddress.ip_network(subnet, strict=False)
        return f"{net.network_address + 1}/{net.prefixlen}"
    return "?"


def tunnel_text(record: dict, node: dict | None = None) -> str:
    """The overlay in one line: device and encapsulation, or how routing works without one."""
    mode = record.get("mode", "")
    if mode in TUNNELS:
        device, what = TUNNELS[mode]
        if mode == "calico-ipip" and node and node.get("carrier"):
            carrier = node["carrier"]
            device = "eth0" if carrier == "ebpf" else device
            what += f", carrier {CARRIERS.get(carrier, carrier)}"
        return f"{device}: {what}"
    return NATIVE.get(mode, f"{mode or 'unknown mode'}: no tunnel")


def _node_label(record: dict, name: str, node: dict) -> str:
    lines = [f"node {name}", f"{node.get('ip', '?')}/{node.get('prefixlen', '?')} eth0"]
    if node.get("subnet"):
        lines.append(f"podCIDR {node['subnet']}")
    if node.get("blocks"):
        lines.append("blocks " + ", ".join(node["blocks"]))
    lines.append(tunnel_text(record, node))
    if node.get("tunnel_ip"):
        lines.append(f"tunnel address {node['tunnel_ip']}/32")
    if node.get("vtep_mac"):
        lines.append(f"VTEP MAC {node['vtep_mac']}")
    if node.get("encap") and node["encap"] != "Always":
        lines.append(f"encapsulation {node['encap']}")
    if "bird" in node:
        pid = node["bird"].get("pid") if isinstance(node["bird"], dict) else None
        lines.append(f"BIRD pid {pid}" if pid else "BIRD")
    return "\n".join(lines)


def _port_text(port: dict) -> str:
    text = f"{port.get('port')}/{port.get('protocol', 'TCP')}"
    if port.get("target_port") not in (None, port.get("port")):
        text += f" -> {port['target_port']}"
    if port.get("node_port"):
        text += f", NodePort {port['node_port']}"
    return text


def _encapsulates(record: dict, a: dict, b: dict) -> bool:
    """Whether traffic between two nodes is tunnelled (Calico's CrossSubnet: across segments)."""
    encap = a.get("encap", "Always")
    if encap == "Never":
        return False
    return encap != "CrossSubnet" or a.get("segment") != b.get("segment")


def to_dot(record: dict) -> str:
    """The cluster's record as Graphviz dot text."""
    cluster = record.get("cluster", "cluster")
    mode = record.get("mode", "")
    nodes: dict = record.get("nodes", {})
    clients: dict = record.get("clients", {})
    pods: dict = record.get("pods", {})
    services: dict = record.get("services", {})
    subnets = segment_subnets(record)
    bridges = record.get("underlay", {}).get("bridges", {})
    out: list[str] = [
        f"digraph {quote('netsim-' + str(cluster))} {{",
        "  " + "graph " + _attrs(label=f"netsim cluster {cluster} — {mode}", labelloc="t",
                                 fontname="Helvetica", compound="true", newrank="true",
                                 rankdir="TB", nodesep="0.3", ranksep="0.6"),
        "  " + "node " + _attrs(fontname="Helvetica", fontsize="11"),
        "  " + "edge " + _attrs(fontname="Helvetica", fontsize="9"),
    ]
    pod_by_node: dict[str, list[str]] = {}
    for pod_name, pod in sorted(pods.items(), key=lambda kv: _ip_key(kv[1].get("ip", ""))):
        pod_by_node.setdefault(pod.get("node", ""), []).append(pod_name)
    shown: dict[str, str] = {}  # pod name -> the dot node that stands for it
    links: list[str] = []  # node -> pod edges (the pods' veths), written after the subgraphs

    def pod_lines(node_name: str, indent: str) -> list[str]:
        lines = []
        names = pod_by_node.get(node_name, [])
        hidden = names[MAX_PODS_PER_NODE:]
        for pod_name in names[:MAX_PODS_PER_NODE]:
            shown[pod_name] = f"pod:{pod_name}"
            pod = pods[pod_name]
            lines.append(indent + quote(shown[pod_name]) + " " + _attrs(
                label=f"{pod_name}\n{pod.get('ip', '?')}", shape="box", style="rounded,filled",
                fillcolor="#e8f4e8", fontsize="9", height="0.3",
                tooltip=f"{pod.get('netns', pod_name)}, host veth {pod.get('veth', '?')}"))
        if hidden:
            for pod_name in hidden:
                shown[pod_name] = f"pods-more:{node_name}"
            lines.append(indent + quote(f"pods-more:{node_name}") + " " + _attrs(
                label=f"+{len(hidden)} more pods", shape="box", style="rounded,dashed",
                fontsize="9", height="0.3"))
        if node_name in nodes:
            for target in dict.fromkeys(shown[p] for p in names):
                links.append("  " + quote(f"node:{node_name}") + " -> " + quote(target) + " "
                             + _attrs(dir="none", color="#999999"))
        return lines

    # the segments, each with its bridge, its nodes (and their pods) and its clients
    for seg in segments(record):
        subnet = subnets.get(seg, "")
        bridge = bridges.get(seg, "")
        out.append(f"  subgraph {quote('cluster_segment:' + seg)} {{")
        out.append("    graph " + _attrs(label=f"segment {seg}" + (f"\n{subnet}" if subnet else ""),
                                        style="rounded", color="#4a6fa5", bgcolor="#f4f7fb"))
        out.append("    " + quote(f"segment:{seg}") + " " + _attrs(
            label=f"{bridge or seg}\nL2 {subnet}".rstrip(), shape="box", style="filled",
            fillcolor="#c9d8ee", height="0.3"))
        for node_name in sorted(n for n, e in nodes.items() if e.get("segment") == seg):
            node = nodes[node_name]
            out.append(f"    subgraph {quote('cluster_node:' + node_name)} {{")
            out.append("      graph " + _attrs(label=f"{node_name} ({node.get('netns', '')})",
                                              style="rounded", color="#666666", bgcolor="white",
                                              fontsize="9"))
            out.append("      " + quote(f"node:{node_name}") + " " + _attrs(
                label=_node_label(record, node_name, node), shape="box", style="filled",
                fillcolor="#fff3d6"))
            out.extend(pod_lines(node_name, "      "))
            out.append("    }")
        for client_name in sorted(c for c, e in clients.items() if e.get("segment") == seg):
            client = clients[client_name]
            asn = client.get("asn") or 0
            label = (f"BGP router {client_name}\nAS {asn}" if asn
                     else f"external client {client_name}")
            out.append("    " + quote(f"client:{client_name}") + " " + _attrs(
                label=f"{label}\n{client.get('ip', '?')}", shape="box" if not asn else "hexagon",
                style="filled", fillcolor="#eeeeee" if not asn else "#f2dede"))
        out.append("  }")

    # nodes whose segment is not recorded, and pods whose node is not recorded
    for node_name in sorted(n for n, e in nodes.items() if not e.get("segment")):
        out.append("  " + quote(f"node:{node_name}") + " " + _attrs(
            label=_node_label(record, node_name, nodes[node_name]), shape="box"))
    for node_name in sorted(set(pod_by_node) - set(nodes)):
        out.extend(pod_lines(node_name, "  "))

    out.extend(links)
    # the underlay links: hosts to their segment, the router to every segment at its .1
    for node_name, node in sorted(nodes.items()):
        if node.get("segment"):
            out.append("  " + quote(f"segment:{node['segment']}") + " -> " + quote(
                f"node:{node_name}") + " " + _attrs(dir="none", color="#4a6fa5", label="eth0"))
    for client_name, client in sorted(clients.items()):
        if client.get("segment"):
            out.append("  " + quote(f"segment:{client['segment']}") + " -> " + quote(
                f"client:{client_name}") + " " + _attrs(dir="none", color="#4a6fa5"))
    router = record.get("router") or {}
    legs = router.get("legs") or {}
    if legs:
        out.append("  " + quote("router") + " " + _attrs(
            label=f"router\n{router.get('netns', '')}".rstrip(), shape="octagon",
            style="filled", fillcolor="#d9ead3"))
        for seg, leg in legs.items():
            ifname = leg.get("ifname", "") if isinstance(leg, dict) else ""
            out.append("  " + quote("router") + " -> " + quote(f"segment:{seg}") + " " + _attrs(
                dir="none", color="#4a6fa5", penwidth="2",
                label=f"{ifname} {_router_ip(record, seg, subnets.get(seg))}".strip()))

    # the overlay between nodes
    names = sorted(nodes)
    legend = [f"overlay: {tunnel_text(record)}"]
    if mode in TUNNELS:
        device = TUNNELS[mode][0]
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                 if _encapsulates(record, nodes[a], nodes[b])]
        if any(n.get("encap") == "CrossSubnet" for n in nodes.values()):
            legend.append("CrossSubnet: tunnelled only between segments, routed within one")
        if len(names) <= MESH_MAX_NODES:
            for a, b in pairs:
                label = device
                if mode == "calico-ipip" and nodes[a].get("carrier") == "ebpf":
                    label = "IPIP (eBPF)"
                out.append("  " + quote(f"node:{a}") + " -> " + quote(f"node:{b}") + " " + _attrs(
                    dir="both", style="dashed", color="#b45f06", fontcolor="#b45f06",
                    label=label, constraint="false"))
        else:
            legend.append(f"{len(pairs)} node pairs tunnel over {device} (mesh not drawn)")
    elif mode == "calico-bgp":
        legend.append("iBGP sessions between the nodes (full mesh or route reflectors)")
        for client_name, client in sorted(clients.items()):
            if not client.get("asn"):
                continue
            for node_name in names:
                if nodes[node_name].get("segment") == client.get("segment"):
                    out.append("  " + quote(f"client:{client_name}") + " -> " + quote(
                        f"node:{node_name}") + " " + _attrs(
                        dir="both", style="dotted", color="#a61c00", label="eBGP",
                        constraint="false"))
    out.append("  " + quote("legend") + " " + _attrs(
        label="\n".join(legend), shape="note", style="filled", fillcolor="#fffbe6"))

    # Services and their endpoints
    for svc_name, svc in sorted(services.items()):
        ports = svc.get("ports") or []
        lines = [f"Service {svc_name}", svc.get("type", "ClusterIP")]
        lines += [f"{svc.get('clusterIP', '?')}:{_port_text(p)}" for p in ports] or [
            str(svc.get("clusterIP", "?"))]
        if svc.get("sessionAffinity") not in (None, "None"):
            lines.append(f"affinity {svc['sessionAffinity']}")
        out.append("  " + quote(f"service:{svc_name}") + " " + _attrs(
            label="\n".join(lines), shape="ellipse", style="filled", fillcolor="#dae8fc"))
        targets = list(dict.fromkeys(shown[p] for p, _ in endpoints(record, svc) if p in shown))
        for target in targets:
            # drawn pod -> Service with the arrowhead at the pod, so Services sit below the pods
            out.append("  " + quote(target) + " -> " + quote(f"service:{svc_name}") + " "
                       + _attrs(dir="back", color="#1c4587"))
    out.append("}")
    return "\n".join(out) + "\n"


def render(record: dict, out_path: str) -> str:
    """Write the picture to out_path, in the format its extension names; return the path."""
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in FORMATS:
        raise NetsimError(f"{out_path}: unknown picture format {ext or '(no extension)'!r}; "
                          f"supported: {', '.join(FORMATS)}")
    text = to_dot(record)
    if ext == ".dot":
        with open(out_path, "w") as fh:
            fh.write(text)
        return out_path
    dot = shutil.which("dot")
    if dot is None:
        raise NetsimError("graphviz's dot is not installed: apt-get install graphviz "
                          "(or write a .dot file)")
    try:
        result = subprocess.run([dot, f"-T{ext[1:]}", "-o", out_path], input=text.encode(),
                                capture_output=True, timeout=DOT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NetsimError(f"dot took longer than {DOT_TIMEOUT:.0f} s to draw {out_path}; "
                          "write a .dot file instead") from exc
    if result.returncode != 0:
        raise NetsimError(f"dot -T{ext[1:]} failed (exit {result.returncode}): "
                          f"{result.stderr.decode(errors='replace').strip()}")
    return out_path
