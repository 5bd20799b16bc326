"""BIRD 2 as Calico runs it: one daemon per node, its configuration as text, its lifecycle.

`render` and `render_external` are pure (text in, text out) so that netsim can diff and record
the configuration; `start`, `reconfigure`, `protocols` and `wait_established` drive one BIRD per
namespace through its own control socket in the node's directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import time

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod
from netsim.kernel import proc

DEFAULT_ASN = 64512
DEFAULT_POOLS = ("192.168.0.0/16",)
ROLES = ("mesh", "rr-client", "reflector", "external")
CONF, CTL, PID, LOG, NETNS_FILE = "bird.conf", "bird.ctl", "bird.pid", "bird.log", "netns"
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL
_SUN_PATH_MAX = 107


# ---------------------------------------------------------------------------------------------
# configuration text


def _timers(connect_delay: int, hold_time: int, keepalive_time: int) -> str:
    return (
        f"  connect delay time {connect_delay};\n"
        "  connect retry time 2;\n"
        "  error wait time 1, 5;\n"
        "  error forget time 10;\n"
        f"  hold time {hold_time};\n"
        f"  keepalive time {keepalive_time};\n"
    )


_TIMERS_COMMENT = """\
# Timers: first connect 1 s after start (BIRD's default is 5 s), retry a refused connect after
# 2 s (default 120 s), restart a session 1-5 s after an error (default 60-300 s), hold time 9 s
# (default 240 s) so a vanished node's blocks are withdrawn within 9 s. Keepalive 1 s: BIRD
# 2.0.12 at times holds the first UPDATE of a new session until its next keepalive (measured:
# 10-node mesh converging in 3.2 s instead of 1.2 s with keepalive 3 s). Calico keeps BIRD's
# defaults; in a lab they only make every node start and every failure test slow.

"""


def _ip(value: object, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise NetsimError(f"BGP: {what} {value!r} is not an IPv4 address") from None


def _net(value: object, what: str) -> str:
    try:
        return str(ipaddress.IPv4Network(str(value)))
    except ValueError:
        raise NetsimError(
            f"BGP: {what} {value!r} is not an IPv4 network "
            "(address bits beyond the prefix must be zero)"
        ) from None


def _quote(text: object) -> str:
    """A BIRD string literal; names come from topology files, so keep them inert."""
    return '"' + re.sub(r"[^A-Za-z0-9_.:/ -]", "_", str(text)) + '"'


def _protocol_name(prefix: str, ip: str) -> str:
    """Calico's naming: Mesh_10_0_0_2 for the node mesh, Node_/Global_ for explicit peers."""
    return f"{prefix}_{ip.replace('.', '_')}"


def _prefix_set(nets: list[str]) -> str:
    return "[ " + ", ".join(f"{n}+" for n in nets) + " ]"


def _header(kind: str, name: str, ip: str, asn: int) -> str:
    return (
        f"# BIRD 2 configuration of {kind} {_quote(name)} (AS {asn}), rendered by netsim.\n"
        "# netsim rewrites this file: edits are lost.\n"
        f"# netsim-node: {_quote(name)[1:-1]}\n\n"
        "log stderr all;\n"
        f"router id {ip};\n"
        "timeformat protocol iso long ms;\n\n"
        "# Interfaces and their addresses, for next-hop checks and resolution.\n"
        "protocol device {\n  scan time 10;\n}\n\n"
    )


def render(
    node: dict,
    peers: list[dict],
    asn: int = DEFAULT_ASN,
    *,
    pools: tuple[str, ...] | list[str] = DEFAULT_POOLS,
    cluster_id: str | None = None,
    connect_delay: int = 1,
    hold_time: int = 9,
    keepalive_time: int = 1,
) -> str:
    """The bird.conf of a Calico node: announce its blocks, learn its peers' blocks into the
    kernel as `<block> via <peer IP> dev eth0 proto bird`."""
    name, ip = str(node["name"]), _ip(node["ip"], f"node {node.get('name')} ip")
    iface = str(node.get("interface", "eth0"))
    blocks = [_net(b, f"node {name} block") for b in node.get("blocks", [])]
    pool_nets = [_net(p, "IP pool") for p in pools]
    reflector = bool(node.get("reflector", False))
    if cluster_id is not None:
        cluster_id = _ip(cluster_id, "route reflector cluster id")
    if not 3 <= hold_time <= 65535 or not 1 <= keepalive_time < hold_time:
        raise NetsimError(
            f"BGP: hold time {hold_time} s must be at least 3 and above the "
            f"keepalive time {keepalive_time} s"
        )
    for block in blocks:
        if not any(
            ipaddress.ip_network(block).subnet_of(ipaddress.ip_network(p)) for p in pool_nets
        ):
            raise NetsimError(f"BGP: node {name} block {block} is in no IP pool ({pool_nets})")

    sessions, seen = [], {ip: f"node {name} itself"}
    for peer in peers:
        pname, pip = str(peer["name"]), _ip(peer["ip"], f"peer {peer.get('name')} ip")
        role, pasn = peer.get("role", "mesh"), int(peer.get("asn", asn))
        if role not in ROLES:
            raise NetsimError(
                f"BGP: peer {pname} of node {name} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if pip in seen:
            raise NetsimError(
                f"BGP: peer {pname} of node {name} has address {pip}, already used by {seen[pip]}"
            )
        seen[pip] = f"peer {pname}"
        if role == "external" and pasn == asn:
            raise NetsimError(
                f"BGP: external peer {pname} has the cluster's AS {asn}; an "
                "external (eBGP) peer needs an AS of its own"
            )
        if role != "external" and pasn != asn:
            raise NetsimError(f"BGP: {role} peer {pname} has AS {pasn}, the cluster's is {asn}")
        if role == "rr-client" and not reflector:
            raise NetsimError(
                f"BGP: node {name} has route reflector client {pname} but is "
                "not a reflector (set reflector: true)"
            )
        sessions.append((pname, pip, role, pasn))

    own = _prefix_set(blocks) if blocks else None
    out = [_header("Calico node", name, ip, asn)]
    out.append(f"define NETSIM_POOLS = {_prefix_set(pool_nets)};\n")
    if own:
        out.append(f"define NETSIM_OWN_BLOCKS = {own};\n")
    out.append(f"""
# The subnet of {iface}: the IGP route that resolves a peer's BGP next hop (Calico's template
# uses `gateway recursive` too), so the kernel gets `via <peer IP> dev {iface}`.
protocol direct {{
  ipv4;
  interface "{iface}";
}}

# This node's IPAM blocks, announced to BGP only. A real Calico node holds them as blackholes;
# netsim installs those itself, and the kernel protocol below exports BGP-learned routes only,
# so BIRD never adds, replaces or removes them. A static protocol (rather than learning the
# blackholes from the kernel) announces exactly the blocks netsim assigned, whatever else the
# kernel table holds, and changes only on reconfigure.
protocol static blocks {{
  ipv4;
""")
    out.extend(f"  route {b} blackhole;\n" for b in blocks)
    out.append(f"""}}

# Kernel main table: BGP-learned blocks go in as `proto bird` (12), metric 0 as Calico's BIRD
# leaves them. Routes outside the pools are learned only to resolve the next hop of a peer on
# another subnet through its router; nothing learned goes back to the kernel or to a peer.
# No `persist` and no graceful restart: a stopped BIRD takes its routes with it, and its
# peers withdraw its blocks at once instead of keeping stale routes for minutes.
protocol kernel {{
  ipv4 {{
    import where !(net ~ NETSIM_POOLS);
    export where source = RTS_BGP;
  }};
  learn;
  metric 0;
  scan time 10;
}}

# From Calico peers: blocks inside the pools, never this node's blocks or anything inside
# them (a more specific route would steal its pods' traffic).
filter calico_import {{
{"  if net ~ NETSIM_OWN_BLOCKS then reject;" + chr(10) if own else ""}\
  if net ~ NETSIM_POOLS then accept;
  reject;
}}

# To Calico peers: this node's blocks; on a reflector also the blocks it reflects (BGP never
# passes an iBGP-learned route to a non-client iBGP peer, so plain nodes send their own only).
filter calico_export {{
  if proto = "blocks" then accept;
  if source = RTS_BGP && net ~ NETSIM_POOLS then accept;
  reject;
}}

# To external peers: this node's blocks only, each announced by its owner.
filter calico_export_external {{
  if proto = "blocks" then accept;
  reject;
}}

{_TIMERS_COMMENT}\
# iBGP as Calico's bgp_template: multihop with recursive next-hop resolution, so a peer may sit
# on another subnet. The next hop of an announced block is this node's address (BIRD sets it
# for locally originated routes); a reflector keeps the originator's next hop (iBGP default).
template bgp calico_ibgp {{
  debug {{ states }};
  local {ip} as {asn};
  multihop;
{_timers(connect_delay, hold_time, keepalive_time)}\
  ipv4 {{
    gateway recursive;
    import filter calico_import;
    export filter calico_export;
  }};
}}
""")
    if reflector:
        cid = cluster_id or ip
        out.append(
            f"\n# This node is a route reflector (cluster id {cid}); its clients peer "
            "only with reflectors.\n"
        )
    for pname, pip, role, pasn in sessions:
        if role == "external":
            out.append(f"""
# eBGP with external router {pname}: this node's blocks go out, nothing comes in, so the
# router can neither steal pod blocks nor reroute the underlay (Calico would import all).
protocol bgp {_protocol_name("Global", pip)} {{
  description {_quote(f"external {pname}")};
  debug {{ states }};
  local {ip} as {asn};
  neighbor {pip} as {pasn};
{_timers(connect_delay, hold_time, keepalive_time)}\
  ipv4 {{
    import none;
    export filter calico_export_external;
  }};
}}
""")
            continue
        prefix, extra = "Mesh", ""
        if role == "rr-client":
            prefix, extra = "Node", f"  rr client;\n  rr cluster id {cluster_id or ip};\n"
        elif role == "reflector":
            prefix = "Node"
        out.append(f"""
protocol bgp {_protocol_name(prefix, pip)} from calico_ibgp {{
  description {_quote(f"{role} {pname}")};
  neighbor {pip} as {pasn};
{extra}}}
""")
    return "".join(out)


def render_external(
    router: dict,
    peers: list[dict],
    asn: int,
    *,
    pools: tuple[str, ...] | list[str] = DEFAULT_POOLS,
    connect_delay: int = 1,
    hold_time: int = 9,
    keepalive_time: int = 1,
) -> str:
    """The bird.conf of a top-of-rack router: eBGP with each node, installs their blocks in its
    kernel and announces nothing, so the cluster cannot be disturbed through it."""
    name, ip = str(router["name"]), _ip(router["ip"], f"router {router.get('name')} ip")
    pool_nets = [_net(p, "IP pool") for p in pools]
    out = [_header("external router", name, ip, asn)]
    out.append(f"""define NETSIM_POOLS = {_prefix_set(pool_nets)};

# BGP-learned blocks into the kernel main table (`proto bird`); nothing learned from it.
protocol kernel {{
  ipv4 {{
    import none;
    export where source = RTS_BGP;
  }};
  metric 0;
  scan time 10;
}}

# From the nodes: pod blocks inside the pools only (never a default or an underlay route).
filter tor_import {{
  if net ~ NETSIM_POOLS then accept;
  reject;
}}

{_TIMERS_COMMENT}\
template bgp tor_node {{
  debug {{ states }};
  local {ip} as {asn};
{_timers(connect_delay, hold_time, keepalive_time)}\
  ipv4 {{
    import filter tor_import;
    export none;
  }};
}}
""")
    seen = {ip}
    for peer in peers:
        pname, pip = str(peer["name"]), _ip(peer["ip"], f"peer {peer.get('name')} ip")
        pasn = int(peer.get("asn", DEFAULT_ASN))
        if pasn == asn:
            raise NetsimError(
                f"BGP: router {name} and node {pname} share AS {asn}; the "
                "external router needs an AS of its own"
            )
        if pip in seen:
            raise NetsimError(f"BGP: router {name} lists address {pip} twice")
        seen.add(pip)
        out.append(f"""
protocol bgp {_protocol_name("Node", pip)} from tor_node {{
  description {_quote(f"node {pname}")};
  neighbor {pip} as {pasn};
}}
""")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# processes


def _paths(directory: str) -> dict[str, str]:
    d = os.path.abspath(directory)
    return {
        k: os.path.join(d, f)
        for k, f in (
            ("conf", CONF),
            ("ctl", CTL),
            ("pid", PID),
            ("log", LOG),
            ("netns", NETNS_FILE),
        )
    }


def _run_in(netns: str | None, argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess:
    """Run a BIRD tool inside the node's namespace (the root namespace is never involved)."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=(lambda: nsmod.enter_for_exec(netns)) if netns else None,
        )
    except FileNotFoundError:
        raise NetsimError(f"{argv[0]} not found: install BIRD 2 (apt-get install bird2)") from None
    except subprocess.TimeoutExpired:
        raise NetsimError(f"{' '.join(argv)} did not answer within {timeout} s") from None


def check(config_path: str, netns: str | None = None) -> None:
    """`bird -p`: parse the file and report BIRD's own message if it is invalid."""
    result = _run_in(netns, ["bird", "-p", "-c", config_path])
    if result.returncode != 0:
        msg = (result.stderr + result.stdout).strip() or f"exit status {result.returncode}"
        raise NetsimError(f"BIRD rejected {config_path}: {msg}")


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def install(path: str, config: str, netns: str | None) -> None:
    """Replace the config file only with text BIRD accepts; a rejected one is not left behind.
    The staged file is this process's own: netsim and the node's confd may write at once."""
    staged = f"{path}.{os.getpid()}.new"
    _write(staged, config)
    try:
        check(staged, netns)
    except NetsimError:
        os.unlink(staged)
        raise
    os.replace(staged, path)


def log_tail(directory: str, lines: int = 10) -> str:
    try:
        with open(_paths(directory)["log"], errors="replace") as fh:
            return "".join(fh.readlines()[-lines:]).rstrip()
    except FileNotFoundError:
        return "(no bird.log)"


def start(netns: str, directory: str, config: str) -> tuple[int, int]:
    """Check and write the config, then run BIRD in the foreground inside `netns` so that
    netsim owns its PID; returns (pid, start time) once its control socket answers."""
    p = _paths(directory)
    if len(p["ctl"]) > _SUN_PATH_MAX:
        raise NetsimError(
            f"BIRD control socket path {p['ctl']} is longer than "
            f"{_SUN_PATH_MAX} bytes; use a shorter directory"
        )
    if not nsmod.exists(netns):
        raise NetsimError(f"cannot start BIRD: netns {netns} does not exist")
    os.makedirs(os.path.dirname(p["conf"]), exist_ok=True)
    if os.path.exists(p["ctl"]):
        if answers(directory):
            raise NetsimError(f"a BIRD already answers on {p['ctl']}; stop it first")
        os.unlink(p["ctl"])  # left by a BIRD that died
    install(p["conf"], config, netns)
    _write(p["netns"], netns + "\n")
    pid, started = proc.spawn(
        ["bird", "-f", "-c", p["conf"], "-s", p["ctl"], "-P", p["pid"]], p["log"], netns=netns
    )
    deadline = time.monotonic() + 5
    while True:
        if answers(directory):
            return pid, started
        if not proc.alive(pid, started):
            proc.stop([(pid, started)])  # reaps it
            raise NetsimError(f"BIRD in netns {netns} exited at start:\n{log_tail(directory)}")
        if time.monotonic() > deadline:
            proc.stop([(pid, started)])
            raise NetsimError(
                f"BIRD in netns {netns} did not open {p['ctl']} within 5 s:\n{log_tail(directory)}"
            )
        time.sleep(0.01)


def answers(directory: str) -> bool:
    try:
        _ask(directory, "show status", timeout=1)
    except NetsimError:
        return False
    return True


def _netns_of(directory: str) -> str | None:
    try:
        with open(_paths(directory)["netns"]) as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None


def reconfigure(directory: str, config: str) -> None:
    """Check the new config, swap it in and have the running BIRD apply it (`birdc configure`):
    unchanged sessions stay up, added peers connect, removed ones are shut down."""
    p, netns = _paths(directory), _netns_of(directory)
    install(p["conf"], config, netns)
    result = _run_in(netns, ["birdc", "-s", p["ctl"], "configure"])
    text = (result.stdout + result.stderr).strip()
    ok = ("Reconfigured", "Reconfiguration in progress", "Nothing to do")
    if result.returncode != 0 or not any(word in text for word in ok):
        raise NetsimError(f"birdc configure in {directory} failed: {text}")


# ---------------------------------------------------------------------------------------------
# control socket


def _ask(directory: str, command: str, timeout: float = 5) -> list[tuple[int, str]]:
    """One command over BIRD's control socket, as birdc speaks it: lines `NNNN-text` continue
    a reply, a line `NNNN text` ends it, ` text` continues the previous code. Talking to the
    socket directly costs no process per poll (wait_established polls every node often)."""
    path = _paths(directory)["ctl"]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            reader = sock.makefile("r", encoding="utf-8", errors="replace", newline="\n")
            _read_reply(reader)  # the greeting: 0001 BIRD 2.x ready.
            sock.sendall(command.encode() + b"\n")
            return _read_reply(reader)
    except (OSError, EOFError) as exc:
        raise NetsimError(f"BIRD control socket {path}: {exc}") from None


def _read_reply(reader) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    code = 0
    for _ in range(1_000_000):
        raw = reader.readline()
        if not raw:
            raise EOFError("BIRD closed the control socket mid-reply")
        line = raw.rstrip("\n")
        if line.startswith("+"):  # asynchronous message, not part of this reply
            continue
        if line.startswith(" "):
            lines.append((code, line[1:]))
            continue
        if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
            code = int(line[:4])
            lines.append((code, line[5:]))
            if line[4] == " ":
                return lines
    raise EOFError("BIRD reply too long")


_ROW = re.compile(
    r"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
    r"(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?|\S+)\s*(?P<info>.*)$"
)


def parse_protocols(rows: list[tuple[int, str]]) -> list[dict]:
    """Rows of `show protocols` (code 1002) as dicts; `info` is e.g. 'Established', 'Active',
    'Connect', 'Passive' or 'Active        Socket: Connection refused'."""
    out = []
    for code, text in rows:
        match = _ROW.match(text.strip()) if code == 1002 else None
        if match:
            out.append({k: match[k].strip() for k in ("name", "proto", "state", "since", "info")})
    return out


def protocols(directory: str) -> list[dict]:
    """`birdc show protocols` of the BIRD running in `directory`, parsed."""
    reply = _ask(directory, "show protocols")
    errors = [text for code, text in reply if code >= 8000]
    if errors:
        raise NetsimError(f"BIRD in {directory}: {'; '.join(errors)}")
    return parse_protocols(reply)


def _describe(directory: str) -> tuple[str, dict[str, str]]:
    """The node's name and each BGP protocol's description, read back from bird.conf."""
    try:
        with open(_paths(directory)["conf"]) as fh:
            text = fh.read()
    except FileNotFoundError:
        return directory, {}
    node = re.search(r"^# netsim-node: (.*)$", text, re.M)
    sessions = dict(re.findall(r'^protocol bgp (\S+)[^{]*\{\s*description "([^"]*)"', text, re.M))
    return (node[1] if node else directory), sessions


def wait_established(directories: list[str], timeout: float) -> None:
    """Poll every BIRD until all its BGP sessions are Established; on timeout name the node,
    the sessions still down and the end of that BIRD's log."""
    deadline = time.monotonic() + timeout
    pending: dict[str, list[str]] = {}
    while True:
        pending = {}
        for directory in directories:
            try:
                down = [
                    f"{p['name']} ({p['info'] or p['state']})"
                    for p in protocols(directory)
                    if p["proto"] == "BGP" and not p["info"].startswith("Established")
                ]
            except NetsimError as exc:
                down = [f"BIRD does not answer: {exc}"]
            if down:
                pending[directory] = down
        if not pending:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    parts = []
    for directory, down in pending.items():
        node, described = _describe(directory)
        named = [
            f"{d} [{described[d.split(' ')[0]]}]" if d.split(" ")[0] in described else d
            for d in down
        ]
        parts.append(
            f"node {node}: not established: {', '.join(named)}\n"
            f"last lines of {_paths(directory)['log']}:\n{log_tail(directory)}"
        )
    raise NetsimError(f"BGP sessions not established within {timeout} s:\n" + "\n".join(parts))
