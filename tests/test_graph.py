"""netsim graph: the dot text names every node, pod and Service with edges to its endpoints;
Graphviz renders it to PNG and SVG; bad output names are refused. No root needed."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from netsim import graph
from netsim.errors import NetsimError

RECORD = {
    "cluster": "demo", "mode": "calico-vxlan",
    "underlay": {"netns": "netsim.demo.underlay", "bridges": {"rack1": "br-rack1",
                                                              "rack2": "br-rack2"}},
    "router": {"netns": "netsim.demo.router",
               "legs": {"rack1": {"ifname": "r-rack1"}, "rack2": {"ifname": "r-rack2"}}},
    "nodes": {
        "worker-1": {"ip": "172.18.1.2", "prefixlen": 24, "segment": "rack1",
                     "netns": "netsim.demo.node.worker-1", "blocks": ["192.168.0.0/26"],
                     "tunnel_ip": "192.168.0.0", "vtep_mac": "66:00:00:00:00:01",
                     "encap": "CrossSubnet"},
        "worker-2": {"ip": "172.18.2.2", "prefixlen": 24, "segment": "rack2",
                     "netns": "netsim.demo.node.worker-2", "blocks": ["192.168.0.64/26"],
                     "tunnel_ip": "192.168.0.64", "vtep_mac": "66:00:00:00:00:02",
                     "encap": "CrossSubnet"},
    },
    "clients": {"client": {"ip": "172.18.1.4", "prefixlen": 24, "segment": "rack1", "asn": 0,
                           "netns": "netsim.demo.ext.client"}},
    "pods": {
        "web-0": {"ip": "192.168.0.1", "node": "worker-1", "veth": "cali0d7763386da",
                  "labels": {"app": "web"}, "netns": "netsim.demo.pod.web-0"},
        "web-1": {"ip": "192.168.0.65", "node": "worker-2", "veth": "cali0761ccbeace",
                  "labels": {"app": "web"}, "netns": "netsim.demo.pod.web-1"},
        "solo": {"ip": "192.168.0.2", "node": "worker-1", "veth": "cali1111111111a",
                 "labels": {"app": "solo"}, "netns": "netsim.demo.pod.solo"},
    },
    "services": {"web": {"clusterIP": "10.96.0.10", "type": "NodePort", "selector": {"app": "web"},
                         "sessionAffinity": "None", "affinityTimeout": 10800,
                         "ports": [{"name": "", "port": 80, "target_port": 9376,
                                    "protocol": "TCP", "node_port": 30080}]}},
}
needs_dot = pytest.mark.skipif(not shutil.which("dot"), reason="graphviz is not installed")


def test_dot_names_everything_and_links_services_to_their_endpoints():
    text = graph.to_dot(RECORD)
    for word in ("worker-1", "worker-2", "172.18.1.2", "192.168.0.0/26", "vxlan.calico",
                 "192.168.0.1", "192.168.0.65", "10.96.0.10", "30080", "client", "rack2"):
        assert word in text, word
    edges = [line for line in text.splitlines() if "->" in line]
    web_edges = [e for e in edges if "web" in e.split("->")[0]]
    assert any("web-0" in e for e in web_edges) and any("web-1" in e for e in web_edges)
    assert not any("solo" in e.split("->")[1] for e in web_edges)


@needs_dot
def test_dot_text_is_valid_graphviz(tmp_path):
    out = graph.render(RECORD, str(tmp_path / "c.dot"))
    check = subprocess.run(["dot", "-Tplain", out], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@needs_dot
def test_png_and_svg(tmp_path):
    png = graph.render(RECORD, str(tmp_path / "c.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    svg = graph.render(RECORD, str(tmp_path / "c.svg"))
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_unknown_extension_is_refused(tmp_path):
    with pytest.raises(NetsimError, match="png"):
        graph.render(RECORD, str(tmp_path / "c.jpeg"))
