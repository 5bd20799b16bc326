"""calico-node's felix, its policy half, on every node (flannel's nodes too: flannel with
Calico's policy is what people call Canal): watch the network policies — Kubernetes' in
/registry, Calico's in Calico's store — and, while there is any, the pods, namespaces and this
node's own pods; keep the node's `ip calico` table (netsim/policy_table.py) in step, the whole
table on the first sync, then one nf_tables batch of only what changed.

The pods and namespaces are watched only while a policy exists (a second informer, started
with the first policy and stopped with the last): without policies a node holds no copy of
every pod, which at 10,000 pods would cost every agent megabytes, and has no policy table.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from netsim import netpol, policy_table, registry
from netsim.daemons.kubelet import POD_STATUS
from netsim.kernel import nft
from netsim.kernel.nfttable import Table, difference
from netsim.model import object_key


class PolicyDaemon:
    name = "felix-policy"
    # Calico's policies are among its v3 resources, which calico-node's felix watches whole
    # (one watch for both daemons in Calico's modes)
    prefixes = (registry.NETWORK_POLICIES, registry.CALICO_RESOURCES)

    def __init__(self, node, dispatch: str, store, event: Callable[[str], None]):
        self.node, self.dispatch, self.store, self.event = node, dispatch, store, event
        self.own = f"{POD_STATUS}{node.name}/"
        self.lock = threading.Lock()
        self.policies: list[netpol.Policy] = []
        self.view: dict | None = None  # the pods' informer's cache, once it listed
        self.listed = threading.Event()
        self.pods = None  # that informer, while there are policies
        self.synced: Table | None = None  # what the table holds; None: no table
        self.decoded: dict[bytes, netpol.PodInfo] = {}  # each pod's stored value, decoded

    def sync(self, view: dict) -> None:
        policies = [
            netpol.from_body(json.loads(kv.value))
            for prefix in self.prefixes
            for kv in view[prefix].values()
            if kv.key.startswith(registry.POLICY_PREFIXES)
        ]
        policies.sort(key=lambda p: (p.kind, p.namespace, p.name))
        if self.policies == policies and (self.synced is not None or not policies):
            return  # another Calico resource changed (a node, a pool)
        with self.lock:
            self.policies = policies
            if policies and self.pods is None:
                self._watch_pods()
        if policies and not self.listed.wait(10):
            raise RuntimeError("the pods were not listed within 10 s")
        if not policies and self.pods is not None:
            with self.lock:
                self.pods.stop()
                self.pods, self.view = None, None
                self.decoded.clear()
                self.listed.clear()
        self._program()

    def _watch_pods(self) -> None:
        from netsim.daemons.informer import Informer

        daemon = self

        class Pods:
            name = "felix-policy (pods)"
            prefixes = (registry.PODS, registry.NAMESPACES, daemon.own)

            def sync(self, view: dict) -> None:
                with daemon.lock:
                    if daemon.pods is not informer:  # stopped with the last policy
                        return
                    daemon.view = view
                daemon.listed.set()
                daemon._program()

        informer = Informer(self.store, [Pods()], lambda applied: None, _log)
        self.pods = informer
        informer.start()

    def _program(self) -> None:
        with self.lock:
            if not self.policies:
                if self.synced is not None:
                    policy_table.sweep(self.node.netns)
                    self.synced = None
                    self.event("no policy is left: removed the policy chains")
                return
            if self.view is None:
                return
            pods, local = _pods(self.view, self.own, self.decoded)
            spaces = {
                kv.key[len(registry.NAMESPACES) :]: json.loads(kv.value)["metadata"].get(
                    "labels", {}
                )
                for kv in self.view[registry.NAMESPACES].values()
            }
            table = policy_table.compute(self.policies, pods, spaces, local, self.dispatch)
            old = self.synced
            if old is None:  # what a previous run left goes, then the fixed part
                policy_table.sweep(self.node.netns)
                nft.apply(self.node.netns, policy_table.base(self.dispatch))
                old = Table(sets=policy_table.dispatch_maps(self.dispatch))
            batch = difference(policy_table.TABLE, old, table)
            if len(batch):
                batch.commit(self.node.netns)
                selected = {c for c in table.chains if c.startswith(("cali-pi-", "cali-po-"))}
                self.event(
                    f"programmed {len(self.policies)} policies: {len(local)} local endpoints, "
                    f"{len(selected)} policy chains, {len(batch)} nf_tables messages"
                )
            self.synced = table


def _pods(
    view: dict, own: str, cache: dict
) -> tuple[list[netpol.PodInfo], list[tuple[netpol.PodInfo, str]]]:
    """Every pod with an address, as Felix's workload endpoints; this node's with their
    host-side interface (from its kubelet's status). `cache` keeps each pod's decoding by
    its stored value: a change decodes only the pods it touched, not all of them."""
    found, seen = {}, {}
    for kv in view[registry.PODS].values():
        info = cache.get(kv.value)
        if info is None:
            info = _pod_info(json.loads(kv.value))
        seen[kv.value] = info
        found[object_key(info.namespace, info.name)] = info
    cache.clear()
    cache.update(seen)
    local = []
    for kv in view[own].values():
        status = json.loads(kv.value)
        info = found.get(kv.key[len(own) :])
        if info is not None and status.get("veth") and status.get("ip"):
            if info.ip != status["ip"]:  # the kubelet knows first
                info = netpol.PodInfo(
                    info.namespace, info.name, info.labels, status["ip"], info.ports
                )
            local.append((info, status["veth"]))
    return list(found.values()), local


def _pod_info(obj: dict) -> netpol.PodInfo:
    meta, status = obj["metadata"], obj.get("status", {})
    ports = tuple(
        (p["name"], p.get("protocol", "TCP"), p["containerPort"])
        for c in obj["spec"].get("containers", [])
        for p in c.get("ports", [])
        if p.get("name")
    )
    return netpol.PodInfo(
        meta.get("namespace", "default"),
        meta["name"],
        meta.get("labels", {}),
        status.get("podIP", ""),
        ports,
    )


def _log(text: str) -> None:
    print(text, flush=True)
