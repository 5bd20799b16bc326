"""The pod side of Calico's modes (calico's CNI plugin): no bridge. The host end of the veth is
`cali` + 11 hex characters with MAC ee:ee:ee:ee:ee:ee, proxy_arp on and proxy_delay 0; the pod
holds its address as a /32 with `169.254.1.1 dev eth0 scope link` and `default via 169.254.1.1`.
The pod ARPs for 169.254.1.1, the host answers with its own MAC (proxy ARP: the node routes that
address elsewhere, by its default route), and the node reaches the pod by `<podIP> dev caliX
scope link`.
"""

from __future__ import annotations

import hashlib

from cni.wiring import Attachment
from netsim.kernel import sysctl
from netsim.kernel.netlink import RT_SCOPE_LINK, Rtnl

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY = "169.254.1.1"
ROUTES: list[tuple[str, str | None]] = [(f"{GATEWAY}/32", None), ("default", GATEWAY)]


def veth_name(namespace: str, pod: str) -> str:
    """`cali` + the first 11 hex digits of sha1("<namespace>.<pod>"), as Calico names them."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def host_sysctls(node_netns: str | None, veths: list[str]) -> None:
    """proxy_arp=1, forwarding=1 and neigh proxy_delay=0 on each cali interface."""
    values = {}
    for veth in veths:
        values[f"net.ipv4.conf.{veth}.proxy_arp"] = "1"
        values[f"net.ipv4.conf.{veth}.forwarding"] = "1"
        values[f"net.ipv4.neigh.{veth}.proxy_delay"] = "0"
    sysctl.set_in(node_netns, values)


class CalicoPodSide:
    name = "calico"

    def attach_host(self, node: Rtnl, attachment: Attachment) -> None:
        """The cali veth (peer created in the pod), MAC ee:ee:ee:ee:ee:ee."""
        attachment.make_host_end(node, mac=HOST_MAC)

    def after_host(self, node: Rtnl, attachments: list[Attachment]) -> None:
        """`<podIP> dev caliX scope link` on the node, and the cali sysctls."""
        for attachment in attachments:
            node.route(f"{attachment.ip}/32", attachment.host_index, scope=RT_SCOPE_LINK)
        host_sysctls(node.netns, [a.veth for a in attachments])
