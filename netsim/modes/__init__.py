"""The CNI data planes, one module each, behind one interface (netsim.modes.base.Mode).

Adding a mode means adding its module and one line here. Modules are imported on demand: they
pull in pyroute2, which commands that only read or delete do not need.
"""

from __future__ import annotations

import functools
import importlib

from netsim.modes.base import Mode

MODES = {
    "flannel-vxlan": "netsim.modes.flannel_vxlan:FlannelVxlan",
    "flannel-host-gw": "netsim.modes.flannel_host_gw:FlannelHostGw",
    "flannel-udp": "netsim.modes.flannel_udp:FlannelUdp",
    "calico-vxlan": "netsim.modes.calico_vxlan:CalicoVxlan",
    "calico-ipip": "netsim.modes.calico_ipip:CalicoIpip",
    "calico-bgp": "netsim.modes.calico_bgp:CalicoBgp",
}
DEFAULT_MODE = "flannel-vxlan"  # as kube-flannel's manifest sets it
PLAIN_ROUTING = "flannel-host-gw"  # pods routed natively on one L2: the benchmark's floor


@functools.cache
def get(name: str) -> Mode:
    module, cls = MODES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def every() -> list[Mode]:
    return [get(name) for name in MODES]


__all__ = ["DEFAULT_MODE", "MODES", "PLAIN_ROUTING", "Mode", "every", "get"]
