"""Network policies as Felix holds them: Kubernetes NetworkPolicy (networking.k8s.io/v1) and
Calico's NetworkPolicy and GlobalNetworkPolicy (projectcalico.org/v3), all read into one shape
— ordered policies of rules with an action, whose peers are Calico selectors, nets and ports —
as calico-kube-controllers converts a Kubernetes policy (`knp.default.<name>`, order 1000, each
peer × port one Allow rule). Pure: documents in, checked, `Policy` out; and which pods a
policy, a peer or a rule's named port selects.

Kubernetes' defaulting: policyTypes is Ingress, plus Egress when an egress section is written;
an empty ingress/egress list allows nothing in that direction, `[{}]` everything; within a rule
ports AND peers; a peer with podSelector and namespaceSelector ANDs them.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from netsim import calico_selector
from netsim.errors import NetsimError

K8S = "networking.k8s.io/v1"
CALICO = "projectcalico.org/v3"
KINDS = ("NetworkPolicy", "GlobalNetworkPolicy")
K8S_ORDER = 1000.0  # calico-kube-controllers gives every Kubernetes policy this order
ACTIONS = ("Allow", "Deny", "Log", "Pass")
PROTOCOLS = ("TCP", "UDP", "SCTP")
TYPES = ("Ingress", "Egress")
NAMESPACE_LABEL = "projectcalico.org/namespace"  # Calico's label on every workload endpoint
_IANA = re.compile(r"(?=.{1,15}\Z)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")


@dataclass(frozen=True)
class PortRange:
    first: int = 0
    last: int = 0
    name: str = ""  # a named port, resolved on the destination pod

    def __str__(self) -> str:
        if self.name:
            return self.name
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Entity:
    """One side of a rule (Calico's EntityRule): pods by selector (within the policy's
    namespace unless a namespace selector is given), and/or addresses by CIDR, and ports."""

    selector: str = ""  # Calico syntax, canonical; "" with no namespace selector: any address
    namespace_selector: str = ""
    nets: tuple[str, ...] = ()
    not_nets: tuple[str, ...] = ()
    ports: tuple[PortRange, ...] = ()

    @property
    def pods(self) -> bool:
        """Does this side name pods (an IP set of them)?"""
        return bool(self.selector or self.namespace_selector)


@dataclass(frozen=True)
class PolicyRule:
    action: str
    protocol: str = ""  # "" any
    source: Entity = field(default_factory=Entity)
    destination: Entity = field(default_factory=Entity)
    number: int = 1  # the rule's place in its list as written (1: the first)


@dataclass(frozen=True)
class Policy:
    kind: str  # NetworkPolicy (Kubernetes) | CalicoNetworkPolicy | GlobalNetworkPolicy
    namespace: str  # "" for a GlobalNetworkPolicy
    name: str
    selector: str
    types: tuple[str, ...]
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    order: float | None = None  # None: after every ordered policy
    namespace_selector: str = ""  # a GlobalNetworkPolicy's
    body: dict = field(default_factory=dict, compare=False, hash=False)  # as applied

    @property
    def title(self) -> str:
        """How a user names it: `NetworkPolicy x/allow`, `GlobalNetworkPolicy deny-all`."""
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"

    @property
    def calico_name(self) -> str:
        """Felix's id of the policy: `<kind>/<namespace>/<name>` (knp: a Kubernetes one)."""
        short = {"NetworkPolicy": "knp", "CalicoNetworkPolicy": "np"}.get(self.kind, "gnp")
        name = f"knp.default.{self.name}" if short == "knp" else self.name
        return f"{short}/{self.namespace}/{name}" if self.namespace else f"{short}/{name}"

    @property
    def sort_key(self) -> tuple:
        return (self.order is None, self.order or 0.0, self.calico_name)

    def rules(self, direction: str) -> tuple[PolicyRule, ...]:
        return self.ingress if direction == "Ingress" else self.egress


@dataclass(frozen=True)
class PodInfo:
    """What Felix knows of a workload endpoint: its labels, namespace, address and ports."""

    namespace: str
    name: str
    labels: dict
    ip: str
    ports: tuple[tuple[str, str, int], ...] = ()  # (name, protocol, number) of named ports

    def __hash__(self) -> int:
        return hash((self.namespace, self.name))


def key(kind: str, namespace: str, name: str) -> str:
    """The record's key of a policy."""
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


@functools.lru_cache(maxsize=4096)
def tree(selector: str) -> tuple:
    return calico_selector.parse(selector)


def endpoint_labels(pod: PodInfo) -> dict:
    return {**pod.labels, NAMESPACE_LABEL: pod.namespace}


def selects(policy: Policy, pod: PodInfo, namespaces: dict[str, dict]) -> bool:
    """Does the policy apply to this pod (its endpoint)?"""
    if policy.namespace and policy.namespace != pod.namespace:
        return False
    if policy.namespace_selector and not calico_selector.matches(
        tree(policy.namespace_selector), namespaces.get(pod.namespace, {})
    ):
        return False
    return calico_selector.matches(tree(policy.selector), endpoint_labels(pod))


def in_entity(entity: Entity, scope: str, pod: PodInfo, namespaces: dict[str, dict]) -> bool:
    """Is the pod one the entity's selectors name? `scope`: the policy's namespace ("" global)."""
    if entity.namespace_selector:
        if not calico_selector.matches(
            tree(entity.namespace_selector), namespaces.get(pod.namespace, {})
        ):
            return False
    elif scope and pod.namespace != scope:
        return False
    return calico_selector.matches(tree(entity.selector or "all()"), endpoint_labels(pod))


# -- reading documents -------------------------------------------------------------------------


def from_document(doc: Any) -> Policy:
    """A checked policy from a topology document (netsim.topology._Doc: get, fail, name)."""
    version = doc.body.get("apiVersion")
    namespace = ""
    if doc.kind == "NetworkPolicy":
        namespace = doc.get("metadata.namespace", "default", str)
        namespace = doc.name(namespace, "metadata.namespace")
    name = doc.get("metadata.name", None, str)
    body = json.loads(json.dumps(doc.body))
    if namespace:
        body["metadata"]["namespace"] = namespace
    if version == K8S:
        return replace(_kubernetes(doc, namespace, doc.name(name, "metadata.name")), body=body)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
        raise doc.fail(
            "metadata.name",
            f"{name!r} is not a resource name",
            "use lowercase letters, digits, '-' and '.'",
        )
    return replace(_calico(doc, namespace, name), body=body)


def _kubernetes(doc: Any, namespace: str, name: str) -> Policy:
    spec = doc.get("spec", {}, dict)
    _known(doc, "spec", spec, ("podSelector", "policyTypes", "ingress", "egress"))
    selector = _label_selector(doc, "spec.podSelector")
    sections = {t: doc.get(f"spec.{t.lower()}", None, list) for t in TYPES}
    types = doc.get("spec.policyTypes", None, list)
    if types is None:  # Kubernetes' defaulting
        types = ["Ingress"] + (["Egress"] if "egress" in spec else [])
    for i, kind in enumerate(types):
        if kind not in TYPES:
            raise doc.fail(
                f"spec.policyTypes[{i}]",
                f"{kind!r} is not a policy type",
                "write Ingress and/or Egress",
            )
    if len(set(types)) != len(types):
        raise doc.fail("spec.policyTypes", "a policy type is listed twice", "list each once")
    rules: dict[str, list[PolicyRule]] = {}
    for direction, section in sections.items():
        peer_field = "from" if direction == "Ingress" else "to"
        rules[direction] = []
        for i, item in enumerate(section or []):
            where = f"spec.{direction.lower()}[{i}]"
            if item is None:
                item = {}
            if not isinstance(item, dict):
                raise doc.fail(where, "expected a mapping with ports and/or " + peer_field)
            _known(doc, where, item, ("ports", peer_field))
            peers = _list(doc, f"{where}.{peer_field}", item.get(peer_field))
            ports = _list(doc, f"{where}.ports", item.get("ports"))
            entities = [_peer(doc, f"{where}.{peer_field}[{j}]", p) for j, p in enumerate(peers)]
            protocols = [_k8s_port(doc, f"{where}.ports[{j}]", p) for j, p in enumerate(ports)]
            for entity in entities or [Entity()]:
                for protocol, port in protocols or [("", None)]:
                    target = Entity(ports=(port,)) if port else Entity()
                    if direction == "Ingress":
                        rule = PolicyRule("Allow", protocol, entity, target, i + 1)
                    else:
                        rule = PolicyRule(
                            "Allow",
                            protocol,
                            destination=Entity(
                                entity.selector,
                                entity.namespace_selector,
                                entity.nets,
                                entity.not_nets,
                                target.ports,
                            ),
                            number=i + 1,
                        )
                    rules[direction].append(rule)
    return Policy(
        "NetworkPolicy",
        namespace,
        name,
        selector,
        tuple(t for t in TYPES if t in types),
        tuple(rules["Ingress"]),
        tuple(rules["Egress"]),
        K8S_ORDER,
    )


# Calico's fields netsim does not model: read past with a note (any other key is a mistake)
CALICO_UNMODELLED = {
    "tier",
    "serviceAccountSelector",
    "doNotTrack",
    "preDNAT",
    "applyOnForward",
    "performanceHints",
    "ipVersion",
    "icmp",
    "notICMP",
    "notProtocol",
    "http",
    "metadata",
    "notSelector",
    "notPorts",
    "serviceAccounts",
    "services",
}


def _known(doc: Any, where: str, item: dict, keys: tuple) -> None:
    """Every key of a policy's part is one the API has, as kubectl's strict field validation
    requires: a misspelt field would otherwise leave a rule that selects everything or
    nothing. Calico's fields that netsim does not model are noted and read past."""
    for k in item:
        if k in keys:
            continue
        if doc.body.get("apiVersion") == CALICO and k in CALICO_UNMODELLED:
            doc.ignored.add(f"{doc.kind}.{re.sub(r'[0-9]+]', ']', where)}.{k}")
            continue
        raise doc.fail(
            f"{where}.{k}",
            f'unknown field "{k}"',
            f"the fields here are {', '.join(keys)}",
        )


def _list(doc: Any, where: str, value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.fail(where, f"expected a list, got {value!r}"[:120], f"write {where}: [...]")
    return value


def _label_selector(doc: Any, path: str, value: Any = ..., default: str = "all()") -> str:
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) in Calico's syntax."""
    from netsim.topology import parse_labels

    body = doc.get(path, {}, dict) if value is ... else value
    if not isinstance(body, dict):
        raise doc.fail(path, f"expected a label selector mapping, got {body!r}"[:120])
    _known(doc, path, body, ("matchLabels", "matchExpressions"))
    labels = body.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise doc.fail(f"{path}.matchLabels", "expected a mapping of label: value")
    try:
        labels = parse_labels(labels, f"{path}.matchLabels")
    except NetsimError as exc:
        raise doc.fail(f"{path}.matchLabels", str(exc).split(": ", 1)[-1]) from None
    expressions = _list(doc, f"{path}.matchExpressions", body.get("matchExpressions"))
    for i, item in enumerate(expressions):
        where = f"{path}.matchExpressions[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise doc.fail(where, "expected {key, operator, values}")
        op, values = item.get("operator"), item.get("values") or []
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise doc.fail(
                f"{where}.operator",
                f"{op!r} is not a valid selector operator",
                "use In, NotIn, Exists or DoesNotExist",
            )
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise doc.fail(f"{where}.values", "expected a list of strings")
        if op in ("In", "NotIn") and not values:
            raise doc.fail(
                f"{where}.values",
                "must be specified when `operator` is 'In' or 'NotIn'",
                "list the values",
            )
        if op in ("Exists", "DoesNotExist") and values:
            raise doc.fail(
                f"{where}.values",
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                "remove values",
            )
    if not labels and not expressions:
        return default
    return calico_selector.text(calico_selector.from_label_selector(labels, expressions))


def _peer(doc: Any, where: str, peer: Any) -> Entity:
    if not isinstance(peer, dict) or not peer:
        raise doc.fail(
            where,
            "must specify a peer",
            "give podSelector, namespaceSelector (or both), or ipBlock",
        )
    _known(doc, where, peer, ("podSelector", "namespaceSelector", "ipBlock"))
    if "ipBlock" in peer:
        if "podSelector" in peer or "namespaceSelector" in peer:
            raise doc.fail(
                where,
                "may not specify more than 1 peer type with ipBlock",
                "put ipBlock in a peer of its own",
            )
        block = peer["ipBlock"]
        if not isinstance(block, dict):
            raise doc.fail(f"{where}.ipBlock", "expected {cidr, except}")
        cidr = _cidr(doc, f"{where}.ipBlock.cidr", block.get("cidr"))
        excepts = []
        for i, text in enumerate(_list(doc, f"{where}.ipBlock.except", block.get("except"))):
            inner = _cidr(doc, f"{where}.ipBlock.except[{i}]", text)
            outer = ipaddress.ip_network(cidr)
            net = ipaddress.ip_network(inner)
            if not (net.subnet_of(outer) and net.prefixlen > outer.prefixlen):
                raise doc.fail(
                    f"{where}.ipBlock.except[{i}]",
                    f"must be a strict subset of `cidr` {cidr}",
                    "list only parts of the block",
                )
            excepts.append(inner)
        return Entity(nets=(cidr,), not_nets=tuple(excepts))
    pods = "podSelector" in peer
    spaces = "namespaceSelector" in peer
    selector = _label_selector(doc, f"{where}.podSelector", peer.get("podSelector") or {})
    if not spaces:
        return Entity(selector=selector)
    space = _label_selector(doc, f"{where}.namespaceSelector", peer.get("namespaceSelector") or {})
    return Entity(selector=selector if pods else "all()", namespace_selector=space)


def _cidr(doc: Any, where: str, text: Any) -> str:
    try:
        if not isinstance(text, str) or "/" not in text:
            raise ValueError
        return str(ipaddress.IPv4Network(text, strict=False))
    except ValueError:
        raise doc.fail(
            where, f"{text!r} is not an IPv4 CIDR", "write it as address/prefix, e.g. 10.0.0.0/8"
        ) from None


def _k8s_port(doc: Any, where: str, item: Any) -> tuple[str, PortRange | None]:
    if not isinstance(item, dict):
        raise doc.fail(where, "expected {protocol, port, endPort}")
    _known(doc, where, item, ("protocol", "port", "endPort"))
    protocol = item.get("protocol") or "TCP"
    if protocol not in PROTOCOLS:
        raise doc.fail(
            f"{where}.protocol", f"{protocol!r} is not a protocol", "use TCP, UDP or SCTP"
        )
    port, end = item.get("port"), item.get("endPort")
    if port is None:
        if end is not None:
            raise doc.fail(f"{where}.endPort", "may not be specified when `port` is not")
        return protocol, None
    if isinstance(port, str):
        if not _IANA.fullmatch(port):
            raise doc.fail(
                f"{where}.port",
                f"{port!r} is not a port name",
                "use a number from 1 to 65535, or a container port's name (at most 15 "
                "lowercase letters, digits and '-', with a letter)",
            )
        if end is not None:
            raise doc.fail(
                f"{where}.endPort",
                "may not be specified when `port` is non-numeric",
                "give port as a number",
            )
        return protocol, PortRange(name=port)
    first = _number(doc, f"{where}.port", port)
    last = first if end is None else _number(doc, f"{where}.endPort", end)
    if last < first:
        raise doc.fail(
            f"{where}.endPort", "must be greater than or equal to `port`", f"use at least {first}"
        )
    return protocol, PortRange(first, last)


def _number(doc: Any, where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise doc.fail(where, f"{value!r} is not a port", "use an integer from 1 to 65535")
    return value


# -- Calico's own --------------------------------------------------------------------------------


def _calico(doc: Any, namespace: str, name: str) -> Policy:
    kind = "CalicoNetworkPolicy" if doc.kind == "NetworkPolicy" else "GlobalNetworkPolicy"
    fields = ("order", "selector", "types", "ingress", "egress")
    if kind == "GlobalNetworkPolicy":
        fields += ("namespaceSelector",)
    _known(doc, "spec", doc.get("spec", {}, dict), fields)
    order = doc.get("spec.order", None, (int, float))
    selector = _selector(doc, "spec.selector", doc.get("spec.selector", "all()", str))
    spaces = ""
    if kind == "GlobalNetworkPolicy":
        spaces = _selector(doc, "spec.namespaceSelector", doc.get("spec.namespaceSelector", ""))
    rules = {}
    for direction in TYPES:
        path = f"spec.{direction.lower()}"
        rules[direction] = tuple(
            _calico_rule(doc, f"{path}[{i}]", item, i + 1)
            for i, item in enumerate(doc.get(path, [], list))
        )
    types = doc.get("spec.types", None, list)
    if types is None:  # Calico's defaulting
        types = (["Ingress"] if rules["Ingress"] or not rules["Egress"] else []) + (
            ["Egress"] if rules["Egress"] else []
        )
    for i, t in enumerate(types):
        if t not in TYPES:
            raise doc.fail(f"spec.types[{i}]", f"{t!r} is not a policy type", "use Ingress, Egress")
    return Policy(
        kind,
        namespace,
        name,
        selector,
        tuple(t for t in TYPES if t in types),
        rules["Ingress"],
        rules["Egress"],
        float(order) if order is not None else None,
        spaces,
    )


def _selector(doc: Any, where: str, text: Any) -> str:
    if text == "":
        return ""
    try:
        return calico_selector.text(calico_selector.parse(text))
    except NetsimError as exc:
        raise doc.fail(where, str(exc)) from None


def _calico_rule(doc: Any, where: str, item: Any, number: int) -> PolicyRule:
    if not isinstance(item, dict):
        raise doc.fail(where, "expected a rule mapping with action:")
    _known(doc, where, item, ("action", "protocol", "source", "destination"))
    action = item.get("action")
    if action not in ACTIONS:
        raise doc.fail(
            f"{where}.action", f"{action!r} is not an action", "use " + ", ".join(ACTIONS)
        )
    protocol = item.get("protocol") or ""
    if protocol and protocol not in PROTOCOLS:
        raise doc.fail(f"{where}.protocol", f"{protocol!r} is not a protocol", "use TCP, UDP, SCTP")
    sides = [_calico_entity(doc, f"{where}.{s}", item.get(s)) for s in ("source", "destination")]
    if not protocol and any(e.ports for e in sides):
        raise doc.fail(f"{where}.protocol", "ports need a protocol", "add protocol: TCP or UDP")
    return PolicyRule(action, protocol, sides[0], sides[1], number)


def _calico_entity(doc: Any, where: str, body: Any) -> Entity:
    if body is None:
        return Entity()
    if not isinstance(body, dict):
        raise doc.fail(where, "expected a mapping (selector, namespaceSelector, nets, ports)")
    _known(doc, where, body, ("selector", "namespaceSelector", "nets", "notNets", "ports"))
    ports = []
    for i, port in enumerate(_list(doc, f"{where}.ports", body.get("ports"))):
        if isinstance(port, str) and re.fullmatch(r"\d+:\d+", port):
            first, last = (_number(doc, f"{where}.ports[{i}]", int(p)) for p in port.split(":"))
            if last < first:
                raise doc.fail(
                    f"{where}.ports[{i}]",
                    f"range {port!r} ends before it starts",
                    f"write {last}:{first}",
                )
            ports.append(PortRange(first, last))
        elif isinstance(port, str):
            if not _IANA.fullmatch(port):
                raise doc.fail(f"{where}.ports[{i}]", f"{port!r} is not a port, range or name")
            ports.append(PortRange(name=port))
        else:
            number = _number(doc, f"{where}.ports[{i}]", port)
            ports.append(PortRange(number, number))
    return Entity(
        _selector(doc, f"{where}.selector", body.get("selector") or ""),
        _selector(doc, f"{where}.namespaceSelector", body.get("namespaceSelector") or ""),
        tuple(_cidr(doc, f"{where}.nets[{i}]", n) for i, n in enumerate(body.get("nets") or [])),
        tuple(
            _cidr(doc, f"{where}.notNets[{i}]", n) for i, n in enumerate(body.get("notNets") or [])
        ),
        tuple(ports),
    )


def from_body(body: dict) -> Policy:
    """A policy as the store holds it (checked when it was applied)."""
    from netsim.topology import document

    return from_document(document(body, "<store>"))
