"""Names of what netsim creates, each carrying its cluster's name (DESIGN: exact ownership)."""

from __future__ import annotations

import hashlib

from netsim import state


def ns_name(cluster: str, role: str, name: str = "") -> str:
    """netsim.<cluster>.underlay | .router | .node.<name> | .pod.<name> | .ext.<name>"""
    return f"{state.PREFIX}.{cluster}.{role}" + (f".{name}" if name else "")


def port_name(host: str) -> str:
    """The host's port on its segment bridge in the underlay namespace (alias: the host)."""
    name = f"p-{host}"
    return name if len(name) <= 15 else "p-" + hashlib.sha256(host.encode()).hexdigest()[:8]
