"""One module per CNI mode. Each mode says how a node is set up, how a peer node is reached and
how a pod is attached; `MODES` maps the topology's `spec.cni.mode` to it."""

from __future__ import annotations

from cni.modes.flannel_host_gw import FlannelHostGw
from cni.modes.flannel_vxlan import FlannelVxlan

MODES = {m.name: m for m in (FlannelVxlan(), FlannelHostGw())}


def get(name: str):
    return MODES[name]
