"""The kernel's own account of what nftables did to one packet: `meta nftrace set 1` on the
probe (a rule of a table of netsim's, in each node it may cross, matching its source address
and port) and `nft monitor trace` in those nodes while it flies. Every chain and rule it met,
kube-proxy's and Felix's, comes back with the verdict, so the rule that accepted or dropped it
is the kernel's word, not a second implementation's guess.

Only the cluster's node namespaces are touched; the tables and monitors go when the probe has
flown (monitors are ended by PID).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod

SUBSCRIBE = 0.2  # seconds for `nft monitor` to subscribe before the probe is sent
SETTLE = 0.3  # seconds for the last events to come out after it
_LINE = re.compile(
    r"trace id (?P<id>\w+) ip (?P<table>\S+) (?P<chain>\S+) "
    r"(?:rule (?P<rule>.*) \(verdict (?P<verdict>[^)]*)\)|policy (?P<policy>\w+)|(?P<what>.*))"
)
_COMMENT = re.compile(r' comment "(?P<comment>[^"]*)"\s*$')


@dataclass(frozen=True)
class Step:
    """One rule (or a base chain's policy) the packet met in one node, with its verdict."""

    node: str
    table: str
    chain: str
    rule: str  # the rule's text without its comment; "" for a chain's policy
    comment: str
    verdict: str  # drop, accept, return, continue, jump <chain>, goto <chain>
    packet: str = ""  # the packet as the chain saw it (the first step of a chain only)
    id: str = ""  # the packet's trace id (one per packet and namespace)


def parse(node: str, text: str) -> list[Step]:
    """The steps of the first packet traced in a node (the connection's first: the later
    ones are its conntrack-established followers)."""
    steps = []
    for line in text.splitlines():
        found = _LINE.match(line.strip())
        if not found or found["table"].startswith("netsim-trace"):
            continue
        id_ = found["id"]
        if found["rule"] is not None:
            rule, comment = found["rule"], ""
            note = _COMMENT.search(rule)
            if note:
                rule, comment = rule[: note.start()], note["comment"]
            steps.append(
                Step(node, found["table"], found["chain"], rule, comment, found["verdict"], "", id_)
            )
        elif found["policy"]:
            steps.append(
                Step(node, found["table"], found["chain"], "", "", found["policy"], "", id_)
            )
        elif (found["what"] or "").startswith("packet:"):
            packet = found["what"][len("packet:") :].strip()
            steps.append(Step(node, found["table"], found["chain"], "", "", "", packet, id_))
    # the probe's first packet: what decided. One packet may show under several trace ids
    # (br_netfilter hands a bridged packet's copy to the forward hook): its ids are those
    # whose packet looked the same (IP id, length, TCP flags)
    signatures = {s.id: _signature(s.packet) for s in steps if s.packet}
    first = next(iter(signatures.values()), None)
    return [s for s in steps if signatures.get(s.id) == first]


def _signature(packet: str) -> tuple:
    return tuple(re.findall(r"ip id (\d+)|ip length (\d+)|flags == (\S+)", packet))


@contextlib.contextmanager
def watching(cluster: str, nodes: dict[str, str], match: str) -> Iterator[list[Step]]:
    """While the block runs, trace every packet that `match` (nft syntax, e.g. `ip saddr
    10.244.1.2 tcp sport 40000`) selects in these nodes (name -> netns); the list it yields
    holds their steps, in order per node, once the block is over."""
    nft = shutil.which("nft")
    if nft is None:
        raise NetsimError("nft not found: install nftables (apt-get install nftables)")
    table = f"netsim-trace-{cluster}"
    ruleset = (
        f"table ip {table} {{\n  chain probe {{\n"
        "    type filter hook prerouting priority raw - 10; policy accept;\n"
        f"    {match} meta nftrace set 1\n  }}\n}}\n"
    )
    steps: list[Step] = []
    monitors: dict[str, subprocess.Popen] = {}
    made: list[str] = []
    try:
        for name, netns in nodes.items():
            _nft(nft, netns, ruleset)
            made.append(netns)
            with nsmod.entered(netns):  # the monitor's netlink socket is the namespace's
                monitors[name] = subprocess.Popen(  # line-buffered: a pipe would keep its
                    [*_line_buffered(), nft, "monitor", "trace"],  # tail when it is ended
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
        time.sleep(SUBSCRIBE)
        yield steps
        time.sleep(SETTLE)
    finally:
        for name, monitor in monitors.items():
            monitor.terminate()  # ours, by PID
            try:
                out, _ = monitor.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                monitor.kill()
                out, _ = monitor.communicate()
            steps.extend(parse(name, out or ""))
        for netns in made:
            _nft(nft, netns, f"delete table ip {table}\n", check=False)


def _line_buffered() -> list[str]:
    stdbuf = shutil.which("stdbuf")  # coreutils
    return [stdbuf, "-oL"] if stdbuf else []


def _nft(nft: str, netns: str, text: str, check: bool = True) -> None:
    with nsmod.entered(netns):
        result = subprocess.run([nft, "-f", "-"], input=text, text=True, capture_output=True)
    if check and result.returncode != 0:
        raise NetsimError(f"nft in {netns}: {result.stderr.strip()}")


def dropped(steps: list[Step]) -> Step | None:
    """The rule that dropped the packet, if one did."""
    return next((s for s in steps if s.verdict == "drop"), None)
