"""kube-proxy's per-service objects sent as nf_tables netlink batches: the kernel must end up
with exactly the table `nft -f` builds from the same rule set's text, after the first sync and
after every kind of change; a refused batch changes nothing and names what was refused."""

from __future__ import annotations

import uuid

import pytest
from conftest import needs_root

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.kernel import nft, nftnl
from netsim.kubeproxy import nftables as kp
from netsim.kubeproxy.ports import Endpoint, ProxyPort

pytestmark = needs_root
CIDR = "10.244.0.0/16"


def port(
    name: str,
    ip: str,
    endpoints: list[str],
    affinity: int | None = None,
    node_port: int | None = None,
    protocol: str = "TCP",
    number: int = 80,
    port_name: str = "",
) -> ProxyPort:
    return ProxyPort(
        "default",
        name,
        port_name,
        protocol,
        ip,
        number,
        node_port,
        tuple(Endpoint(e, 9376) for e in endpoints),
        affinity,
    )


START = [
    port("web", "10.96.0.10", ["10.244.1.2", "10.244.2.2", "10.244.1.3"], node_port=30080),
    port("aff", "10.96.0.11", ["10.244.1.2", "10.244.2.2"], affinity=3),
    port("dns", "10.96.0.12", ["10.244.1.4"], protocol="UDP", number=53, port_name="dns"),
    port("dns", "10.96.0.12", ["10.244.1.4"], number=53, port_name="dns-tcp"),
    port("idle", "10.96.0.13", [], node_port=30081),
]

STEPS = {
    "endpoint added": lambda ps: [
        p._replace(endpoints=p.endpoints + (Endpoint("10.244.2.9", 9376),))
        if p.name == "web"
        else p
        for p in ps
    ],
    "endpoint removed": lambda ps: [
        p._replace(endpoints=p.endpoints[1:]) if p.name == "aff" else p for p in ps
    ],
    "affinity timeout changed": lambda ps: [
        p._replace(affinity_timeout=60) if p.name == "aff" else p for p in ps
    ],
    "affinity switched off": lambda ps: [
        p._replace(affinity_timeout=None) if p.name == "aff" else p for p in ps
    ],
    "affinity switched on": lambda ps: [
        p._replace(affinity_timeout=10800) if p.name == "web" else p for p in ps
    ],
    "no endpoints left": lambda ps: [
        p._replace(endpoints=()) if p.name == "web" else p for p in ps
    ],
    "endpoints back": lambda ps: [
        p._replace(endpoints=(Endpoint("10.244.1.7", 9376),)) if p.name in ("web", "idle") else p
        for p in ps
    ],
    "node port changed": lambda ps: [
        p._replace(node_port=30090) if p.name == "idle" else p for p in ps
    ],
    "service removed": lambda ps: [p for p in ps if p.name != "dns"],
    "service added": lambda ps: ps + [port("new", "10.96.0.14", ["10.244.2.3"], affinity=5)],
}


@pytest.fixture
def two_nodes():
    names = [f"netsim.nl{uuid.uuid4().hex[:6]}.{n}" for n in ("text", "batch")]
    for name in names:
        nsmod.create(name)
    yield names
    for name in names:
        nsmod.remove(name)


def table(netns: str) -> list[str]:
    """The table as nft lists it, one item per line, order-free (set elements and rules of a
    hash set list in the kernel's order)."""
    listed = nft.ruleset(netns)
    assert "table ip kube-proxy" in listed
    return sorted(line.strip().rstrip(",") for line in listed.splitlines())


def reference(netns: str, ports: list[ProxyPort], cidr: str = CIDR) -> list[str]:
    nft.apply(netns, kp.full(kp.compute(ports, cidr)))
    return table(netns)


@pytest.mark.parametrize("cidr", [CIDR, "10.240.0.0/12"])
def test_first_sync_as_a_batch_lists_as_nft_builds_it(two_nodes, cidr):
    text_ns, batch_ns = two_nodes
    nft.apply(batch_ns, kp.full(kp.compute([], cidr)))
    kp.changes([], START, cidr).commit(batch_ns)
    listed = table(batch_ns)
    assert listed == reference(text_ns, START, cidr)
    assert f"numgen inc mod 3 vmap @{kp.endpoints_map(START[0])}" in listed
    assert any(
        line.startswith(f"ip daddr 10.96.0.10 tcp dport 80 ip saddr != {cidr} jump")
        for line in listed
    )
    assert "meta l4proto udp dnat to 10.244.1.4:9376" in listed


def test_every_kind_of_change_leaves_the_table_nft_would_build(two_nodes):
    text_ns, batch_ns = two_nodes
    nft.apply(batch_ns, kp.full(kp.compute(START, CIDR)))
    ports = START
    for what, step in STEPS.items():
        new = step(ports)
        batch = kp.changes(ports, new, CIDR)
        assert len(batch) > 0, what
        batch.commit(batch_ns)
        assert table(batch_ns) == reference(text_ns, new), what
        ports = new
    assert not len(kp.changes(ports, list(ports), CIDR))  # nothing changed: nothing to send


def test_a_changed_affinity_timeout_reaches_the_kernel(two_nodes):
    _, batch_ns = two_nodes
    nft.apply(batch_ns, kp.full(kp.compute(START, CIDR)))
    new = STEPS["affinity timeout changed"](START)
    kp.changes(START, new, CIDR).commit(batch_ns)
    timeouts = [
        line.strip()
        for line in nft.ruleset(batch_ns).splitlines()
        if line.strip().startswith("timeout ")
    ]
    assert timeouts == ["timeout 1m"] * 2  # one affinity set per endpoint of "aff"


def test_a_refused_batch_changes_nothing_and_names_the_command(two_nodes):
    _, batch_ns = two_nodes
    nft.apply(batch_ns, kp.full(kp.compute(START, CIDR)))
    before = table(batch_ns)
    batch = nftnl.Batch(kp.TABLE)
    batch.add_chain("made-then-undone")
    batch.add_elements("cluster-ips", [(bytes([10, 96, 0, 99]), None)])
    batch.add_rule(
        "no-such-chain", kp._bare("jump", "mark-for-masquerade").code, "jump mark-for-masquerade"
    )
    with pytest.raises(NetsimError) as refused:
        batch.commit(batch_ns)
    assert "add rule no-such-chain jump mark-for-masquerade" in str(refused.value)
    assert "No such file or directory" in str(refused.value)
    assert table(batch_ns) == before


def test_a_batch_refused_message_by_message_still_names_the_first(two_nodes):
    """Thousands of refusals (here: the table does not exist) overflow the socket; the error
    is still the first refused command, not a socket error."""
    _, batch_ns = two_nodes
    many = [
        port(f"s{i}", f"10.96.{i // 200}.{i % 200 + 1}", ["10.244.1.2", "10.244.2.2"], affinity=3)
        for i in range(400)
    ]
    batch = kp.changes([], many, CIDR)
    assert len(batch) > 2000
    with pytest.raises(NetsimError, match="refused 'add chain endpoint-.*No such file"):
        batch.commit(batch_ns)
