"""The Kubernetes objects netsim models, as kube-apiserver keeps them in etcd under /registry
(as JSON here, where the API server writes protobuf): nodes, pods, Services and their
Endpoints. One read of /registry shows the cluster; `netsim get` lists from it.

    /registry/minions/<node>
    /registry/namespaces/<namespace>
    /registry/pods/<namespace>/<pod>
    /registry/services/specs/<namespace>/<service>
    /registry/services/endpoints/<namespace>/<service>
    /registry/deployments/<namespace>/<deployment>
    /registry/replicasets/<namespace>/<replicaset>
    /registry/networkpolicies/<namespace>/<policy>
    /calico/resources/v3/projectcalico.org/networkpolicies/<namespace>/<policy>
    /calico/resources/v3/projectcalico.org/globalnetworkpolicies/<policy>

Pure: the record in, key -> JSON text out; `sync` writes only what differs from the store.
"""

from __future__ import annotations

import json

from netsim import collector, deployments
from netsim.kubeproxy.ports import Endpoint, ProxyPort
from netsim.model import SYSTEM_NAMESPACES
from netsim.modes.calico import RESOURCES
from netsim.record import NodeRecord, PodRecord, Record
from netsim.services import NAMESPACE, endpoints, ip_key, target_port

PREFIX = "/registry/"
NODES = "/registry/minions/"
NAMESPACES = "/registry/namespaces/"
PODS = "/registry/pods/"
SERVICES = "/registry/services/specs/"
ENDPOINTS = "/registry/services/endpoints/"
DEPLOYMENTS, REPLICASETS = deployments.DEPLOYMENTS, deployments.REPLICASETS
SERVICES_ALL = "/registry/services/"  # kube-proxy watches both, in one stream
NETWORK_POLICIES = "/registry/networkpolicies/"
CALICO_RESOURCES = RESOURCES  # Calico's v3 resources (felix watches all of them)
CALICO_POLICIES = CALICO_RESOURCES + "networkpolicies/"
GLOBAL_POLICIES = CALICO_RESOURCES + "globalnetworkpolicies/"
POLICY_PREFIXES = (NETWORK_POLICIES, CALICO_POLICIES, GLOBAL_POLICIES)
MANAGED = (
    NODES,
    NAMESPACES,
    PODS,
    SERVICES,
    ENDPOINTS,
    DEPLOYMENTS,
    REPLICASETS,
    *POLICY_PREFIXES,
)  # what apply writes (not the kubelets' leases)


def _text(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def node_object(node: NodeRecord) -> dict:
    cidrs = node.pod_cidrs
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
        "spec": {"podCIDR": cidrs[0] if cidrs else "", "podCIDRs": cidrs},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.ip},
                {"type": "Hostname", "address": node.name},
            ],
        },
    }


def pod_object(pod: PodRecord, node_ip: str) -> dict:
    meta: dict = {"name": pod.pod.name, "namespace": pod.pod.namespace, "labels": dict(pod.labels)}
    if pod.pod.owner:
        meta["ownerReferences"] = [{"kind": "Deployment", "name": pod.pod.owner}]
    containers = []
    for c in pod.pod.containers:
        names = {p: n for n, p in c.port_names}
        container: dict = {"name": c.name}
        if c.ports:
            container["ports"] = [
                {"containerPort": p}
                | ({"name": names[p]} if p in names else {})
                | ({"protocol": c.protocol(p)} if c.protocol(p) != "TCP" else {})
                for p in c.ports
            ]
        if c.command:
            container["command"] = list(c.command)
        containers.append(container)
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {"nodeName": pod.node, "containers": containers},
        "status": {
            "phase": "Running",
            "hostIP": node_ip,
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
        },
    }


def namespace_object(name: str, labels: dict[str, str]) -> dict:
    meta = {"name": name, "labels": {"kubernetes.io/metadata.name": name} | labels}
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": meta,
        "status": {"phase": "Active"},
    }


def service_object(record: Record, key: str) -> dict:
    svc = record.services[key]
    ports = []
    for p in svc.ports:
        port: dict = {"protocol": p.protocol, "port": p.port, "targetPort": p.target_port}
        if p.name:
            port["name"] = p.name
        if p.node_port:
            port["nodePort"] = p.node_port
        ports.append(port)
    spec: dict = {
        "type": svc.type,
        "clusterIP": svc.cluster_ip,
        "clusterIPs": [svc.cluster_ip],
        "selector": dict(svc.selector),
        "ports": ports,
        "sessionAffinity": svc.session_affinity,
    }
    if svc.session_affinity == "ClientIP":
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": svc.affinity_timeout}}
    if svc.node_ports:
        spec["externalTrafficPolicy"] = svc.external_policy
    spec["internalTrafficPolicy"] = svc.internal_policy
    if svc.health_check_node_port:
        spec["healthCheckNodePort"] = svc.health_check_node_port
    status: dict = {"loadBalancer": {}}
    if svc.load_balancer_ip:  # MetalLB's L2 mode: the address is announced by one node
        status["loadBalancer"]["ingress"] = [{"ip": svc.load_balancer_ip, "ipMode": "VIP"}]
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": svc.name, "namespace": svc.namespace}
        | ({"labels": dict(svc.labels)} if svc.labels else {}),
        "spec": spec,
        "status": status,
    }


def _pod_ref(pod: PodRecord) -> dict:
    """An address's targetRef. Its namespace is the Endpoints object's own, said only
    outside `default`: ten thousand addresses in an object every node's kube-proxy holds."""
    ref = {"kind": "Pod", "name": pod.pod.name}
    if pod.pod.namespace != NAMESPACE:
        ref["namespace"] = pod.pod.namespace
    return ref


def endpoints_object(record: Record, key: str) -> dict:
    """One subset per Service port (the addresses whose pod resolves that port), as the
    endpoints controller groups addresses by the port set they share."""
    svc = record.services[key]
    pods = endpoints(record, svc)
    subsets = []
    for port in svc.ports:
        addresses = [
            {
                "ip": p.ip,
                "nodeName": p.node,
                "targetRef": _pod_ref(p),
            }
            for p in pods
            if target_port(p, port)
        ]
        if addresses:
            number = target_port(next(p for p in pods if target_port(p, port)), port)
            entry: dict = {"port": number, "protocol": port.protocol}
            if port.name:
                entry["name"] = port.name
            subsets.append({"addresses": addresses, "ports": [entry]})
    return {
        "kind": "Endpoints",
        "apiVersion": "v1",
        "metadata": {"name": svc.name, "namespace": svc.namespace},
        "subsets": subsets,
    }


def objects(record: Record) -> dict[str, str]:
    """Every /registry key of the cluster and its value."""
    keys = {NODES + n.name: _text(node_object(n)) for n in record.nodes.values()}
    for name, labels in [*((n, {}) for n in SYSTEM_NAMESPACES), *record.namespaces.items()]:
        keys[NAMESPACES + name] = _text(namespace_object(name, labels))
    for pod in record.pods.values():
        node_ip = record.nodes[pod.node].ip if pod.node in record.nodes else ""
        keys[f"{PODS}{pod.pod.namespace}/{pod.pod.name}"] = _text(pod_object(pod, node_ip))
    for key, svc in record.services.items():
        where = f"{svc.namespace}/{svc.name}"
        keys[SERVICES + where] = _text(service_object(record, key))
        keys[ENDPOINTS + where] = _text(endpoints_object(record, key))
    keys |= {k: _text(v) for k, v in deployments.objects(record).items()}
    for policy in record.policies.values():
        keys[policy_key(policy)] = _text(policy.body)
    return keys


def policy_key(policy) -> str:
    """Where a policy is kept: a Kubernetes one in /registry, Calico's in Calico's store."""
    where = f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name
    if policy.kind == "NetworkPolicy":
        return NETWORK_POLICIES + where
    return (CALICO_POLICIES if policy.namespace else GLOBAL_POLICIES) + where


def sync(store, record: Record) -> int:
    """Make /registry hold exactly the record's objects: one range read, then puts and
    deletes of what differs. The number of keys changed. The controller's judgement is kept:
    a node's conditions as stored, and the pods of NotReady nodes and the pods not ready in
    their Endpoints' notReadyAddresses (netsim/controller.py)."""
    from netsim.controller import is_ready, split_endpoints

    wanted = objects(record)
    held = {
        kv.key: kv.value.decode()
        for prefix in (PREFIX, CALICO_POLICIES, GLOBAL_POLICIES)
        for kv in store.range(prefix, prefix=True)
        if kv.key.startswith(MANAGED)  # not the kubelets' node leases
    }
    not_ready = set()
    for key in wanted:
        if key.startswith(NODES) and key in held:
            stored = json.loads(held[key]).get("status", {}).get("conditions")
            if stored:
                obj = json.loads(wanted[key])
                obj["status"]["conditions"] = stored
                wanted[key] = _text(obj)
                if not is_ready(obj):
                    not_ready.add(obj["metadata"]["name"])
    waiting = _not_ready_pods(record, [v for k, v in held.items() if k.startswith(ENDPOINTS)])
    if not_ready or waiting:
        for key in wanted:
            if key.startswith(ENDPOINTS):
                wanted[key] = _text(split_endpoints(json.loads(wanted[key]), not_ready, waiting))
    changed = {k: v for k, v in wanted.items() if held.get(k) != v}
    gone = [k for k in held if k not in wanted]
    if changed:
        store.put_all(changed)
    if gone:
        store.delete_all(gone)
    return len(changed) + len(gone)


def _not_ready_pods(record: Record, held: list[str]) -> frozenset[str]:
    """The pods the endpoints controller keeps out of `addresses` (netsim/controller.py):
    those it holds so now, and new ones whose kubelet reported them not ready (init
    containers, a readiness probe). A pod it holds as ready stays so: it is the judge. (The
    stored objects are decoded only when one holds a pod back or a pod is not ready: ten
    thousand addresses are read at every apply otherwise.)"""
    from netsim.controller import address_pod

    if all(p.ready for p in record.pods.values()) and not any(
        "notReadyAddresses" in text for text in held
    ):
        return frozenset()
    ready, waiting = set(), set()
    for obj in map(json.loads, held):
        for subset in obj.get("subsets", []):
            ready |= {(address_pod(a), a["ip"]) for a in subset.get("addresses", [])}
            waiting |= {(address_pod(a), a["ip"]) for a in subset.get("notReadyAddresses", [])}
    return frozenset(
        key
        for key, pod in record.pods.items()
        if (key, pod.ip) in waiting or (not pod.ready and (key, pod.ip) not in ready)
    )


def proxy_ports(
    services: dict[str, dict], endpoints: dict[str, dict], node: str = ""
) -> list[ProxyPort]:
    """Every Service port with its endpoints, read from the Service and Endpoints objects as
    kube-proxy reads them (key -> object, netsim.model.object_key), in key order; for a
    Service with a Local traffic policy, also the endpoints on `node` (kube-proxy's own).
    Headless Services have no part."""
    found = []
    for name in sorted(services):
        svc = services[name]
        spec = svc["spec"]
        if spec.get("clusterIP") == "None":
            continue
        namespace = svc["metadata"].get("namespace", NAMESPACE)
        affinity = None
        if spec.get("sessionAffinity") == "ClientIP":
            affinity = spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"]
        subsets = (endpoints.get(name) or {}).get("subsets", [])
        for port in spec.get("ports", []):
            pname, proto = port.get("name", ""), port.get("protocol", "TCP")
            placed = sorted(  # (endpoint, its node), in address order
                (
                    (Endpoint(address["ip"], entry["port"]), address.get("nodeName"))
                    for subset in subsets
                    for entry in subset.get("ports", [])
                    if entry.get("name", "") == pname and entry.get("protocol", "TCP") == proto
                    for address in subset.get("addresses", [])
                ),
                key=lambda found: ip_key(found[0].ip),
            )
            backends = [endpoint for endpoint, _ in placed]
            external_local = spec.get("externalTrafficPolicy") == "Local"
            internal_local = spec.get("internalTrafficPolicy") == "Local"
            local = ()
            if external_local or internal_local:
                local = tuple(dict.fromkeys(e for e, where in placed if where == node))
            ingress = svc.get("status", {}).get("loadBalancer", {}).get("ingress", [])
            found.append(
                ProxyPort(
                    namespace,
                    svc["metadata"]["name"],
                    pname,
                    proto,
                    spec["clusterIP"],
                    port["port"],
                    port.get("nodePort"),
                    tuple(backends),
                    affinity,
                    # kube-proxy programs the VIP addresses (ipMode unset or VIP), not Proxy ones
                    tuple(i["ip"] for i in ingress if i.get("ipMode", "VIP") == "VIP"),
                    external_local,
                    internal_local,
                    local,
                    spec.get("healthCheckNodePort"),
                )
            )
    return found


def listed(store, prefix: str) -> list[dict]:
    """The objects under one /registry prefix, in key order."""
    with collector.paused():
        return [kv.json() for kv in store.range(prefix, prefix=True)]
