"""Topology files (Kubernetes-shaped multi-document YAML) -> model.Cluster, validated.

Every rejection names the file, the document, the field and what to change, and happens before
anything touches the kernel. Fields netsim does not model are collected and reported once.

The YAML is read by a bounded loader: the file's size, the number of documents, the number of
values (aliases counted as expanded), the nesting depth and the length of integers are limited
while the node graph is composed, before any Python object is made, so that no input hangs or
exhausts the interpreter. What Kubernetes' API server would refuse is refused here too.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import urlsplit

import yaml
from netaddr import AddrFormatError, IPAddress, IPNetwork

from cni.spec import VERSIONS as CNI_VERSIONS
from netsim import modes, netpol, rollout
from netsim.errors import TopologyError
from netsim.model import (
    DEFAULT_NAMESPACE,
    HOSTNAME_PORT,
    KUBE_DNS,
    POD_NAMES,
    RESTART_POLICIES,
    SYSTEM_NAMESPACES,
    CalicoSpec,
    Cluster,
    Container,
    Datastore,
    Deployment,
    ExternalClient,
    Node,
    Pod,
    Probe,
    Segment,
    Service,
    ServicePort,
    object_key,
)
from netsim.modes import DEFAULT_MODE, MODES  # importing the modes does not load pyroute2

DEFAULTS = {
    "network": "10.244.0.0/16",
    "subnet_len": 24,
    "service_cidr": "10.96.0.0/12",
    "mtu": 1500,
}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # Service names
IANA_SVC_NAME = re.compile(r"(?=.{1,15}\Z)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")  # named ports
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
CNI_PLUGIN_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # an executable's file name
MAX_SEGMENT_NAME = 12  # the segment's bridge is br-<name>, and link names stop at 15
NODE_PORT_RANGE = (30000, 32767)
CALICO_POOL, CALICO_BLOCK = "192.168.0.0/16", 26  # Calico's default pool and block size
CNI_VERSION = "1.0.0"  # the newest that Debian's reference plugins accept in a chain
API_VERSIONS = {
    "Cluster": "netsim.dev/v1alpha1",
    "Pod": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "Namespace": "v1",
    "NetworkPolicy": netpol.K8S,  # or Calico's projectcalico.org/v3
    "GlobalNetworkPolicy": netpol.CALICO,
}
VERSIONS = {"NetworkPolicy": (netpol.K8S, netpol.CALICO)}  # kinds served by two groups
MIN_SERVICE_PREFIX = 12  # kube-apiserver: "for 32-bit addresses, the mask must be >= 12"
# Ranges whose addresses cannot be a pod's, a Service's or a node's: the kernel treats them
# specially (loopback, multicast), or Calico uses them (169.254.1.1 is every pod's gateway).
RESERVED = (
    ("0.0.0.0/8", "'this network'"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (Calico's pod gateway is 169.254.1.1)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_RESERVED = tuple((IPNetwork(cidr), what) for cidr, what in RESERVED)

# The loader's limits. PyYAML's pure-Python reader (kept over libyaml, so that messages are
# the same on every machine) takes up to 1.5 s per MiB, and every value some 30-50 µs: these
# bound the worst `parse` to under two seconds.
MAX_BYTES = 1 << 20  # 1 MiB
MAX_DOCUMENTS = 1000
MAX_VALUES = 20_000  # scalars, lists and mappings in the file, each alias counted as expanded
MAX_DEPTH = 50  # lists and mappings nested in each other
MAX_INT_DIGITS = 20  # an integer's digits; PyYAML would run int() on any length

_KNOWN = {
    "Namespace": {"apiVersion", "kind", "metadata", "metadata.name", "metadata.labels"},
    "Cluster": {
        "apiVersion",
        "kind",
        "metadata",
        "metadata.name",
        "spec",
        "spec.cni",
        "spec.cni.mode",
        "spec.cni.cniVersion",
        "spec.cni.plugins",
        "spec.cni.flannel",
        "spec.cni.flannel.Network",
        "spec.cni.calico",
        "spec.cni.calico.ipPool",
        "spec.cni.calico.ipPool.cidr",
        "spec.cni.calico.ipPool.blockSize",
        "spec.cni.calico.ipPool.ipipMode",
        "spec.cni.calico.ipPool.vxlanMode",
        "spec.cni.calico.ipPool.natOutgoing",
        "spec.cni.calico.ipipCarrier",
        "spec.cni.calico.bgp",
        "spec.cni.calico.bgp.asNumber",
        "spec.cni.calico.bgp.routeReflectors",
        "spec.cni.calico.bgp.peers",
        "spec.cni.flannel.SubnetLen",
        "spec.cni.flannel.leaseTTL",
        "spec.serviceCIDR",
        "spec.underlay",
        "spec.kubeProxy",
        "spec.kubeProxy.mode",
        "spec.underlay.mtu",
        "spec.underlay.segments",
        "spec.nodes",
        "spec.externalClients",
        "spec.datastore",
        "spec.datastore.etcd",
        "spec.datastore.etcd.endpoints",
        "spec.datastore.etcd.netns",
        "spec.controlPlane",
        "spec.controlPlane.nodeMonitorGracePeriod",
        "spec.controlPlane.podEvictionTimeout",
        "spec.controlPlane.podNames",
        "spec.loadBalancer",
        "spec.loadBalancer.addresses",
    },
    "Pod": {
        "apiVersion",
        "kind",
        "metadata",
        "metadata.name",
        "metadata.namespace",
        "metadata.labels",
        "spec",
        "spec.nodeName",
        "spec.containers",
        "spec.initContainers",
        "spec.restartPolicy",
        "spec.enableServiceLinks",
    },
    "Deployment": {
        "apiVersion",
        "kind",
        "metadata",
        "metadata.name",
        "metadata.namespace",
        "metadata.labels",
        "spec",
        "metadata.annotations",
        "spec.replicas",
        "spec.selector",
        "spec.selector.matchLabels",
        "spec.strategy",
        "spec.strategy.type",
        "spec.strategy.rollingUpdate",
        "spec.strategy.rollingUpdate.maxSurge",
        "spec.strategy.rollingUpdate.maxUnavailable",
        "spec.minReadySeconds",
        "spec.revisionHistoryLimit",
        "spec.progressDeadlineSeconds",
        "spec.paused",
        "spec.template",
        "spec.template.metadata",
        "spec.template.metadata.labels",
        "spec.template.metadata.annotations",
        "spec.template.spec",
        "spec.template.spec.nodeName",
        "spec.template.spec.containers",
        "spec.template.spec.initContainers",
        "spec.template.spec.restartPolicy",
        "spec.template.spec.enableServiceLinks",
    },
    "Service": {
        "apiVersion",
        "kind",
        "metadata",
        "metadata.name",
        "metadata.namespace",
        "metadata.labels",
        "spec",
        "spec.type",
        "spec.selector",
        "spec.ports",
        "spec.clusterIP",
        "spec.sessionAffinity",
        "spec.sessionAffinityConfig",
        "spec.sessionAffinityConfig.clientIP",
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        "spec.externalTrafficPolicy",
        "spec.internalTrafficPolicy",
        "spec.healthCheckNodePort",
        "spec.loadBalancerIP",
    },
}
# a policy's spec is read, strictly, by netsim/netpol.py
_POLICY_KEYS = {"apiVersion", "kind", "metadata", "metadata.name", "metadata.namespace", "spec"}
_KNOWN["NetworkPolicy"] = _POLICY_KEYS
_KNOWN["GlobalNetworkPolicy"] = _POLICY_KEYS - {"metadata.namespace"}
_CONTAINER_KEYS = {"name", "ports", "command", "args", "image", "env", "readinessProbe"}
_PROBE_KEYS = {
    "httpGet",
    "tcpSocket",
    "exec",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
}
IANA_FIX = (
    "use at most 15 lowercase letters, digits and '-', with a letter, no '-' at either "
    "end or twice in a row (IANA_SVC_NAME)"
)


_YAML = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class _Refused(yaml.MarkedYAMLError):
    """The loader refuses input that is valid YAML: a limit, or a feature netsim does not read."""

    def __init__(self, problem: str, mark: Any, fix: str, field: str = ""):
        super().__init__(problem=problem, problem_mark=mark)
        self.fix, self.field = fix, field


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with budgets checked while the node graph is composed (before any
    Python object is constructed), the field path kept for the error, and Kubernetes' reading
    of scalars: a duplicate key is an error, and 1:20 or 2001-12-14 are strings (go-yaml has
    no base-60 numbers, and Kubernetes' YAML-to-JSON step leaves timestamps as text)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.documents = 0
        self.values = 0  # composed so far in the file, aliases counted as expanded
        self.sizes: dict[str, int] = {}  # anchor -> the number of values it expands to
        self.parts: list[str] = []  # the field path of the node being composed

    def field(self) -> str:
        return "".join(self.parts).lstrip(".")

    def compose_document(self) -> Any:
        self.documents += 1
        if self.documents > MAX_DOCUMENTS:
            raise _Refused(
                f"more than {MAX_DOCUMENTS} documents",
                self.peek_event().start_mark,
                "use Deployments with replicas instead of many Pod documents, or split the file",
            )
        self.sizes = {}  # anchors are per document
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(index, int):
            self.parts.append(f"[{index}]")
        elif isinstance(index, yaml.ScalarNode):  # a mapping's value: index is its key
            self.parts.append("." + _key(index.value))
        else:  # the document, or a mapping's key
            self.parts.append("")
        try:
            if isinstance(event, yaml.AliasEvent):
                return self._alias(event, parent, index)
            if len(self.parts) > MAX_DEPTH:
                raise _Refused(
                    f"values nested more than {MAX_DEPTH} deep",
                    event.start_mark,
                    "flatten the structure",
                    _short(self.field(), 80),
                )
            if event.tag not in (None, "!") and event.tag not in _PLAIN_TAGS:
                tag = event.tag.replace(_YAML, "!!", 1)
                raise _Refused(
                    f"the YAML tag {_short(tag, 60)} is not supported",
                    event.start_mark,
                    "remove the tag: netsim reads plain "
                    "strings, numbers, booleans, lists and mappings",
                    self.field(),
                )
            before = self.values
            self._count(1, event.start_mark)
            node = super().compose_node(parent, index)
            if event.anchor is not None:
                self.sizes[event.anchor] = self.values - before
            if isinstance(node, yaml.MappingNode):
                self._unique_keys(node)
            elif isinstance(node, yaml.ScalarNode) and node.tag == _YAML + "int":
                digits = len(node.value.replace("_", "").lstrip("+-"))
                if digits > MAX_INT_DIGITS:
                    raise _Refused(
                        f"an integer of {digits} digits",
                        node.start_mark,
                        f"netsim reads integers of up to {MAX_INT_DIGITS} digits",
                        self.field(),
                    )
            return node
        finally:
            self.parts.pop()

    def _alias(self, event: yaml.AliasEvent, parent: Any, index: Any) -> Any:
        if event.anchor in self.anchors and event.anchor not in self.sizes:
            raise _Refused(
                f"the alias *{_short(event.anchor, 40)} refers to a value that contains it",
                event.start_mark,
                "write the value out: a topology cannot be recursive",
                self.field(),
            )
        node = super().compose_node(parent, index)  # an undefined alias is PyYAML's error
        self._count(self.sizes[event.anchor], event.start_mark, event.anchor)
        return node

    def _count(self, values: int, mark: Any, alias: str = "") -> None:
        self.values += values
        if self.values > MAX_VALUES:
            raise _Refused(
                f"the file holds more than {MAX_VALUES} values"
                + (f" once the alias *{_short(alias, 40)} is expanded" if alias else ""),
                mark,
                "write aliases out, and use Deployments with replicas instead of long lists",
                self.field(),
            )

    def _unique_keys(self, node: yaml.MappingNode) -> None:
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _YAML + "merge":
                if (key.tag, key.value) in seen:
                    field = ".".join(p for p in (self.field(), _key(key.value)) if p)
                    raise _Refused(
                        f"the key {_short(key.value, 40)!r} appears twice in one mapping",
                        key.start_mark,
                        "keep one of them",
                        field,
                    )
                seen.add((key.tag, key.value))


def _lenient(tag: str, what: str) -> None:
    """Make PyYAML's constructor for `tag` refuse malformed text (!!int x, 0b_, !!bool maybe)
    with a YAML error instead of a ValueError or KeyError, and read base 60 as a string."""
    construct = _Loader.yaml_constructors[_YAML + tag]

    def checked(loader: _Loader, node: yaml.ScalarNode) -> Any:
        if what == "number" and isinstance(node.value, str) and ":" in node.value:
            return loader.construct_scalar(node)
        try:
            return construct(loader, node)
        except (ValueError, KeyError, TypeError, OverflowError):
            raise yaml.constructor.ConstructorError(
                None, None, f"{_short(node.value, 40)!r} is not a valid {tag}", node.start_mark
            ) from None

    _Loader.add_constructor(_YAML + tag, checked)


for _tag in ("int", "float"):
    _lenient(_tag, "number")
_lenient("bool", "bool")
_Loader.add_constructor(_YAML + "timestamp", yaml.SafeLoader.construct_scalar)


def _short(value: Any, limit: int = 60) -> str:
    """str(value), cut to `limit` characters."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _choices(names: Any, limit: int = 10) -> str:
    """Names for a message: the first `limit` of them, and how many more."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _show(value: Any, limit: int = 60) -> str:
    """repr(value) for an error message: one line, cut to `limit` characters."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]  # no repr of a megabyte
    return _short(repr(value), limit)


def _too_large(file: str) -> TopologyError:
    return TopologyError(
        file,
        "file",
        "",
        f"is larger than {MAX_BYTES >> 20} MiB",
        f"netsim reads topology files of up to {MAX_BYTES >> 20} MiB: use Deployments with "
        "replicas instead of many Pod documents",
    )


def _read_yaml(text: str, file: str) -> list:
    """The non-empty documents of the text, or a TopologyError naming the line."""
    if len(text) > MAX_BYTES:
        raise _too_large(file)
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses characters YAML does not allow at once
        bodies = []
        while loader.check_data():
            body = loader.get_data()
            if body is not None:
                bodies.append(body)
        return bodies
    except _Refused as exc:
        raise TopologyError(
            file, _where(exc.problem_mark), exc.field, exc.problem, exc.fix
        ) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[0])
        raise TopologyError(
            file,
            f"YAML at line {line}, column {column}",
            "",
            f"the character U+{char:04X} is not allowed ({exc.reason})",
            "remove it, or write it as an escape inside double quotes",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or _short(exc, 200)
        raise TopologyError(
            file,
            _where(mark),
            "",
            f"malformed YAML: {problem}",
            "fix the syntax there (indentation, a missing ':' or quote)",
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _where(mark: Any) -> str:
    return f"YAML at line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"


class _Doc:
    """One YAML document being read: knows how to phrase an error about itself."""

    def __init__(self, file: str, index: int, body: dict, ignored: set[str]):
        self.file, self.index, self.body, self.ignored = file, index, body, ignored
        kind = body.get("kind")
        self.kind = kind if isinstance(kind, str) else ""
        meta = body.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        name = (
            (name if DNS1123_LABEL.fullmatch(name) else _show(name, 40))
            if isinstance(name, str)
            else ""
        )
        what = _short(self.kind, 40) if self.kind.isprintable() else _show(self.kind, 40)
        self.label = f"document {index} ({what or 'no kind'}{' ' + name if name else ''})"
        self._note_ignored(body, "")

    def _note_ignored(self, node: Any, prefix: str) -> None:
        known = _KNOWN.get(self.kind, set())
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            path = f"{prefix}{_key(key)}"
            if path not in known:
                self.ignored.add(f"{self.kind or 'no kind'}.{path}")
            elif any(k.startswith(path + ".") for k in known):
                self._note_ignored(value, path + ".")

    def fail(self, field: str, problem: str, fix: str = "") -> TopologyError:
        return TopologyError(self.file, self.label, field, problem, fix)

    def get(self, path: str, default: Any = None, kind: type | tuple = object) -> Any:
        node: Any = self.body
        for part in path.split("."):
            if not isinstance(node, dict):
                raise self.fail(path, f"expected a mapping above '{part}'")
            if part not in node or node[part] is None:
                return default
            node = node[part]
        if (
            kind is not object
            and not isinstance(node, kind)
            or (isinstance(node, bool) and kind in (int, (int,)))
        ):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(path, f"expected {_noun(names)}, got {_show(node)}")
        return node

    def choice(self, path: str, choices: tuple, default: str, problem: str, fix: str) -> str:
        """A field that takes one of `choices`; `problem` names the value given at {}."""
        value = self.get(path, default, str)
        if value not in choices:
            raise self.fail(path, problem.format(_show(value)), fix)
        return value

    def name(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not DNS1123_LABEL.fullmatch(value):
            raise self.fail(
                field,
                f"{_show(value)} is not a DNS-1123 label",
                "use lowercase letters, digits and '-', start and end with a letter "
                "or digit, at most 63 characters",
            )
        return value

    def cidr(self, value: Any, field: str) -> IPNetwork:
        net = _ipv4(value, cidr=True)
        if net is None:
            raise self.fail(
                field,
                f"{_show(value)} is not an IPv4 CIDR",
                "write it as address/prefix, e.g. 10.244.0.0/16",
            )
        if net.ip != net.network:
            raise self.fail(field, f"{value} has host bits set", f"use {net.cidr}")
        for reserved, what in _RESERVED:
            if net.first <= reserved.last and reserved.first <= net.last:
                raise self.fail(
                    field,
                    f"{net} overlaps {reserved}, which is {what}",
                    "use a private range: 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16",
                )
        return net

    def address(self, value: Any, field: str) -> IPAddress:
        addr = _ipv4(value)
        if addr is None:
            raise self.fail(
                field,
                f"{_show(value)} is not an IPv4 address",
                "write it as four decimal numbers, e.g. 10.96.0.10",
            )
        return addr


def _ipv4(value: Any, cidr: bool = False) -> Any:
    """An IPv4 address (or, with cidr, address/prefix) as netaddr reads it, or None: only a
    string of four decimal numbers, as Kubernetes parses it (netaddr alone would take 10/8)."""
    pattern = r"\d{1,3}(\.\d{1,3}){3}" + (r"/\d{1,2}" if cidr else "")
    if not isinstance(value, str) or not re.fullmatch(pattern, value, re.ASCII):
        return None
    try:
        return IPNetwork(value) if cidr else IPAddress(value)
    except (AddrFormatError, ValueError, TypeError):
        return None


def _key(key: Any) -> str:
    """A mapping key as a field path shows it."""
    return key if isinstance(key, str) and len(key) <= 40 and key.isprintable() else _show(key, 40)


def _noun(name: str) -> str:
    return {"dict": "a mapping", "list": "a list", "str": "a string", "int": "an integer"}.get(
        name, name
    )


def load(file: str, overrides: dict | None = None) -> tuple[Cluster, list[str]]:
    """Read and validate a topology file; return the cluster and the notes about ignored fields.
    `overrides` are what `netsim scale`, `expose` and `delete pod` changed on top of the
    file, and the objects applied from files of their own (`objects`)."""
    return parse(_text(file), file, overrides)


def documents(file: str) -> list:
    """The YAML documents of a file, read as a topology file is (limits, clear errors)."""
    return _read_yaml(_text(file), file)


def object_id(body: Any) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of a Kubernetes object document; None for anything else."""
    meta = body.get("metadata") if isinstance(body, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    kind = str(body.get("kind"))
    if body.get("apiVersion") == netpol.CALICO and kind == "NetworkPolicy":
        kind = "NetworkPolicy.projectcalico.org"  # not the Kubernetes policy of that name
    return kind, str(namespace), meta["name"]


def _text(file: str) -> str:
    try:
        with open(file, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise TopologyError(
            file, "file", "", f"cannot read it: {exc.strerror}", "check the path given to -f"
        ) from None
    except ValueError as exc:  # a NUL in the path
        raise TopologyError(
            file, "file", "", f"cannot read it: {exc}", "check the path given to -f"
        ) from None
    if len(data) > MAX_BYTES:
        raise _too_large(file)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TopologyError(
            file,
            "file",
            "",
            f"is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}",
            "save the file as UTF-8",
        ) from None
    return text


def with_overrides(bodies: list, overrides: dict | None) -> list:
    """The documents with imperative changes on top: replicas per Deployment (scale), extra
    Service documents (expose), objects applied from files without a Cluster document."""
    if not overrides:
        return bodies

    services = {object_id(b) for b in bodies}
    bodies = bodies + [s for s in overrides.get("services", []) if object_id(s) not in services]
    # objects applied from files of their own replace the file's of the same kind and name
    applied = {object_id(o): o for o in overrides.get("objects", [])}
    deleted = {tuple(i) for i in overrides.get("deleted", [])}  # `netsim delete KIND NAME`
    kept = [b for b in bodies if object_id(b) not in applied]
    bodies = [b for b in kept + list(applied.values()) if object_id(b) not in deleted]
    # `set image`, `rollout undo|restart|pause|resume`, `label`: on the objects as merged
    changed = {key: overrides.get(key, {}) for key in ("replicas", "templates", "paused", "labels")}
    if any(changed.values()):
        bodies = [_changed(b, changed) for b in bodies]
    return bodies


def _changed(body: Any, changed: dict) -> Any:
    """A document with the imperative changes on top: a Deployment's replicas, template or
    pause, an object's labels (a key with value None: the label removed, as `label k-` does)."""
    found = object_id(body)
    if found is None:
        return body
    body = json.loads(json.dumps(body))
    key = object_key(found[1], found[2])
    if found[0] == "Deployment" and key in changed["replicas"] and body.get("spec") is None:
        body["spec"] = {}
    if found[0] == "Deployment" and isinstance(body.get("spec"), dict):  # else the loader says
        if key in changed["replicas"]:
            body["spec"]["replicas"] = changed["replicas"][key]
        if key in changed["templates"]:
            body["spec"]["template"] = changed["templates"][key]
        if key in changed["paused"]:
            body["spec"]["paused"] = changed["paused"][key]
    labels = changed["labels"].get(f"{found[0]}/{key}")
    if labels:
        meta = body["metadata"]
        merged = {**(meta.get("labels") or {}), **labels}
        meta["labels"] = {k: v for k, v in merged.items() if v is not None}
    return body


def parse(
    text: str, file: str = "<topology>", overrides: dict | None = None
) -> tuple[Cluster, list[str]]:
    """Validate the text of a topology file (see `load`)."""
    bodies = with_overrides(_read_yaml(text, file), overrides)
    ignored: set[str] = set()
    docs = []
    for i, body in enumerate(bodies, 1):
        if not isinstance(body, dict):
            raise TopologyError(
                file,
                f"document {i}",
                "",
                "a document must be a mapping",
                "start it with apiVersion:, kind:, metadata:",
            )
        docs.append(_Doc(file, i, body, ignored))
    for doc in docs:
        if doc.kind not in _KNOWN:
            raise doc.fail(
                "kind",
                f"unknown kind {_show(doc.body.get('kind'))}",
                "netsim reads Cluster, Namespace, Pod, Deployment, Service, NetworkPolicy and "
                "GlobalNetworkPolicy documents",
            )
        version = doc.body.get("apiVersion")
        if version not in VERSIONS.get(doc.kind, (API_VERSIONS[doc.kind],)):
            raise doc.fail(
                "apiVersion",
                f"{doc.kind} is served as {API_VERSIONS[doc.kind]}, not {_show(version)}",
                f"write apiVersion: {API_VERSIONS[doc.kind]}",
            )
    clusters = [d for d in docs if d.kind == "Cluster"]
    if len(clusters) != 1:
        raise TopologyError(
            file,
            "file",
            "kind",
            f"found {len(clusters)} Cluster documents",
            "a topology file holds exactly one Cluster document",
        )
    cluster = _cluster(clusters[0])
    cluster.namespaces = _namespaces([d for d in docs if d.kind == "Namespace"])
    pods: list[tuple[Pod, _Doc]] = []
    for doc in docs:
        if doc.kind == "Pod":
            pods.append((_pod(doc, cluster), doc))
        elif doc.kind == "Deployment":
            deployment, made = _deployment(doc, cluster)
            cluster.deployments.append(deployment)
            pods.extend((p, doc) for p in made)
        elif doc.kind == "Service":
            cluster.services.append(_service(doc, cluster))
        elif doc.kind in netpol.KINDS:
            cluster.policies.append(_policy(doc, cluster))
    _unique([(p.key, d) for p, d in pods], "metadata.name", "pod")
    pod_docs = {p.key: d for p, d in pods}
    pods = [p for p, _ in pods]
    deleted = set((overrides or {}).get("deleted_pods", []))  # `netsim delete pod`
    cluster.pods = [p for p in pods if p.key not in deleted]
    _check_pod_room(cluster, pod_docs)
    _unique(
        [
            (s.key, d)
            for s, d in zip(cluster.services, [d for d in docs if d.kind == "Service"], strict=True)
        ],
        "metadata.name",
        "service",
    )
    # pods with the same labels and containers match alike: one of each stands for all
    alike = list(
        {(p.namespace, frozenset(p.labels.items()), p.containers): p for p in pods}.values()
    )
    templates = [
        d.get("spec.template.metadata.labels", {}, dict) for d in docs if d.kind == "Deployment"
    ]  # a Deployment scaled to 0 still counts
    for svc, doc in zip(cluster.services, [d for d in docs if d.kind == "Service"], strict=True):
        matched = [
            p
            for p in alike
            if p.namespace == svc.namespace
            and all(p.labels.get(k) == v for k, v in svc.selector.items())
        ]
        if (
            svc.selector
            and not matched
            and not any(all(t.get(k) == v for k, v in svc.selector.items()) for t in templates)
        ):
            ignored.add(
                f"warning: the selector {_show(svc.selector, 120)} of Service {svc.name} "
                "matches no pod: it has no endpoints"
            )
        for i, port in enumerate(svc.ports):
            if isinstance(port.target_port, str) and not any(
                p.named_port(port.target_port) for p in matched
            ):
                raise doc.fail(
                    f"spec.ports[{i}].targetPort",
                    f"no container of the selected pods declares a port named {port.target_port!r}",
                    "name a containerPort so (ports: [{name: ..., containerPort: "
                    "...}]) or use the port number",
                )
    _check_node_ports(cluster, [d for d in docs if d.kind == "Service"])
    _check_cluster_ips(cluster, [d for d in docs if d.kind == "Service"], clusters[0])
    cluster.source = file
    warnings = sorted(n for n in ignored if n.startswith("warning: "))
    ignored -= set(warnings)
    notes = (
        [f"ignoring fields netsim does not model: {_choices(sorted(ignored), 30)}"]
        if ignored
        else []
    ) + warnings
    return cluster, notes


def _policy(doc: _Doc, cluster: Cluster) -> netpol.Policy:
    if doc.kind == "NetworkPolicy":
        _namespace(doc, cluster)  # one that exists
    policy = netpol.from_document(doc)
    key = netpol.key(policy.kind, policy.namespace, policy.name)
    if any(netpol.key(p.kind, p.namespace, p.name) == key for p in cluster.policies):
        raise doc.fail(
            "metadata.name",
            f"duplicate {policy.title}",
            "give each policy of a namespace its own name",
        )
    return policy


def document(body: dict, file: str) -> _Doc:
    """A document read as a topology file's would be (for objects the store holds)."""
    return _Doc(file, 0, body, set())


def _unique(items: list[tuple[str, _Doc]], field: str, what: str) -> None:
    seen: dict[str, _Doc] = {}
    for key, doc in items:
        if key in seen:
            namespace, _, name = key.rpartition(".")
            where = f" in namespace {namespace}" if namespace else ""
            raise doc.fail(
                field,
                f"duplicate {what} name {name!r}{where} (also in {seen[key].label})",
                f"give each {what} its own name",
            )
        seen[key] = doc


def _namespaces(docs: list[_Doc]) -> dict[str, dict[str, str]]:
    """Namespace documents: name -> labels (with kubernetes.io/metadata.name, which the API
    server sets on every namespace)."""
    found: dict[str, dict[str, str]] = {}
    for doc in docs:
        name = doc.name(doc.get("metadata.name"), "metadata.name")
        if name in found or name in SYSTEM_NAMESPACES:
            raise doc.fail(
                "metadata.name",
                f"namespace {name!r} exists already"
                + (" (every cluster has it)" if name in SYSTEM_NAMESPACES else ""),
                "declare each namespace once; default and kube-system need no document",
            )
        found[name] = _labels(doc, "metadata.labels") | {"kubernetes.io/metadata.name": name}
    return found


def _namespace(doc: _Doc, cluster: Cluster) -> str:
    """metadata.namespace of a Pod, Deployment or Service: one that exists."""
    namespace = doc.get("metadata.namespace", DEFAULT_NAMESPACE, str)
    namespace = doc.name(namespace, "metadata.namespace")
    if namespace not in SYSTEM_NAMESPACES and namespace not in cluster.namespaces:
        raise doc.fail(
            "metadata.namespace",
            f'namespaces "{namespace}" not found',
            f"add a Namespace document (apiVersion: v1, kind: Namespace, metadata: "
            f"{{name: {namespace}}}), or use one of: "
            f"{_choices([*SYSTEM_NAMESPACES, *cluster.namespaces])}",
        )
    return namespace


def _cluster(doc: _Doc) -> Cluster:
    name = doc.name(doc.get("metadata.name", kind=str), "metadata.name")
    mode = doc.get("spec.cni.mode", DEFAULT_MODE, str)
    if mode not in MODES:
        raise doc.fail(
            "spec.cni.mode", f"unknown mode {_show(mode)}", f"use one of: {', '.join(MODES)}"
        )
    calico = modes.get(mode).family == "calico"
    other = "spec.cni.flannel" if calico else "spec.cni.calico"
    if doc.get(other) is not None:  # present, even as {}: it would be silently ignored
        raise doc.fail(
            other,
            f"mode {mode} does not read {other.rsplit('.', 1)[1]} settings",
            f"remove {other}, or use a {other.rsplit('.', 1)[1]}-* mode",
        )
    if calico:
        network_field, len_field = "spec.cni.calico.ipPool.cidr", "spec.cni.calico.ipPool.blockSize"
        network = doc.cidr(doc.get(network_field, CALICO_POOL), network_field)
        subnet_len = doc.get(len_field, CALICO_BLOCK, int)
        if not 20 <= subnet_len <= 32 or subnet_len <= network.prefixlen:
            raise doc.fail(
                len_field,
                f"block size {subnet_len} is out of range",
                f"use 20 to 32, longer than the pool's /{network.prefixlen} "
                "(Calico's default is 26)",
            )
    else:
        network_field, len_field = "spec.cni.flannel.Network", "spec.cni.flannel.SubnetLen"
        network = doc.cidr(doc.get(network_field, DEFAULTS["network"]), network_field)
        subnet_len = doc.get(len_field, DEFAULTS["subnet_len"], int)
        if not network.prefixlen < subnet_len <= 28:
            raise doc.fail(
                len_field,
                f"{subnet_len} does not fit Network {network}",
                f"use a length between {network.prefixlen + 1} and 28",
            )
    lease_ttl = _seconds(
        doc, "spec.cni.flannel.leaseTTL", 86400, 10, "flannel's own is 86400, 24 h"
    )
    node_grace = _seconds(
        doc,
        "spec.controlPlane.nodeMonitorGracePeriod",
        40,
        2,
        "Kubernetes' default is 40",
        most=3600,
    )
    eviction_timeout = _seconds(
        doc,
        "spec.controlPlane.podEvictionTimeout",
        300,
        2,
        "Kubernetes' default is 300",
        most=3600,
    )
    service_cidr = doc.cidr(
        doc.get("spec.serviceCIDR", DEFAULTS["service_cidr"]), "spec.serviceCIDR"
    )
    if service_cidr.prefixlen < MIN_SERVICE_PREFIX:
        raise doc.fail(
            "spec.serviceCIDR",
            f"{service_cidr} is larger than kube-apiserver accepts",
            f"use a /{MIN_SERVICE_PREFIX} or longer (the default is {DEFAULTS['service_cidr']})",
        )
    if service_cidr.prefixlen > 28:
        raise doc.fail(
            "spec.serviceCIDR",
            f"{service_cidr} has no 10th address for kube-dns (the cluster DNS)",
            f"use a /28 or larger (the default is {DEFAULTS['service_cidr']})",
        )
    mtu = doc.get("spec.underlay.mtu", DEFAULTS["mtu"], int)
    if not 1280 <= mtu <= 9000:
        raise doc.fail("spec.underlay.mtu", f"{mtu} is out of range", "use 1280 to 9000")
    segments = _segments(doc)
    nets = [
        (f"spec.underlay.segments[{i}].subnet", IPNetwork(s.subnet)) for i, s in enumerate(segments)
    ]
    nets += [(network_field, network), ("spec.serviceCIDR", service_cidr)]
    pair = _first_overlap([net for _, net in nets])
    if pair:
        (field_a, a), (field_b, b) = nets[pair[0]], nets[pair[1]]
        raise doc.fail(
            field_b, f"{b} overlaps {a} ({field_a})", "choose ranges that do not overlap"
        )
    nodes = _hosts(doc, "spec.nodes", segments, Node)
    if not nodes:
        raise doc.fail(
            "spec.nodes",
            "a cluster needs at least one node",
            "add nodes: [{name: worker-1, segment: ...}]",
        )
    clients = _hosts(doc, "spec.externalClients", segments, ExternalClient)
    calico_spec = _calico(doc, mode, segments, nodes) if calico else None
    if calico:
        clients += _bgp_peers(doc, mode, segments, calico_spec.asn)
    _unique([(h.name, doc) for h in nodes + clients], "spec.nodes", "node or external client")
    datastore = _datastore(doc)
    master_ip = _assign_ips(doc, segments, nodes, clients, datastore.own)
    datastore = replace(datastore, master_ip=master_ip)
    lb_addresses = _lb_addresses(doc, segments, [*nodes, *clients], master_ip)
    available = 2 ** (subnet_len - network.prefixlen) - 1  # flannel's SubnetMin skips the first
    if not calico and len(nodes) > available:
        raise doc.fail(
            "spec.cni.flannel.Network",
            f"{network} holds {available} /{subnet_len} subnets for {len(nodes)} nodes",
            "use a larger Network or SubnetLen",
        )
    blocks = 2 ** (subnet_len - network.prefixlen)
    if calico and len(nodes) > blocks:
        raise doc.fail(
            network_field,
            f"{network} holds {blocks} /{subnet_len} blocks for "
            f"{len(nodes)} nodes (each node claims a block of its own)",
            "use a larger pool or a longer blockSize",
        )
    cni_version, plugins = _chain(doc)
    proxy_mode = doc.choice(
        "spec.kubeProxy.mode",
        ("nftables", "userspace"),
        "nftables",
        "unknown kube-proxy mode {}",
        "use nftables (the default) or userspace",
    )
    cluster = Cluster(
        name=name,
        mode=mode,
        pod_network=str(network),
        subnet_len=subnet_len,
        service_cidr=str(service_cidr),
        mtu=mtu,
        segments=segments,
        nodes=[replace(n) for n in nodes],
        clients=clients,
        calico=calico_spec,
        cni_version=cni_version,
        cni_plugins=plugins,
        proxy_mode=proxy_mode,
        datastore=datastore,
        lease_ttl=lease_ttl,
        node_grace=node_grace,
        eviction_timeout=eviction_timeout,
        lb_addresses=lb_addresses,
    )
    cluster.pod_names = doc.choice(
        "spec.controlPlane.podNames",
        POD_NAMES,
        "ReplicaSet",
        "{} is not a way to name pods",
        "use ReplicaSet (<replicaset>-<5 chars>, rolling updates) or Ordinal (<name>-0, "
        "<name>-1, ...; a new template replaces the pods in place)",
    )
    for warning in modes.get(mode).validate(cluster, doc.fail):
        doc.ignored.add(f"warning: {warning}")
    return cluster


ENCAP_MODES = ("Always", "CrossSubnet", "Never")


def _calico(doc: _Doc, mode: str, segments: list[Segment], nodes: list[Node]) -> CalicoSpec:
    """The pool's encapsulation per mode, and the BGP settings, checked against each other."""
    base = "spec.cni.calico.ipPool."
    data_plane = modes.get(mode)
    settings = {"ipip_mode": "ipipMode", "vxlan_mode": "vxlanMode"}
    own_setting = getattr(data_plane, "encap_setting", "")  # what this mode encapsulates by
    ipip = doc.get(base + "ipipMode", "Always" if own_setting == "ipip_mode" else "Never", str)
    vxlan = doc.get(base + "vxlanMode", "Always" if own_setting == "vxlan_mode" else "Never", str)
    for field, value in (("ipipMode", ipip), ("vxlanMode", vxlan)):
        if value not in ENCAP_MODES:
            raise doc.fail(
                base + field,
                f"{_show(value)} is not an encapsulation mode",
                f"use one of {', '.join(ENCAP_MODES)}",
            )
    values = {"ipip_mode": ipip, "vxlan_mode": vxlan}
    if own_setting:
        field = settings[own_setting]
        other = next(s for s in settings if s != own_setting)
        if values[own_setting] == "Never":
            raise doc.fail(
                base + field,
                f"{mode} with {field} Never carries nothing",
                "use Always or CrossSubnet, or a mode that routes without "
                "encapsulation for plain routing",
            )
        if values[other] != "Never":
            raise doc.fail(
                base + settings[other],
                f"{mode} encapsulates with one protocol only",
                f"set {settings[other]} to Never",
            )
    elif (ipip, vxlan) != ("Never", "Never"):
        raise doc.fail(
            base + ("ipipMode" if ipip != "Never" else "vxlanMode"),
            f"{mode} routes without encapsulation",
            "set it to Never, or use a Calico mode that encapsulates",
        )
    if "CrossSubnet" in (ipip, vxlan) and len(segments) < 2:
        doc.ignored.add(
            "warning: CrossSubnet with a single underlay segment encapsulates "
            "nothing (every peer is on the same subnet)"
        )
    asn = doc.get("spec.cni.calico.bgp.asNumber", 64512, int)
    if not 1 <= asn <= 4294967295:
        raise doc.fail(
            "spec.cni.calico.bgp.asNumber",
            f"AS number {asn} is out of range",
            "use 1 to 4294967295 (Calico's default is 64512)",
        )
    reflectors = doc.get("spec.cni.calico.bgp.routeReflectors", [], list)
    names = {n.name for n in nodes}
    for i, name in enumerate(reflectors):
        if not isinstance(name, str) or name not in names:
            raise doc.fail(
                f"spec.cni.calico.bgp.routeReflectors[{i}]",
                f"{_show(name)} is not a node",
                f"use node names: {_choices(sorted(names))}",
            )
    if reflectors and not data_plane.bgp:
        raise doc.fail(
            "spec.cni.calico.bgp.routeReflectors",
            f"{mode} runs no BGP",
            "route reflectors need mode calico-bgp",
        )
    carrier = doc.get("spec.cni.calico.ipipCarrier", "auto", str)
    if carrier not in ("auto", "kernel", "ebpf", "userspace"):
        raise doc.fail(
            "spec.cni.calico.ipipCarrier",
            f"unknown carrier {_show(carrier)}",
            "use auto, kernel, ebpf or userspace",
        )
    return CalicoSpec(
        ipip_mode=ipip,
        vxlan_mode=vxlan,
        ipip_carrier=carrier,
        nat_outgoing=doc.get(base + "natOutgoing", True, bool),
        asn=asn,
        reflectors=tuple(reflectors),
    )


def _bgp_peers(doc: _Doc, mode: str, segments: list[Segment], own_asn: int) -> list[ExternalClient]:
    """Top-of-rack routers: external hosts with their own AS number."""
    path = "spec.cni.calico.bgp.peers"
    raw = doc.get(path, [], list)
    if raw and not modes.get(mode).bgp:
        raise doc.fail(path, f"{mode} runs no BGP", "external BGP peers need mode calico-bgp")
    peers = []
    for i, (host, item) in enumerate(
        zip(_hosts(doc, path, segments, ExternalClient, extra=("asNumber",)), raw, strict=True)
    ):
        asn = item.get("asNumber") if isinstance(item, dict) else None
        if not isinstance(asn, int) or isinstance(asn, bool) or not 1 <= asn <= 4294967295:
            raise doc.fail(
                f"{path}[{i}].asNumber",
                f"AS number {_show(asn)} is missing or out of range",
                "give the router its own AS, for example 65001",
            )
        if asn == own_asn:
            raise doc.fail(
                f"{path}[{i}].asNumber",
                f"AS {asn} is the cluster's own AS "
                "(spec.cni.calico.bgp.asNumber): the nodes would speak iBGP to an "
                "external router",
                "give the router its own AS, for example 65001",
            )
        peers.append(replace(host, asn=asn))
    return peers


def _chain(doc: _Doc) -> tuple[str, list[dict]]:
    """The node's CNI config list: its version, and plugins to run after netsim's own."""
    version = doc.get("spec.cni.cniVersion", CNI_VERSION, str)
    if version not in CNI_VERSIONS:
        raise doc.fail(
            "spec.cni.cniVersion",
            f"unsupported version {_show(version)}",
            f"use one of {', '.join(CNI_VERSIONS)} (Debian's reference plugins take up to 1.0.0)",
        )
    plugins = doc.get("spec.cni.plugins", [], list)
    for i, plugin in enumerate(plugins):
        if (
            not isinstance(plugin, dict)
            or not isinstance(plugin.get("type"), str)
            or not CNI_PLUGIN_TYPE.fullmatch(plugin["type"])
        ):
            raise doc.fail(
                f"spec.cni.plugins[{i}]",
                'each plugin needs a "type": the name of its executable',
                "for example {type: tuning, sysctl: {...}}",
            )
    try:
        return version, json.loads(json.dumps(plugins, allow_nan=False))
    except ValueError:
        raise doc.fail(
            "spec.cni.plugins",
            "holds a number JSON cannot carry (.nan or .inf)",
            "write a finite number, or quote it",
        ) from None


def _segments(doc: _Doc) -> list[Segment]:
    raw = doc.get("spec.underlay.segments", [{"name": "underlay", "subnet": "172.18.0.0/24"}], list)
    if not raw:
        raise doc.fail(
            "spec.underlay.segments",
            "no segments",
            "add at least one: [{name: underlay, subnet: 172.18.0.0/24}]",
        )
    segments = []
    for i, item in enumerate(raw):
        field = f"spec.underlay.segments[{i}]"
        if not isinstance(item, dict):
            raise doc.fail(field, "expected a mapping with name and subnet")
        name = doc.name(item.get("name"), f"{field}.name")
        if len(name) > MAX_SEGMENT_NAME:
            raise doc.fail(
                f"{field}.name",
                f"{name!r} is longer than {MAX_SEGMENT_NAME} characters",
                "shorten it (its bridge is named br-<name>)",
            )
        subnet = doc.cidr(item.get("subnet"), f"{field}.subnet")
        segments.append(Segment(name, str(subnet)))
    _unique([(s.name, doc) for s in segments], "spec.underlay.segments", "segment")
    return segments


def _hosts(
    doc: _Doc, path: str, segments: list[Segment], cls: type, extra: tuple[str, ...] = ()
) -> list:
    hosts = []
    subnets = {s.name: s.subnet for s in segments}
    for i, item in enumerate(doc.get(path, [], list)):
        field = f"{path}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise doc.fail(field, "expected a mapping with name and segment")
        name = doc.name(item.get("name"), f"{field}.name")
        doc.ignored.update(
            f"Cluster.{path}[].{_key(k)}"
            for k in item
            if k not in ("name", "segment", "ip", *extra)
        )
        segment = item.get("segment")
        segment = segments[0].name if segment is None else segment
        if not isinstance(segment, str) or segment not in subnets:
            raise doc.fail(
                f"{field}.segment",
                f"no segment named {_show(segment)}",
                f"use one of: {_choices(s.name for s in segments)}",
            )
        ip = item.get("ip")
        ip = "" if ip is None else ip
        if ip != "":
            addr = doc.address(ip, f"{field}.ip")
            net = IPNetwork(subnets[segment])
            if addr not in net or addr in (net.network, net.broadcast, net.network + 1):
                raise doc.fail(
                    f"{field}.ip",
                    f"{ip} is not a usable host of {net}",
                    f"pick an address from {net.network + 2} to {net.broadcast - 1}",
                )
        hosts.append(cls(name=name, segment=segment, ip=str(ip)))
    return hosts


def _first_overlap(nets: list[IPNetwork]) -> tuple[int, int] | None:
    """The first (i, j), i < j in list order, of two networks that overlap, or None; in
    O(n log n), as a file may list thousands of segments. Two CIDRs are nested or disjoint,
    so in the order of (first address, size down) a network overlaps an earlier one exactly
    when it begins before the furthest end seen so far."""
    order = sorted(range(len(nets)), key=lambda k: (nets[k].first, -nets[k].last))
    involved, end, holder = set(), -1, -1
    for k in order:
        if nets[k].first <= end:
            involved.update((k, holder))
        if nets[k].last > end:
            end, holder = nets[k].last, k
    if not involved:
        return None
    i = min(involved)  # the first network in any overlap meets a later one
    a = nets[i]
    return i, next(
        j for j in range(i + 1, len(nets)) if a.first <= nets[j].last and nets[j].first <= a.last
    )


def _seconds(doc: _Doc, field: str, default: int, least: int, real: str, most: int = 86400):
    """A duration in whole seconds, within [least, most]."""
    value = doc.get(field, default, int)
    if not least <= value <= most:
        raise doc.fail(
            field, f"{value} s is out of range", f"use {least} to {most} seconds ({real})"
        )
    return value


def _assign_ips(
    doc: _Doc, segments: list[Segment], nodes: list, clients: list, master: bool
) -> str:
    """Give hosts without an ip the next free address; .1 of each segment stays for a router.
    With `master`, the first segment's highest address not given to a host is the master's
    (where netsim runs the cluster's etcd), which is returned."""
    places: dict[str, list[tuple[list, int]]] = {s.name: [] for s in segments}
    for group in (nodes, clients):
        for i, host in enumerate(group):
            places[host.segment].append((group, i))
    master_ip = ""
    for index, seg in enumerate(segments):
        net = IPNetwork(seg.subnet)
        members = [group[i] for group, i in places[seg.name]]
        room = max(net.size - 3 - (master and index == 0), 0)
        if len(members) > room:
            also = " beside the master (its etcd)" if master and index == 0 else ""
            raise doc.fail(
                "spec.underlay.segments",
                f"segment {seg.name} ({net}) has room for {room} hosts{also}, not {len(members)}",
                "use a larger subnet or spread the nodes over more segments",
            )
        taken = {h.ip for h in members if h.ip}
        if len(taken) < len([h for h in members if h.ip]):
            raise doc.fail(
                "spec.nodes",
                f"two hosts on segment {seg.name} share an ip",
                "give each node and client its own address",
            )
        if master and index == 0:
            top = net.broadcast - 1
            while str(top) in taken:
                top -= 1
            master_ip = str(top)
            taken.add(master_ip)
        free = (str(a) for a in net.iter_hosts() if a != net.network + 1 and str(a) not in taken)
        for group, i in places[seg.name]:
            if not group[i].ip:
                group[i] = replace(group[i], ip=next(free))
    return master_ip


def _lb_addresses(doc: _Doc, segments: list[Segment], hosts: list, master_ip: str) -> tuple:
    """spec.loadBalancer.addresses, as MetalLB's IPAddressPool gives them (`a-b` ranges or
    CIDRs): each on one underlay segment (L2 mode announces it there), none a host's."""
    field = "spec.loadBalancer.addresses"
    items = doc.get(field, [], list)
    fix = "write ranges like 172.18.0.200-172.18.0.220 or CIDRs like 172.18.0.192/28"
    taken = {h.ip: f"{type(h).__name__.lower()} {h.name}" for h in hosts}
    if master_ip:
        taken[master_ip] = "the master (etcd)"
    for seg in segments:
        taken[seg.router_ip] = f"segment {seg.name}'s router"
    found = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, str):
            raise doc.fail(where, f"{_show(item)} is not an address range", fix)
        try:
            if "-" in item:
                first, last = (IPAddress(a.strip(), 4) for a in item.split("-", 1))
            else:
                net = IPNetwork(item, version=4)
                first, last = IPAddress(net.first), IPAddress(net.last)
        except (AddrFormatError, ValueError):
            raise doc.fail(where, f"{_show(item)} is not an address range", fix) from None
        if first > last:
            raise doc.fail(where, f"{item} ends before it begins", fix)
        home = next(
            (s for s in segments if first in IPNetwork(s.subnet) and last in IPNetwork(s.subnet)),
            None,
        )
        if home is None:
            raise doc.fail(
                where,
                f"{item} is not inside one underlay segment "
                f"({', '.join(s.subnet for s in segments)})",
                "take the addresses from a segment's subnet: one node answers ARP for them there",
            )
        for ip, who in taken.items():
            if first <= IPAddress(ip) <= last:
                raise doc.fail(where, f"{item} holds {ip}, the address of {who}", fix)
        found.append(item)
    return tuple(found)


def _datastore(doc: _Doc) -> Datastore:
    """spec.datastore.etcd: the user's etcd endpoints (http URLs) and the namespace to reach
    them from; without it netsim runs an etcd of the cluster's own on its master."""
    datastore = doc.get("spec.datastore", {}, dict)
    if any(key != "etcd" for key in datastore):
        other = next(key for key in datastore if key != "etcd")
        raise doc.fail(
            "spec.datastore",
            f"unknown datastore {_show(other)}",
            "use etcd: {endpoints: [http://IP:2379]}, or leave spec.datastore out to let "
            "netsim run the cluster's etcd",
        )
    endpoints = doc.get("spec.datastore.etcd.endpoints", [], list)
    urls = []
    for i, url in enumerate(endpoints):
        field = f"spec.datastore.etcd.endpoints[{i}]"
        parts = urlsplit(url) if isinstance(url, str) else None
        try:
            port = parts.port if parts else None
            IPv4Address(parts.hostname or "")
        except (ValueError, AttributeError):
            port = None
        if (
            not parts
            or parts.scheme != "http"
            or not port
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username
        ):
            raise doc.fail(
                field,
                f"{_show(url)} is not an etcd client URL netsim can use",
                "write http://IPv4:PORT, e.g. http://10.0.0.5:2379 (no path; TLS and names "
                "are not supported)",
            )
        urls.append(f"http://{parts.hostname}:{port}")
    netns = doc.get("spec.datastore.etcd.netns", "", str)
    if netns and not urls:
        raise doc.fail(
            "spec.datastore.etcd.netns",
            "a namespace to reach etcd from, but no endpoints",
            "add spec.datastore.etcd.endpoints, or remove netns to let netsim run etcd",
        )
    return Datastore(tuple(urls), netns)


def _labels(doc: _Doc, path: str) -> dict[str, str]:
    """Labels (or a selector) as Kubernetes validates them: string keys and values."""
    labels = doc.get(path, {}, dict)
    result = {}
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", None)
        if (
            name is None
            or not LABEL_NAME.fullmatch(name)
            or (prefix and not DNS1123_SUBDOMAIN.fullmatch(prefix))
            or key.startswith("/")
        ):
            raise doc.fail(
                path,
                f"{_show(key)} is not a label key",
                "use up to 63 letters, digits, '-', '_' or '.', beginning and ending "
                "with a letter or digit, optionally after a DNS prefix and '/'",
            )
        value = "" if value is None else value  # as Kubernetes reads null
        if not isinstance(value, str):
            raise doc.fail(
                f"{path}.{_key(key)}",
                f"label values are strings, not {_show(value)}",
                f'quote it: {_key(key)}: "{_short(value, 20)}"',
            )
        if value and not LABEL_NAME.fullmatch(value):
            raise doc.fail(
                f"{path}.{_key(key)}",
                f"{_show(value)} is not a label value",
                "use up to 63 letters, digits, '-', '_' or '.', beginning and "
                "ending with a letter or digit",
            )
        result[key] = value
    return result


def parse_labels(labels: dict, where: str) -> dict[str, str]:
    """Labels given on a command line, checked as a file's are."""
    doc = _Doc(where, 0, {"kind": "", "metadata": {"labels": labels}}, set())
    doc.label = "labels"
    return _labels(doc, "metadata.labels")


def _containers(doc: _Doc, path: str, init: bool = False) -> tuple[Container, ...]:
    raw = doc.get(path, [] if init else [{"name": "hostname"}], list)
    containers: list[Container] = []
    taken: set[str] = set()  # port names, unique in the pod
    for i, item in enumerate(raw):
        field = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise doc.fail(field, "expected a mapping with name (and ports)")
        for key in item:
            if key not in _CONTAINER_KEYS:
                doc.ignored.add(f"{doc.kind}.{path}[].{_key(key)}")
        name = doc.name(item.get("name", f"c{i}"), f"{field}.name")
        if name in {c.name for c in containers}:
            raise doc.fail(
                f"{field}.name",
                f"duplicate container name {name!r}",
                "give each container of a pod its own name",
            )
        ports, names, protocols = [], [], []
        if not isinstance(item.get("ports") if item.get("ports") is not None else [], list):
            raise doc.fail(f"{field}.ports", "expected a list of {containerPort: N}")
        for key in ("command", "args"):
            words = item.get(key) if item.get(key) is not None else []
            if not isinstance(words, list):
                raise doc.fail(
                    f"{field}.{key}",
                    f"expected a list of strings, got {_show(words)}",
                    f'write it as {key}: ["..."]',
                )
            for k, word in enumerate(words):
                if not isinstance(word, str):
                    raise doc.fail(
                        f"{field}.{key}[{k}]",
                        f"expected a string, got {_show(word)}",
                        f'quote it: "{_short(word, 20)}"',
                    )
        for j, port in enumerate(item.get("ports") or []):
            value = port.get("containerPort") if isinstance(port, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
                raise doc.fail(
                    f"{field}.ports[{j}].containerPort",
                    f"{_show(value)} is not a port",
                    "use an integer from 1 to 65535",
                )
            ports.append(value)
            protocol = port.get("protocol") or "TCP"
            if protocol not in ("TCP", "UDP", "SCTP"):
                raise doc.fail(
                    f"{field}.ports[{j}].protocol",
                    f"{_show(protocol)} is not a protocol",
                    "use TCP, UDP or SCTP",
                )
            if protocol != "TCP":
                protocols.append((value, protocol))
            port_name = port.get("name")
            if port_name is not None and port_name != "":
                if not isinstance(port_name, str) or not IANA_SVC_NAME.fullmatch(port_name):
                    raise doc.fail(
                        f"{field}.ports[{j}].name",
                        f"{_show(port_name)} is not a port name",
                        IANA_FIX,
                    )
                if port_name in taken:
                    raise doc.fail(
                        f"{field}.ports[{j}].name",
                        f"duplicate port name {port_name!r} in this pod",
                        "give each port its own name",
                    )
                taken.add(port_name)
                names.append((port_name, value))
        image = item.get("image") if item.get("image") is not None else ""
        if not isinstance(image, str):
            raise doc.fail(f"{field}.image", f"{_show(image)} is not an image name")
        container = Container(
            name,
            tuple(ports),
            tuple(item.get("command") or ()),
            tuple(names),
            image,
            tuple(item.get("args") or ()),
            _env(doc, item, field),
            _probe(doc, item, field),
            tuple(protocols),
        )
        from netsim.images import workload

        notice = workload(container).notice
        if notice:
            doc.ignored.add(f"warning: {notice}")
        containers.append(container)
    if not containers and not init:
        raise doc.fail(path, "a pod needs at least one container", "add {name: hostname}")
    return tuple(containers)


def _env(doc: _Doc, item: dict, field: str) -> tuple[tuple[str, str], ...]:
    """env: [{name, value}] (valueFrom is not modelled: noted and left out)."""
    raw = item.get("env") if item.get("env") is not None else []
    if not isinstance(raw, list):
        raise doc.fail(f"{field}.env", "expected a list of {name: ..., value: ...}")
    found = []
    for k, entry in enumerate(raw):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise doc.fail(f"{field}.env[{k}].name", "each variable needs a name")
        if "valueFrom" in entry:
            doc.ignored.add(f"{doc.kind}.{field.split('[')[0]}[].env[].valueFrom")
            continue
        value = entry.get("value", "")
        if not isinstance(value, str):
            raise doc.fail(
                f"{field}.env[{k}].value",
                f"values are strings, not {_show(value)}",
                f'quote it: value: "{_short(value, 20)}"',
            )
        found.append((name, value))
    return tuple(found)


def _probe(doc: _Doc, item: dict, field: str) -> Probe | None:
    """readinessProbe with httpGet, tcpSocket or exec, and Kubernetes' timings."""
    raw = item.get("readinessProbe")
    if raw is None:
        return None
    where = f"{field}.readinessProbe"
    if not isinstance(raw, dict):
        raise doc.fail(where, "expected a mapping with httpGet, tcpSocket or exec")
    for key in raw:
        if key not in _PROBE_KEYS:
            doc.ignored.add(f"{doc.kind}.{field.split('[')[0]}[].readinessProbe.{_key(key)}")
    kinds = [k for k in ("httpGet", "tcpSocket", "exec") if k in raw]
    if len(kinds) != 1:
        raise doc.fail(where, "a probe has exactly one of httpGet, tcpSocket and exec")
    kind, body = kinds[0], raw[kinds[0]]
    if not isinstance(body, dict):
        raise doc.fail(f"{where}.{kind}", "expected a mapping")
    timings = {}
    for key, least in (
        ("initialDelaySeconds", 0),
        ("periodSeconds", 1),
        ("timeoutSeconds", 1),
        ("successThreshold", 1),
        ("failureThreshold", 1),
    ):
        value = raw.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < least
        ):
            raise doc.fail(f"{where}.{key}", f"{_show(value)} is not a whole number >= {least}")
        if value is not None:
            timings[key] = value
    probe = Probe(
        kind,
        initial_delay=timings.get("initialDelaySeconds", 0),
        period=timings.get("periodSeconds", 10),
        timeout=timings.get("timeoutSeconds", 1),
        success_threshold=timings.get("successThreshold", 1),
        failure_threshold=timings.get("failureThreshold", 3),
    )
    if kind == "exec":
        command = body.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(w, str) for w in command)
        ):
            raise doc.fail(f"{where}.exec.command", "expected a list of strings")
        return replace(probe, command=tuple(command))
    port = body.get("port")
    valid = (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535) or (
        isinstance(port, str) and IANA_SVC_NAME.fullmatch(port)
    )
    if not valid:
        raise doc.fail(f"{where}.{kind}.port", f"{_show(port)} is not a port number or name")
    if isinstance(port, str) and port not in {n for n, _ in _port_names(item)}:
        raise doc.fail(
            f"{where}.{kind}.port",
            f"no port of this container is named {port!r}",
            "name one of its ports so, or give the number",
        )
    path = body.get("path", "/")
    if not isinstance(path, str):
        raise doc.fail(f"{where}.{kind}.path", f"{_show(path)} is not a path")
    return replace(probe, port=port, path=path)


def _port_names(item: dict) -> list[tuple[str, int]]:
    return [
        (p["name"], p.get("containerPort"))
        for p in item.get("ports") or []
        if isinstance(p, dict) and isinstance(p.get("name"), str)
    ]


def _pod_spec(doc: _Doc, path: str) -> dict:
    """initContainers, restartPolicy and enableServiceLinks of a pod spec, checked."""
    init = _containers(doc, f"{path}.initContainers", init=True)
    main = _containers(doc, f"{path}.containers")
    clash = {c.name for c in init} & {c.name for c in main}
    if clash:
        raise doc.fail(
            f"{path}.initContainers",
            f"container name {sorted(clash)[0]!r} is used twice in the pod",
            "give init containers and containers different names",
        )
    policy = doc.get(f"{path}.restartPolicy", "Always", str)
    if policy not in RESTART_POLICIES:
        raise doc.fail(
            f"{path}.restartPolicy",
            f"{_show(policy)} is not a restart policy",
            "use Always, OnFailure or Never",
        )
    if doc.kind == "Deployment" and policy != "Always":
        raise doc.fail(
            f"{path}.restartPolicy",
            f"a Deployment's pods restart Always, not {policy}",
            "leave restartPolicy out, or use a Pod",
        )
    links = doc.get(f"{path}.enableServiceLinks", True, bool)
    return {
        "containers": main,
        "init_containers": init,
        "restart_policy": policy,
        "service_links": links,
    }


def _node_name(doc: _Doc, path: str, cluster: Cluster) -> str:
    node = doc.get(path, "", str)
    if node and node not in {n.name for n in cluster.nodes}:
        raise doc.fail(
            path,
            f"no node named {_show(node)}",
            f"use one of: {_choices(n.name for n in cluster.nodes)}",
        )
    return node


def _pod(doc: _Doc, cluster: Cluster) -> Pod:
    return Pod(
        name=doc.name(doc.get("metadata.name"), "metadata.name"),
        labels=_labels(doc, "metadata.labels"),
        node=_node_name(doc, "spec.nodeName", cluster),
        namespace=_namespace(doc, cluster),
        **_pod_spec(doc, "spec"),
    )


def _deployment(doc: _Doc, cluster: Cluster) -> tuple[Deployment, list[Pod]]:
    """The Deployment, and its pods as they are once rolled out (apply's Deployment
    controller makes them through ReplicaSets, netsim/deployments.py)."""
    name = doc.name(doc.get("metadata.name"), "metadata.name")
    replicas = doc.get("spec.replicas", 1, int)
    ordinal = cluster.pod_names == "Ordinal"
    longest = f"{name}-{max(replicas - 1, 0)}" if ordinal else f"{name}-1234567890-xxxxx"
    if len(longest) > 63:
        raise doc.fail(
            "metadata.name",
            f"pod names like {longest} would be longer than 63 characters",
            "shorten the Deployment's name",
        )
    if not 0 <= replicas <= 10000:
        raise doc.fail("spec.replicas", f"{replicas} is out of range", "use 0 to 10000")
    selector = _labels(doc, "spec.selector.matchLabels")
    labels = _labels(doc, "spec.template.metadata.labels")
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        raise doc.fail(
            "spec.selector.matchLabels",
            f"selector {_show(selector, 120)} does "
            f"not match the template labels {_show(labels, 120)}",
            "make spec.selector.matchLabels a subset of spec.template.metadata.labels",
        )
    template = doc.get("spec.template", {}, dict)
    _annotations(doc, "spec.template.metadata.annotations")
    deployment = Deployment(
        name,
        _namespace(doc, cluster),
        replicas,
        json.loads(json.dumps(template)),
        selector,
        _labels(doc, "metadata.labels"),
        *_strategy(doc),
        min_ready=_count(doc, "spec.minReadySeconds", 0),
        history_limit=_count(doc, "spec.revisionHistoryLimit", 10),
        progress_deadline=_deadline(doc),
        paused=doc.get("spec.paused", False, bool),
        cause=_annotations(doc, "metadata.annotations").get(rollout.CHANGE_CAUSE, ""),
    )
    if ordinal:
        pods = template_pods(
            cluster, deployment, template, [f"{name}-{i}" for i in range(replicas)], doc
        )
    else:
        hash_ = rollout.template_hash(template)
        names = rollout.pod_names(rollout.replicaset_name(name, hash_), replicas)
        pods = template_pods(cluster, deployment, template, names, doc, hash_)
    return deployment, pods


def template_pods(
    cluster: Cluster,
    deployment: Deployment,
    template: dict,
    names: list[str],
    doc: _Doc | None = None,
    hash_: str = "",
) -> list[Pod]:
    """Pods of a Deployment's template (a ReplicaSet's, labelled with its pod-template-hash;
    a template kept in the record is read as its file's was)."""
    if doc is None:
        body = {
            "kind": "Deployment",
            "metadata": {"name": deployment.name, "namespace": deployment.namespace},
            "spec": {"template": template},
        }
        doc = _Doc(cluster.source or "<record>", 0, body, set())
    labels = _labels(doc, "spec.template.metadata.labels")
    if hash_:
        labels = labels | {rollout.HASH_LABEL: hash_}
    spec = _pod_spec(doc, "spec.template.spec")
    node = _node_name(doc, "spec.template.spec.nodeName", cluster)
    return [
        Pod(n, labels, node=node, owner=deployment.name, namespace=deployment.namespace, **spec)
        for n in names
    ]


def _deadline(doc: _Doc) -> int:
    """progressDeadlineSeconds: more than 0 and than minReadySeconds, as Kubernetes checks."""
    deadline = _count(doc, "spec.progressDeadlineSeconds", 600)
    min_ready = _count(doc, "spec.minReadySeconds", 0)
    if deadline <= min_ready:
        raise doc.fail(
            "spec.progressDeadlineSeconds",
            f"{deadline} must be greater than minReadySeconds ({min_ready})",
            "make it longer than minReadySeconds, or leave it out (600)",
        )
    return deadline


def _count(doc: _Doc, field: str, default: int) -> int:
    value = doc.get(field, default, int)
    if value < 0:
        raise doc.fail(field, f"{value} is negative", "use 0 or more")
    return value


def _annotations(doc: _Doc, path: str) -> dict[str, str]:
    found = doc.get(path, {}, dict)
    for key, value in found.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise doc.fail(
                f"{path}.{_key(key)}",
                f"annotations are strings, not {_show(value)}",
                f'quote it: {_key(key)}: "{_short(value, 20)}"',
            )
    return found


def _strategy(doc: _Doc) -> tuple[str, int | str, int | str]:
    """spec.strategy: its type, and maxSurge / maxUnavailable as numbers or percentages."""
    kind = doc.choice(
        "spec.strategy.type",
        ("RollingUpdate", "Recreate"),
        "RollingUpdate",
        "{} is not a strategy",
        "use RollingUpdate or Recreate",
    )
    if kind == "Recreate" and doc.get("spec.strategy.rollingUpdate") is not None:
        raise doc.fail(
            "spec.strategy.rollingUpdate",
            "may not be given when strategy type is 'Recreate'",
            "remove rollingUpdate, or use type: RollingUpdate",
        )
    values = []
    for part in ("maxSurge", "maxUnavailable"):
        field = f"spec.strategy.rollingUpdate.{part}"
        value = doc.get(field, "25%", (int, str))
        if isinstance(value, str):
            digits = value[:-1]
            if not (value.endswith("%") and digits.isdigit()):
                raise doc.fail(
                    field, f"{_show(value)} is not a number or a percentage", "write e.g. 1 or 25%"
                )
            if part == "maxUnavailable" and int(digits) > 100:
                raise doc.fail(field, f"{value} is more than 100%", "use at most 100%")
        elif value < 0:
            raise doc.fail(field, f"{value} is negative", "use 0 or more")
        values.append(value)
    surge, unavailable = values
    if rollout.scaled(surge, 100, True) == 0 and rollout.scaled(unavailable, 100, False) == 0:
        raise doc.fail(
            "spec.strategy.rollingUpdate.maxUnavailable",
            "may not be 0 when maxSurge is 0",
            "let one of them be more than 0",
        )
    return kind, surge, unavailable


def _service(doc: _Doc, cluster: Cluster) -> Service:
    name = doc.name(doc.get("metadata.name"), "metadata.name")
    if not DNS1035_LABEL.fullmatch(name):
        raise doc.fail(
            "metadata.name",
            f"{name!r} is not a DNS-1035 label (a Service's name starts with a letter)",
            "begin the name with a lowercase letter",
        )
    kind = doc.get("spec.type", "ClusterIP", str)
    if kind not in SERVICE_TYPES:
        raise doc.fail(
            "spec.type",
            f"unsupported type {_show(kind)}",
            "use ClusterIP, NodePort or LoadBalancer",
        )
    selector = _labels(doc, "spec.selector")  # none: no endpoints (netsim makes none by hand)
    ports = []
    names: dict[str, int] = {}  # port name -> its index; "" (unnamed) is checked above
    numbers: dict[tuple[int, str], int] = {}
    raw_ports = doc.get("spec.ports", [], list)
    if not raw_ports:
        raise doc.fail(
            "spec.ports",
            "a Service needs at least one port",
            f"add ports: [{{port: 80, targetPort: {HOSTNAME_PORT}}}]",
        )
    for i, item in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        if not isinstance(item, dict):
            raise doc.fail(field, "expected a mapping with port and targetPort")
        port = item.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise doc.fail(f"{field}.port", f"{_show(port)} is not a port", "use 1 to 65535")
        target = item.get("targetPort")
        target = port if target is None else target  # Kubernetes' default
        if (
            isinstance(target, bool)
            or not isinstance(target, int | str)
            or (isinstance(target, int) and not 1 <= target <= 65535)
        ):
            raise doc.fail(
                f"{field}.targetPort",
                f"{_show(target)} is not a port",
                "use 1 to 65535, or the name of a containerPort",
            )
        if isinstance(target, str) and not IANA_SVC_NAME.fullmatch(target):
            raise doc.fail(
                f"{field}.targetPort",
                f"{_show(target)} is neither a port number nor a port name",
                "write a number without quotes, or a name: " + IANA_FIX,
            )
        protocol = item.get("protocol")
        protocol = "TCP" if protocol is None or protocol == "" else protocol
        if protocol not in ("TCP", "UDP"):
            raise doc.fail(
                f"{field}.protocol", f"unsupported protocol {_show(protocol)}", "use TCP or UDP"
            )
        node_port = item.get("nodePort")
        node_port = None if node_port == 0 and not isinstance(node_port, bool) else node_port
        if node_port is not None:  # 0, as in Kubernetes, means "allocate one"
            if kind == "ClusterIP":
                raise doc.fail(
                    f"{field}.nodePort",
                    "nodePort is set on a ClusterIP Service",
                    "set spec.type: NodePort (or LoadBalancer) or remove nodePort",
                )
            low, high = NODE_PORT_RANGE
            if (
                not isinstance(node_port, int)
                or isinstance(node_port, bool)
                or not low <= node_port <= high
            ):
                raise doc.fail(
                    f"{field}.nodePort",
                    f"{_show(node_port)} is outside {low}-{high}",
                    f"pick a port from {low} to {high}",
                )
        port_name = item.get("name")
        port_name = "" if port_name is None else port_name
        if port_name != "" and (
            not isinstance(port_name, str) or not DNS1123_LABEL.fullmatch(port_name)
        ):
            raise doc.fail(
                f"{field}.name",
                f"{_show(port_name)} is not a port name",
                "use a DNS-1123 label: lowercase letters, digits and '-', starting "
                "and ending with a letter or digit, at most 63 characters",
            )
        if port_name == "" and len(raw_ports) > 1:
            raise doc.fail(
                f"{field}.name",
                "a Service with more than one port must name each of them",
                "add name: (for example http) to every port",
            )
        if port_name in names:
            raise doc.fail(
                f"{field}.name",
                f"duplicate port name {port_name!r} (also spec.ports[{names[port_name]}])",
                "give each port its own name",
            )
        if (port, protocol) in numbers:
            raise doc.fail(
                f"{field}.port",
                f"port {port}/{protocol} is already spec.ports[{numbers[port, protocol]}]",
                "use each port and protocol once",
            )
        names[port_name] = numbers[port, protocol] = i
        ports.append(ServicePort(port, target, protocol, port_name, node_port))
    cluster_ip = doc.get("spec.clusterIP", "", str)
    if cluster_ip == "None" and kind != "ClusterIP":
        raise doc.fail(
            "spec.clusterIP",
            f"a {kind} Service cannot be headless (clusterIP: None)",
            "use type ClusterIP, or leave clusterIP out",
        )
    if cluster_ip and cluster_ip != "None":
        addr, net = doc.address(cluster_ip, "spec.clusterIP"), IPNetwork(cluster.service_cidr)
        if addr not in net:
            raise doc.fail(
                "spec.clusterIP",
                f"{cluster_ip} is not in the service CIDR {cluster.service_cidr}",
                "pick an address inside it or leave clusterIP out",
            )
        if addr in (net.network, net.broadcast):
            what = "network" if addr == net.network else "broadcast"
            raise doc.fail(
                "spec.clusterIP",
                f"{cluster_ip} is the {what} address of the service CIDR {net}",
                f"pick one from {net.network + 1} to {net.broadcast - 1}, or leave clusterIP out",
            )
    affinity = doc.get("spec.sessionAffinity", "None", str)
    if affinity not in ("None", "ClientIP"):
        raise doc.fail(
            "spec.sessionAffinity", f"{_show(affinity)} is not valid", "use None or ClientIP"
        )
    timeout = doc.get("spec.sessionAffinityConfig.clientIP.timeoutSeconds", 10800, int)
    if not 1 <= timeout <= 86400:
        raise doc.fail(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            f"{timeout} is out of range",
            "use 1 to 86400 seconds",
        )
    namespace = _namespace(doc, cluster)
    labels = _labels(doc, "metadata.labels")
    return Service(
        name,
        selector,
        tuple(ports),
        kind,
        cluster_ip,
        affinity,
        timeout,
        namespace,
        labels,
        **_traffic(doc, kind, cluster),
    )


def _traffic(doc: _Doc, kind: str, cluster: Cluster) -> dict:
    """externalTrafficPolicy, internalTrafficPolicy, healthCheckNodePort, loadBalancerIP."""
    found: dict = {}
    for field, key in (
        ("spec.externalTrafficPolicy", "external_policy"),
        ("spec.internalTrafficPolicy", "internal_policy"),
    ):
        found[key] = doc.choice(
            field,
            ("Cluster", "Local"),
            "Cluster",
            "{} is not a traffic policy",
            "use Cluster or Local",
        )
    if found["external_policy"] == "Local" and kind == "ClusterIP":
        raise doc.fail(
            "spec.externalTrafficPolicy",
            "may only be set when `type` is 'NodePort' or 'LoadBalancer'",
            "remove it, or change spec.type",
        )
    health = doc.get("spec.healthCheckNodePort", None, int)
    if health is not None:
        low, high = NODE_PORT_RANGE
        if kind != "LoadBalancer" or found["external_policy"] != "Local":
            raise doc.fail(
                "spec.healthCheckNodePort",
                "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
                "remove it (it is allocated for such Services)",
            )
        if not low <= health <= high:
            raise doc.fail(
                "spec.healthCheckNodePort",
                f"{health} is outside {low}-{high}",
                f"pick a port from {low} to {high}",
            )
        found["health_check_node_port"] = health
    wanted = doc.get("spec.loadBalancerIP", "", str)
    if wanted:
        if kind != "LoadBalancer":
            raise doc.fail(
                "spec.loadBalancerIP",
                "is set on a Service that is not a LoadBalancer",
                "set spec.type: LoadBalancer, or remove loadBalancerIP",
            )
        address = doc.address(wanted, "spec.loadBalancerIP")
        if int(address) not in lb_pool(cluster):
            raise doc.fail(
                "spec.loadBalancerIP",
                f"{wanted} is not in the cluster's pool (spec.loadBalancer.addresses of the "
                f"Cluster document: {', '.join(cluster.lb_addresses) or 'none'})",
                "pick an address of the pool, or leave loadBalancerIP out",
            )
        found["load_balancer_ip"] = wanted
    return found


SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


def lb_pool(cluster: Cluster) -> list[int]:
    """The addresses of spec.loadBalancer.addresses, in order (each a range or a CIDR)."""
    found: list[int] = []
    for item in cluster.lb_addresses:
        if "-" in item:
            first, last = (int(IPAddress(a.strip())) for a in item.split("-", 1))
        else:
            net = IPNetwork(item)
            first, last = net.first, net.last
            if net.prefixlen < 31:  # a CIDR's network and broadcast addresses are not given
                first, last = first + 1, last - 1
        found += [a for a in range(first, last + 1) if a not in found]
    return found


def _check_node_ports(cluster: Cluster, docs: list[_Doc]) -> None:
    """Written nodePorts are unique per protocol, and the range holds every NodePort port
    (netsim.cluster allocates the lowest number no port holds yet, whatever its protocol)."""
    seen: dict[tuple[int, str], str] = {}  # one number may serve TCP and UDP, as in Kubernetes
    auto: list[tuple[_Doc, int]] = []
    for svc, doc in zip(cluster.services, docs, strict=True):
        for i, port in enumerate(svc.ports):
            if port.node_port is None:
                if svc.node_ports:
                    auto.append((doc, i))
                continue
            key = (port.node_port, port.protocol)
            if key in seen:
                raise doc.fail(
                    f"spec.ports[{i}].nodePort",
                    f"nodePort {port.node_port} is already taken by Service {seen[key]}",
                    "pick another port",
                )
            seen[key] = svc.name
    low, high = NODE_PORT_RANGE
    room = high - low + 1 - len({number for number, _ in seen})
    if len(auto) > room:
        doc, i = auto[max(room, 0)]
        raise doc.fail(
            f"spec.ports[{i}].nodePort",
            f"no nodePort is left for this port: "
            f"{low}-{high} holds {high - low + 1}, {high - low + 1 - room} are "
            f"written and {len(auto)} more would be allocated",
            "use type ClusterIP for some Services, or fewer ports",
        )


def _check_cluster_ips(cluster: Cluster, docs: list[_Doc], cluster_doc: _Doc) -> None:
    """Written clusterIPs are unique, and the allocation range (.10 of the CIDR to the last
    before broadcast, see allocate_cluster_ips) holds the Services without one."""
    seen: dict[str, str] = {}
    for svc, doc in zip(cluster.services, docs, strict=True):
        if svc.cluster_ip == "None":  # headless
            continue
        if svc.cluster_ip == dns_ip(cluster.service_cidr) and svc.key != KUBE_DNS:
            raise doc.fail(
                "spec.clusterIP",
                f"{svc.cluster_ip} is kube-dns's, the 10th address of the service CIDR",
                "pick another address or leave clusterIP out",
            )
        if svc.cluster_ip and svc.cluster_ip in seen:
            raise doc.fail(
                "spec.clusterIP",
                f"{svc.cluster_ip} is already the clusterIP of Service {seen[svc.cluster_ip]}",
                "pick another address or leave clusterIP out",
            )
        seen[svc.cluster_ip] = svc.name
    first, last = _allocation_range(cluster.service_cidr)
    written = {
        int(IPAddress(s.cluster_ip)) for s in cluster.services if s.cluster_ip not in ("", "None")
    }
    room = max(last - first + 1, 0) - len({a for a in written if first <= a <= last})
    auto = [s.name for s in cluster.services if not s.cluster_ip]
    if len(auto) > room:
        raise cluster_doc.fail(
            "spec.serviceCIDR",
            f"{cluster.service_cidr} has room for "
            f"{room} allocated clusterIPs (netsim allocates from "
            f"{IPAddress(first)} to the address before broadcast, less the "
            f"written ones), not {len(auto)}: Service {auto[room]} gets none",
            "use a larger serviceCIDR, or give Services a clusterIP",
        )


def _allocation_range(service_cidr: str) -> tuple[int, int]:
    """The addresses allocate_cluster_ips hands out, as integers: .11 to broadcast - 1 (.10
    is kube-dns's, as kubeadm reserves it)."""
    net = IPNetwork(service_cidr)
    return net.first + 11, net.last - 1


def dns_ip(service_cidr: str) -> str:
    """The kube-dns Service's ClusterIP: the 10th address of the service CIDR (kubeadm)."""
    return str(IPNetwork(service_cidr).network + 10)


def _check_pod_room(cluster: Cluster, docs: dict[str, _Doc]) -> None:
    """Every pod gets an address where the scheduler places it. flannel: host-local in the
    node's subnet, less its network address, the gateway .1 and broadcast. Calico: each node
    claims blocks of the pool as it needs them, one at least, and the tunnel address of the
    modes that have one is the first address of the node's first block."""
    network = IPNetwork(cluster.pod_network)
    size = 2 ** (32 - cluster.subnet_len)
    on_node = dict.fromkeys((n.name for n in cluster.nodes), 0)
    calico = cluster.mode.startswith("calico-")
    tunnel = 1 if modes.get(cluster.mode).tunnel else 0  # the tunnel address is a pool address
    blocks, claimed = 2 ** (cluster.subnet_len - network.prefixlen), len(cluster.nodes)
    for pod in schedule(cluster, {}):
        before = on_node[pod.node]
        on_node[pod.node] += 1
        if calico:
            claimed += max(1, math.ceil((before + 1 + tunnel) / size)) - max(
                1, math.ceil((before + tunnel) / size)
            )
            full = claimed > blocks
            problem = (
                f"pod {pod.name} on node {pod.node} needs a block more, and the pool "
                f"{network} holds {blocks} /{cluster.subnet_len} blocks of {size} "
                "addresses (each node claims its own"
                + (", and its tunnel address takes one" if tunnel else "")
                + ")"
            )
            fix = (
                "run fewer pods, or use a larger spec.cni.calico.ipPool.cidr in the Cluster "
                "document"
            )
        else:
            full = on_node[pod.node] > size - 3
            problem = (
                f"pod {pod.name} would be pod {on_node[pod.node]} on node {pod.node}, "
                f"whose /{cluster.subnet_len} subnet holds {max(size - 3, 0)} pods "
                f"({size} addresses less network, gateway .1 and broadcast)"
            )
            fix = (
                "run fewer pods, add nodes, or use a shorter spec.cni.flannel.SubnetLen in "
                "the Cluster document"
            )
        if full:
            doc = docs[pod.key]
            field = (
                "spec.replicas"
                if doc.kind == "Deployment"
                else ("spec.nodeName" if doc.get("spec.nodeName") else "metadata.name")
            )
            raise doc.fail(field, problem, fix)


def schedule(
    cluster: Cluster, placed: dict[str, str], unschedulable: frozenset[str] = frozenset()
) -> list[Pod]:
    """Place each pod: nodeName wins, a pod already running stays, others go to the emptiest
    node (ties broken by node order) that is not `unschedulable` (stopped) while another is —
    a simple spreading scheduler."""
    nodes = [n.name for n in cluster.nodes]
    load = dict.fromkeys(nodes, 0)
    result: dict[str, Pod] = {}
    for pod in cluster.pods:
        node = pod.node or (placed.get(pod.key) if placed.get(pod.key) in load else "")
        if node:
            result[pod.key] = replace(pod, node=node)
            load[node] += 1
    open_nodes = [n for n in nodes if n not in unschedulable] or nodes
    emptiest = [(load[node], i, node) for i, node in enumerate(open_nodes)]
    heapq.heapify(emptiest)  # (pods, node order): the least loaded first, ties by node order
    for pod in cluster.pods:
        if pod.key not in result:
            count, i, node = heapq.heappop(emptiest)
            result[pod.key] = replace(pod, node=node)
            heapq.heappush(emptiest, (count + 1, i, node))
    return [result[p.key] for p in cluster.pods]


def allocate_cluster_ips(cluster: Cluster, allocated: dict[str, str]) -> dict[str, str]:
    """ClusterIPs: as written, else as before, else the next free from .11 of the CIDR."""
    first, last = _allocation_range(cluster.service_cidr)
    result = {s.key: s.cluster_ip for s in cluster.services if s.cluster_ip}
    for svc in cluster.services:
        if (
            svc.key not in result
            and allocated.get(svc.key)
            and allocated[svc.key] not in result.values()
        ):
            result[svc.key] = allocated[svc.key]
    used = set(result.values())
    candidates = (str(IPAddress(a)) for a in range(first, last + 1))
    for svc in cluster.services:
        if svc.key not in result:
            ip = next((ip for ip in candidates if ip not in used), None)
            if ip is None:  # parse() checks the room; a record from elsewhere may not fit
                raise TopologyError(
                    cluster.source or "<topology>",
                    "file",
                    "spec.serviceCIDR",
                    f"{cluster.service_cidr} has no address left for Service {svc.key}",
                    "use a larger serviceCIDR",
                )
            result[svc.key] = ip
    return result
