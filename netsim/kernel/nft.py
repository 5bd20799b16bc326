"""nftables, as kube-proxy and flannel drive it: a whole ruleset as one `nft -f` transaction,
run inside a node's namespace (the host's own ruleset is never touched)."""

from __future__ import annotations

import shutil
import subprocess

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod


def available() -> str | None:
    return shutil.which("nft")


def apply(netns: str, ruleset: str) -> None:
    """Apply the ruleset atomically in the namespace; nothing changes if any line fails."""
    nft = available()
    if nft is None:
        raise NetsimError("nft not found: install nftables (apt-get install nftables)")
    # started from a thread inside the namespace (a child begins where its parent thread is):
    # no Python runs between fork and exec, so this is safe from several threads at once
    with nsmod.entered(netns):
        result = subprocess.run([nft, "-f", "-"], input=ruleset, text=True, capture_output=True)
    if result.returncode != 0:
        raise NetsimError(f"nft -f in netns {netns} failed: {result.stderr.strip()}")


def ruleset(netns: str) -> str:
    result = subprocess.run(
        [available() or "nft", "list", "ruleset"],
        text=True,
        capture_output=True,
        preexec_fn=lambda: nsmod.enter_for_exec(netns),
    )
    return result.stdout


def table_objects(netns: str, family: str, table: str) -> tuple[list[str], list[str]]:
    """The chains and the sets (maps too) of a table in the namespace; none if it has no
    such table."""
    import json

    result = subprocess.run(
        [available() or "nft", "-j", "list", "table", family, table],
        text=True,
        capture_output=True,
        preexec_fn=lambda: nsmod.enter_for_exec(netns),
    )
    if result.returncode != 0:
        return [], []
    items = json.loads(result.stdout)["nftables"]
    chains = [i["chain"]["name"] for i in items if "chain" in i]
    sets = [i[k]["name"] for i in items for k in ("set", "map") if k in i]
    return chains, sets
