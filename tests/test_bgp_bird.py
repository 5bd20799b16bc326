"""BIRD 2 as Calico's BGP data plane, on throwaway namespaces: full mesh, a node's BIRD going
away and back, route reflection, and an external top-of-rack peer that cannot harm the cluster.

Every namespace is named netsim.tbgp<hex>.*, every BIRD is ended by its PID, and the root
namespace gets nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import needs_root, wait_for

from netsim.bgp import bird
from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.kernel import proc, sysctl

ASN, TOR_ASN = 64512, 65001
TOR_IP = "10.77.0.254"


def needs_bird(test):
    """Root (namespaces) and BIRD 2."""
    return needs_root(
        pytest.mark.skipif(
            shutil.which("bird") is None, reason="needs BIRD 2 (apt-get install bird2)"
        )(test)
    )


def _ip(netns: str, *argv: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["ip", "-n", netns, *argv], input=stdin, capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise AssertionError(f"ip -n {netns} {' '.join(argv)}: {result.stderr}")
    return result.stdout


class Lab:
    """An underlay bridge and N nodes (10.77.0.2.., block 192.168.N.0/26 blackholed, a "pod"
    address 192.168.N.1/32 on lo), optionally a top-of-rack namespace at 10.77.0.254."""

    def __init__(self, root: Path, count: int, tor: bool = False):
        self.tag = "netsim.tbgp" + uuid.uuid4().hex[:8]
        self.root = root
        self.underlay = f"{self.tag}.underlay"
        self.nodes = [
            {
                "name": f"n{i}",
                "netns": f"{self.tag}.node.n{i}",
                "ip": f"10.77.0.{i + 1}",
                "blocks": [f"192.168.{i}.0/26"],
                "pod": f"192.168.{i}.1",
                "reflector": False,
                "dir": str(root / f"n{i}"),
            }
            for i in range(1, count + 1)
        ]
        self.tor = (
            {"name": "tor", "netns": f"{self.tag}.tor", "ip": TOR_IP, "dir": str(root / "tor")}
            if tor
            else None
        )
        self.procs: dict[str, tuple[int, int]] = {}
        self.made: list[str] = []

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def build(self) -> Lab:
        nsmod.create(self.underlay)
        self.made.append(self.underlay)
        _ip(
            self.underlay,
            "-batch",
            "-",
            stdin="link set lo up\nlink add br0 type bridge\nlink set br0 up\n",
        )
        hosts = self.nodes + ([self.tor] if self.tor else [])
        for i, host in enumerate(hosts):
            nsmod.create(host["netns"])
            self.made.append(host["netns"])
            port = f"p{i}"
            _ip(
                self.underlay,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host["netns"],
            )
            _ip(self.underlay, "link", "set", port, "master", "br0", "up")
            cmds = ["link set lo up", f"addr add {host['ip']}/24 dev eth0", "link set eth0 up"]
            if "pod" in host:
                cmds += [
                    f"addr add {host['pod']}/32 dev lo",
                    f"route add blackhole {host['blocks'][0]}",
                ]
            _ip(host["netns"], "-batch", "-", stdin="\n".join(cmds) + "\n")
            sysctl.set_in(host["netns"], {"net.ipv4.ip_forward": "1"})
        return self

    def start(self, host: dict, config: str) -> None:
        self.procs[host["name"]] = bird.start(host["netns"], host["dir"], config)

    def stop(self, host: dict) -> None:
        if host["name"] in self.procs:
            proc.stop([self.procs.pop(host["name"])])

    def close(self) -> None:
        """Stop every BIRD by PID, then remove the namespaces; runs even after a failure."""
        try:
            proc.stop(list(self.procs.values()))
            self.procs.clear()
        finally:
            for name in reversed(self.made):
                nsmod.remove(name)

    def mesh_config(self, host: dict, tor: bool = False) -> str:
        peers = [
            {"name": n["name"], "ip": n["ip"], "asn": ASN, "role": "mesh"}
            for n in self.nodes
            if n is not host
        ]
        if tor:
            peers.append({"name": "tor", "ip": TOR_IP, "asn": TOR_ASN, "role": "external"})
        return bird.render(host, peers, ASN)

    def reflector_configs(self, reflectors: set[str]) -> dict[str, str]:
        """Reflectors peer with every node (clients as `rr client`), clients with reflectors."""
        out = {}
        for host in self.nodes:
            is_rr = host["name"] in reflectors
            peers = []
            for other in self.nodes:
                if other is host or not (is_rr or other["name"] in reflectors):
                    continue
                role = (
                    ("mesh" if other["name"] in reflectors else "rr-client")
                    if is_rr
                    else "reflector"
                )
                peers.append({"name": other["name"], "ip": other["ip"], "asn": ASN, "role": role})
            out[host["name"]] = bird.render({**host, "reflector": is_rr}, peers, ASN)
        return out


def bird_routes(netns: str) -> dict[str, tuple[str | None, str | None]]:
    """The kernel's `proto bird` routes: destination -> (gateway, device)."""
    out = _ip(netns, "-j", "route", "show", "proto", "bird")
    return {r["dst"]: (r.get("gateway"), r.get("dev")) for r in json.loads(out or "[]")}


def expected_routes(lab: Lab, host: dict) -> dict[str, tuple[str, str]]:
    return {o["blocks"][0]: (o["ip"], "eth0") for o in lab.nodes if o is not host}


def import_updates(host: dict, protocol: str) -> dict[str, int]:
    """The import update counters BIRD keeps for one session (`show protocols all`):
    received, rejected, filtered, ignored, accepted."""
    out = subprocess.run(
        ["birdc", "-s", os.path.join(host["dir"], bird.CTL), "show", "protocols", "all", protocol],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    row = next(
        (
            line.split(":", 1)[1].split()
            for line in out.splitlines()
            if line.strip().startswith("Import updates:")
        ),
        [],
    )
    names = ("received", "rejected", "filtered", "ignored", "accepted")
    return {k: int(v) if v.isdigit() else 0 for k, v in zip(names, row, strict=False)}


def all_converged(lab: Lab) -> bool:
    return all(bird_routes(h["netns"]) == expected_routes(lab, h) for h in lab.nodes)


def ping(lab: Lab, src: str, dst: str) -> subprocess.CompletedProcess:
    a, b = lab.node(src), lab.node(dst)
    return subprocess.run(
        ["ip", "netns", "exec", a["netns"], "ping", "-c1", "-W2", "-I", a["pod"], b["pod"]],
        capture_output=True,
        text=True,
        timeout=10,
    )


@pytest.fixture
def make_lab(tmp_path):
    labs: list[Lab] = []

    def make(count: int = 3, tor: bool = False) -> Lab:
        lab = Lab(tmp_path, count, tor)
        labs.append(lab)
        return lab.build()

    yield make
    for lab in labs:
        lab.close()
        assert not [n for n in nsmod.names() if n.startswith(lab.tag)], "namespaces left"


# ---------------------------------------------------------------------------------------------
# rendering (no root needed)


def test_render_rejects_bad_peers():
    node = {"name": "n1", "ip": "10.77.0.2", "blocks": ["192.168.1.0/26"], "reflector": False}
    with pytest.raises(NetsimError, match="AS 65001"):
        bird.render(node, [{"name": "n2", "ip": "10.77.0.3", "asn": 65001, "role": "mesh"}])
    with pytest.raises(NetsimError, match="not a reflector"):
        bird.render(node, [{"name": "n2", "ip": "10.77.0.3", "asn": ASN, "role": "rr-client"}])
    with pytest.raises(NetsimError, match="needs an AS of its own"):
        bird.render(node, [{"name": "t", "ip": TOR_IP, "asn": ASN, "role": "external"}])
    with pytest.raises(NetsimError, match="in no IP pool"):
        bird.render({**node, "blocks": ["10.1.0.0/26"]}, [])
    with pytest.raises(NetsimError, match="already used"):
        bird.render(node, [{"name": "n2", "ip": "10.77.0.2", "asn": ASN, "role": "mesh"}])


def test_render_shape():
    node = {"name": "n1", "ip": "10.77.0.2", "blocks": ["192.168.1.0/26"], "reflector": True}
    text = bird.render(
        node,
        [
            {"name": "n2", "ip": "10.77.0.3", "asn": ASN, "role": "rr-client"},
            {"name": "tor", "ip": TOR_IP, "asn": TOR_ASN, "role": "external"},
        ],
    )
    assert "router id 10.77.0.2;" in text
    assert "route 192.168.1.0/26 blackhole;" in text
    assert "protocol bgp Node_10_77_0_3 from calico_ibgp" in text and "rr client;" in text
    assert "neighbor 10.77.0.254 as 65001;" in text
    assert "connect delay time 1;" in text
    assert "export where source = RTS_BGP;" in text


def test_parse_protocols():
    rows = [
        (2002, "Name       Proto      Table      State  Since         Info"),
        (1002, "device1    Device     ---        up     2024-05-01 10:00:00.123  "),
        (1002, "Mesh_10_77_0_3 BGP        ---        up     2024-05-01 10:00:01.5  Established   "),
        (
            1002,
            "Mesh_10_77_0_4 BGP        ---        start  10:00:01.500  Active        "
            "Socket: Connection refused",
        ),
        (0, ""),
    ]
    got = bird.parse_protocols(rows)
    assert [p["name"] for p in got] == ["device1", "Mesh_10_77_0_3", "Mesh_10_77_0_4"]
    assert got[1]["info"] == "Established" and got[1]["since"] == "2024-05-01 10:00:01.5"
    assert got[2]["state"] == "start"
    assert got[2]["info"] == "Active        Socket: Connection refused"


# ---------------------------------------------------------------------------------------------
# BIRD in namespaces


@needs_bird
def test_full_mesh(make_lab):
    lab = make_lab(3)
    for host in lab.nodes:
        lab.start(host, lab.mesh_config(host))
    bird.wait_established([h["dir"] for h in lab.nodes], timeout=5)
    wait_for(lambda: all_converged(lab), 3, "every node holds its peers' blocks")
    for host in lab.nodes:
        assert bird_routes(host["netns"]) == expected_routes(lab, host)
        raw = json.loads(_ip(host["netns"], "-j", "route", "show", "table", "main"))
        assert {r["dst"]: r.get("protocol") for r in raw}[host["blocks"][0]] != "bird", (
            "BIRD must leave the node's own blackhole alone"
        )
        assert {r["dst"]: r.get("type") for r in raw}[host["blocks"][0]] == "blackhole"
        states = {p["name"]: p["info"] for p in bird.protocols(host["dir"]) if p["proto"] == "BGP"}
        assert len(states) == 2 and all(s.startswith("Established") for s in states.values())
    for src, dst in (("n1", "n2"), ("n2", "n3"), ("n3", "n1")):
        result = ping(lab, src, dst)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_bird
def test_node_bird_stops_and_returns(make_lab):
    lab = make_lab(3)
    configs = {h["name"]: lab.mesh_config(h) for h in lab.nodes}
    for host in lab.nodes:
        lab.start(host, configs[host["name"]])
    wait_for(lambda: all_converged(lab), 5, "initial convergence")
    n3 = lab.node("n3")
    lab.stop(n3)
    gone = wait_for(
        lambda: all(
            "192.168.3.0/26" not in bird_routes(lab.node(n)["netns"]) for n in ("n1", "n2")
        ),
        5,
        "n3's block withdrawn",
    )
    assert bird_routes(n3["netns"]) == {}, "a stopped BIRD leaves no routes behind"
    assert gone < 2, f"withdrawal took {gone:.2f} s (expected: at once, on the Cease)"
    lab.start(n3, configs["n3"])
    back = wait_for(lambda: all_converged(lab), 8, "n3's block back everywhere")
    assert back < 6, f"re-convergence took {back:.2f} s"


@needs_bird
def test_route_reflector(make_lab):
    lab = make_lab(3)
    configs = lab.reflector_configs({"n1"})
    assert "rr client;" in configs["n1"] and "Mesh_" not in configs["n2"]
    for host in lab.nodes:
        lab.start(host, configs[host["name"]])
    bird.wait_established([h["dir"] for h in lab.nodes], timeout=5)
    wait_for(lambda: all_converged(lab), 3, "reflected blocks everywhere")
    # n2 has no session with n3, yet reaches n3's block directly, not through the reflector
    assert bird_routes(lab.node("n2")["netns"])["192.168.3.0/26"] == ("10.77.0.4", "eth0")
    assert {p["name"] for p in bird.protocols(lab.node("n2")["dir"]) if p["proto"] == "BGP"} == {
        "Node_10_77_0_2"
    }
    result = ping(lab, "n2", "n3")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_bird
def test_two_reflectors(make_lab):
    """Clients peer with both reflectors; the reflectors peer with each other as plain iBGP."""
    lab = make_lab(4)
    configs = lab.reflector_configs({"n1", "n2"})
    for host in lab.nodes:
        lab.start(host, configs[host["name"]])
    bird.wait_established([h["dir"] for h in lab.nodes], timeout=5)
    wait_for(lambda: all_converged(lab), 3, "blocks reflected by two reflectors")
    assert bird_routes(lab.node("n3")["netns"])["192.168.4.0/26"] == ("10.77.0.5", "eth0")


HOSTILE_TOR = """\
log stderr all;
router id 10.77.0.254;
protocol device { }
protocol static hijack {
  ipv4;
  route 0.0.0.0/0 blackhole;
  route 10.77.0.0/24 blackhole;
  route 192.168.2.0/26 blackhole;
  route 192.168.2.0/27 blackhole;
  route 192.168.9.0/26 blackhole;
}
template bgp hostile {
  local 10.77.0.254 as 65001;
  connect delay time 1; connect retry time 2; error wait time 1, 5;
  ipv4 { import none; export all; next hop self; };
}
"""


@needs_bird
def test_external_peer(make_lab):
    lab = make_lab(3, tor=True)
    tor = lab.tor
    assert tor is not None
    for host in lab.nodes:
        lab.start(host, lab.mesh_config(host, tor=True))
    lab.start(
        tor,
        bird.render_external(
            tor, [{"name": n["name"], "ip": n["ip"], "asn": ASN} for n in lab.nodes], TOR_ASN
        ),
    )
    dirs = [h["dir"] for h in lab.nodes] + [tor["dir"]]
    bird.wait_established(dirs, timeout=5)
    want_tor = {n["blocks"][0]: (n["ip"], "eth0") for n in lab.nodes}
    wait_for(lambda: bird_routes(tor["netns"]) == want_tor, 3, "the ToR learns every block")
    wait_for(lambda: all_converged(lab), 3, "mesh converged beside the ToR")

    # the same router turns hostile: default, underlay, a node's block and a more specific one
    hostile = HOSTILE_TOR + "".join(
        f"protocol bgp N{i} from hostile {{ neighbor {n['ip']} as {ASN}; }}\n"
        for i, n in enumerate(lab.nodes)
    )
    bird.reconfigure(tor["dir"], hostile)
    bird.wait_established(dirs, timeout=8)
    # every node has heard all five hostile routes (and kept none) before the kernel is read
    session = "Global_" + TOR_IP.replace(".", "_")
    wait_for(
        lambda: all(import_updates(h, session)["received"] >= 5 for h in lab.nodes),
        5,
        "every node received the hostile router's routes",
    )
    for host in lab.nodes:
        assert import_updates(host, session)["accepted"] == 0
    for host in lab.nodes:
        assert bird_routes(host["netns"]) == expected_routes(lab, host)
        assert _ip(host["netns"], "route", "show", "default") == ""
    result = ping(lab, "n1", "n2")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_bird
def test_start_reports_bad_config_and_timeout(make_lab):
    lab = make_lab(2)
    n1, n2 = lab.nodes
    with pytest.raises(NetsimError, match="syntax error"):
        lab.start(n1, "router id 10.77.0.2;\nprotocol bogus {}\n")
    assert not lab.procs
    good = lab.mesh_config(n1)
    lab.start(n1, good)  # n2 never starts
    with pytest.raises(NetsimError, match="BIRD rejected"):
        bird.reconfigure(n1["dir"], good.replace("router id", "router idx"))
    assert Path(n1["dir"], "bird.conf").read_text() == good
    assert not Path(n1["dir"], "bird.conf.new").exists()
    bird.reconfigure(n1["dir"], good)  # "Nothing to do" is fine
    with pytest.raises(NetsimError) as err:
        bird.wait_established([n1["dir"]], timeout=1.5)
    msg = str(err.value)
    assert "node n1" in msg and "Mesh_10_77_0_3" in msg and "mesh n2" in msg
    assert "bird.log" in msg


@needs_root
def test_start_reports_a_bird_that_exits_or_never_answers(make_lab, monkeypatch):
    """The two ways BIRD can fail after its config was accepted: it exits, or it never opens
    its control socket. Either way the error ends with BIRD's own log and no process is left."""
    lab = make_lab(1)
    n1 = lab.nodes[0]
    real_spawn, started = bird.proc.spawn, []

    def stand_in(script: str):
        def spawn(argv, log, netns=None, **kw):
            started.append(real_spawn(["sh", "-c", script], log, netns=netns))
            return started[-1]

        return spawn

    monkeypatch.setattr(bird.proc, "spawn", stand_in("echo 'bird: boom: cannot go on'; exit 1"))
    with pytest.raises(NetsimError, match=r"exited at start:\n(.|\n)*boom: cannot go on"):
        bird.start(n1["netns"], n1["dir"], lab.mesh_config(n1))
    monkeypatch.setattr(bird.proc, "spawn", stand_in("echo 'bird: stuck'; exec sleep 30"))
    with pytest.raises(NetsimError, match=r"did not open .*bird.ctl within 5 s:\n(.|\n)*stuck"):
        bird.start(n1["netns"], n1["dir"], lab.mesh_config(n1))
    assert len(started) == 2 and not any(bird.proc.alive(*p) for p in started)
