"""Fuzzing the loader: small edits of the shipped topologies are built or refused, never a crash.

Every input either parses or raises TopologyError with one line, and does so in well under a
second: no other exception, no hang. What parses must also plan: the scheduler, the ClusterIP
allocator and flannel's subnet leases run on it without an error. Pure parsing, no kernel.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsim import topology
from netsim.errors import TopologyError
from netsim.modes.flannel import allocate_subnets

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
FILES = sorted(TOPOLOGIES.glob("*.yaml"))
TEXTS = [p.read_text() for p in FILES]
DOCS = [list(yaml.safe_load_all(t)) for t in TEXTS]
NAME = "fuzz.yaml"
BUDGET = 2.0  # seconds per example
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def laughs(levels: int, width: int = 9) -> str:
    """A "billion laughs" flow sequence: each level aliases the previous one `width` times."""
    parts = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        parts.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "[" + ", ".join(parts) + f", *l{levels - 1}]"


# Raw YAML put in place of a value after dumping: what a Python value cannot be dumped as.
SNIPPETS = [
    "9" * 5000,
    "-" + "1" * 25,
    "1" * 20,
    "0b_",
    "0x_",
    "0o8",
    "2001-13-45",
    "2001-12-14",
    "1:20",
    "1:2:3:4:5:6",
    ".inf",
    ".nan",
    "-.inf",
    "1e400",
    "0x7fffffffffffffff",
    "<<",
    "=",
    "~",
    "null",
    "yes",
    "off",
    "!!binary '!!!'",
    "!!binary aGk=",
    "!!float abc",
    "!!int abc",
    "!!bool maybe",
    "!!timestamp nope",
    "!!set {a: null}",
    "!!omap [a: 1]",
    "!!str 80",
    "!!python/object/apply:os.system [true]",
    "!foo bar",
    "*undefined",
    "&a [1, *a]",
    "&a {b: *a}",
    "[&x a, *x, *x]",
    laughs(9),
    laughs(4, 3),
    "[" * 60 + "]" * 60,
    "[" * 3000 + "]" * 3000,
    "{a: " * 60 + "b" + "}" * 60,
    "{a: 1, a: 2}",
    "[a, b",
    "'x",
    '"\\x00"',
    '"a\\nb"',
    '"\\ud800"',
    "\u2028",
    "x" * 70000,
]
STRINGS = [
    "",
    "None",
    "0.0.0.0/0",
    "10.0.0.0/1",
    "32.0.0.0/3",
    "1.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "169.254.1.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "10.244.0.0/30",
    "10.96.0.0/29",
    "10.96.0.0/30",
    "10.96.0.0",
    "10.96.0.10",
    "10.111.255.255",
    "10.96.0.1",
    "192.168.0.0/30",
    "172.18.0.0/31",
    "172.18.0.1",
    "172.18.0.300",
    "01.2.3.4",
    "::1",
    "a" * 40,
    "a" * 64,
    "http",
    "Http",
    "a b",
    "-a",
    "a-",
    "a--b",
    "123",
    "web",
    "worker-1",
    "worker-9",
    "underlay",
    "client",
    "TCP",
    "UDP",
    "SCTP",
    "NodePort",
    "ClusterIP",
    "LoadBalancer",
    "ClientIP",
    "calico-bgp",
    "calico-vxlan",
    "calico-ipip",
    "flannel-vxlan",
    "flannel-host-gw",
    "flannel-udp",
    "Always",
    "CrossSubnet",
    "Never",
    "userspace",
    "ebpf",
    "v1",
    "apps/v1",
    "netsim.dev/v1alpha1",
    "Pod",
    "Service",
    "Deployment",
    "Cluster",
    "app",
    "x/y",
    "a\nb",
    "é",
    "\x00",
]
SENTINEL = "snippet{}x"
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(
        [
            0,
            1,
            2,
            3,
            12,
            19,
            20,
            26,
            28,
            32,
            33,
            64512,
            65535,
            65536,
            30000,
            32767,
            32768,
            10000,
            10001,
            4294967295,
            4294967296,
        ]
    ),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(STRINGS),
    st.builds(SENTINEL.format, st.integers(0, len(SNIPPETS) - 1)),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "name",
            "port",
            "targetPort",
            "nodePort",
            "protocol",
            "containerPort",
            "segment",
            "ip",
            "subnet",
            "asNumber",
            "cidr",
            "blockSize",
            "matchLabels",
            "labels",
            "app",
            "type",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def dump(docs: list) -> str:
    text = yaml.safe_dump_all(docs, sort_keys=False, width=1 << 20)
    for i in reversed(range(len(SNIPPETS))):  # snippet1x before snippet10x would clash: reversed
        text = text.replace(SENTINEL.format(i), SNIPPETS[i])
    return text


def paths(node, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document that holds a value, containers included."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths(value, prefix + (i,))
    return found


def known_paths(doc: dict) -> list[tuple]:
    """The dotted fields netsim reads for this kind, present or not (so absent ones get set)."""
    kind = doc.get("kind")
    known = topology._KNOWN.get(kind, ()) if isinstance(kind, str) else ()
    return [tuple(p.split(".")) for p in sorted(known) if p not in ("apiVersion", "kind")]


def get(doc, path: tuple):
    for part in path:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def near(original) -> st.SearchStrategy:
    """Values of the original's type close to it: most edits should get past the first check,
    so that the later ones (capacity, overlaps, the scheduler) are reached too."""
    if isinstance(original, bool) or original is None:
        return st.one_of(st.booleans(), scalars)
    if isinstance(original, int):
        return st.one_of(st.integers(-1, 2 * abs(original) + 64), scalars)
    if isinstance(original, str):
        return st.one_of(
            st.sampled_from(STRINGS),
            st.builds(
                lambda i, c: original[:i] + c + original[i + 1 :],
                st.integers(0, len(original)),
                st.sampled_from(list("0123456789az-./ _A")),
            ),
        )
    if isinstance(original, list) and original:
        return st.lists(st.sampled_from(original), max_size=2 * len(original) + 2)
    return values


def put(doc, path: tuple, value) -> None:
    for part in path[:-1]:
        if isinstance(doc, dict):
            if not isinstance(doc.get(part), dict | list):
                doc[part] = {}
            doc = doc[part]
        elif isinstance(doc, list) and isinstance(part, int) and part < len(doc):
            doc = doc[part]
        else:
            return
    if isinstance(doc, dict) or (
        isinstance(doc, list) and isinstance(path[-1], int) and path[-1] < len(doc)
    ):
        doc[path[-1]] = value


def check(run) -> None:
    """`run()` parses: it returns a cluster that plans, or raises a one-line TopologyError;
    either quickly."""
    start = time.monotonic()
    try:
        cluster, notes = run()
    except TopologyError as exc:
        message = str(exc)
        assert message.startswith(f"{NAME}: ") or message.startswith(exc.file), message
        assert len(message.splitlines()) == 1 and message.isprintable(), message
        assert len(message) < 1000, message[:2000]
    else:
        assert all(len(n.splitlines()) == 1 and n.isprintable() for n in notes), notes
        placed = topology.schedule(cluster, {})
        assert len(placed) == len(cluster.pods)
        ips = topology.allocate_cluster_ips(cluster, {})
        assert len(set(ips.values())) == len(cluster.services)
        if cluster.mode.startswith("flannel-"):
            leases = allocate_subnets(
                cluster.pod_network, cluster.subnet_len, [n.name for n in cluster.nodes], {}
            )
            assert len(set(leases.values())) == len(cluster.nodes)
    elapsed = time.monotonic() - start
    assert elapsed < BUDGET, f"took {elapsed:.1f} s"


@st.composite
def edited(draw) -> str:
    """A shipped topology with one to three values replaced (or fields added) anywhere."""
    docs = [dict(d) for d in yaml.safe_load_all(draw(st.sampled_from(TEXTS)))]
    for _ in range(draw(st.integers(1, 3))):
        doc = draw(st.sampled_from(docs))
        path = draw(st.sampled_from(paths(doc) + known_paths(doc)))
        put(doc, path, draw(st.one_of(near(get(doc, path)), values)))
    return dump(docs)


overrides = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "replicas": st.dictionaries(st.sampled_from(["web", "other"]), st.integers(0, 20000)),
            "deleted_pods": st.lists(st.sampled_from(["web-0", "web-1", "solo"])),
            "services": st.lists(
                st.builds(
                    lambda name, port: {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {"name": name},
                        "spec": {
                            "type": "NodePort",
                            "selector": {"app": "web"},
                            "ports": [{"port": port}],
                        },
                    },
                    st.sampled_from(["web", "web-np"]),
                    st.integers(0, 70000),
                ),
                max_size=2,
            ),
        },
    ),
)


@FUZZ
@given(edited(), overrides)
def test_edited_topology_is_built_or_refused(text, changes):
    """`changes` are what `netsim scale`, `expose` and `delete pod` put on top of a file."""
    check(lambda: topology.parse(text, NAME, changes))


@st.composite
def mangled(draw) -> str:
    """A shipped topology with characters inserted, deleted or replaced, or a snippet put in."""
    text = draw(st.sampled_from(TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        what = draw(st.sampled_from(["insert", "delete", "snippet", "line"]))
        if what == "insert":
            text = text[:at] + draw(st.text(min_size=1, max_size=8)) + text[at:]
        elif what == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)) :]
        elif what == "snippet":
            text = text[:at] + draw(st.sampled_from(SNIPPETS + STRINGS)) + text[at:]
        else:  # repeat a line: duplicate keys, extra list items
            lines = text.splitlines(keepends=True)
            i = draw(st.integers(0, len(lines) - 1))
            text = "".join(lines[: i + 1] + lines[i:])
    return text


@FUZZ
@given(mangled())
def test_mangled_topology_is_built_or_refused(text):
    check(lambda: topology.parse(text, NAME))


@st.composite
def mangled_bytes(draw) -> bytes:
    data = draw(st.sampled_from(TEXTS)).encode()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


@FUZZ
@given(mangled_bytes())
def test_file_with_any_bytes_is_built_or_refused(data):
    fd, path = tempfile.mkstemp(suffix=".yaml")
    try:
        os.write(fd, data)
        os.close(fd)
        check(lambda: topology.load(path))
    finally:
        os.unlink(path)


WRONG = [None, True, -1, 10**19, 1.5, "x" * 70, [], {"a": "b"}]


def test_every_field_takes_or_refuses_each_kind_of_value():
    """Not random: each kind of wrong value in place of each value of two files that between
    them hold every field netsim reads (the second adds Calico's to the Cluster document)."""
    for name, kinds in (("flannel-vxlan.yaml", None), ("calico-bgp-rr.yaml", {"Cluster"})):
        base = DOCS[FILES.index(TOPOLOGIES / name)]
        for d, doc in enumerate(base):
            if kinds and doc["kind"] not in kinds:
                continue
            for path in dict.fromkeys(paths(doc) + known_paths(doc)):
                for value in WRONG:
                    docs = copy.deepcopy(base)
                    put(docs[d], path, value)
                    text = dump(docs)
                    check(lambda: topology.parse(text, NAME))  # noqa: B023 (called at once)


def test_every_snippet_in_a_name_a_count_a_label_and_a_list():
    """Each raw snippet where a string, an integer, a label value and a list are read."""
    base = DOCS[FILES.index(TOPOLOGIES / "flannel-vxlan.yaml")]
    places = [
        (0, ("metadata", "name")),
        (1, ("spec", "replicas")),
        (1, ("spec", "selector", "matchLabels", "app")),
        (0, ("spec", "nodes")),
    ]
    for i in range(len(SNIPPETS)):
        for d, path in places:
            docs = copy.deepcopy(base)
            put(docs[d], path, SENTINEL.format(i))
            text = dump(docs)
            check(lambda: topology.parse(text, NAME))  # noqa: B023 (called at once)
