"""The one way a pod is wired, for netsim's batches and for the CNI executable alike.

Both callers hand over attachments (a pod's veth, address and routes) and a pod side (cni.bridge
for flannel's bridge plugin, cni.calico_pod for Calico's). netsim hands many per node, with the
interface indexes it assigns, so one netlink batch makes every host end; the executable hands
one, with index 0, and the kernel picks (the steps then look links up by name). In order:
the host ends (veth pairs, peers made directly in the pods), what needs them to exist (Calico's
route to the pod, its sysctls), then inside each pod its interface, address and routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from netsim.kernel.netlink import IFINDEX, Rtnl


@dataclass
class Attachment:
    pod_netns: str  # the pod's namespace, by name or path
    pod_fd: int  # an open fd of it: the veth peer is created there
    veth: str  # the host end's name
    ip: str
    prefixlen: int
    routes: list[tuple[str, str | None]]  # (destination, gateway) inside the pod
    mtu: int
    alias: str  # the host end's alias: the pod, or containerID/ifname
    ifname: str = "eth0"
    index: int = 0  # the host end's index; 0: the kernel picks
    pod_index: int = IFINDEX.ETH0  # the pod end's index; 0: the kernel picks
    pod_rtnl: Rtnl | None = None  # an open netlink socket in the pod, if the caller has one
    host_link: dict | None = field(default=None, init=False)  # looked up when index was 0
    pod_link: dict | None = field(default=None, init=False)  # looked up when pod_index was 0
    host_index: int = field(default=0, init=False)  # the host end's index once it exists

    def make_host_end(self, node: Rtnl, **link) -> None:
        """Queue the veth pair: this end on the node, the peer made in the pod; `link` adds
        what the pod side sets on the host end (master, mac)."""
        node.veth(
            self.veth,
            self.index,
            self.ifname,
            self.pod_index,
            self.pod_fd,
            self.mtu,
            alias=self.alias,
            **link,
        )


class PodSide(Protocol):
    name: str

    def attach_host(self, node: Rtnl, attachment: Attachment) -> None:
        """Queue the host end of one attachment."""

    def after_host(self, node: Rtnl, attachments: list[Attachment]) -> None:
        """What needs the host ends to exist (queued on node, committed by wire)."""


def wire(side: PodSide, node: Rtnl, attachments: list[Attachment], loopback: bool = False) -> None:
    """Wire every attachment; with loopback, also bring up each pod's lo (the runtime's
    loopback plugin, for pods netsim runs itself). The caller undoes on failure."""
    for attachment in attachments:
        side.attach_host(node, attachment)
    node.commit()
    for attachment in attachments:
        if not attachment.index:
            attachment.host_link = node.link(attachment.veth)
        attachment.host_index = attachment.index or attachment.host_link["index"]
    side.after_host(node, attachments)
    node.commit()
    for attachment in attachments:
        if attachment.pod_rtnl is not None:
            _pod_side(attachment.pod_rtnl, attachment, loopback)
        else:
            with Rtnl(attachment.pod_netns) as pod:
                _pod_side(pod, attachment, loopback)


def _pod_side(pod: Rtnl, attachment: Attachment, loopback: bool) -> None:
    """Inside the pod: lo (if asked), the interface up with its address, then its routes."""
    if loopback:
        pod.link_up(IFINDEX.LO, "lo")
    index = attachment.pod_index
    if not index:
        attachment.pod_link = pod.link(attachment.ifname)
        index = attachment.pod_link["index"]
    pod.link_up(index, attachment.ifname)
    pod.address(index, attachment.ip, attachment.prefixlen, attachment.ifname)
    for dst, via in attachment.routes:
        pod.route(dst, index, gateway=via)
    pod.commit()
