"""One module per CNI mode. Each mode says how a node is set up, how a peer node is reached and
how a pod is attached; `get()` maps the topology's `spec.cni.mode` to it. Modules are imported
on demand: they pull in pyroute2, which commands that only read or delete do not need."""

from __future__ import annotations

import importlib

MODES = {
    "flannel-vxlan": ("cni.modes.flannel_vxlan", "FlannelVxlan"),
    "flannel-host-gw": ("cni.modes.flannel_host_gw", "FlannelHostGw"),
    "flannel-udp": ("cni.modes.flannel_udp", "FlannelUdp"),
    "calico-vxlan": ("cni.modes.calico_vxlan", "CalicoVxlan"),
    "calico-ipip": ("cni.modes.calico_ipip", "CalicoIpip"),
    "calico-bgp": ("cni.modes.calico_bgp", "CalicoBgp"),
}


def get(name: str):
    module, cls = MODES[name]
    return getattr(importlib.import_module(module), cls)()
