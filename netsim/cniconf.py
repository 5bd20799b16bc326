"""The node's CNI config list (net.d/10-<mode>.conflist, as a real node holds it in
/etc/cni/net.d) and a runtime that executes it inside the node's namespace."""

from __future__ import annotations

import json
import os

from netsim import state
from netsim.model import Cluster
from netsim.modes import Mode
from netsim.record import NodeRecord, Record


def conflist_path(cluster: str, node: str, mode: str) -> str:
    return os.path.join(state.node_dir(cluster, node), "net.d", f"10-{mode}.conflist")


def write_node_files(cluster: Cluster, node: NodeRecord, mode: Mode) -> None:
    """The mode's node files (flannel's subnet.env), and the config list, usable as it is by
    a runtime run inside the node's namespace."""
    directory = state.node_dir(cluster.name, node.name)
    for name, text in mode.node_files(cluster, node).items():
        state.write_file(os.path.join(directory, name), text)
    own = mode.cni_config(cluster, node, state.cluster_dir(cluster.name), directory)
    conflist = {
        "cniVersion": cluster.cni_version,
        "name": mode.cni_network,
        "plugins": [own] + cluster.cni_plugins,
    }
    state.write_file(
        conflist_path(cluster.name, node.name, cluster.mode), json.dumps(conflist, indent=2) + "\n"
    )


def cni_bin_dir(cluster: str) -> str:
    """A CNI bin directory holding netsim's plugin under its type name, `netsim`."""
    from cni import plugin

    directory = os.path.join(state.cluster_dir(cluster), "bin")
    if not os.path.exists(os.path.join(directory, "netsim")):
        plugin.install(directory)
    return directory


def runtime(record: Record, node_name: str):
    """A CNI runtime for one node: its config list, run inside the node's namespace, results
    cached in the node's state."""
    return node_runtime(record.cluster, node_name, record.mode, record.nodes[node_name].netns)


def node_runtime(cluster: str, node: str, mode: str, netns: str):
    from cni.runtime import DEFAULT_PATH, Runtime

    return Runtime(
        conflist_path(cluster, node, mode),
        [cni_bin_dir(cluster)] + DEFAULT_PATH,
        os.path.join(state.node_dir(cluster, node), "cni-cache"),
        run_in=netns,
    )
