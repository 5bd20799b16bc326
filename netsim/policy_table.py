"""Felix's policy rules for one node, laid out as felix/rules lays them out, in a table
`ip calico` of the node's namespace. Pure: policies, pods and namespaces in, the table's
changing part (netsim.kernel.nfttable.Table) out.

    cali-FORWARD (hook forward)   dispatch from the workload, then to the workload:
        <from> vmap @cali-from-wl-dispatch     -> jump cali-fw-<iface>
        <to> vmap @cali-to-wl-dispatch         -> jump cali-tw-<iface>
        meta mark & 0x10000 == 0x10000 accept  ("Policy explicitly accepted packet.")
    cali-INPUT (hook input)       a workload's traffic to its node: its egress policy
    cali-tw-<iface> / cali-fw-<iface>   one per local pod and direction:
        ct state established,related accept; ct state invalid drop; clear the marks;
        jump to its group, return if the accept mark is set; then the namespace's profile
        cali-pri-kns.<ns> / cali-pro-kns.<ns> (allow).
    cali-gi-<id> / cali-go-<id>   one per group of pods alike (namespace and labels): each
        selecting policy in order: jump cali-pi-<id> / cali-po-<id> while neither the accept
        nor the pass mark is set (Felix returns after each policy that accepted: one rule per
        policy instead of two, the same verdicts); then return if accepted; "Drop if no
        policies passed packet" unless passed.
    cali-pi-<id> / cali-po-<id>   one per policy: its rules in order, each an nft rule per
        net and port, ending in its action (Allow: accept mark + return; Deny: drop;
        Pass: pass mark + return; Log: log).
    cali40s-<hash>                the addresses of the pods a rule's selectors name;
    cali40n-<hash>                address . protocol . port of a named port's pods.

Where the pod's host-side interface is routed (Calico's cali interfaces), dispatch is by that
interface's name, as Felix's. Flannel's pods hang on the cni0 bridge: bridged packets reach the
ip family's hooks through br_netfilter with the bridge, not the port, as their interface, so
there dispatch is by the pod's address (the chains are the same).

Traffic through a Service is policed after kube-proxy's DNAT (forward hook): the policy sees
the endpoint pod, not the ClusterIP. The node's own traffic to its pods (probes) is not policed,
as Kubernetes requires.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct

from netsim import netpol
from netsim.kernel import nftnl
from netsim.kernel.nfttable import IPV4, IPV4_PROTO_PORT, Rule, SetType, Table, addr_match, l4proto
from netsim.netpol import Entity, PodInfo, Policy, PolicyRule

TABLE = "calico"
ACCEPT_MARK, PASS_MARK = 0x10000, 0x20000  # Felix's first two mark bits
FROM, TO = "cali-from-wl-dispatch", "cali-to-wl-dispatch"
MAX_NAME = 28  # Felix keeps chain names within iptables' limit


def base(dispatch: str) -> str:
    """The policy's fixed part, as `nft -f` text (the first sync loads it, after `sweep`).
    The table is Felix's in Calico's modes: natOutgoing's chain lives in it too."""
    key, src, dst = (
        ("ifname", "iifname", "oifname")
        if dispatch == "iface"
        else ("ipv4_addr", "ip saddr", "ip daddr")
    )
    return f"""table ip {TABLE} {{
  map {FROM} {{ type {key} : verdict; }}
  map {TO} {{ type {key} : verdict; }}
  chain cali-FORWARD {{ type filter hook forward priority filter; policy accept;
    {src} vmap @{FROM}
    {dst} vmap @{TO}
    meta mark & 0x{ACCEPT_MARK:08x} == 0x{ACCEPT_MARK:08x} accept \
      comment "Policy explicitly accepted packet."
  }}
  chain cali-INPUT {{ type filter hook input priority filter; policy accept;
    {src} vmap @{FROM}
  }}
}}
"""


NOT_POLICY = ("cali-nat-outgoing",)  # the table's chains that are not the policy's


def sweep(netns: str) -> None:
    """Remove every policy object from the node's table (a previous run's, or all of them
    when the last policy went), in one batch: rules first, then maps and sets, then chains."""
    from netsim.kernel import nft

    chains, sets = nft.table_objects(netns, "ip", TABLE)
    chains = [c for c in chains if c not in NOT_POLICY]
    if not chains and not sets:
        return
    batch = nftnl.Batch(TABLE)
    for chain in chains:
        batch.flush_chain(chain)
    for name in sets:
        batch.delete_set(name)
    for chain in chains:
        batch.delete_chain(chain)
    batch.commit(netns)


def dispatch_maps(dispatch: str) -> dict[str, SetType]:
    kind = (
        SetType(nftnl.TYPE_IFNAME, nftnl.IFNAMSIZ, True)
        if dispatch == "iface"
        else SetType(nftnl.TYPE_IPADDR, 4, True)
    )
    return {FROM: kind, TO: kind}


def limited(prefix: str, suffix: str) -> str:
    """hash.GetLengthLimitedID: prefix+suffix if it fits, else prefix_<hash of suffix>."""
    if len(prefix) + len(suffix) <= MAX_NAME:
        return prefix + suffix
    return prefix + "_" + _digest(suffix, MAX_NAME - len(prefix) - 1)


def policy_chain(policy: Policy, direction: str) -> str:
    return limited("cali-pi-" if direction == "Ingress" else "cali-po-", policy.calico_name)


def endpoint_chain(iface: str, direction: str) -> str:
    return limited("cali-tw-" if direction == "Ingress" else "cali-fw-", iface)


def group_chain(pod: PodInfo, direction: str) -> str:
    """Felix's policy group chains (cali-gi-/cali-go-) gather the policies that endpoints
    share. Here a group is the pods of one namespace with the same labels — every policy
    selects them alike — so the group outlives policy changes: adding a policy that selects
    a Deployment's pods rewrites its group's chain, not each pod's."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(pod.labels.items()))
    prefix = "cali-gi-" if direction == "Ingress" else "cali-go-"
    return prefix + _digest(f"{pod.namespace}/{labels}", MAX_NAME - len(prefix))


def profile_chain(namespace: str, direction: str) -> str:
    return limited("cali-pri-" if direction == "Ingress" else "cali-pro-", f"kns.{namespace}")


# -- expressions -------------------------------------------------------------------------------


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _mark_test(bit: int, value: int) -> bytes:
    return (
        nftnl.meta(nftnl.META_MARK)
        + nftnl.bitwise(_u32(bit))
        + nftnl.cmp(nftnl.CMP_EQ, _u32(value))
    )


def _mark_set(bit: int) -> bytes:
    return (
        nftnl.meta(nftnl.META_MARK)
        + nftnl.bitwise(_u32(0xFFFFFFFF ^ bit), xor=_u32(bit))
        + nftnl.meta_set(nftnl.META_MARK)
    )


def _ct_state(mask: int) -> bytes:
    return nftnl.ct(nftnl.CT_STATE) + nftnl.bitwise(_u32(mask)) + nftnl.cmp(nftnl.CMP_NEQ, _u32(0))


def _port(offset: int, first: int, last: int) -> bytes:
    load = nftnl.payload(nftnl.TRANSPORT_HEADER, offset, 2)
    if first == last:
        return load + nftnl.cmp(nftnl.CMP_EQ, struct.pack("!H", first))
    return load + nftnl.range_eq(struct.pack("!H", first), struct.pack("!H", last))


def _named(set_name: str) -> bytes:
    """`ip daddr . meta l4proto . th dport @set`."""
    return (
        nftnl.payload(nftnl.NETWORK_HEADER, 16, 4, nftnl.REG_1)
        + nftnl.meta(nftnl.META_L4PROTO, nftnl.REG32_01)
        + nftnl.payload(nftnl.TRANSPORT_HEADER, 2, 2, nftnl.REG32_02)
        + nftnl.lookup(set_name, nftnl.REG_1)
    )


def _rule(parts: list[tuple[str, bytes]], comment: str = "") -> Rule:
    text = " ".join(t for t, _ in parts)
    code = b"".join(c for _, c in parts)
    return Rule(text + (f' comment "{comment}"' if comment else ""), lambda: code, comment)


ESTABLISHED = ("ct state established,related accept", _ct_state(0x06) + nftnl.verdict(1))
INVALID = ("ct state invalid drop", _ct_state(0x01) + nftnl.verdict(nftnl.DROP))
CLEAR = (
    f"meta mark set meta mark & 0x{0xFFFFFFFF ^ (ACCEPT_MARK | PASS_MARK):08x}",
    nftnl.meta(nftnl.META_MARK)
    + nftnl.bitwise(_u32(0xFFFFFFFF ^ (ACCEPT_MARK | PASS_MARK)))
    + nftnl.meta_set(nftnl.META_MARK),
)
NO_PASS = (f"meta mark & 0x{PASS_MARK:08x} == 0x00000000", _mark_test(PASS_MARK, 0))
UNDECIDED = (  # neither accepted nor passed yet: the next policy has its say
    f"meta mark & 0x{ACCEPT_MARK | PASS_MARK:08x} == 0x00000000",
    _mark_test(ACCEPT_MARK | PASS_MARK, 0),
)
ACCEPTED = (
    f"meta mark & 0x{ACCEPT_MARK:08x} == 0x{ACCEPT_MARK:08x}",
    _mark_test(ACCEPT_MARK, ACCEPT_MARK),
)
RETURN = ("return", nftnl.verdict(nftnl.RETURN))
DROP = ("drop", nftnl.verdict(nftnl.DROP))
ACTIONS = {
    "Allow": (
        f"meta mark set meta mark | 0x{ACCEPT_MARK:08x} return",
        _mark_set(ACCEPT_MARK) + nftnl.verdict(nftnl.RETURN),
    ),
    "Pass": (
        f"meta mark set meta mark | 0x{PASS_MARK:08x} return",
        _mark_set(PASS_MARK) + nftnl.verdict(nftnl.RETURN),
    ),
    "Deny": DROP,
    "Log": ('log prefix "calico-packet: "', nftnl.log("calico-packet: ")),
}


# -- the table ---------------------------------------------------------------------------------


class _Builder:
    def __init__(self, pods: list[PodInfo], namespaces: dict[str, dict], dispatch: str):
        self.pods = [p for p in pods if p.ip]
        self.namespaces = _profile_labels(namespaces)
        self.table = Table(sets=dispatch_maps(dispatch), elements={FROM: {}, TO: {}})

    def ip_set(self, entity: Entity, scope: str) -> str:
        key = f"{scope}|{entity.selector}|{entity.namespace_selector}"
        name = _set_name("cali40s-", key)
        if name not in self.table.sets:
            members = [p for p in self.pods if netpol.in_entity(entity, scope, p, self.namespaces)]
            self.table.sets[name] = IPV4
            self.table.elements[name] = {p.ip: None for p in members}
        return name

    def named_set(self, port: str, protocol: str, members: list[PodInfo], key: str) -> str:
        name = _set_name("cali40n-", f"{key}|{port}|{protocol}")
        if name not in self.table.sets:
            proto = protocol.lower()
            self.table.sets[name] = IPV4_PROTO_PORT
            self.table.elements[name] = {
                f"{p.ip} . {proto} . {number}": None
                for p in members
                for pname, pproto, number in p.ports
                if pname == port and pproto == protocol
            }
        return name

    def policy(self, policy: Policy, direction: str) -> str:
        chain = policy_chain(policy, direction)
        if chain in self.table.chains:
            return chain
        rules: list[Rule] = []
        for rule in policy.rules(direction):
            comment = f"{policy.title} {direction.lower()} rule {rule.number}: {rule.action}"
            for parts in self.matches(policy, direction, rule):
                rules.append(_rule(parts + [ACTIONS[rule.action]], comment))
        self.table.chains[chain] = tuple(rules)
        return chain

    def matches(self, policy: Policy, direction: str, rule: PolicyRule) -> list[list]:
        """Each alternative of a rule (its nets and ports multiply) as (text, code) parts."""
        scope = policy.namespace
        alternatives: list[list] = [[]]
        if rule.protocol:
            proto = rule.protocol.lower()
            alternatives = [[(f"meta l4proto {proto}", l4proto(proto))]]
        for side, offset, word in ((rule.source, 12, "saddr"), (rule.destination, 16, "daddr")):
            if side.pods:
                name = self.ip_set(side, scope)
                load = nftnl.payload(nftnl.NETWORK_HEADER, offset, 4) + nftnl.lookup(name)
                alternatives = [a + [(f"ip {word} @{name}", load)] for a in alternatives]
            if side.nets:
                alternatives = [
                    a + [(f"ip {word} {net}", addr_match(offset, net))]
                    for a in alternatives
                    for net in side.nets
                ]
            for net in side.not_nets:
                part = (f"ip {word} != {net}", addr_match(offset, net, nftnl.CMP_NEQ))
                alternatives = [a + [part] for a in alternatives]
            if side.ports:
                offset_port = 0 if side is rule.source else 2
                choices = []
                for port in side.ports:
                    if port.name:
                        members = self.named_members(policy, direction, rule)
                        key = f"{scope}|{policy.calico_name}|{direction}|{rule.destination}"
                        name = self.named_set(port.name, rule.protocol, members, key)
                        choices.append(
                            (f"ip daddr . meta l4proto . th dport @{name}", _named(name))
                        )
                    else:
                        where = "sport" if offset_port == 0 else "dport"
                        choices.append(
                            (f"th {where} {port}", _port(offset_port, port.first, port.last))
                        )
                alternatives = [a + [c] for a in alternatives for c in choices]
        return alternatives

    def named_members(self, policy: Policy, direction: str, rule: PolicyRule) -> list[PodInfo]:
        """The pods a named port is looked up on: the rule's destination pods, else the
        policy's own (ingress) or every pod (egress)."""
        if rule.destination.pods:
            return [
                p
                for p in self.pods
                if netpol.in_entity(rule.destination, policy.namespace, p, self.namespaces)
            ]
        if direction == "Ingress":
            return [p for p in self.pods if netpol.selects(policy, p, self.namespaces)]
        return self.pods

    def group(self, pod: PodInfo, direction: str, policies: list[Policy]) -> str:
        """The chain of the policies that select pods of this namespace with these labels
        (every such pod is selected alike): each policy in order, then the tier's drop."""
        chain = group_chain(pod, direction)
        if chain in self.table.chains:
            return chain
        rules = []
        for index, policy in enumerate(policies):  # until one accepts or passes
            target = self.policy(policy, direction)
            note = "Start of tier default" if index == 0 else ""
            rules.append(
                _rule([UNDECIDED, (f"jump {target}", nftnl.verdict(nftnl.JUMP, target))], note)
            )
        if policies:
            rules.append(_rule([ACCEPTED, RETURN], "Return if policy accepted"))
            rules.append(
                _rule([NO_PASS, DROP], "End of tier default. Drop if no policies passed packet")
            )
        self.table.chains[chain] = tuple(rules)
        return chain

    def endpoint(self, pod: PodInfo, iface: str, direction: str, policies: list[Policy]) -> str:
        chain = endpoint_chain(iface, direction)
        group = self.group(pod, direction, policies)
        profile = profile_chain(pod.namespace, direction)
        self.table.chains[profile] = _profile_rules(pod.namespace)
        self.table.chains[chain] = _endpoint_rules(direction, group, profile)
        return chain


@functools.lru_cache(maxsize=4096)
def _endpoint_rules(direction: str, group: str, profile: str) -> tuple[Rule, ...]:
    """An endpoint chain's rules: the same for every pod of a group (made once, shared)."""
    rules = [_rule([ESTABLISHED]), _rule([INVALID]), _rule([CLEAR])]
    if direction == "Egress":  # Felix drops tunnelled packets a workload sends
        rules.append(
            _rule(
                [("meta l4proto udp", l4proto("udp")), ("th dport 4789", _port(2, 4789, 4789))]
                + [DROP],
                "Drop VXLAN encapped packets originating in workloads",
            )
        )
    rules.append(_rule([(f"jump {group}", nftnl.verdict(nftnl.JUMP, group))]))
    rules.append(_rule([ACCEPTED, RETURN], "Return if policy accepted"))
    rules.append(_rule([(f"jump {profile}", nftnl.verdict(nftnl.JUMP, profile))]))
    rules.append(_rule([ACCEPTED, RETURN], "Return if profile accepted"))
    rules.append(_rule([DROP], "Drop if no profiles matched"))
    return tuple(rules)


@functools.lru_cache(maxsize=1024)
def _profile_rules(namespace: str) -> tuple[Rule, ...]:
    return (_rule([ACTIONS["Allow"]], f"Profile kns.{namespace}"),)


def _set_name(prefix: str, key: str) -> str:
    return prefix + _digest(key, 22)


def _digest(text: str, length: int) -> str:
    """Felix's hashes in names: base64url of sha256 (labels may hold characters nft's names
    may not, such as '=')."""
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode()[:length]


def compute(
    policies: list[Policy],
    pods: list[PodInfo],
    namespaces: dict[str, dict],
    local: list[tuple[PodInfo, str]],
    dispatch: str,
) -> Table:
    """The node's table: an endpoint chain pair per local pod (with an interface, and an
    address when dispatch is by address), the chains of the policies selecting them, the sets
    those name, the dispatch maps' elements."""
    build = _Builder(pods, namespaces, dispatch)
    ordered = sorted(policies, key=lambda p: p.sort_key)
    for pod, iface in sorted(local, key=lambda item: item[1]):
        keys = {"iface": iface, "address": pod.ip}[dispatch]
        if not keys:
            continue
        for direction, dispatch_map in (("Ingress", TO), ("Egress", FROM)):
            chosen = [
                p
                for p in ordered
                if direction in p.types and netpol.selects(p, pod, build.namespaces)
            ]
            chain = build.endpoint(pod, iface, direction, chosen)
            build.table.elements[dispatch_map][keys] = f"jump {chain}"
    return build.table


def selecting(policies: list[Policy], pod: PodInfo, namespaces: dict[str, dict]) -> list[Policy]:
    """The policies that select a pod, in the order Felix evaluates them."""
    spaces = _profile_labels(namespaces)
    return [p for p in sorted(policies, key=lambda p: p.sort_key) if netpol.selects(p, pod, spaces)]


def _profile_labels(namespaces: dict[str, dict]) -> dict[str, dict]:
    """Each namespace's labels as its Calico profile holds them (with projectcalico.org/name),
    which namespace selectors read."""
    return {name: {**labels, "projectcalico.org/name": name} for name, labels in namespaces.items()}
