"""The practical floor: the same kernel work as `netsim apply` of a flannel-vxlan (or
calico-vxlan) cluster, done with iproute2 batch files (`ip -batch`, one `ip -n NS -batch` per
namespace), no Python in the loop.
Run alone: python bench/reference_ipbatch.py NODES PODS_PER_NODE [calico] (as root)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def _batch(lines: list[str], netns: str | None = None, tool: str = "ip") -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.flush()
        argv = [tool] + (["-n", netns] if netns else []) + ["-batch", fh.name]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def names(tag: str, nodes: int, pods: int) -> tuple[str, list[str], list[list[str]]]:
    underlay = f"netsim.{tag}.underlay"
    node_ns = [f"netsim.{tag}.node.n{i}" for i in range(nodes)]
    pod_ns = [[f"netsim.{tag}.pod.n{i}-p{j}" for j in range(pods)] for i in range(nodes)]
    return underlay, node_ns, pod_ns


def build(tag: str, nodes: int, pods: int, mode: str = "flannel-vxlan") -> None:
    if mode == "calico-vxlan":
        return build_calico(tag, nodes, pods)
    _underlay(tag, nodes, pods)
    _, node_ns, pod_ns = names(tag, nodes, pods)
    mac = [f"02:00:00:00:{i // 256:02x}:{i % 256:02x}" for i in range(nodes)]
    for i, ns in enumerate(node_ns):
        lines = [
            "link set lo up",
            "link set eth0 up",
            f"addr add 172.18.{i // 250}.{i % 250 + 2}/16 dev eth0",
            f"link add flannel.1 address {mac[i]} mtu 1450 type vxlan id 1 local "
            f"172.18.{i // 250}.{i % 250 + 2} dev eth0 dstport 8472 nolearning",
            f"addr add 10.244.{i + 1}.0/32 dev flannel.1",
            "link set flannel.1 up",
            "link add cni0 mtu 1450 type bridge",
            f"addr add 10.244.{i + 1}.1/24 dev cni0",
            "link set cni0 up",
        ]
        fdb: list[str] = []
        for k in range(nodes):
            if k != i:
                fdb.append(
                    f"fdb add {mac[k]} dev flannel.1 dst 172.18.{k // 250}."
                    f"{k % 250 + 2} self permanent"
                )
                lines += [
                    f"neigh add 10.244.{k + 1}.0 lladdr {mac[k]} dev flannel.1 nud permanent",
                    f"route add 10.244.{k + 1}.0/24 via 10.244.{k + 1}.0 dev flannel.1 onlink",
                ]
        for j, pns in enumerate(pod_ns[i]):
            lines += [
                f"link add veth{i:04x}{j:04x} mtu 1450 type veth peer name eth0 netns {pns}",
                f"link set veth{i:04x}{j:04x} master cni0 up",
                f"link set veth{i:04x}{j:04x} type bridge_slave hairpin on",
            ]
        _batch(lines[:9], ns)
        _batch(fdb, ns, tool="bridge")  # ARP, then FDB, then the route, as flannel orders them
        _batch(lines[9:], ns)
        for j, pns in enumerate(pod_ns[i]):
            _batch(
                [
                    "link set lo up",
                    "link set eth0 up",
                    f"addr add 10.244.{i + 1}.{j + 2}/24 dev eth0",
                    f"route add 10.244.0.0/16 via 10.244.{i + 1}.1",
                    f"route add default via 10.244.{i + 1}.1",
                ],
                pns,
            )


def _underlay(tag: str, nodes: int, pods: int) -> None:
    underlay, node_ns, pod_ns = names(tag, nodes, pods)
    _batch([f"netns add {n}" for n in [underlay, *node_ns, *sum(pod_ns, [])]])
    lines = ["link set lo up", "link add br-underlay type bridge", "link set br-underlay up"]
    for i, ns in enumerate(node_ns):
        lines += [
            f"link add p-n{i} type veth peer name eth0 netns {ns}",
            f"link set p-n{i} master br-underlay up",
        ]
    _batch(lines, underlay)


def build_calico(tag: str, nodes: int, pods: int) -> None:
    """Calico VXLAN: vxlan.calico, a /26 block per node (blackhole), cali veths with a /32 route
    on the node and the 169.254.1.1 routes in the pod. (The three sysctls per cali interface
    that netsim writes are left out: ip -batch cannot set them, so this floor is lower.)"""
    _underlay(tag, nodes, pods)
    _, node_ns, pod_ns = names(tag, nodes, pods)
    mac = [f"66:00:00:00:{i // 256:02x}:{i % 256:02x}" for i in range(nodes)]

    def ip(i: int) -> str:
        return f"172.18.{i // 250}.{i % 250 + 2}"

    def block(i: int) -> tuple[str, str]:  # (block, tunnel IP): /26 blocks from 192.168.0.0
        base = 64 * i
        return f"192.168.{base // 256}.{base % 256}/26", f"192.168.{base // 256}.{base % 256}"

    for i, ns in enumerate(node_ns):
        net, tunnel = block(i)
        lines = [
            "link set lo up",
            "link set eth0 up",
            f"addr add {ip(i)}/16 dev eth0",
            f"link add vxlan.calico address {mac[i]} mtu 1450 type vxlan id 4096 local "
            f"{ip(i)} dev eth0 dstport 4789 nolearning",
            f"addr add {tunnel}/32 dev vxlan.calico",
            "link set vxlan.calico up",
            f"route add blackhole {net} proto 80",
        ]
        fdb, routes = [], []
        for k in range(nodes):
            if k != i:
                knet, ktunnel = block(k)
                fdb.append(f"fdb add {mac[k]} dev vxlan.calico dst {ip(k)} self permanent")
                lines.append(f"neigh add {ktunnel} lladdr {mac[k]} dev vxlan.calico nud permanent")
                routes.append(f"route add {knet} via {ktunnel} dev vxlan.calico onlink proto 80")
        first = int(tunnel.rsplit(".", 1)[1])
        prefix = tunnel.rsplit(".", 1)[0]
        for j, pns in enumerate(pod_ns[i]):
            name = f"cali{i:05x}{j:06x}"
            routes += [
                f"link add {name} address ee:ee:ee:ee:ee:ee mtu 1450 type veth peer "
                f"name eth0 netns {pns}",
                f"link set {name} up",
                f"route add {prefix}.{first + j + 1} dev {name} scope link",
            ]
        _batch(lines, ns)
        _batch(fdb, ns, tool="bridge")
        _batch(routes, ns)
        for j, pns in enumerate(pod_ns[i]):
            _batch(
                [
                    "link set lo up",
                    "link set eth0 up",
                    f"addr add {prefix}.{first + j + 1}/32 dev eth0",
                    "route add 169.254.1.1 dev eth0 scope link",
                    "route add default via 169.254.1.1 dev eth0",
                ],
                pns,
            )


def teardown(tag: str, nodes: int, pods: int) -> None:
    underlay, node_ns, pod_ns = names(tag, nodes, pods)
    _batch([f"netns del {n}" for n in [*sum(pod_ns, []), *node_ns, underlay]])


if __name__ == "__main__":
    n, p = int(sys.argv[1]), int(sys.argv[2])
    mode = "calico-vxlan" if sys.argv[3:] == ["calico"] else "flannel-vxlan"
    tag = f"ref{os.getpid()}"
    t0 = time.perf_counter()
    try:
        build(tag, n, p, mode)
        t1 = time.perf_counter()
    finally:
        t1b = time.perf_counter()
        teardown(tag, n, p)
        t2 = time.perf_counter()
    print(f"reference {n}x{p}: build {t1 - t0:.2f}s, teardown {t2 - t1b:.2f}s")
