"""What each node's daemons did and when, as `kubectl get events` shows a cluster's: one JSON
line per event in the node's state directory (events.jsonl), merged by time to read."""

from __future__ import annotations

import json
import os
import time

FILE = "events.jsonl"


def record(node_dir: str, node: str, daemon: str, message: str) -> None:
    line = json.dumps({"time": time.time(), "node": node, "daemon": daemon, "message": message})
    with open(os.path.join(node_dir, FILE), "a") as fh:
        fh.write(line + "\n")


def read(cluster: str) -> list[dict]:
    """Every event of the cluster's nodes, oldest first."""
    from netsim import state

    found = []
    nodes = os.path.join(state.cluster_dir(cluster), "nodes")
    dirs = (
        [os.path.join(nodes, n) for n in sorted(os.listdir(nodes))] if os.path.isdir(nodes) else []
    )
    dirs.append(os.path.join(state.cluster_dir(cluster), "controller"))
    for directory in dirs:
        try:
            with open(os.path.join(directory, FILE)) as fh:
                found += [json.loads(line) for line in fh if line.strip()]
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda e: e["time"])
