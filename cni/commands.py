"""One entry function per CNI command, for one attachment (containerID, ifname).

The executable calls these from the node's namespace (host_netns None); netsim can call them
in-process for a node namespace by name. ADD undoes its own work on any failure; DEL succeeds
when the namespace, the interface or the allocation is already gone, and always releases the
address; CHECK compares prevResult with the kernel.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import time

from cni import bridge, calico_pod, spec, wiring
from cni.calico_ipam import LOCK_DIR, BlockStore, pod_handle
from cni.ipam import HostLocal, IpamError
from cni.spec import CniError, Env, NetConf
from netsim.errors import KernelError
from netsim.kernel import netns as nsmod
from netsim.kernel.netlink import Rtnl
from netsim.store.client import Store, StoreError

# -- IPAM -------------------------------------------------------------------------------------


def _store(conf: NetConf) -> HostLocal:
    """netsim's built-in host-local compatible store, from the ipam section."""
    ipam = conf.ipam
    ranges = ipam.get("ranges") or [[{"subnet": ipam.get("subnet") or conf.subnet}]]
    if (
        not isinstance(ranges, list)
        or len(ranges) != 1
        or not isinstance(ranges[0], list)
        or len(ranges[0]) != 1
        or not isinstance(ranges[0][0], dict)
    ):
        raise CniError(
            spec.INVALID_CONFIG,
            "invalid field ipam.ranges: netsim-host-local takes one range set with one range",
            'use [[{"subnet": "10.244.1.0/24"}]], or ipam type host-local for more',
        )
    rng = ranges[0][0]
    try:
        return HostLocal(
            ipam.get("dataDir") or spec.DEFAULT_DATA_DIR,
            conf.name,
            str(ipaddress.IPv4Network(rng.get("subnet") or conf.subnet, strict=False)),
            rng.get("gateway"),
            rng.get("rangeStart"),
            rng.get("rangeEnd"),
        )
    except ValueError as exc:
        raise CniError(spec.INVALID_CONFIG, f"invalid field ipam.ranges: {exc}") from None


def _delegate(conf: NetConf, env: Env, command: str) -> dict | None:
    """Run the configured IPAM plugin with this attachment, as the runtime ran us."""
    from cni import invoke  # subprocess: only for a delegated IPAM plugin

    return invoke.execute(
        conf.ipam["type"],
        command,
        env.path,
        conf.raw,
        env.container_id,
        env.netns,
        env.ifname,
        env.args_text,
    )


def _ipam_add(conf: NetConf, env: Env) -> tuple[list[dict], list[dict]]:
    """(ips, routes) for the attachment, from the built-in store or the delegated plugin."""
    if conf.ipam["type"] not in (spec.BUILTIN_IPAM, spec.CALICO_IPAM):
        answer = _delegate(conf, env, "ADD") or {}
        ips = [ip for ip in answer.get("ips", []) if ":" not in ip.get("address", ":")]
        if not ips:
            _ipam_del(conf, env)
            raise CniError(
                spec.IPAM_FAILURE, f"IPAM plugin {conf.ipam['type']} returned no IPv4 address"
            )
        return ips, answer.get("routes") or []
    wanted = spec.requested_ips(conf, env)
    if conf.ipam["type"] == spec.CALICO_IPAM:
        blocks = _blocks(conf)
        pod = {
            attr: env.args[arg]
            for attr, arg in (("namespace", "K8S_POD_NAMESPACE"), ("pod", "K8S_POD_NAME"))
            if env.args.get(arg)
        }
        if pod:  # as Calico's plugin records a pod's addresses
            pod["timestamp"] = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())
        try:
            with blocks.session():
                ip, _ = blocks.allocate(
                    conf.node_name,
                    pod_handle(conf.name, env.container_id),
                    env.ifname,
                    wanted[0] if wanted else None,
                    attrs=pod,
                )
        except IpamError as exc:
            raise CniError(spec.IPAM_FAILURE, str(exc)) from None
        except StoreError as exc:
            raise CniError(spec.TRY_AGAIN_LATER, str(exc)) from None
        return [{"address": f"{ip}/32"}], []
    store = _store(conf)
    try:
        with store.session():
            ip = store.allocate(env.container_id, env.ifname, wanted[0] if wanted else None)
    except IpamError as exc:
        raise CniError(spec.IPAM_FAILURE, str(exc)) from None
    except OSError as exc:
        raise CniError(spec.IO_FAILURE, f"IPAM store {store.dir}: {exc}") from None
    routes = [r for r in conf.ipam.get("routes") or [] if isinstance(r, dict) and "dst" in r]
    return ([{"address": f"{ip}/{store.subnet.prefixlen}", "gateway": str(store.gateway)}], routes)


def _blocks(conf: NetConf) -> BlockStore:
    """The cluster's Calico IPAM, in the etcd the ipam section names (etcdEndpoints: client
    URLs; etcdNetns: the namespace they are reached from, null for the plugin's own)."""
    endpoints = conf.ipam.get("etcdEndpoints")
    if (
        not isinstance(endpoints, list)
        or not endpoints
        or not all(isinstance(e, str) and "://" in e for e in endpoints)
    ):
        raise CniError(
            spec.INVALID_CONFIG,
            f"{'missing' if endpoints is None else 'invalid'} field ipam.etcdEndpoints",
            'give the cluster\'s etcd client URLs: ["http://10.0.0.1:2379"]',
        )
    if "etcdNetns" not in conf.ipam or not isinstance(conf.ipam["etcdNetns"], (str, type(None))):
        raise CniError(
            spec.INVALID_CONFIG,
            f"{'missing' if 'etcdNetns' not in conf.ipam else 'invalid'} field ipam.etcdNetns",
            "name the network namespace etcd is reached from, or null for the plugin's own",
        )
    return BlockStore(
        Store(endpoints, conf.ipam["etcdNetns"] or None),
        conf.network,
        conf.block_size,
        lock_dir=conf.ipam.get("dataDir") or LOCK_DIR,  # netsim's nodes: the cluster's state
    )


def _ipam_del(conf: NetConf, env: Env) -> None:
    if conf.ipam["type"] == spec.CALICO_IPAM:
        blocks = _blocks(conf)
        try:
            with blocks.session():
                blocks.release(conf.node_name, pod_handle(conf.name, env.container_id), env.ifname)
        except StoreError as exc:
            raise CniError(spec.TRY_AGAIN_LATER, str(exc)) from None
        return
    if conf.ipam["type"] != spec.BUILTIN_IPAM:
        _delegate(conf, env, "DEL")
        return
    store = _store(conf)
    try:
        with store.session():
            store.release(env.container_id, env.ifname)
    except OSError as exc:
        raise CniError(spec.IO_FAILURE, f"IPAM store {store.dir}: {exc}") from None


# -- commands ---------------------------------------------------------------------------------


def add(conf: NetConf, env: Env, host_netns: str | None = None) -> dict:
    try:
        pod_fd = nsmod.open_fd(env.netns)
    except KernelError:
        raise CniError(
            spec.UNKNOWN_CONTAINER,
            f"netns {env.netns} does not exist",
            "CNI_NETNS must name the container's network namespace",
        ) from None
    veth = host_veth(conf, env)
    try:
        with Rtnl(env.netns) as pod, Rtnl(host_netns) as node:
            if pod.link(env.ifname) is not None:
                raise CniError(
                    spec.INTERFACE_EXISTS,
                    f"interface {env.ifname} already exists in netns {env.netns}",
                )
            ips, routes = _ipam_add(conf, env)
            try:
                return _wire(conf, env, pod, node, pod_fd, veth, ips, routes)
            except KernelError as exc:
                _ipam_del(conf, env)
                if exc.errno == errno.EEXIST and node.link(veth) is not None:
                    raise CniError(
                        spec.INTERFACE_EXISTS,
                        f"host interface {veth} for container "
                        f"{env.container_id} {env.ifname} already exists",
                    ) from None
                _unwire(node, veth)
                raise
            except BaseException:
                _unwire(node, veth)
                _ipam_del(conf, env)
                raise
    except KernelError as exc:
        raise CniError(spec.KERNEL_FAILURE, str(exc)) from None
    finally:
        os.close(pod_fd)


def host_veth(conf: NetConf, env: Env) -> str:
    """The host end's name, the same on ADD and DEL: Calico names it after the pod (from the
    runtime's K8S_POD_* args), the bridge plugin after the attachment."""
    if conf.calico:
        return calico_pod.veth_name(
            env.args.get("K8S_POD_NAMESPACE", "default"),
            env.args.get("K8S_POD_NAME") or env.container_id,
        )
    return bridge.veth_name(env.container_id, env.ifname)


def _unwire(node: Rtnl, veth: str) -> None:
    node.link_delete(0, veth)
    node.commit()


def _wire(
    conf: NetConf,
    env: Env,
    pod: Rtnl,
    node: Rtnl,
    pod_fd: int,
    veth: str,
    ips: list[dict],
    routes: list[dict],
) -> dict:
    address = ipaddress.IPv4Interface(ips[0]["address"])
    if conf.calico:
        gateway = None
        pairs = list(calico_pod.ROUTES)
        side = calico_pod.CalicoPodSide()
    else:
        gateway = ips[0].get("gateway") or conf.gateway
        pairs = [
            (r["dst"] if r["dst"] != "0.0.0.0/0" else "default", r.get("gw") or gateway)
            for r in routes
        ]
        if conf.is_default_gateway and not any(dst == "default" for dst, _ in pairs):
            pairs.append(("default", gateway))
        side = bridge.BridgePodSide(bridge.ensure_bridge(node, conf.subnet, conf.mtu))
    attachment = wiring.Attachment(
        env.netns,
        pod_fd,
        veth,
        str(address.ip),
        address.network.prefixlen,
        pairs,
        conf.mtu,
        alias=f"{env.container_id}/{env.ifname}",
        ifname=env.ifname,
        pod_index=0,
        pod_rtnl=pod,
    )
    wiring.wire(side, node, [attachment])
    inside, host = attachment.pod_link, attachment.host_link
    interfaces = [
        {"name": veth, "mac": host["mac"]},
        {"name": env.ifname, "mac": inside["mac"], "sandbox": env.netns},
    ]
    ip = {"address": str(address), "interface": 1} | ({"gateway": gateway} if gateway else {})
    return spec.extend(
        conf.prev_result,
        conf.version,
        interfaces,
        [ip],
        [
            {"dst": "0.0.0.0/0" if dst == "default" else dst} | ({"gw": via} if via else {})
            for dst, via in pairs
        ],
    )


def delete(conf: NetConf, env: Env, host_netns: str | None = None) -> None:
    """Remove the veth (the kernel takes the pod's end with it) and release the address; what
    is already gone is not an error, and the address is released even if the first part fails."""
    problem = None
    try:
        with Rtnl(host_netns) as node:
            node.link_delete(0, host_veth(conf, env))
            node.commit()
    except KernelError as exc:
        problem = CniError(spec.KERNEL_FAILURE, str(exc))
    _ipam_del(conf, env)
    if problem:
        raise problem


def check(conf: NetConf, env: Env, host_netns: str | None = None) -> None:
    prev = conf.prev_result
    if not prev:
        raise CniError(
            spec.INVALID_CONFIG,
            "missing field prevResult: CHECK compares the ADD "
            "result the runtime cached with the kernel",
        )
    if not nsmod.exists(env.netns):
        raise CniError(spec.UNKNOWN_CONTAINER, f"netns {env.netns} does not exist")
    interfaces = prev.get("interfaces") or []
    mine = [
        i
        for i, itf in enumerate(interfaces)
        if itf.get("name") == env.ifname and itf.get("sandbox") == env.netns
    ]
    if not mine:
        raise CniError(
            spec.CHECK_FAILED, f"prevResult has no interface {env.ifname} in sandbox {env.netns}"
        )
    wanted = interfaces[mine[0]]
    veth = host_veth(conf, env)
    try:
        with Rtnl(env.netns) as pod, Rtnl(host_netns) as node:
            link = pod.link(env.ifname)
            if link is None:
                _fail(f"interface {env.ifname} is missing in netns {env.netns}")
            if wanted.get("mac") and wanted["mac"].lower() != (link["mac"] or "").lower():
                _fail(
                    f"interface {env.ifname} has MAC {link['mac']}, prevResult says {wanted['mac']}"
                )
            host = node.link(veth)
            if host is None:
                _fail(f"host interface {veth} of {env.ifname} is missing")
            if not conf.calico and host["master"] != (node.link(bridge.BRIDGE) or {}).get("index"):
                _fail(f"host interface {veth} is not attached to {bridge.BRIDGE}")
            have = {f"{a}/{p}" for index, a, p in pod.addresses() if index == link["index"]}
            node_routes = {(r["dst"], r["oif"]) for r in node.routes()} if conf.calico else ()
            for ip in prev.get("ips") or []:
                if ip.get("interface") != mine[0]:
                    continue
                if ip["address"] not in have:
                    _fail(
                        f"address {ip['address']} is missing on {env.ifname} in netns {env.netns}"
                    )
                address = ip["address"].split("/")[0]
                if conf.calico and (f"{address}/32", host["index"]) not in node_routes:
                    _fail(f"route {address} dev {veth} is missing in the node's namespace")
            routes = {(r["dst"], r["gateway"]) for r in pod.routes()}
            for route in prev.get("routes") or []:
                dst = "default" if route["dst"] == "0.0.0.0/0" else route["dst"]
                if (dst, route.get("gw")) not in routes and not (
                    not route.get("gw") and any(d == dst for d, _ in routes)
                ):
                    via = f" via {route['gw']}" if route.get("gw") else ""
                    _fail(f"route {route['dst']}{via} is missing in netns {env.netns}")
    except KernelError as exc:
        raise CniError(spec.KERNEL_FAILURE, str(exc)) from None


def _fail(message: str) -> None:
    raise CniError(spec.CHECK_FAILED, message)


def _not_ready(conf: NetConf, node: Rtnl) -> str | None:
    """Why pods cannot be wired on this node yet, from what the node's config says it needs:
    forwarding on, the mode's tunnel device (or its address), and for Calico the blackhole of
    a block affine to the node."""
    from netsim.kernel import sysctl
    from netsim.kernel.netlink import RTN_BLACKHOLE

    daemon = "calico-node" if conf.calico else "flanneld"
    if sysctl.get_in(node.netns, "net.ipv4.ip_forward") != "1":
        return f"IPv4 forwarding is off: {daemon} has not set up this node"
    if conf.tunnel:
        link = node.link(conf.tunnel)
        if link is None or not (link["up"] or conf.calico):  # felix checks presence only
            return (
                f"{conf.tunnel} is {'down' if link else 'missing'}: {daemon} has not set "
                "up this node"
            )
    if conf.tunnel_address and not any(
        f"{a}/{p}" == f"{conf.tunnel_address}/32" for _, a, p in node.addresses()
    ):
        return (
            f"the tunnel address {conf.tunnel_address} is missing: {daemon} has not set up "
            "this node"
        )
    if conf.calico and not any(r["type"] == RTN_BLACKHOLE for r in node.routes()):
        return (
            "no block is affine to this node (no blackhole route): calico-node has not "
            "set up this node"
        )
    return None


def status(conf: NetConf, host_netns: str | None = None) -> None:
    """Ready when the node's mode is set up (code 50 otherwise)."""
    with Rtnl(host_netns) as node:
        problem = _not_ready(conf, node)
    if problem:
        raise CniError(spec.NOT_AVAILABLE, f"{conf.mode} is not ready: {problem}")


def gc(conf: NetConf, env: Env, host_netns: str | None = None) -> None:
    """Release every allocation, and remove every veth this plugin made, whose attachment is
    not in cni.dev/valid-attachments (or the older cni.dev/attachments)."""
    valid_list = conf.raw.get("cni.dev/valid-attachments", conf.raw.get("cni.dev/attachments"))
    if not isinstance(valid_list, list):
        raise CniError(
            spec.INVALID_CONFIG,
            "missing field cni.dev/valid-attachments",
            "GC needs the list of attachments to keep",
        )
    valid = {(a.get("containerID"), a.get("ifname")) for a in valid_list if isinstance(a, dict)}
    keep = {f"{cid}/{ifname}" for cid, ifname in valid}
    with Rtnl(host_netns) as node:
        cni0 = (node.link(bridge.BRIDGE) or {}).get("index")
        for link in node.links():
            ours = (
                link["name"].startswith("cali")
                if conf.calico
                else (cni0 and link["master"] == cni0)
            )
            if ours and "/" in (link["alias"] or "") and link["alias"] not in keep:
                node.link_delete(link["index"], link["name"])
        node.commit()
    if conf.ipam["type"] == spec.CALICO_IPAM:
        blocks = _blocks(conf)
        handles = {pod_handle(conf.name, cid) for cid, _ in valid}
        try:
            with blocks.session():
                for ip, handle in blocks.allocations(conf.node_name):
                    tunnel = handle.endswith(f"-tunnel-addr-{conf.node_name}")  # the node's
                    if handle not in handles and not tunnel:
                        blocks.release_ip(conf.node_name, ip)
        except StoreError as exc:
            raise CniError(spec.TRY_AGAIN_LATER, str(exc)) from None
    if conf.ipam["type"] == spec.BUILTIN_IPAM:
        store = _store(conf)
        with store.session():
            for ip, container_id, ifname in store.allocations():
                if (container_id, ifname) not in valid:
                    store.release_ip(ip)
