"""Per-namespace sysctls: /proc/sys/net is resolved in the opening thread's namespace."""

from __future__ import annotations

from netsim.kernel import netns as nsmod


def set_in(netns: str, values: dict[str, str]) -> None:
    """Write net.* sysctls inside the namespace, e.g. {"net.ipv4.ip_forward": "1"}."""
    with nsmod.entered(netns):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
                fh.write(value)


def get_in(netns: str, key: str) -> str:
    with nsmod.entered(netns):
        with open("/proc/sys/" + key.replace(".", "/")) as fh:
            return fh.read().strip()
