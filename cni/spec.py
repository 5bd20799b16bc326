"""The CNI specification's side of the plugin: versions, error codes, the environment, the
network configuration and the result format. Pure data: no kernel work here.

Versions 0.4.0, 1.0.0 and 1.1.0 are served. A 0.4.0 result carries `"version": "4"` on each IP;
1.x results do not. STATUS and GC exist from 1.1.0 on.
"""

from __future__ import annotations

import ipaddress
import json

VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# the spec's error codes
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# netsim's own (the spec leaves 100 and up to plugins)
INTERFACE_EXISTS = 100
KERNEL_FAILURE = 101
IPAM_FAILURE = 102
CHECK_FAILED = 103
DELEGATE_FAILURE = 104

FAMILIES = ("flannel", "calico")  # the pod sides: the bridge plugin's, or Calico's
BUILTIN_IPAM = "netsim-host-local"
CALICO_IPAM = "netsim-calico-ipam"  # blocks affine to nodes, in a store the nodes share
DEFAULT_DATA_DIR = "/var/lib/cni/networks"  # host-local's default
ARGS_KNOWN = {
    "IgnoreUnknown",
    "IP",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
}


class CniError(Exception):
    """An error as the spec shapes it: printed as JSON on stdout, exit status 1."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict:
        return {"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details}


class Env:
    """The CNI_* variables of one invocation. (No dataclasses in the plugin's import path:
    that module pulls in inspect and ast, ~8 ms of every plugin start.)"""

    def __init__(
        self,
        command: str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "",
        args: dict[str, str] | None = None,
        path: list[str] | None = None,
        args_text: str = "",
    ):
        self.command, self.container_id, self.netns, self.ifname = (
            command,
            container_id,
            netns,
            ifname,
        )
        self.args = args or {}
        self.path = path or []
        self.args_text = args_text  # CNI_ARGS as it came, passed on to a delegated plugin


REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}


def parse_env(environ: dict[str, str]) -> Env:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(
            INVALID_ENVIRONMENT,
            "required environment variable CNI_COMMAND is not set",
            f"set CNI_COMMAND to one of {', '.join(COMMANDS)}",
        )
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENVIRONMENT,
            f"unknown CNI_COMMAND {command!r}",
            f"use one of {', '.join(COMMANDS)}",
        )
    for name in REQUIRED[command]:
        if not environ.get(name):
            raise CniError(
                INVALID_ENVIRONMENT,
                f"required environment variable {name} is not set",
                f"{command} needs {', '.join(REQUIRED[command])}",
            )
    env = Env(
        command,
        environ.get("CNI_CONTAINERID", ""),
        environ.get("CNI_NETNS", ""),
        environ.get("CNI_IFNAME", ""),
        parse_args(environ.get("CNI_ARGS", "")),
        [p for p in environ.get("CNI_PATH", "").split(":") if p],
        environ.get("CNI_ARGS", ""),
    )
    if env.ifname:
        check_ifname(env.ifname)
    return env


def check_ifname(name: str) -> None:
    """The kernel's rules for an interface name, checked before anything is made."""
    problem = (
        "is longer than 15 characters"
        if len(name) > 15
        else "contains '/'"
        if "/" in name
        else "contains whitespace or ':'"
        if any(c.isspace() or c == ":" for c in name)
        else "is reserved"
        if name in (".", "..")
        else ""
    )
    if problem:
        raise CniError(
            INVALID_ENVIRONMENT,
            f"invalid CNI_IFNAME {name!r}: it {problem}",
            "use a name of 1-15 characters without '/', ':' or whitespace",
        )


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K=V`. Unknown keys are refused unless IgnoreUnknown is true."""
    args = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {item!r} is not KEY=VALUE")
        args[key] = value
    if args.get("IgnoreUnknown", "").lower() not in ("1", "true"):
        unknown = sorted(set(args) - ARGS_KNOWN)
        if unknown:
            raise CniError(
                INVALID_ENVIRONMENT,
                f"CNI_ARGS: unknown args {', '.join(unknown)}",
                "add IgnoreUnknown=1 to CNI_ARGS to ignore them",
            )
    return args


# -- network configuration --------------------------------------------------------------------


class NetConf:
    """One plugin's network configuration as it arrived on stdin."""

    def __init__(self, version: str, name: str, type_: str, raw: dict):
        self.version, self.name, self.type, self.raw = version, name, type_, raw
        self.mode = ""
        self.network = ""  # the cluster's pod network (FLANNEL_NETWORK)
        self.subnet = ""  # this node's subnet (FLANNEL_SUBNET's network)
        self.mtu = 1500
        self.is_default_gateway = True
        self.ipam: dict = {}
        self.prev_result: dict | None = None
        self.node_name = ""  # Calico: the node whose blocks pods take addresses from
        self.block_size = 26
        self.tunnel = ""  # the device the node must have before pods are wired (STATUS)
        self.tunnel_address = ""  # or the address it must hold (a tc carrier has no device)

    @property
    def calico(self) -> bool:
        return self.mode.startswith("calico-")

    @property
    def gateway(self) -> str:
        from cni.bridge import gateway  # the bridge's .1, as the bridge plugin takes it

        return gateway(self.subnet)


def parse_conf(data: bytes, command: str) -> NetConf:
    """Decode and validate stdin; every problem names the field and the fix."""
    try:
        raw = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_FAILURE, f"network config on stdin is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "network config on stdin must be a JSON object")
    version = raw.get("cniVersion", "")
    if command == "VERSION":
        return NetConf(version or VERSIONS[-1], "", "", raw)
    if version not in VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r}",
            f"this plugin supports {', '.join(VERSIONS)}",
        )
    if command in ("STATUS", "GC") and version != "1.1.0":
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {command}",
            "STATUS and GC need cniVersion 1.1.0",
        )
    conf = NetConf(version, _field(raw, "name", str), _field(raw, "type", str), raw)
    conf.mode = _field(raw, "mode", str)
    if conf.mode.partition("-")[0] not in FAMILIES or not conf.mode.partition("-")[2]:
        raise CniError(
            INVALID_CONFIG,
            f"invalid field mode: unknown mode {conf.mode!r}",
            "use flannel-<backend> (bridge pod side) or calico-<backend>",
        )
    node = _field(raw, "node", dict)
    for key in ("tunnel", "tunnelAddress"):
        if not isinstance(node.get(key) or "", str):
            raise CniError(
                INVALID_CONFIG,
                f"invalid field node.{key}: {node[key]!r}",
                "name the device (or address) the node must have, or leave it out",
            )
    conf.tunnel, conf.tunnel_address = node.get("tunnel") or "", node.get("tunnelAddress") or ""
    conf.network = _cidr(node, "network")
    if conf.calico:
        conf.node_name = _field(node, "name", str, "node.name")
        conf.block_size = node.get("blockSize", 26)
        if not isinstance(conf.block_size, int) or not 20 <= conf.block_size <= 32:
            raise CniError(
                INVALID_CONFIG, f"invalid field node.blockSize: {conf.block_size!r}", "use 20 to 32"
            )
    else:
        conf.subnet = _cidr(node, "subnet")
        if not ipaddress.ip_network(conf.subnet).subnet_of(ipaddress.ip_network(conf.network)):
            raise CniError(
                INVALID_CONFIG,
                f"invalid field node.subnet: {conf.subnet} is not "
                f"inside node.network {conf.network}",
            )
    conf.mtu = node.get("mtu", 1500)
    if not isinstance(conf.mtu, int) or isinstance(conf.mtu, bool) or not 68 <= conf.mtu <= 65535:
        raise CniError(
            INVALID_CONFIG,
            f"invalid field node.mtu: {conf.mtu!r}",
            "use an integer from 68 to 65535",
        )
    conf.is_default_gateway = raw.get("isDefaultGateway", True)
    conf.ipam = raw.get("ipam") or {"type": CALICO_IPAM if conf.calico else BUILTIN_IPAM}
    if not isinstance(conf.ipam, dict) or not isinstance(conf.ipam.get("type"), str):
        raise CniError(
            INVALID_CONFIG,
            'invalid field ipam: it needs a "type"',
            f'use {{"type": "{BUILTIN_IPAM}", ...}} or another IPAM plugin\'s name',
        )
    conf.prev_result = raw.get("prevResult")
    if conf.prev_result is not None and not isinstance(conf.prev_result, dict):
        raise CniError(INVALID_CONFIG, "invalid field prevResult: it must be an object")
    return conf


def _field(raw: dict, key: str, kind: type, path: str = ""):
    path = path or key
    if key not in raw:
        raise CniError(INVALID_CONFIG, f"missing field {path}")
    if not isinstance(raw[key], kind) or (kind is str and not raw[key]):
        raise CniError(
            INVALID_CONFIG,
            f"invalid field {path}: expected a "
            f"{'non-empty string' if kind is str else 'JSON object'}",
        )
    return raw[key]


def _cidr(node: dict, key: str) -> str:
    value = node.get(key)
    try:
        return str(ipaddress.IPv4Network(value, strict=False))
    except (ValueError, TypeError):
        raise CniError(
            INVALID_CONFIG,
            f"invalid field node.{key}: {value!r} is not an IPv4 CIDR",
            "for example 10.244.1.0/24",
        ) from None


def requested_ips(conf: NetConf, env: Env) -> list[str]:
    """A wanted address from `args.cni.ips` (the runtime's args) or CNI_ARGS IP=."""
    ips = ((conf.raw.get("args") or {}).get("cni") or {}).get("ips") or []
    if env.args.get("IP"):
        ips = ips + env.args["IP"].split(",")
    return [ip.split("/")[0] for ip in ips]


# -- results ----------------------------------------------------------------------------------


def result(
    version: str,
    interfaces: list[dict],
    ips: list[dict],
    routes: list[dict],
    dns: dict | None = None,
) -> dict:
    """A result in the requested version's shape."""
    if version == "0.4.0":
        ips = [{"version": "4", **ip} for ip in ips]
    else:
        ips = [{k: v for k, v in ip.items() if k != "version"} for ip in ips]
    return {
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": dns or {},
    }


def extend(
    prev: dict | None, version: str, interfaces: list[dict], ips: list[dict], routes: list[dict]
) -> dict:
    """This plugin's additions appended to prevResult: nothing an earlier plugin reported is
    dropped, and the new IPs' interface indexes point past the earlier interfaces."""
    prev = prev or {}
    base = list(prev.get("interfaces") or [])
    shifted = [
        {**ip, "interface": ip["interface"] + len(base)} if "interface" in ip else ip for ip in ips
    ]
    out = result(
        version,
        base + interfaces,
        list(prev.get("ips") or []) + shifted,
        list(prev.get("routes") or []) + routes,
        prev.get("dns"),
    )
    return out


def version_info(version: str) -> dict:
    return {
        "cniVersion": version if version in VERSIONS else VERSIONS[-1],
        "supportedVersions": list(VERSIONS),
    }
