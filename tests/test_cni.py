"""The CNI executable driven as a runtime drives it: CNI_* environment, config on stdin, result
or error on stdout, exit status; in throwaway node and pod namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ip_json, needs_root, run_netsim

from netsim.kernel import netns as nsmod

pytestmark = needs_root
PLUGIN = str(Path(sys.executable).parent / "netsim-cni")
DEBIAN_CNI = "/usr/lib/cni"
SUBNET = "10.244.1.0/24"
BLOCK = "/calico/ipam/v2/assignment/ipv4/block/192.168.0.0-26"


class Node:
    """A throwaway node namespace, pods in their own namespaces, an IPAM store in tmp."""

    def __init__(self, tmp_path: Path, mode: str = "flannel-host-gw", version: str = "1.0.0"):
        self.prefix = f"netsim.tc{uuid.uuid4().hex[:8]}"
        self.netns = f"{self.prefix}.node"
        self.data_dir = str(tmp_path / "ipam")
        self.made = [self.netns]
        nsmod.create(self.netns)
        self.conf = {
            "cniVersion": version,
            "name": "cbr0",
            "type": "netsim",
            "mode": mode,
            "node": {"network": "10.244.0.0/16", "subnet": SUBNET, "mtu": 1450},
            "ipam": {
                "type": "netsim-host-local",
                "ranges": [[{"subnet": SUBNET}]],
                "routes": [{"dst": "10.244.0.0/16"}],
                "dataDir": self.data_dir,
            },
        }

    def pod(self, name: str) -> str:
        netns = f"{self.prefix}.{name}"
        nsmod.create(netns)
        self.made.append(netns)
        return nsmod.path(netns)

    def cni(
        self,
        command: str,
        container: str = "c1",
        netns: str = "",
        ifname: str = "eth0",
        conf: dict | bytes | None = None,
        drop: str = "",
        **extra: str,
    ):
        """Run the plugin in the node's namespace; (exit status, decoded stdout)."""
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": DEBIAN_CNI,
            **extra,
        }
        env.pop(drop, None)
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf or self.conf).encode()
        done = subprocess.run(
            [PLUGIN],
            input=stdin,
            env=env,
            capture_output=True,
            timeout=30,
            preexec_fn=lambda: nsmod.enter_for_exec(self.netns),
        )
        out = done.stdout.decode()
        return done.returncode, (json.loads(out) if out.strip() else None)

    def allocated(self) -> list[str]:
        store = Path(self.data_dir) / "cbr0"
        return (
            sorted(p.name for p in store.iterdir() if p.name[0].isdigit()) if store.exists() else []
        )

    def veths(self) -> list[str]:
        return [
            link["ifname"]
            for link in ip_json(self.netns, "link")
            if link["ifname"].startswith("veth")
        ]

    def remove(self) -> None:
        for netns in self.made:
            nsmod.remove(netns)


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.remove()


def calico_ipam(etcd) -> dict:
    """The ipam section of a Calico node's config: the test's etcd and where it is reached,
    and the nodes' locks in the test's own directory (not the plugin's default, /run/calico)."""
    return {
        "type": "netsim-calico-ipam",
        "etcdEndpoints": [etcd.url],
        "etcdNetns": etcd.netns,
        "dataDir": str(etcd.dir / "locks"),
    }


def etcd_json(etcd, key: str):
    out = etcd.etcdctl("get", key, "--print-value-only")
    return json.loads(out) if out.strip() else None


def with_prev(conf: dict, result: dict) -> dict:
    return {**conf, "prevResult": result}


def test_version_lists_every_supported_version(node):
    code, out = node.cni("VERSION", conf={"cniVersion": "1.1.0"})
    assert code == 0
    assert out == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize(
    "mode,version",
    [
        ("flannel-host-gw", "0.4.0"),
        ("flannel-vxlan", "1.0.0"),
        ("flannel-udp", "1.0.0"),
        ("flannel-host-gw", "1.1.0"),
    ],
)
def test_add_check_del_del(tmp_path, mode, version):
    node = Node(tmp_path, mode, version)
    try:
        pod = node.pod("p1")
        code, result = node.cni("ADD", netns=pod)
        assert code == 0, result
        assert result["cniVersion"] == version
        host, inside = result["interfaces"]
        assert inside == {"name": "eth0", "mac": inside["mac"], "sandbox": pod}
        ip = result["ips"][0]
        assert ip["address"] == "10.244.1.2/24" and ip["gateway"] == "10.244.1.1"
        assert ip["interface"] == 1
        assert ("version" in ip) == (version == "0.4.0")
        assert {"dst": "10.244.0.0/16", "gw": "10.244.1.1"} in result["routes"]
        assert {"dst": "0.0.0.0/0", "gw": "10.244.1.1"} in result["routes"]
        # the kernel agrees: address, routes, the veth on cni0 with hairpin, the IPAM file
        pod_ns = os.path.basename(pod)
        addrs = ip_json(pod_ns, "addr", "show", "eth0")[0]["addr_info"]
        assert _pairs(addrs) == {"local": "10.244.1.2", "prefixlen": 24}
        routes = {(r["dst"], r.get("gateway")) for r in ip_json(pod_ns, "route")}
        assert {("default", "10.244.1.1"), ("10.244.0.0/16", "10.244.1.1")} <= routes
        veth = ip_json(node.netns, "-d", "link", "show", host["name"])[0]
        assert veth["master"] == "cni0" and veth["linkinfo"]["info_slave_data"]["hairpin"]
        assert (Path(node.data_dir) / "cbr0" / "10.244.1.2").read_bytes() == b"c1\r\neth0"
        ping = subprocess.run(
            ["ip", "netns", "exec", pod_ns, "ping", "-c1", "-W1", "10.244.1.1"], capture_output=True
        )
        assert ping.returncode == 0
        code, out = node.cni("CHECK", netns=pod, conf=with_prev(node.conf, result))
        assert (code, out) == (0, None)
        assert node.cni("DEL", netns=pod, conf=with_prev(node.conf, result)) == (0, None)
        assert node.veths() == [] and node.allocated() == []
        assert node.cni("DEL", netns=pod, conf=with_prev(node.conf, result)) == (0, None)
    finally:
        node.remove()


def _pairs(addr_info: list[dict]) -> dict:
    """The IPv4 address of `ip -j addr` as {local, prefixlen}."""
    return {
        k: v
        for a in addr_info
        if a.get("family") == "inet"
        for k, v in a.items()
        if k in ("local", "prefixlen")
    }


@pytest.mark.parametrize("mode", ["calico-vxlan", "calico-ipip", "calico-bgp"])
def test_calico_add_check_del_del(etcd, tmp_path, mode):
    """Calico's pod side, the same in its three modes: cali veth with ee:ee:ee:ee:ee:ee and
    proxy ARP, a /32 from the node's block, 169.254.1.1 as the pod's gateway; the pod answers
    through the node's route."""
    node = Node(tmp_path, mode, "1.0.0")
    node.conf.update(
        node={"name": "n1", "network": "192.168.0.0/16", "blockSize": 26, "mtu": 1450},
        ipam=calico_ipam(etcd),
    )
    try:
        pod = node.pod("p1")
        args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"
        code, result = node.cni("ADD", netns=pod, CNI_ARGS=args)
        assert code == 0, result
        host, inside = result["interfaces"]
        assert host == {"name": "cali0d7763386da", "mac": "ee:ee:ee:ee:ee:ee"}
        assert result["ips"] == [{"address": "192.168.0.0/32", "interface": 1}]
        assert result["routes"] == [
            {"dst": "169.254.1.1/32"},
            {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
        ]
        pod_ns = os.path.basename(pod)
        assert {(r["dst"], r.get("gateway"), r.get("scope")) for r in ip_json(pod_ns, "route")} == {
            ("default", "169.254.1.1", None),
            ("169.254.1.1", None, "link"),
        }
        assert {
            "dst": "192.168.0.0",
            "dev": "cali0d7763386da",
            "scope": "link",
            "flags": [],
        } in ip_json(node.netns, "route")
        sysctl = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                node.netns,
                "sysctl",
                "-n",
                "net.ipv4.conf.cali0d7763386da.proxy_arp",
                "net.ipv4.neigh.cali0d7763386da.proxy_delay",
            ],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert sysctl == ["1", "0"]
        block = etcd_json(etcd, BLOCK)
        assert block["affinity"] == "host:n1" and block["allocations"][0] == 0
        assert block["attributes"][0]["handle_id"] == "cbr0.c1"  # <network>.<containerID>
        assert block["attributes"][0]["secondary"]["pod"] == "web-0"
        assert etcd_json(etcd, "/calico/ipam/v2/handle/cbr0.c1") == {
            "block": {"192.168.0.0/26": 1},
            "deleted": False,
        }
        assert node.cni("CHECK", netns=pod, conf=with_prev(node.conf, result), CNI_ARGS=args) == (
            0,
            None,
        )
        assert node.cni("DEL", netns=pod, CNI_ARGS=args) == (0, None)
        assert etcd_json(etcd, BLOCK)["allocations"][0] is None
        assert etcd_json(etcd, "/calico/ipam/v2/handle/cbr0.c1") is None
        assert ip_json(node.netns, "link", "show", "type", "veth") == []
        assert node.cni("DEL", netns=pod, CNI_ARGS=args) == (0, None)
    finally:
        node.remove()


def test_a_failure_after_ipam_gives_the_address_back(etcd, tmp_path):
    """A second pod with the same Kubernetes name (so the same cali veth name) fails after
    Calico IPAM gave it an address: the ADD fails with the veth named, and the address is
    free again, the first pod's untouched."""
    node = Node(tmp_path, "calico-vxlan", "1.0.0")
    node.conf.update(
        node={"name": "n1", "network": "192.168.0.0/16", "blockSize": 26, "mtu": 1450},
        ipam=calico_ipam(etcd),
    )
    args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"

    def held():
        block = etcd_json(etcd, BLOCK)
        return [block["attributes"][i]["handle_id"] for i in block["allocations"] if i is not None]

    try:
        assert node.cni("ADD", container="c1", netns=node.pod("p1"), CNI_ARGS=args)[0] == 0
        code, out = node.cni("ADD", container="c2", netns=node.pod("p2"), CNI_ARGS=args)
        assert code == 1 and "cali0d7763386da" in out["msg"], out
        assert held() == ["cbr0.c1"]
        assert [link["ifname"] for link in ip_json(f"{node.prefix}.p2", "link")] == ["lo"]
    finally:
        node.remove()


def test_del_after_the_namespace_is_gone_releases_the_address(node):
    pod = node.pod("p1")
    code, result = node.cni("ADD", netns=pod)
    assert code == 0 and node.allocated() == ["10.244.1.2"]
    nsmod.remove(os.path.basename(pod))
    assert node.cni("DEL", netns=pod) == (0, None)
    assert node.allocated() == [] and node.veths() == []


def test_check_names_the_missing_route(node):
    pod = node.pod("p1")
    _, result = node.cni("ADD", netns=pod)
    subprocess.run(["ip", "-n", os.path.basename(pod), "route", "del", "10.244.0.0/16"], check=True)
    code, out = node.cni("CHECK", netns=pod, conf=with_prev(node.conf, result))
    assert code == 1 and out["code"] == 103
    assert out["msg"] == f"route 10.244.0.0/16 via 10.244.1.1 is missing in netns {pod}"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (["addr", "flush", "dev", "eth0"], "address 10.244.1.2/24 is missing on eth0"),
        (
            ["link", "set", "eth0", "address", "02:00:00:00:00:99"],
            "interface eth0 has MAC 02:00:00:00:00:99",
        ),
        (["link", "del", "eth0"], "interface eth0 is missing in netns"),
        (["node", "link", "set", "VETH", "nomaster"], "is not attached to cni0"),
    ],
)
def test_check_names_what_differs(node, breakage, message):
    pod = node.pod("p1")
    _, result = node.cni("ADD", netns=pod)
    where = node.netns if breakage[0] == "node" else os.path.basename(pod)
    argv = [a.replace("VETH", result["interfaces"][0]["name"]) for a in breakage if a != "node"]
    subprocess.run(["ip", "-n", where, *argv], check=True)
    code, out = node.cni("CHECK", netns=pod, conf=with_prev(node.conf, result))
    assert code == 1 and out["code"] == 103 and message in out["msg"], out


def test_calico_check_names_the_missing_node_route(etcd, tmp_path):
    node = Node(tmp_path, "calico-vxlan", "1.0.0")
    node.conf.update(
        node={"name": "n1", "network": "192.168.0.0/16", "blockSize": 26, "mtu": 1450},
        ipam=calico_ipam(etcd),
    )
    args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"
    try:
        pod = node.pod("p1")
        _, result = node.cni("ADD", netns=pod, CNI_ARGS=args)
        conf = with_prev(node.conf, result)
        assert node.cni("CHECK", netns=pod, conf=conf, CNI_ARGS=args) == (0, None)
        subprocess.run(["ip", "-n", node.netns, "route", "del", "192.168.0.0/32"], check=True)
        code, out = node.cni("CHECK", netns=pod, conf=conf, CNI_ARGS=args)
        assert code == 1 and out["code"] == 103
        assert (
            out["msg"] == "route 192.168.0.0 dev cali0d7763386da is missing in the node's namespace"
        )
    finally:
        node.remove()


def test_64_parallel_adds_get_distinct_addresses_and_dels_release_them(node):
    pods = [node.pod(f"p{i}") for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        added = list(pool.map(lambda i: node.cni("ADD", f"c{i}", pods[i]), range(64)))
    assert all(code == 0 for code, _ in added), [o for c, o in added if c]
    ips = {out["ips"][0]["address"] for _, out in added}
    assert len(ips) == 64 and len(node.allocated()) == 64 and len(node.veths()) == 64
    with ThreadPoolExecutor(16) as pool:
        deleted = list(pool.map(lambda i: node.cni("DEL", f"c{i}", pods[i]), range(64)))
    assert all(d == (0, None) for d in deleted)
    assert node.allocated() == [] and node.veths() == []


def test_gc_releases_what_is_not_in_the_valid_list(tmp_path):
    node = Node(tmp_path, version="1.1.0")
    try:
        pods = [node.pod(f"p{i}") for i in range(3)]
        for i, pod in enumerate(pods):
            assert node.cni("ADD", f"c{i}", pod)[0] == 0
        keep = [{"containerID": "c0", "ifname": "eth0"}]
        code, out = node.cni("GC", conf={**node.conf, "cni.dev/valid-attachments": keep})
        assert (code, out) == (0, None)
        assert node.allocated() == ["10.244.1.2"] and len(node.veths()) == 1
        # the older key is accepted too, and an empty list releases the rest
        assert node.cni("GC", conf={**node.conf, "cni.dev/attachments": []}) == (0, None)
        assert node.allocated() == [] and node.veths() == []
    finally:
        node.remove()


def test_status_reports_code_50_until_the_node_is_set_up(tmp_path):
    from netsim.kernel import sysctl

    node = Node(tmp_path, version="1.1.0")
    try:
        code, out = node.cni("STATUS")
        assert code == 1 and out["code"] == 50 and "forwarding is off" in out["msg"]
        sysctl.set_in(node.netns, {"net.ipv4.ip_forward": "1"})
        assert node.cni("STATUS") == (0, None)
    finally:
        node.remove()


@pytest.mark.parametrize("mode", ["calico-vxlan", "calico-ipip", "calico-bgp"])
def test_calico_status_is_50_until_calico_node_set_the_node_up(etcd, tmp_path, mode):
    """Ready needs forwarding, what the node's config says the mode needs (vxlan.calico; or
    the eBPF IPIP carrier's tunnel address on lo) and the blackhole of a block affine to the
    node."""
    from netsim.kernel import sysctl

    node = Node(tmp_path, mode, "1.1.0")
    ready = {
        "calico-vxlan": {"tunnel": "vxlan.calico"},
        "calico-ipip": {"tunnelAddress": "192.168.0.0"},
    }.get(mode, {})
    node.conf.update(
        node={"name": "n1", "network": "192.168.0.0/16", "blockSize": 26, "mtu": 1450, **ready},
        ipam=calico_ipam(etcd),
    )
    try:
        sysctl.set_in(node.netns, {"net.ipv4.ip_forward": "1"})
        steps = [["route", "add", "blackhole", "192.168.0.0/26"]]
        if mode == "calico-vxlan":
            steps.insert(
                0, ["link", "add", "vxlan.calico", "type", "vxlan", "id", "4096", "dstport", "4789"]
            )
        if mode == "calico-ipip":  # the eBPF carrier's shape: no tunl0, the address on lo
            steps.insert(0, ["addr", "add", "192.168.0.0/32", "dev", "lo"])
        for step in steps:
            code, out = node.cni("STATUS")
            assert code == 1 and out["code"] == 50, out
            assert (
                "blackhole"
                if step[0] == "route"
                else "vxlan.calico is missing"
                if step[0] == "link"
                else "tunnel address 192.168.0.0"
            ) in out["msg"], out
            subprocess.run(["ip", "-n", node.netns, *step], check=True)
        assert node.cni("STATUS") == (0, None)
    finally:
        node.remove()


def test_prev_result_is_kept_and_extended(node):
    pod = node.pod("p1")
    earlier = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": pod}],
        "ips": [{"address": "127.0.0.1/8", "interface": 0}],
        "routes": [],
        "dns": {},
    }
    code, result = node.cni("ADD", netns=pod, conf=with_prev(node.conf, earlier))
    assert code == 0
    assert result["interfaces"][0] == {"name": "lo", "sandbox": pod}
    assert result["ips"][0] == {"address": "127.0.0.1/8", "interface": 0}
    assert result["ips"][1]["interface"] == 2  # our eth0, after lo and the host veth


def test_cni_args_requested_ip_and_ignore_unknown(node):
    pod = node.pod("p1")
    code, out = node.cni("ADD", netns=pod, CNI_ARGS="IgnoreUnknown=1;FOO=bar;IP=10.244.1.77")
    assert code == 0 and out["ips"][0]["address"] == "10.244.1.77/24"
    code, out = node.cni("ADD", "c2", node.pod("p2"), CNI_ARGS="FOO=bar")
    assert code == 1 and out["code"] == 4 and "unknown args FOO" in out["msg"]
    conf = {**node.conf, "args": {"cni": {"ips": ["10.244.1.88"]}}}
    code, out = node.cni("ADD", "c3", node.pod("p3"), conf=conf)
    assert code == 0 and out["ips"][0]["address"] == "10.244.1.88/24"


def test_interface_that_exists_is_refused_and_nothing_leaks(node):
    pod = node.pod("p1")
    assert node.cni("ADD", "c1", pod)[0] == 0
    code, out = node.cni("ADD", "c2", pod)
    assert code == 1 and out["code"] == 100
    assert out["msg"] == f"interface eth0 already exists in netns {pod}"
    assert node.allocated() == ["10.244.1.2"] and len(node.veths()) == 1


BAD = [
    ("not JSON", dict(conf=b"{nope"), 6, "network config on stdin is not JSON"),
    ("missing field", dict(conf="drop-node"), 7, "missing field node"),
    ("invalid field", dict(conf="bad-subnet"), 7, "invalid field node.subnet"),
    ("unsupported version", dict(conf="version-9"), 1, "unsupported cniVersion '9.9.9'"),
    ("missing variable", dict(drop="CNI_NETNS"), 4, "CNI_NETNS is not set"),
    (
        "no such netns",
        dict(netns="/run/netns/netsim.none-such"),
        3,
        "netns /run/netns/netsim.none-such does not exist",
    ),
    ("long ifname", dict(ifname="a-very-long-ifname0"), 4, "longer than 15 characters"),
    ("slash in ifname", dict(ifname="eth/0"), 4, "contains '/'"),
]


@pytest.mark.parametrize("what,kw,code,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_the_right_code_and_leaves_nothing(node, what, kw, code, msg):
    conf = dict(node.conf, node=dict(node.conf["node"]))
    change = kw.pop("conf", None)
    if change == "drop-node":
        del conf["node"]
    elif change == "bad-subnet":
        conf["node"]["subnet"] = "10.300.0.0/24"
    elif change == "version-9":
        conf["cniVersion"] = "9.9.9"
    elif isinstance(change, bytes):
        conf = change
    kw.setdefault("netns", node.pod("p1"))
    rc, out = node.cni("ADD", conf=conf, **kw)
    assert rc == 1 and out["code"] == code, out
    assert msg in out["msg"] + out["details"]
    assert node.allocated() == [] and node.veths() == []


def test_exhausted_range_and_unavailable_requested_ips(node):
    conf = dict(
        node.conf,
        ipam=dict(
            node.conf["ipam"],
            ranges=[[{"subnet": SUBNET, "rangeStart": "10.244.1.10", "rangeEnd": "10.244.1.10"}]],
        ),
    )
    assert node.cni("ADD", "c1", node.pod("p1"), conf=conf)[0] == 0
    code, out = node.cni("ADD", "c2", node.pod("p2"), conf=conf)
    assert code == 1 and out["code"] == 102
    assert out["msg"] == "no IP addresses available in range 10.244.1.10-10.244.1.10"
    code, out = node.cni("ADD", "c3", node.pod("p3"), CNI_ARGS="IP=10.244.9.9")
    assert code == 1 and "outside the range" in out["msg"]
    code, out = node.cni("ADD", "c4", node.pod("p4"), CNI_ARGS="IP=10.244.1.10", conf=conf)
    assert code == 1 and out["msg"] == "requested IP 10.244.1.10 is already allocated"
    assert node.allocated() == ["10.244.1.10"] and len(node.veths()) == 1


@pytest.mark.skipif(
    not os.path.exists(f"{DEBIAN_CNI}/host-local"),
    reason="Debian's containernetworking-plugins is not installed",
)
def test_ipam_delegated_to_debian_host_local(node):
    conf = dict(
        node.conf,
        ipam={
            "type": "host-local",
            "ranges": [[{"subnet": SUBNET}]],
            "routes": [{"dst": "10.244.0.0/16"}],
            "dataDir": node.data_dir,
        },
    )
    pod = node.pod("p1")
    code, out = node.cni("ADD", netns=pod, conf=conf)
    assert code == 0, out
    assert out["ips"][0]["address"] == "10.244.1.2/24"
    # host-local's own file: the same layout netsim's store writes
    assert (Path(node.data_dir) / "cbr0" / "10.244.1.2").read_bytes() == b"c1\r\neth0"
    assert node.cni("DEL", netns=pod, conf=conf) == (0, None)
    assert node.allocated() == []


@pytest.mark.skipif(
    not os.path.exists(f"{DEBIAN_CNI}/tuning"),
    reason="Debian's containernetworking-plugins is not installed",
)
def test_apply_cni_exec_runs_a_chain_with_debian_tuning(cluster):
    cluster.write("flannel-host-gw.yaml", replicas=2)
    text = (
        Path(cluster.file)
        .read_text()
        .replace(
            "mode: flannel-host-gw",
            "mode: flannel-host-gw\n    plugins:\n    - type: tuning\n"
            "      sysctl: {net.ipv4.conf.eth0.rp_filter: '2'}",
            1,
        )
    )
    Path(cluster.file).write_text(text)
    run_netsim("apply", "-f", cluster.file, "--cni", "exec", check=True)
    record = cluster.record()
    pod = record.pods["web-0"]
    assert pod.via == "cni-exec"
    sysctl = subprocess.run(
        ["ip", "netns", "exec", pod.netns, "sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"],
        capture_output=True,
        text=True,
    )
    assert sysctl.stdout.strip() == "2"  # tuning parsed netsim's prevResult and applied it
    node_dir = Path("/run/netsim") / cluster.name / "nodes" / pod.node
    conflist = json.loads((node_dir / "net.d" / "10-flannel-host-gw.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["netsim", "tuning"]
    cache = json.loads((node_dir / "cni-cache" / "results" / "cbr0-web-0-eth0").read_text())
    assert cache["result"]["ips"][0]["address"] == pod.ip + "/24"
    pong = cluster.netsim("curl", "web-0", f"http://{record.pods['web-1'].ip}:9376")
    assert pong.returncode == 0 and "web-1" in pong.stdout
    # scaling down runs DEL through the chain: the cache entry and the address go
    Path(cluster.file).write_text(text.replace("replicas: 2", "replicas: 1"))
    run_netsim("apply", "-f", cluster.file, "--cni", "exec", check=True)
    gone = record.pods["web-1"]
    gone_dir = Path("/run/netsim") / cluster.name / "nodes" / gone.node
    assert (gone_dir / "net.d").exists()
    assert not (gone_dir / "cni-cache" / "results" / "cbr0-web-1-eth0").exists()
    assert not (gone_dir / "ipam" / "cbr0" / gone.ip).exists()
    assert not nsmod.exists(gone.netns)
    # the choice stays with the cluster: a scale (no --cni flag) wires through the chain too
    scaled = cluster.netsim("scale", "deployment/web", "--replicas", "2", check=True)
    assert "warning" not in scaled.stderr
    again = cluster.record().pods["web-1"]
    assert again.via == "cni-exec"
    assert (gone_dir / "cni-cache" / "results" / "cbr0-web-1-eth0").exists() or (
        Path("/run/netsim")
        / cluster.name
        / "nodes"
        / again.node
        / "cni-cache"
        / "results"
        / "cbr0-web-1-eth0"
    ).exists()


def test_plugins_without_cni_exec_are_named_as_unused(cluster):
    cluster.write("flannel-host-gw.yaml", replicas=1)
    text = (
        Path(cluster.file)
        .read_text()
        .replace(
            "mode: flannel-host-gw", "mode: flannel-host-gw\n    plugins:\n    - type: tuning", 1
        )
    )
    Path(cluster.file).write_text(text)
    done = run_netsim("apply", "-f", cluster.file, check=True)
    assert (
        "spec.cni.plugins run only when pods are wired through the node's CNI chain: "
        "apply with --cni exec" in done.stderr
    )
    assert cluster.record().pods["web-0"].via == "in-process"


def test_cni_install_puts_the_plugin_under_its_type_name(tmp_path):
    bin_dir = tmp_path / "bin"
    done = run_netsim("cni", "install", "--bin-dir", str(bin_dir), check=True)
    installed = bin_dir / "netsim"
    assert done.stdout.strip() == f"installed {installed}"
    version = subprocess.run(
        [str(installed)],
        input=b'{"cniVersion":"1.0.0"}',
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
    )
    assert json.loads(version.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "netsim").write_text("#!/bin/sh\n")
    refused = run_netsim("cni", "install", "--bin-dir", str(other))
    assert refused.returncode == 1
    assert "exists and is not netsim's: remove it first" in refused.stderr


def test_host_local_layout_round_robin_and_gateway(tmp_path):
    """host-local's layout and order: `last_reserved_ip.0` holds the last address handed out,
    the next ADD takes the one after it even when a lower one was freed, and an explicit
    gateway inside rangeStart..rangeEnd is skipped."""
    node = Node(tmp_path)
    node.conf["ipam"]["ranges"] = [
        [
            {
                "subnet": SUBNET,
                "rangeStart": "10.244.1.10",
                "rangeEnd": "10.244.1.13",
                "gateway": "10.244.1.11",
            }
        ]
    ]
    store = Path(node.data_dir) / "cbr0"
    try:
        pods = [node.pod(f"p{i}") for i in range(3)]
        got = [node.cni("ADD", f"c{i}", pods[i])[1]["ips"][0] for i in range(2)]
        assert [g["address"] for g in got] == ["10.244.1.10/24", "10.244.1.12/24"]
        assert got[0]["gateway"] == "10.244.1.11"
        assert (store / "last_reserved_ip.0").read_text() == "10.244.1.12"
        assert (store / "10.244.1.12").read_bytes() == b"c1\r\neth0"
        assert (store / "lock").exists()
        assert node.cni("DEL", "c0", pods[0]) == (0, None)  # .10 is free again
        third = node.cni("ADD", "c2", pods[2])[1]["ips"][0]["address"]
        assert third == "10.244.1.13/24"  # after the last reserved, not the freed .10
        assert (store / "last_reserved_ip.0").read_text() == "10.244.1.13"
    finally:
        node.remove()


def test_calico_gc_keeps_valid_pods_and_the_node_tunnel_address(etcd, tmp_path):
    from cni.calico_ipam import BlockStore

    node = Node(tmp_path, "calico-vxlan", "1.1.0")
    node.conf.update(
        node={"name": "n1", "network": "192.168.0.0/16", "blockSize": 26, "mtu": 1450},
        ipam=calico_ipam(etcd),
    )
    store = BlockStore(etcd.store, "192.168.0.0/16", 26, lock_dir=str(tmp_path / "locks"))
    try:
        with store.session():
            # as calico-node takes its own, under Calico's handle for it
            tunnel, _ = store.allocate("n1", "vxlan-tunnel-addr-n1", "vxlan.calico")
        pods = [node.pod(f"p{i}") for i in range(2)]
        for i, pod in enumerate(pods):
            args = f"K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-{i}"
            assert node.cni("ADD", f"c{i}", pod, CNI_ARGS=args)[0] == 0
        keep = [{"containerID": "c0", "ifname": "eth0"}]
        assert node.cni("GC", conf={**node.conf, "cni.dev/valid-attachments": keep}) == (0, None)
        with store.session():
            left = sorted(store.allocations("n1"))
        assert left == sorted([(tunnel, "vxlan-tunnel-addr-n1"), ("192.168.0.1", "cbr0.c0")])
        veths = [link["ifname"] for link in ip_json(node.netns, "link", "show", "type", "veth")]
        assert veths == ["cali0d7763386da"]  # web-0's; web-1's went with its attachment
    finally:
        node.remove()


def test_host_local_session_writes_the_last_reserved_address_once_even_on_failure(tmp_path):
    """Many allocations in one session go round robin among themselves; the last one is on
    disk when the session ends, also when the work inside it failed."""
    from cni.ipam import HostLocal

    store = HostLocal(str(tmp_path), "net", "10.9.0.0/29")
    with store.session():
        assert [store.allocate(f"c{i}", "eth0") for i in range(3)] == [
            "10.9.0.2",
            "10.9.0.3",
            "10.9.0.4",
        ]
    assert (tmp_path / "net" / "last_reserved_ip.0").read_text() == "10.9.0.4"
    with pytest.raises(RuntimeError), store.session():
        assert store.allocate("c3", "eth0") == "10.9.0.5"
        raise RuntimeError("the pod's wiring failed")
    assert (tmp_path / "net" / "last_reserved_ip.0").read_text() == "10.9.0.5"
    with store.session():
        assert store.allocate("c4", "eth0") == "10.9.0.6"  # after .5, not a hole before it


def test_calico_ipam_names_a_missing_etcd_field_and_says_try_again_when_etcd_is_down(
    etcd, tmp_path
):
    """No etcdEndpoints: INVALID_CONFIG naming the field. etcd not answering: code 11, "try
    again later", one line naming the endpoint, and nothing left in the node."""
    node = Node(tmp_path, "calico-vxlan", "1.0.0")
    node.conf["node"] = {"name": "n1", "network": "192.168.0.0/16", "blockSize": 26, "mtu": 1450}
    args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"
    try:
        pod = node.pod("p1")
        node.conf["ipam"] = {"type": "netsim-calico-ipam", "etcdNetns": etcd.netns}
        code, out = node.cni("ADD", netns=pod, CNI_ARGS=args)
        assert code == 1 and out["code"] == 7 and "ipam.etcdEndpoints" in out["msg"], out
        node.conf["ipam"] = {**calico_ipam(etcd), "etcdEndpoints": ["http://127.0.0.1:9"]}
        code, out = node.cni("ADD", netns=pod, CNI_ARGS=args)
        assert code == 1 and out["code"] == 11, out
        assert "etcd is not reachable" in out["msg"] and "\n" not in out["msg"], out
        assert ip_json(node.netns, "link", "show", "type", "veth") == []
    finally:
        node.remove()
