"""IPIP (RFC 2003) at kernel speed on kernels without the ipip module: a tc eBPF carrier.

The program (bpf/ipip.c) sits on a node's underlay interface: egress adds the outer IPv4 header
to packets bound for a peer's pod block, ingress strips it from a peer node's protocol-4 packets.
The node keeps Calico's route shape with the underlay device instead of tunl0
(`<block> via <peer node IP> dev eth0 onlink`), so the kernel still routes and resolves MACs.

How it is loaded, and why:
- `bpftool prog loadall ... pinmaps` loads both programs from one object, so they share one set
  of maps, and pins programs and maps under /sys/fs/bpf/netsim/<netns>/ ('.' written ':', as
  bpffs refuses dots): a path per namespace. bpffs is global to the host, and iproute2's own
  pinning uses one tc/globals directory, where two nodes' maps would collide.
- tc attaches the pinned programs (clsact, `bpf da pinned`). It runs with only the network
  namespace switched: `tc -n` / `ip netns exec` remount /sys, which hides the host's bpffs.
- Peers are map updates through bpf(2) on the pinned maps (ctypes): no process per peer.
- `detach` deletes the filters (and clsact when nothing else uses it) and the pins, so nothing
  stays loaded. Pins outlive a deleted namespace: `remove_pins` clears them for gc.

Maps: ipip_routes (LPM trie, {prefixlen, block} -> {peer node IP, this node IP}), ipip_peers
(hash, peer node IP -> number of its blocks; ingress accepts protocol 4 only from these),
ipip_config (array[1], this node's IP; ingress accepts only packets addressed to it). Updates of
one namespace's maps are not atomic across processes: one owner (the node's reconciler) at a time.
The pods' MTU must leave 20 bytes for the outer header, as with tunl0.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errnos
import functools
import hashlib
import ipaddress
import os
import platform
import shutil
import socket
import struct
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from netsim.errors import KernelError, NetsimError
from netsim.kernel import netns as nsmod

SOURCE = Path(__file__).resolve().parent / "bpf" / "ipip.c"
BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "netsim")
DEFAULT_BUILD_DIR = os.environ.get("NETSIM_BPF_CACHE", "/var/cache/netsim/bpf")
PACKAGES = "clang libbpf-dev bpftool"
PREF = 100  # tc filter priority netsim's carrier owns on the device
PROGRAMS = {"egress": "ipip_egress", "ingress": "ipip_ingress"}
ROUTES, PEERS, CONFIG = "ipip_routes", "ipip_peers", "ipip_config"

_MULTIARCH = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
CFLAGS = ["-O2", "-g", "-target", "bpf", "-Wall", f"-I/usr/include/{_MULTIARCH}"]
HEADERS = {
    "/usr/include/bpf/bpf_helpers.h": "libbpf-dev",
    "/usr/include/linux/bpf.h": "linux-libc-dev",
    f"/usr/include/{_MULTIARCH}/asm/types.h": "linux-libc-dev",
}

# bpf(2): the syscall number and the commands used here
_NR_BPF = {
    "x86_64": 321,
    "aarch64": 280,
    "armv7l": 386,
    "ppc64le": 361,
    "s390x": 351,
    "riscv64": 280,
}
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 1, 2, 3
BPF_MAP_GET_NEXT_KEY, BPF_OBJ_GET = 4, 7
BPF_ANY, BPF_NOEXIST = 0, 1
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def toolchain_missing() -> str | None:
    """Why the object cannot be built here (naming the Debian packages), or None."""
    missing = [] if shutil.which("clang") else ["clang"]
    missing += [pkg for header, pkg in HEADERS.items() if not os.path.exists(header)]
    if not missing:
        return None
    return (
        f"the IPIP eBPF carrier needs clang and BPF headers (missing: "
        f"{' '.join(dict.fromkeys(missing))}): apt-get install {PACKAGES}"
    )


def build(output_dir: str = DEFAULT_BUILD_DIR) -> str:
    """Compile bpf/ipip.c once per source and flags; the path of the cached object."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + "\0".join(CFLAGS).encode()).hexdigest()[:16]
    out = os.path.join(output_dir, f"ipip-{digest}.o")
    if os.path.exists(out):
        return out
    reason = toolchain_missing()
    if reason:
        raise NetsimError(reason)
    os.makedirs(output_dir, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    result = subprocess.run(
        ["clang", *CFLAGS, "-c", str(SOURCE), "-o", tmp], capture_output=True, text=True
    )
    if result.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise NetsimError(
            f"clang could not build {SOURCE}:\n{result.stderr.strip()}\n"
            f"(Debian packages needed: {PACKAGES})"
        )
    os.replace(tmp, out)  # atomic: a concurrent build never sees half an object
    return out


def pin_dir(netns: str) -> str:
    """/sys/fs/bpf/netsim/<netns with ':' for '.'>: bpffs refuses dots in names (EPERM)."""
    if not netns or "/" in netns or ":" in netns:
        raise ValueError(f"not a namespace name netsim can pin for: {netns!r}")
    return os.path.join(PIN_ROOT, netns.replace(".", ":"))


def _prog_pin(netns: str, direction: str) -> str:
    return os.path.join(pin_dir(netns), "prog", PROGRAMS[direction])


def _map_pin(netns: str, name: str) -> str:
    return os.path.join(pin_dir(netns), "map", name)


def _ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf if the host has not (systemd normally does)."""
    with open("/proc/self/mounts") as fh:
        if any(line.split()[1:3] == [BPFFS, "bpf"] for line in fh):
            return
    if (
        _libc.mount(b"bpf", BPFFS.encode(), b"bpf", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"mode=0700")
        != 0
    ):
        raise KernelError(ctypes.get_errno(), f"mount bpffs on {BPFFS}", None)


def _tc(netns: str, commands: list[str], force: bool = False) -> subprocess.CompletedProcess:
    """One `tc -batch` inside the namespace. Only the network namespace is switched (a
    preexec setns), so the host's /sys/fs/bpf stays visible to tc."""
    return subprocess.run(
        ["tc", *(["-force"] if force else []), "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        preexec_fn=lambda: nsmod.enter_for_exec(netns),
    )


def attach(netns: str, ifname: str, obj: str, local_ip: str) -> None:
    """Load the carrier for `netns` and attach it to `ifname` (egress and ingress); `local_ip`
    is this node's underlay address. Undoes what it made if a step fails."""
    local = socket.inet_aton(str(ipaddress.IPv4Address(local_ip)))
    if not nsmod.exists(netns):
        raise KernelError(errnos.ENOENT, "attach ipip carrier", netns, "no such namespace")
    pins = pin_dir(netns)
    if os.path.exists(pins):
        raise KernelError(
            errnos.EEXIST, f"attach ipip carrier: {pins}", netns, "already attached; detach first"
        )
    _ensure_bpffs()
    try:
        os.makedirs(pins)
    except FileNotFoundError:  # another detach removed the empty PIN_ROOT in between
        os.makedirs(pins)
    try:
        result = subprocess.run(
            [
                "bpftool",
                "prog",
                "loadall",
                obj,
                os.path.join(pins, "prog"),
                "type",
                "classifier",
                "pinmaps",
                os.path.join(pins, "map"),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise KernelError(
                0, f"bpftool prog loadall {obj}", netns, result.stderr.strip()[-2000:]
            )
        with _Map(_map_pin(netns, CONFIG), netns) as config:
            config.update(struct.pack("=I", 0), local)
        result = _tc(
            netns,
            [f"qdisc replace dev {ifname} clsact"]
            + [
                f"filter replace dev {ifname} {direction} pref {PREF} handle 1 bpf da pinned "
                f"{_prog_pin(netns, direction)}"
                for direction in PROGRAMS
            ],
        )
        if result.returncode != 0:
            raise KernelError(
                0, f"tc attach ipip carrier on {ifname}", netns, result.stderr.strip()
            )
    except BaseException:
        detach(netns, ifname)
        raise


def detach(netns: str, ifname: str) -> bool:
    """Remove the carrier's filters (and clsact if nothing else hangs on it) and its pins.
    Idempotent; also fine when the namespace is already gone. True if anything was removed."""
    removed = False
    if nsmod.exists(netns):
        dels = [f"filter del dev {ifname} {d} pref {PREF}" for d in PROGRAMS]
        removed = _tc(netns, dels, force=True).returncode == 0
        left = _tc(netns, [f"filter show dev {ifname} {d}" for d in PROGRAMS], force=True)
        if left.returncode == 0 and not left.stdout.strip():
            _tc(netns, [f"qdisc del dev {ifname} clsact"], force=True)
    return remove_pins(netns) or removed


def remove_pins(netns: str) -> bool:
    """Unpin the namespace's programs and maps (the kernel frees them with their last user)."""
    pins = pin_dir(netns)
    if not os.path.exists(pins):
        return False
    shutil.rmtree(pins)
    with contextlib.suppress(OSError):  # shared by every namespace: only while empty
        os.rmdir(PIN_ROOT)
    return True


def pinned_namespaces() -> list[str]:
    """Namespaces that have carrier pins, for gc and 'nothing left' checks."""
    try:
        return sorted(name.replace(":", ".") for name in os.listdir(PIN_ROOT))
    except FileNotFoundError:
        return []


def attached(netns: str) -> bool:
    return os.path.exists(_map_pin(netns, ROUTES))


def _route_key(block_cidr: str) -> bytes:
    net = ipaddress.IPv4Network(block_cidr)  # strict: host bits set is a caller's bug
    return struct.pack("=I", net.prefixlen) + net.network_address.packed


def add_peer(netns: str, block_cidr: str, peer_node_ip: str) -> None:
    """Route `block_cidr` to the peer node through the tunnel (re-pointing it if it existed)."""
    key = _route_key(block_cidr)
    remote = ipaddress.IPv4Address(peer_node_ip).packed
    with _maps(netns) as (routes, peer_map, config):
        local = config.lookup(struct.pack("=I", 0), 4)
        if local == bytes(4):
            raise KernelError(errnos.ENOENT, "add ipip peer", netns, "carrier has no local IP")
        try:
            routes.update(key, remote + local, BPF_NOEXIST)
        except KernelError as exc:
            if exc.errno != errnos.EEXIST:
                raise
            old = routes.lookup(key, 8)  # the exact entry: it exists
            if old[:4] == remote and old[4:] == local:
                return
            routes.update(key, remote + local, BPF_ANY)
            _count(peer_map, old[:4], -1)
        _count(peer_map, remote, +1)


def remove_peer(netns: str, block_cidr: str, peer_node_ip: str) -> bool:
    """Stop tunnelling `block_cidr` to that peer; False if it was not routed there."""
    key = _route_key(block_cidr)
    remote = ipaddress.IPv4Address(peer_node_ip).packed
    with _maps(netns) as (routes, peer_map, _):
        # a lookup is longest-prefix (it may find a shorter block covering this one), but a
        # delete is exact: ENOENT from it means the block itself was never routed
        try:
            if routes.lookup(key, 8)[:4] != remote:
                return False
            routes.delete(key)
        except KernelError as exc:
            if exc.errno == errnos.ENOENT:
                return False
            raise
        _count(peer_map, remote, -1)
    return True


def peers(netns: str) -> dict[str, str]:
    """The carrier's routes: block CIDR -> peer node IP."""
    result = {}
    with _maps(netns) as (routes, _, _):
        for key in routes.keys(8):
            plen, addr = struct.unpack("=I4s", key)
            result[f"{socket.inet_ntoa(addr)}/{plen}"] = socket.inet_ntoa(routes.lookup(key, 8)[:4])
    return result


def peer_nodes(netns: str) -> dict[str, int]:
    """Peer node IPs ingress accepts, with the number of blocks routed to each."""
    with _maps(netns) as (_, peer_map, _):
        return {
            socket.inet_ntoa(k): struct.unpack("=I", peer_map.lookup(k, 4))[0]
            for k in peer_map.keys(4)
        }


def _count(peers_map: _Map, node_ip: bytes, delta: int) -> None:
    try:
        count = struct.unpack("=I", peers_map.lookup(node_ip, 4))[0]
    except KernelError as exc:
        if exc.errno != errnos.ENOENT:
            raise
        count = 0
    count += delta
    if count > 0:
        peers_map.update(node_ip, struct.pack("=I", count))
    elif delta < 0:
        with contextlib.suppress(KernelError):
            peers_map.delete(node_ip)


@contextlib.contextmanager
def _maps(netns: str) -> Iterator[tuple[_Map, _Map, _Map]]:
    with (
        _Map(_map_pin(netns, ROUTES), netns) as routes,
        _Map(_map_pin(netns, PEERS), netns) as peer_map,
        _Map(_map_pin(netns, CONFIG), netns) as config,
    ):
        yield routes, peer_map, config


class _Map:
    """A pinned BPF map opened with bpf(BPF_OBJ_GET); element calls are single syscalls."""

    def __init__(self, pin: str, netns: str):
        self.pin, self.netns, self.fd = pin, netns, -1

    def __enter__(self) -> _Map:
        path = ctypes.create_string_buffer(self.pin.encode())
        self.fd = _bpf(
            BPF_OBJ_GET,
            struct.pack("=QII", ctypes.addressof(path), 0, 0),
            f"open BPF map {self.pin}",
            self.netns,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _elem(
        self, cmd: int, key: bytes | None, value: ctypes.Array | None, flags: int, what: str
    ) -> None:
        kbuf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
        attr = struct.pack(
            "=IIQQQ",
            self.fd,
            0,
            ctypes.addressof(kbuf) if kbuf else 0,
            ctypes.addressof(value) if value is not None else 0,
            flags,
        )
        _bpf(cmd, attr, f"{what} {os.path.basename(self.pin)}", self.netns)

    def lookup(self, key: bytes, size: int) -> bytes:
        value = ctypes.create_string_buffer(size)
        self._elem(BPF_MAP_LOOKUP_ELEM, key, value, 0, "lookup in")
        return value.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._elem(
            BPF_MAP_UPDATE_ELEM,
            key,
            ctypes.create_string_buffer(value, len(value)),
            flags,
            "update",
        )

    def delete(self, key: bytes) -> None:
        self._elem(BPF_MAP_DELETE_ELEM, key, None, 0, "delete from")

    def keys(self, size: int) -> list[bytes]:
        found: list[bytes] = []
        nxt = ctypes.create_string_buffer(size)
        while True:
            try:
                self._elem(BPF_MAP_GET_NEXT_KEY, found[-1] if found else None, nxt, 0, "iterate")
            except KernelError as exc:
                if exc.errno == errnos.ENOENT:
                    return found
                raise
            found.append(nxt.raw)


def _bpf(cmd: int, attr: bytes, what: str, netns: str | None) -> int:
    number = _NR_BPF.get(platform.machine())
    if number is None:
        raise KernelError(
            errnos.ENOSYS, what, netns, f"bpf(2) number unknown on {platform.machine()}"
        )
    buf = ctypes.create_string_buffer(attr, len(attr))
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if result < 0:
        raise KernelError(ctypes.get_errno(), what, netns)
    return result


@functools.cache
def unavailable_reason() -> str | None:
    """Why the carrier cannot run here, or None: builds the object and attaches it to lo in a
    scratch namespace (removed right after), so a kernel or tc that refuses it is caught."""
    reason = toolchain_missing()
    if reason:
        return reason
    for tool, package in (("bpftool", "bpftool"), ("tc", "iproute2")):
        if not shutil.which(tool):
            return f"the IPIP eBPF carrier needs {tool}: apt-get install {package}"
    scratch = f"netsim.probe.bpf{os.getpid()}"  # gc leaves netsim.probe.* alone
    try:
        obj = build()
        nsmod.create(scratch)
        try:
            attach(scratch, "lo", obj, "127.0.0.1")
        finally:
            detach(scratch, "lo")
            nsmod.remove(scratch)
    except (NetsimError, OSError) as exc:
        return f"the IPIP eBPF carrier cannot be attached here: {exc}"
    return None


def available() -> bool:
    return unavailable_reason() is None
