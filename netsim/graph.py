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

import os
import shutil
import subprocess

from netsim import modes
from netsim.errors import NetsimError
from netsim.model import ServicePort
from netsim.modes import Mode
from netsim.record import NodeRecord, Record
from netsim.services import endpoints, ip_key

FORMATS = (".dot", ".png", ".svg")
MESH_MAX_NODES = 5  # above this the overlay is one legend note, not a full mesh of edges
MAX_PODS_PER_NODE = 24  # the rest of a node's pods are drawn as one "+N more" node
DOT_TIMEOUT = 120.0  # seconds for `dot` to lay out and write the picture


def quote(text: object) -> str:
    """A dot double-quoted string; a newline in the text becomes a centred line break."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def _attrs(**attrs: object) -> str:
    return "[" + ", ".join(f"{k}={quote(v)}" for k, v in attrs.items()) + "]"


def _node(name: str, indent: str, **attrs: object) -> str:
    """One dot node statement."""
    return f"{indent}{quote(name)} {_attrs(**attrs)}"


def _edge(a: str, b: str, indent: str, **attrs: object) -> str:
    """One dot edge statement, a -> b."""
    return f"{indent}{quote(a)} -> {quote(b)} {_attrs(**attrs)}"


def tunnel_text(mode: Mode, node: NodeRecord | None = None) -> str:
    """The overlay in one line: device and encapsulation, or how routing works without one."""
    if not mode.tunnel:
        return mode.summary
    device, what = mode.tunnel, mode.summary
    if node is not None and mode.carrier_text(node):
        device = mode.tunnel_device(node)
        what += f", carrier {mode.carrier_text(node)}"
    return f"{device}: {what}"


def _node_label(mode: Mode, name: str, node: NodeRecord) -> str:
    lines = [f"node {name}", f"{node.ip}/{node.prefixlen} eth0"]
    if node.subnet:
        lines.append(f"podCIDR {node.subnet}")
    if node.blocks:
        lines.append("blocks " + ", ".join(node.blocks))
    lines.append(tunnel_text(mode, node))
    if node.tunnel_ip:
        lines.append(f"tunnel address {node.tunnel_ip}/32")
    if node.vtep_mac:
        lines.append(f"VTEP MAC {node.vtep_mac}")
    if mode.family == "calico" and node.encap != "Always" and mode.tunnel:
        lines.append(f"encapsulation {node.encap}")
    if node.bird is not None:
        lines.append(f"BIRD pid {node.bird.pid}")
    return "\n".join(lines)


def _port_text(port: ServicePort) -> str:
    text = f"{port.port}/{port.protocol}"
    if port.target_port != port.port:
        text += f" -> {port.target_port}"
    if port.node_port:
        text += f", NodePort {port.node_port}"
    return text


def to_dot(record: Record) -> str:
    """The cluster's record as Graphviz dot text."""
    cluster, mode = record.cluster, modes.get(record.mode)
    nodes, clients, pods = record.nodes, record.clients, record.pods
    subnets = {s.name: s.subnet for s in record.spec.segments}
    out: list[str] = [
        f"digraph {quote('netsim-' + cluster)} {{",
        "  "
        + "graph "
        + _attrs(
            label=f"netsim cluster {cluster} — {mode.name}",
            labelloc="t",
            fontname="Helvetica",
            compound="true",
            newrank="true",
            rankdir="TB",
            nodesep="0.3",
            ranksep="0.6",
        ),
        "  " + "node " + _attrs(fontname="Helvetica", fontsize="11"),
        "  " + "edge " + _attrs(fontname="Helvetica", fontsize="9"),
    ]
    pod_by_node: dict[str, list[str]] = {}
    for pod_name, pod in sorted(pods.items(), key=lambda kv: ip_key(kv[1].ip)):
        pod_by_node.setdefault(pod.node, []).append(pod_name)
    shown: dict[str, str] = {}  # pod name -> the dot node that stands for it
    links: list[str] = []  # node -> pod edges (the pods' veths), written after the subgraphs

    def pod_lines(node_name: str, indent: str) -> list[str]:
        lines = []
        names = pod_by_node.get(node_name, [])
        hidden = names[MAX_PODS_PER_NODE:]
        for pod_name in names[:MAX_PODS_PER_NODE]:
            shown[pod_name] = f"pod:{pod_name}"
            pod = pods[pod_name]
            lines.append(
                _node(
                    shown[pod_name],
                    indent,
                    label=f"{pod_name}\n{pod.ip}",
                    shape="box",
                    style="rounded,filled",
                    fillcolor="#e8f4e8",
                    fontsize="9",
                    height="0.3",
                    tooltip=f"{pod.netns}, host veth {pod.veth}",
                )
            )
        if hidden:
            for pod_name in hidden:
                shown[pod_name] = f"pods-more:{node_name}"
            lines.append(
                _node(
                    f"pods-more:{node_name}",
                    indent,
                    label=f"+{len(hidden)} more pods",
                    shape="box",
                    style="rounded,dashed",
                    fontsize="9",
                    height="0.3",
                )
            )
        for target in dict.fromkeys(shown[p] for p in names):
            links.append(_edge(f"node:{node_name}", target, "  ", dir="none", color="#999999"))
        return lines

    # the segments, each with its bridge, its nodes (and their pods) and its clients
    for seg, subnet in subnets.items():
        bridge = record.underlay.bridges.get(seg, "")
        out.append(f"  subgraph {quote('cluster_segment:' + seg)} {{")
        out.append(
            "    graph "
            + _attrs(
                label=f"segment {seg}\n{subnet}",
                style="rounded",
                color="#4a6fa5",
                bgcolor="#f4f7fb",
            )
        )
        out.append(
            _node(
                f"segment:{seg}",
                "    ",
                label=f"{bridge or seg}\nL2 {subnet}",
                shape="box",
                style="filled",
                fillcolor="#c9d8ee",
                height="0.3",
            )
        )
        for node_name in sorted(n for n, e in nodes.items() if e.segment == seg):
            node = nodes[node_name]
            out.append(f"    subgraph {quote('cluster_node:' + node_name)} {{")
            out.append(
                "      graph "
                + _attrs(
                    label=f"{node_name} ({node.netns})",
                    style="rounded",
                    color="#666666",
                    bgcolor="white",
                    fontsize="9",
                )
            )
            out.append(
                _node(
                    f"node:{node_name}",
                    "      ",
                    label=_node_label(mode, node_name, node),
                    shape="box",
                    style="filled",
                    fillcolor="#fff3d6",
                )
            )
            out.extend(pod_lines(node_name, "      "))
            out.append("    }")
        for client_name in sorted(c for c, e in clients.items() if e.segment == seg):
            client = clients[client_name]
            label = (
                f"BGP router {client_name}\nAS {client.asn}"
                if client.asn
                else f"external client {client_name}"
            )
            out.append(
                _node(
                    f"client:{client_name}",
                    "    ",
                    label=f"{label}\n{client.ip}",
                    shape="hexagon" if client.asn else "box",
                    style="filled",
                    fillcolor="#f2dede" if client.asn else "#eeeeee",
                )
            )
        out.append("  }")

    out.extend(links)
    # the underlay links: hosts to their segment, the router to every segment at its .1
    for node_name, node in sorted(nodes.items()):
        out.append(
            _edge(
                f"segment:{node.segment}",
                f"node:{node_name}",
                "  ",
                dir="none",
                color="#4a6fa5",
                label="eth0",
            )
        )
    for client_name, client in sorted(clients.items()):
        out.append(
            _edge(
                f"segment:{client.segment}",
                f"client:{client_name}",
                "  ",
                dir="none",
                color="#4a6fa5",
            )
        )
    if record.router.legs:
        out.append(
            _node(
                "router",
                "  ",
                label=f"router\n{record.router.netns}",
                shape="octagon",
                style="filled",
                fillcolor="#d9ead3",
            )
        )
        segments = {s.name: s for s in record.spec.segments}
        for seg, leg in record.router.legs.items():
            address = f"{segments[seg].router_ip}/{segments[seg].prefixlen}"
            out.append(
                _edge(
                    "router",
                    f"segment:{seg}",
                    "  ",
                    dir="none",
                    color="#4a6fa5",
                    penwidth="2",
                    label=f"{leg.ifname} {address}",
                )
            )

    # the overlay between nodes
    names = sorted(nodes)
    legend = [f"overlay: {tunnel_text(mode)}"]
    if mode.tunnel:
        pairs = [
            (a, b)
            for i, a in enumerate(names)
            for b in names[i + 1 :]
            if mode.encapsulates(nodes[a], nodes[b])
        ]
        if any(n.encap == "CrossSubnet" for n in nodes.values()):
            legend.append("CrossSubnet: tunnelled only between segments, routed within one")
        if len(names) <= MESH_MAX_NODES:
            for a, b in pairs:
                label = mode.tunnel
                if mode.tunnel_device(nodes[a]) != mode.tunnel:
                    label = f"{mode.encapsulation.upper()} ({mode.carrier_text(nodes[a])})"
                out.append(
                    _edge(
                        f"node:{a}",
                        f"node:{b}",
                        "  ",
                        dir="both",
                        style="dashed",
                        color="#b45f06",
                        fontcolor="#b45f06",
                        label=label,
                        constraint="false",
                    )
                )
        else:
            legend.append(f"{len(pairs)} node pairs tunnel over {mode.tunnel} (mesh not drawn)")
    elif any(n.bird for n in nodes.values()):
        legend.append("iBGP sessions between the nodes (full mesh or route reflectors)")
        for client_name, client in sorted(clients.items()):
            if not client.asn:
                continue
            for node_name in names:
                if nodes[node_name].segment == client.segment:
                    out.append(
                        _edge(
                            f"client:{client_name}",
                            f"node:{node_name}",
                            "  ",
                            dir="both",
                            style="dotted",
                            color="#a61c00",
                            label="eBGP",
                            constraint="false",
                        )
                    )
    out.append(
        _node(
            "legend",
            "  ",
            label="\n".join(legend),
            shape="note",
            style="filled",
            fillcolor="#fffbe6",
        )
    )

    # Services and their endpoints
    for svc_name, svc in sorted(record.services.items()):
        lines = [f"Service {svc_name}", svc.type]
        lines += [f"{svc.cluster_ip}:{_port_text(p)}" for p in svc.ports]
        if svc.session_affinity != "None":
            lines.append(f"affinity {svc.session_affinity}")
        out.append(
            _node(
                f"service:{svc_name}",
                "  ",
                label="\n".join(lines),
                shape="ellipse",
                style="filled",
                fillcolor="#dae8fc",
            )
        )
        targets = list(
            dict.fromkeys(shown[p.name] for p in endpoints(record, svc) if p.name in shown)
        )
        for target in targets:
            # drawn pod -> Service with the arrowhead at the pod, so Services sit below the pods
            out.append(_edge(target, f"service:{svc_name}", "  ", dir="back", color="#1c4587"))
    out.append("}")
    return "\n".join(out) + "\n"


def render(record: Record, out_path: str) -> str:
    """Write the picture to out_path, in the format its extension names; return the path."""
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in FORMATS:
        raise NetsimError(
            f"{out_path}: unknown picture format {ext or '(no extension)'!r}; "
            f"supported: {', '.join(FORMATS)}"
        )
    text = to_dot(record)
    if ext == ".dot":
        with open(out_path, "w") as fh:
            fh.write(text)
        return out_path
    dot = shutil.which("dot")
    if dot is None:
        raise NetsimError(
            "graphviz's dot is not installed: apt-get install graphviz (or write a .dot file)"
        )
    try:
        result = subprocess.run(
            [dot, f"-T{ext[1:]}", "-o", out_path],
            input=text.encode(),
            capture_output=True,
            timeout=DOT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetsimError(
            f"dot took longer than {DOT_TIMEOUT:.0f} s to draw {out_path}; "
            "write a .dot file instead"
        ) from exc
    if result.returncode != 0:
        raise NetsimError(
            f"dot -T{ext[1:]} failed (exit {result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return out_path
