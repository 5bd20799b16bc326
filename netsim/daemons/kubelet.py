"""kubelet on a node: make the pods the store binds to the node, and only those.

The API server hands a kubelet only its own node's pods (a watch with the field selector
spec.nodeName=<node>); etcd cannot filter by value, so netsim's scheduler (apply) also writes
each bound pod under /netsim.dev/kubelet/<node>/<pod>, and the kubelet watches that prefix.
For a pod that appears it runs the CNI ADD — in-process with the plugin's own code (an IPAM
session for the batch, the pods' namespaces, one netlink batch for the host ends), or by
executing the node's CNI config list (`--cni exec`) — and has the agent serve it (its hostname
server, its containers); for a pod that goes it stops the containers and runs the CNI DEL
(veth, namespace, address). What it made it keeps on the node's disk (<node>/pods/<pod>.json,
as a container runtime keeps its sandboxes), so a restarted kubelet adopts its pods instead of
making them twice, and publishes each pod's address, namespace, veth and container PIDs under
/netsim.dev/pods/<node>/<pod> (the pod status apply reads back; `error` if the ADD failed).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

from netsim.kernel import netns as nsmod

KUBELET = "/netsim.dev/kubelet/"  # + <node>/<pod>: the pod spec bound to the node
POD_STATUS = "/netsim.dev/pods/"  # + <node>/<pod>: what the node's kubelet made of it


class Kubelet:
    name = "kubelet"

    def __init__(self, mode, cluster, node, node_dir: str, serve, store, event: Callable):
        self.mode, self.cluster, self.node = mode, cluster, node
        self.serve = serve  # the agent: serve exactly these pods -> {pod: container pids}
        self.store, self.event = store, event
        self.prefixes = (f"{KUBELET}{node.name}/",)
        self.dir = os.path.join(node_dir, "pods")
        self.cluster_dir = os.path.dirname(os.path.dirname(node_dir))
        self.etc = os.path.join(self.cluster_dir, "etc")  # the pods' resolv.conf and hosts
        self.running: dict[str, dict] | None = None  # pod -> its checkpoint; None: not read
        self.status_prefix = f"{POD_STATUS}{node.name}/"
        # pod -> hash of the status this node's kubelet published (a hundred texts in each of
        # a hundred agents: the hash is enough to tell a change)
        self.published: dict[str, int] = {}
        self.statuses: dict[str, dict] = {}  # pod -> phase, readiness, container statuses
        self.lock = threading.Lock()  # a sync, or the publication of a container's change
        self.changes: dict[str, tuple[dict, list[int]]] = {}  # from the agent, to publish
        self.changes_lock = threading.Lock()
        self.wake = threading.Event()
        self.publisher: threading.Thread | None = None

    def sync(self, view: dict) -> None:
        with self.lock:
            self._sync(view)

    def _sync(self, view: dict) -> None:
        prefix = self.prefixes[0]
        wanted = {kv.key[len(prefix) :]: kv.json() for kv in view[prefix].values()}
        if self.running is None:
            self.running = self._adopt()
            self.published = {
                kv.key[len(self.status_prefix) :]: hash(kv.value.decode())
                for kv in self.store.range(self.status_prefix, prefix=True)
            }
        running = self.running
        gone = sorted(n for n, c in running.items() if wanted.get(n) != c["spec"])
        if gone:
            self._serve({n: c for n, c in running.items() if n not in gone})
            deleted = self._delete([running[n] for n in gone])
            self.event(f"deleted {_names(deleted)} (CNI DEL)")
        new = {n: s for n, s in sorted(wanted.items()) if n not in running}
        errors: dict[str, str] = {}
        if new:
            made, error = self._add(new)
            running |= made
            errors |= {n: error for n in new if n not in made}
        errors |= self._serve(running)
        self._publish(
            {
                name: json.dumps({"node": self.node.name, "error": errors[name]})
                if name in errors
                else self._status_text(name)
                for name in wanted
                if name in running or name in errors
            }
        )
        made = [n for n in new if n not in errors]
        if made:
            their = "their" if len(made) > 1 else "its"
            self.event(f"made {_names(made)} (CNI ADD) and started {their} containers")
        for name in sorted(set(new) & set(errors)):
            self.event(f"could not make pod {name}: {errors[name]}")

    # -- the node's disk -----------------------------------------------------------------------

    def _adopt(self) -> dict[str, dict]:
        """The pods a previous kubelet made (their checkpoints). Containers that outlived
        their agent (no longer its children) are ended: this agent starts them again."""
        from netsim.kernel import proc

        found, unfinished = {}, []
        for entry in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []:
            if entry.endswith(".json"):
                with open(os.path.join(self.dir, entry)) as fh:
                    checkpoint = json.load(fh)
                if checkpoint.get("making"):  # its ADD never finished: DEL what it left
                    unfinished.append(checkpoint)
                    continue
                orphans = [tuple(p) for p in checkpoint["pids"] if proc.parent(p[0]) != os.getpid()]
                proc.stop(orphans)
                found[checkpoint["name"]] = checkpoint
                if os.path.isdir(os.path.join(self.etc, checkpoint["netns"])):
                    nsmod.link_etc(checkpoint["netns"], self.etc)  # its agent died before it
        self._delete(unfinished)
        return found

    def _save(self, checkpoint: dict) -> None:
        from netsim import state

        state.write_file(
            os.path.join(self.dir, f"{checkpoint['name']}.json"), json.dumps(checkpoint)
        )

    def _forget(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, f"{name}.json"))
        except FileNotFoundError:
            pass

    # -- CNI ADD and DEL -----------------------------------------------------------------------

    def _next_index(self) -> int:
        from netsim.kernel.netlink import IFINDEX

        used = [c["ifindex"] for c in (self.running or {}).values() if c.get("ifindex")]
        return max(used, default=IFINDEX.FIRST_DYNAMIC - 1) + 1

    def _add(self, specs: dict[str, dict]) -> tuple[dict[str, dict], str]:
        """Make the pods in a forked child, whose heap goes when it exits (wiring a hundred
        pods would leave its peak in each of a hundred agents); it leaves their checkpoints,
        or why it could not make them. ({pod: checkpoint}, "") or ({}, why)."""
        from netsim import store
        from netsim.kernel import proc

        failure = os.path.join(self.dir, ".add-failed")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.etc, exist_ok=True)
        # intents first, as a runtime records a sandbox before it makes it: what a kubelet
        # killed in the middle leaves, the next one finds and deletes (_adopt). Kept to what
        # needs no code beyond this module: each object the agent touches is a page of the
        # zygote's it copies, in each of a hundred agents (the child adds veth and inode)
        intents = [_checkpoint(name, spec, making=True) for name, spec in specs.items()]
        for intent in intents:
            self._save(intent)

        def work() -> None:
            store.forget(self.cluster.name)  # the child's own etcd connections
            made, error = self._add_here(specs)
            if error:
                with open(failure, "w") as fh:
                    fh.write(error)

        try:
            proc.in_child(work)
        except RuntimeError as exc:  # its traceback is in the agent's log
            self._abandon(intents)
            return {}, str(exc)
        if os.path.exists(failure):
            with open(failure) as fh:
                error = fh.read()
            os.unlink(failure)
            self._abandon(intents)
            return {}, error
        made = {}
        for name in specs:
            with open(os.path.join(self.dir, f"{name}.json")) as fh:
                made[name] = json.load(fh)
            # linked here, not in the child: an agent that is killed links nothing more, a
            # child may outlive it a moment (and its cluster's deletion)
            nsmod.link_etc(made[name]["netns"], self.etc)
        return made, ""

    def _abandon(self, intents: list[dict]) -> None:
        """DEL what is left of pods whose ADD did not finish (their veths, addresses, and the
        namespace each had made, known by its inode): their checkpoints still say `making`."""
        left = []
        for intent in intents:
            path = os.path.join(self.dir, f"{intent['name']}.json")
            try:
                with open(path) as fh:
                    saved = json.load(fh)
            except (OSError, ValueError):
                continue
            if saved.get("making"):
                left.append(saved)
        self._delete(left)

    def _add_here(self, specs: dict[str, dict]) -> tuple[dict[str, dict], str]:
        """Make the pods; ({pod: checkpoint}, "") or ({}, why) with nothing of them left."""
        from netsim.errors import NetsimError

        made: dict[str, dict] = {}
        try:
            if any(s.get("via") == "cni-exec" for s in specs.values()):
                for name, spec in specs.items():
                    made[name] = self._exec_add(name, spec)
            else:
                made = self._wire(specs)
        except (NetsimError, OSError) as exc:  # KernelError is a NetsimError
            self._delete(list(made.values()))
            return {}, str(exc)
        for checkpoint in made.values():
            self._save(checkpoint)
        return made, ""

    def _wire(self, specs: dict[str, dict]) -> dict[str, dict]:
        """The in-process ADD: addresses from one IPAM session, then the namespaces, one
        netlink batch for the host ends and a small one inside each pod (cni.wiring)."""
        from cni.wiring import Attachment, wire
        from netsim.kernel.netlink import Rtnl

        mode, node = self.mode, self.node
        ipam = mode.ipam(self.cluster, self.cluster_dir, node)
        made: dict[str, dict] = {}
        try:
            with ipam.session():
                index = self._next_index()
                for name, spec in specs.items():
                    made[name] = _checkpoint(
                        name,
                        spec,
                        ip=ipam.allocate(name, "eth0"),
                        veth=mode.host_veth(*_identity(name, spec)),
                        ifindex=index,
                    )
                    index += 1
            routes, prefixlen = mode.pod_routes(self.cluster, node), mode.pod_prefixlen(node)
            mtu = mode.pod_mtu(self.cluster.mtu)
            attachments = []
            try:
                for name, checkpoint in made.items():
                    checkpoint["ino"] = _create_netns(self.cluster.name, checkpoint["netns"])
                    self._save({**checkpoint, "making": True})  # its namespace, by inode
                    self._etc(name, checkpoint)
                    attachments.append(
                        Attachment(
                            checkpoint["netns"],
                            nsmod.open_fd(checkpoint["netns"]),
                            checkpoint["veth"],
                            checkpoint["ip"],
                            prefixlen,
                            routes,
                            mtu,
                            alias=name,
                            index=checkpoint["ifindex"],
                        )
                    )
                with Rtnl(node.netns) as rt:
                    wire(mode.pod_side, rt, attachments, loopback=True)
            finally:
                for attachment in attachments:
                    os.close(attachment.pod_fd)
        except BaseException:
            self._delete(list(made.values()))
            raise
        return made

    def _runtime(self):
        from netsim.cniconf import node_runtime

        return node_runtime(self.cluster.name, self.node.name, self.mode.name, self.node.netns)

    def _exec_add(self, name: str, spec: dict) -> dict:
        """ADD by executing the node's CNI chain, as containerd does; DEL through it if it
        fails."""
        from cni.spec import CniError
        from netsim.errors import NetsimError
        from netsim.kernel.netlink import IFINDEX, Rtnl

        ino = _create_netns(self.cluster.name, spec["netns"])
        self._save(_checkpoint(name, spec, ino=ino, making=True))
        runtime, path = self._runtime(), nsmod.path(spec["netns"])
        namespace, pod = _identity(name, spec)
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"
        try:
            result = runtime.add(name, path, "eth0", args)
        except CniError as exc:
            try:
                runtime.delete(name, path, "eth0")
            except CniError:
                pass  # the ADD's own failure is the one to report
            nsmod.remove(spec["netns"])
            raise NetsimError(
                f"CNI ADD for pod {name} failed (code {exc.code}): {exc.msg}"
                + (f" ({exc.details})" if exc.details else "")
            ) from None
        with Rtnl(spec["netns"]) as pod_rt:
            pod_rt.link_up(IFINDEX.LO, "lo")  # the runtime's loopback plugin
            pod_rt.commit()
        address = next(ip["address"] for ip in result["ips"])
        veth = result["interfaces"][0]["name"]
        made = _checkpoint(name, spec, ip=address.split("/")[0], veth=veth, ino=ino)
        self._etc(name, made)
        return made

    def _etc(self, name: str, checkpoint: dict) -> None:
        """The pod's resolv.conf and hosts, as the kubelet writes them, where `ip netns exec`
        and the pod's containers find them (/etc/netns/<netns>/)."""
        from netsim import addons

        namespace, hostname = _identity(name, checkpoint["spec"])
        files = {
            "resolv.conf": addons.resolv_conf(self.cluster.service_cidr, namespace),
            "hosts": addons.hosts(checkpoint["ip"], hostname),
        }
        nsmod.write_etc(checkpoint["netns"], files, self.etc)

    def _delete(self, checkpoints: list[dict]) -> list[str]:
        """DEL: the host veth (it takes its peer), the namespace, then the address; what is
        already gone is fine, as CNI's DEL wants. A namespace that is no longer the one this
        kubelet made (the pod was made again elsewhere while this node was down, and its
        namespace has its name) is left alone. The pods deleted (dropped from `running`)."""
        from netsim.kernel.netlink import Rtnl

        if not checkpoints:
            return []
        mine = {c["name"]: _inode(c["netns"]) == c.get("ino") for c in checkpoints}
        done = []
        for checkpoint in [c for c in checkpoints if c.get("via") == "cni-exec"]:
            path = nsmod.path(checkpoint["netns"]) if mine[checkpoint["name"]] else ""
            try:
                self._runtime().delete(checkpoint["name"], path)
            except Exception as exc:  # noqa: BLE001 -- kept, and tried again at the next sync
                self.event(f"CNI DEL of pod {checkpoint['name']} failed: {exc}")
                continue
            done.append(checkpoint)
        with Rtnl(self.node.netns) as rt:
            for checkpoint in checkpoints:
                if checkpoint.get("via") != "cni-exec":
                    if checkpoint.get("ifindex"):  # (an intent cut short has no veth yet)
                        rt.link_delete(checkpoint["ifindex"], checkpoint["veth"])
                    done.append(checkpoint)
            rt.commit()
        ipam = self.mode.ipam(self.cluster, self.cluster_dir, self.node)
        with ipam.session():
            for checkpoint in done:
                if mine[checkpoint["name"]]:
                    nsmod.remove(checkpoint["netns"])
                    nsmod.remove_etc(checkpoint["netns"])
                if checkpoint.get("via") != "cni-exec":
                    ipam.release(checkpoint["name"], "eth0")
                self._forget(checkpoint["name"])
                if self.running is not None:
                    self.running.pop(checkpoint["name"], None)
        return [c["name"] for c in done]

    # -- the agent and the store ---------------------------------------------------------------

    def _serve(self, running: dict[str, dict]) -> dict[str, str]:
        """The agent serves exactly these pods; their containers' processes are noted. The
        pods it could not start: pod -> why."""

        reply = self.serve(
            {n: _served(c) for n, c in running.items()}, self._changed, self._environment
        )
        self.statuses = reply["statuses"]
        for name, checkpoint in running.items():
            self._note_pids(checkpoint, reply["pids"].get(name, []))
        return reply["errors"]

    def _note_pids(self, checkpoint: dict, pids: list[int]) -> None:
        from netsim.kernel import proc

        now = [[p, proc.start_time(p) or 0] for p in pids]
        if now != checkpoint["pids"]:
            checkpoint["pids"] = now
            self._save(checkpoint)

    def _status_text(self, name: str) -> str:
        status = _status(self.running[name]) | self.statuses.get(name, {})
        return json.dumps({"node": self.node.name, **status})

    def _changed(self, pod: str, status: dict, pids: list[int]) -> None:
        """(The agent's loop.) A container started, ended or became ready: published by the
        publisher thread, which waits for a sync under way."""
        with self.changes_lock:
            self.changes[pod] = (status, pids)
            if self.publisher is None:
                self.publisher = threading.Thread(target=self._publish_changes, daemon=True)
                self.publisher.start()
        self.wake.set()

    def _publish_changes(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            with self.changes_lock:
                changes, self.changes = self.changes, {}
            with self.lock:
                statuses = dict(self.published)
                for pod, (status, pids) in changes.items():
                    if self.running is None or pod not in self.running:
                        continue
                    self.statuses[pod] = status
                    self._note_pids(self.running[pod], pids)
                    statuses[pod] = self._status_text(pod)
                try:
                    self._publish(statuses)
                except Exception as exc:  # noqa: BLE001 -- the store is away: the next change
                    print(f"kubelet: publishing pod statuses: {exc}", flush=True)

    def _environment(self, pod: str) -> dict[str, str]:
        """(The agent's loop.) The variables of the Services that exist now, as the kubelet
        gives a container that starts (netsim/envvars.py)."""
        from netsim.envvars import service_env
        from netsim.registry import SERVICES

        checkpoint = (self.running or {}).get(pod)
        if checkpoint is None or not checkpoint["spec"].get("serviceLinks", True):
            return {}
        namespace = _identity(pod, checkpoint["spec"])[0]
        try:
            services = [
                kv.json() for kv in self.store.range(f"{SERVICES}{namespace}/", prefix=True)
            ]
        except Exception as exc:  # noqa: BLE001 -- the store is away: none, as a kubelet would
            print(f"kubelet: reading Services for pod {pod}: {exc}", flush=True)
            return {}
        return service_env(services)

    def _publish(self, statuses: dict[str, str | int]) -> None:
        """Each pod's status as it is now (its text, or the hash of what was published, for
        a pod that did not change); those of pods no longer bound here go."""
        from netsim.store.client import MAX_TXN_OPS, delete_op, put_op

        hashes = {n: v if isinstance(v, int) else hash(v) for n, v in statuses.items()}
        ops = [
            put_op(self.status_prefix + n, v)
            for n, v in statuses.items()
            if isinstance(v, str) and self.published.get(n) != hashes[n]
        ]
        ops += [delete_op(self.status_prefix + n) for n in self.published if n not in statuses]
        for start in range(0, len(ops), MAX_TXN_OPS):
            self.store.txn([], ops[start : start + MAX_TXN_OPS])
        self.published = hashes


def _checkpoint(name: str, spec: dict, **facts) -> dict:
    """What the kubelet keeps of a pod on the node's disk; `facts` as far as they are known
    (an intent has none of the ADD's yet)."""
    base = {"name": name, "spec": spec, "netns": spec["netns"], "veth": "", "ifindex": 0}
    return base | {"via": spec.get("via", "in-process"), "pids": []} | facts


def container_pids(node_dir: str) -> list[tuple[int, int]]:
    """(pid, start time) of the node's pods' containers, as its kubelet noted them."""
    found = []
    pods = os.path.join(node_dir, "pods")
    for entry in os.listdir(pods) if os.path.isdir(pods) else []:
        with open(os.path.join(pods, entry)) as fh:
            found += [tuple(p) for p in json.load(fh).get("pids", [])]
    return found


def _names(pods) -> str:
    pods = list(pods)
    shown = ", ".join(pods[:3]) + (f" and {len(pods) - 3} more" if len(pods) > 3 else "")
    return f"pod{'s' if len(pods) > 1 else ''} {shown}"


def _identity(key: str, spec: dict) -> tuple[str, str]:
    """The pod's namespace and name (its binding's key is netsim.model.object_key)."""
    return spec.get("namespace", "default"), spec.get("name", key)


def _served(checkpoint: dict) -> dict:
    """What the agent needs to serve a pod: its namespace and address, the hostname
    server's ports, its init containers and containers, its restart policy."""
    spec = checkpoint["spec"]
    served = {k: spec[k] for k in ("ports", "init", "containers", "restartPolicy") if k in spec}
    served["netns"] = checkpoint["netns"]
    if any(c.get("readiness") for c in spec.get("containers", [])):
        served["ip"] = checkpoint.get("ip", "")  # the kubelet probes the pod's address
    if "namespace" in spec:  # (a pod of `default` is served by its key, its name)
        served |= {"hostname": spec["name"], "namespace": spec["namespace"]}
    return served


def _status(checkpoint: dict) -> dict:
    status = {k: checkpoint[k] for k in ("ip", "netns", "veth", "ifindex", "via")}
    return status | {"pids": [pid for pid, _ in checkpoint["pids"]]}


def _create_netns(cluster: str, name: str) -> int:
    """The pod's namespace; its inode, which says later whether the name still holds this
    one."""
    from netsim import state

    prefix = state.netns_prefix(cluster)
    short = name[len(prefix) :] if name.startswith(prefix) else None
    nsmod.create(name, under=state.netns_dir(cluster), file=short)
    return _inode(name)


def _inode(netns: str) -> int | None:
    try:
        return os.stat(nsmod.path(netns)).st_ino
    except FileNotFoundError:
        return None
