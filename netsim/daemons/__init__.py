"""A node's daemons, run by its agent against the cluster's etcd, as on a real node: the
kubelet makes the pods bound to the node and has the agent serve them; flanneld
reaches the peers the subnet leases name; calico-node's felix the peers' IPAM blocks, and its
confd keeps BIRD's configuration; kube-proxy (nftables mode) programs the Services and
Endpoints. Each watches the store (informer.py), changes only its own node's kernel, records
what it did (events.py) and publishes the revision it applied under /netsim.dev/status/<node>,
which `netsim apply` waits for."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable


def start(
    config: dict,
    node_dir: str,
    tunnel: Callable[[], object],
    proxy: Callable[[], object],
    serve: Callable[[dict], dict],
    after=None,
):
    """Start the daemons this configuration (netsim.agents.daemons_config) calls for; the
    running informer. `tunnel` and `proxy` give the agent's userspace carrier (None until it
    runs) and its userspace proxy (made on first use); `serve` has the agent serve exactly the
    pods the kubelet gives it; `after`, the worker of the daemons these replace."""
    import msgspec

    from netsim import events, modes
    from netsim import store as storemod
    from netsim.daemons.informer import Informer, status
    from netsim.daemons.kubelet import Kubelet
    from netsim.record import ClusterSpec, NodeRecord
    from netsim.store.client import Store, StoreError

    node = msgspec.convert(config["node"], NodeRecord)
    cluster = msgspec.convert(config["spec"], ClusterSpec).cluster(config["cluster"])
    mode = modes.get(config["mode"])
    store = Store(config["store"]["endpoints"], config["store"]["netns"])

    def recorder(daemon: str) -> Callable[[str], None]:
        return lambda message: events.record(node_dir, node.name, daemon, message)

    daemons: list = [Kubelet(mode, cluster, node, node_dir, serve, store, recorder("kubelet"))]
    if mode.family == "flannel":
        from netsim.daemons.flanneld import Flanneld

        udp = tunnel if mode.encapsulation == "udp" else None
        daemons.append(Flanneld(mode, node, config["network"], recorder("flanneld"), udp))
    else:
        from netsim.daemons.felix import Confd, Felix

        carrier = tunnel if node.carrier == "userspace" else None
        daemons.append(Felix(mode, node, recorder("felix"), carrier))
        if mode.bgp:
            daemons.append(Confd(node, os.path.join(node_dir, "bird"), recorder("confd")))
    from netsim.daemons.policy import PolicyDaemon

    daemons.append(PolicyDaemon(node, mode.workload_dispatch, store, recorder("felix")))
    if config["kube_proxy"] == "nftables":
        from netsim.daemons.kube_proxy import KubeProxy

        plans = os.path.join(os.path.dirname(os.path.dirname(node_dir)), "kube-proxy-plans")
        daemons.append(
            KubeProxy(node.netns, config["network"], recorder("kube-proxy"), plans, node.name)
        )
    else:
        from netsim.daemons.kube_proxy import UserspaceKubeProxy

        daemons.append(UserspaceKubeProxy(node.netns, node.ip, proxy, recorder("kube-proxy")))

    if cluster.lb_addresses:  # MetalLB's speaker, layer 2: only where there is a pool
        from netsim.daemons.speaker import Speaker

        daemons.append(Speaker(node, recorder("speaker")))

    def report(applied: dict[str, int]) -> None:
        try:
            store.put(storemod.STATUS + node.name, json.dumps(status(node.name, applied)))
        except StoreError as exc:
            print(f"status: {exc}", flush=True)

    informer = Informer(store, daemons, report, lambda text: print(text, flush=True))
    informer.after = after
    os.makedirs(node_dir, exist_ok=True)
    informer.start()
    threading.Thread(
        target=heartbeat, args=(store, node.name, config["grace"], informer.stopped), daemon=True
    ).start()
    return informer


def heartbeat(store, node: str, grace: int, stopped) -> None:
    """The kubelet's node lease, renewed every quarter of the grace period (10 s of 40), which
    the node lifecycle controller reads (netsim/controller.py)."""
    from netsim.controller import LEASES, node_lease
    from netsim.store.client import StoreError

    every = max(0.5, grace / 4)
    while not stopped.is_set():
        try:
            store.put(LEASES + node, node_lease(node, grace, time.time()))
            wait = every
        except StoreError as exc:  # e.g. just powered on, its neighbours not yet resolved
            print(f"heartbeat: {exc}", flush=True)
            wait = min(every, 1.0)
        stopped.wait(wait)
