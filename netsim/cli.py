"""The netsim command: kubectl-like verbs over a cluster built from kernel objects."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from netsim import cluster as clustermod
from netsim import columns, imperative, probe, services, state, teardown, topology
from netsim import store as storemod
from netsim.containers import PATH
from netsim.errors import NetsimError, TopologyError, UsageError
from netsim.kernel import netns as nsmod
from netsim.model import HOSTNAME_PORT, object_key
from netsim.record import Record

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "flannel-vxlan.yaml"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns aligned as kubectl aligns them: three spaces between, no borders."""
    return "\n".join(columns.aligned(header, rows))


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def pick_cluster(name: str | None) -> tuple[str, Record]:
    if name:
        record = state.load(name)
        if record is None:
            raise NetsimError(f"no cluster named {name}; `netsim get clusters` lists them")
        return name, record
    records = {n: r for n, r in _readable_clusters().items() if r is not None}
    if not records:
        raise NetsimError("no cluster exists; create one with netsim apply -f FILE")
    if len(records) > 1:
        raise NetsimError(f"several clusters exist ({', '.join(records)}): add --cluster NAME")
    return next(iter(records.items()))


def _readable_clusters() -> dict[str, Record | None]:
    """Every recorded cluster; None for one whose record this netsim cannot read, so that
    one damaged or older record does not hide the others."""
    found = {}
    for name in state.clusters():
        try:
            record = state.load(name)
        except NetsimError:
            found[name] = None
            continue
        if record is not None:
            found[name] = record
    return found


NAMESPACE = ["default"]  # the namespace the command names objects in (-n), set by main


def key_of(record: Record, name: str) -> str:
    """A name given on the command line as the record knows it: a pod or Service of the
    namespace (-n) by its key (netsim.model.object_key), anything else as it is."""
    key = object_key(NAMESPACE[0], name)
    return key if key in record.pods or key in record.services else name


def resolve(record: Record, target: str) -> tuple[str, str, str]:
    """A pod, node or external client name, or an IP -> (kind, netns, ip)."""
    target = key_of(record, target)
    place = _present(record, target)
    if place:
        return place.kind, place.netns, place.ip
    svc = record.services.get(target)
    if svc:
        return "service", "", svc.cluster_ip
    if target.count(".") == 3 and all(p.isdigit() for p in target.split(".")):
        return "ip", "", target
    raise NetsimError(
        f"no pod, node, client or service named {target!r} in cluster "
        f"{record.cluster}; `netsim get pods` lists them"
    )


def _present(record: Record, name: str):
    """The pod, node or client of that name (None if there is none), refused with the fix
    when its namespace was removed behind netsim's back (`ip netns del`)."""
    place = record.place(name)
    if place and place.netns and not nsmod.exists(place.netns):
        fix = (
            f"`netsim delete pod {name}`, then `netsim apply -f FILE` builds it again"
            if place.kind == "pod"
            else "`netsim down`, then `netsim apply -f FILE`"
        )
        raise NetsimError(
            f"{place.kind} {name} is Lost: its namespace {place.netns} was removed outside "
            f"netsim; {fix}"
        )
    return place


# -- verbs ------------------------------------------------------------------------------------


def cmd_cni_install(args) -> int:
    """The plugin under the name a config's "type" uses, as a fast-starting launcher."""
    from cni import plugin

    link = os.path.join(args.bin_dir, "netsim")
    if os.path.exists(link) and "netsim's CNI plugin" not in open(link, errors="replace").read():
        raise NetsimError(f"{link} exists and is not netsim's: remove it first")
    print(f"installed {plugin.install(args.bin_dir)}")
    return 0


def _objects_file(file: str) -> list | None:
    """The documents of a file that holds Kubernetes objects but no Cluster (kubectl apply
    -f of a Pod or Service into a cluster that runs); None for a topology file."""
    bodies = topology.documents(file)
    if any(isinstance(b, dict) and b.get("kind") == "Cluster" for b in bodies):
        return None
    if not bodies or any(topology.object_id(b) is None for b in bodies):
        raise TopologyError(
            file,
            "file",
            "",
            "holds no Cluster document and not only named objects",
            "apply a topology file (with its Cluster), or a file of Pods, Deployments, "
            "Services and Namespaces, each with metadata.name",
        )
    return bodies


def _without(record: Record, objects: list) -> tuple[dict, list]:
    """The cluster's overrides without these objects (by kind, namespace and name, nor their
    deletion), and the ones it held of them."""
    overrides = json.loads(json.dumps(record.overrides))
    ids = {topology.object_id(b) for b in objects}
    held = overrides.get("objects", [])
    overrides["objects"] = [o for o in held if topology.object_id(o) not in ids]
    # applied again after `delete KIND NAME`: no longer deleted
    overrides["deleted"] = [d for d in overrides.get("deleted", []) if tuple(d) not in ids]
    return overrides, [o for o in held if topology.object_id(o) in ids]


def _named(objects: list) -> str:
    return ", ".join(f"{k.lower()}/{n}" for k, _, n in map(topology.object_id, objects))


def _check_objects(record: Record, objects: list, file: str) -> None:
    """The objects alone, read as a topology file is, so that an error names their file and
    document: after them the cluster's Cluster document and the namespaces it knows."""
    import yaml

    with open(record.source) as fh:
        cluster = [b for b in yaml.safe_load_all(fh) if isinstance(b, dict)]
    context = [b for b in cluster if b.get("kind") in ("Cluster", "Namespace")]
    context += [o for o in record.overrides.get("objects", []) if o.get("kind") == "Namespace"]
    mine = {topology.object_id(b) for b in objects}
    context = [b for b in context if topology.object_id(b) not in mine]
    _, notes = topology.parse(yaml.safe_dump_all([*objects, *context]), file)
    for note in notes:
        print(f"netsim: {note}", file=sys.stderr)


def cmd_apply(args) -> int:
    objects = _objects_file(args.file)
    if objects is not None:
        _, record = pick_cluster(args.cluster)
        overrides, _ = _without(record, objects)
        overrides["objects"] += objects
        _check_objects(record, objects, args.file)
        return _reapply(record, overrides, f"{_named(objects)} applied from {args.file}")
    model, notes = topology.load(args.file)
    try:
        known = state.load(model.name)
    except NetsimError:
        known = None
    # objects applied from files of their own stay (scale and expose end with apply -f)
    kept = (
        {"objects": known.overrides["objects"]}
        if known and known.overrides.get("objects")
        else None
    )
    if kept:
        model, notes = topology.load(args.file, kept)
    for note in notes:
        print(f"netsim: {note}", file=sys.stderr)
    if model.cni_plugins and args.cni != "exec" and not (known and known.cni_exec):
        print(
            "netsim: warning: spec.cni.plugins run only when pods are wired through the "
            "node's CNI chain: apply with --cni exec (it then stays so for this cluster)",
            file=sys.stderr,
        )
    start = time.monotonic()
    changes = clustermod.apply(model, progress, cni_exec=args.cni == "exec", overrides=kept)
    print(
        f"cluster/{model.name} {changes.summary()} ({model.mode}, "
        f"{len(model.nodes)} nodes, {len(model.pods)} pods) in "
        f"{time.monotonic() - start:.2f}s"
    )
    return 0


def _reapply(record: Record, overrides: dict, what: str) -> int:
    """Apply the cluster's own file again with imperative changes on top (scale, expose)."""
    if not record.source:
        raise NetsimError(f"cluster {record.cluster} has no topology file on record")
    model, _ = topology.load(record.source, overrides)
    start = time.monotonic()
    changes = clustermod.apply(model, progress, overrides=overrides)
    print(f"{what}: cluster/{model.name} {changes.summary()} in {time.monotonic() - start:.2f}s")
    return 0


def cmd_scale(args) -> int:
    name = _one_deployment(args.target, "scale")
    if not 0 <= args.replicas <= 10000:
        raise NetsimError(f"--replicas {args.replicas} is out of range: use 0 to 10000")
    _, record = pick_cluster(args.cluster)
    imperative.find(record, "Deployment", name)  # it exists, or say so
    overrides = json.loads(json.dumps(record.overrides))
    overrides.setdefault("replicas", {})[object_key(NAMESPACE[0], name)] = args.replicas
    return _reapply(record, overrides, f"deployment/{name} scaled to {args.replicas}")


def _one_deployment(words: list[str], verb: str) -> str:
    """deployment/NAME or deployment NAME, as kubectl takes either."""
    _, name, rest = imperative.target(words, imperative.DEPLOYMENT)
    if rest:
        raise UsageError(f"{verb} takes one deployment, not also {' '.join(rest)!r}")
    return name


def cmd_expose(args) -> int:
    """A Service for a Deployment's pods, as `kubectl expose deployment` makes it."""
    name = _one_deployment(args.target, "expose")
    for flag, value in (("--port", args.port), ("--target-port", args.target_port)):
        if value is not None and not 1 <= value <= 65535:
            raise TopologyError(
                "netsim expose", flag, "", f"{value} is not a port", "use 1 to 65535"
            )
    if args.name is not None and not topology.DNS1123_LABEL.match(args.name):
        raise TopologyError(
            "netsim expose",
            "--name",
            "",
            f"{args.name!r} is not a DNS-1123 label",
            "use lowercase letters, digits and '-'",
        )
    _, record = pick_cluster(args.cluster)
    deployment = imperative.find(record, "Deployment", name)
    selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    port = {
        "port": args.port,
        "targetPort": args.target_port or args.port,
        "protocol": args.protocol,
    }
    if args.node_port:
        port["nodePort"] = args.node_port
    if object_key(NAMESPACE[0], args.name or name) in record.services:
        raise NetsimError(
            f"service/{args.name or name} already exists: give the new one another name with --name"
        )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": args.name or name, "namespace": NAMESPACE[0]}
        | (  # kubectl expose gives the Service the Deployment's labels
            {"labels": deployment["metadata"]["labels"]}
            if deployment["metadata"].get("labels")
            else {}
        ),
        "spec": {
            "type": args.type,
            "selector": selector,
            "ports": [port],
            "sessionAffinity": args.session_affinity,
        },
    }
    if args.session_affinity == "ClientIP" and args.affinity_timeout:
        service["spec"]["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": args.affinity_timeout}
        }
    overrides, _ = _without(record, [service])  # (and no longer deleted, if it was)
    overrides["services"] = [
        s
        for s in overrides.get("services", [])
        if topology.object_id(s) != topology.object_id(service)
    ] + [service]
    return _reapply(record, overrides, f"service/{service['metadata']['name']} exposed")


def cmd_delete(args) -> int:
    if args.pod:
        return _delete_pod(args)
    if not (args.file or args.name):
        raise NetsimError(
            "delete what? `netsim delete -f FILE` removes the cluster, "
            "`netsim delete pod NAME` one pod"
        )
    objects = _objects_file(args.file) if args.file else None
    if objects is not None:
        _, record = pick_cluster(args.cluster)
        overrides, held = _without(record, objects)
        if not held:
            raise NetsimError(
                f"none of the objects of {args.file} was applied from a file of its own; "
                "objects of the cluster's topology file go when it changes"
            )
        return _reapply(record, overrides, f"{_named(held)} deleted")
    if args.file:
        name = topology.load(args.file)[0].name
    else:
        name = args.name
    if state.load(name) is None and not any(
        n.startswith(state.netns_prefix(name)) for n in nsmod.names()
    ):
        print(f"cluster/{name} not found (nothing to delete)")
        return 0
    start = time.monotonic()
    removed = teardown.delete(name)
    print(
        f"cluster/{name} deleted ({len(removed)} namespaces and processes) in "
        f"{time.monotonic() - start:.2f}s"
    )
    return 0


def _delete_pod(args) -> int:
    """`kubectl delete pod`: the pod's endpoints leave every node's Services, then it goes. A
    Deployment's pod is made again at once, as its ReplicaSet would (same name, fresh
    namespace); a bare Pod stays away until the next `apply -f`."""
    words = args.pod[0].split("/", 1) + args.pod[1:] if args.pod else []
    if (
        not args.file
        and len(words) == 2
        and imperative.KINDS.get(words[0]) in imperative.SINGULARS
        and imperative.KINDS.get(words[0]) != "Pod"
    ):
        return imperative.delete_object(args, imperative.KINDS[words[0]], words[1])
    args.pod = words
    if args.file or len(args.pod) != 2 or args.pod[0] not in ("pod", "pods", "po"):
        raise UsageError(
            f"cannot delete {' '.join(args.pod)!r}: use `netsim delete KIND NAME` (pod, "
            "deployment, service, networkpolicy, globalnetworkpolicy), `netsim delete -f "
            "FILE` for what a file applied, or `netsim down CLUSTER` for a whole cluster"
        )
    _, record = pick_cluster(args.cluster)
    name = key_of(record, args.pod[1])
    if name not in record.pods:
        raise NetsimError(
            f"no pod named {name!r} in cluster {record.cluster}; `netsim get pods` shows what runs"
        )
    overrides = json.loads(json.dumps(record.overrides))
    gone = {**overrides, "deleted_pods": sorted({*overrides.get("deleted_pods", []), name})}
    owner = record.pods[name].pod.owner
    if not owner:
        return _reapply(record, gone, f"pod/{name} deleted")
    _reapply(record, gone, f"pod/{name} deleted")
    return _reapply(
        state.load(record.cluster), overrides, f"pod/{name} made again by deployment/{owner}"
    )


def _events(record, output: str | None) -> int:
    """What each node's daemons did, oldest first, as `kubectl get events` lists them."""
    from netsim import events

    found = events.read(record.cluster)
    if output == "json":
        print(json.dumps(found, indent=2))
        return 0
    now = time.time()
    rows = [[_age(now - e["time"]), e["node"], e["daemon"], e["message"]] for e in found]
    print(table(rows, ["AGE", "NODE", "DAEMON", "MESSAGE"]))
    return 0


def _age(seconds: float) -> str:
    """kubectl's age column: 45s, 3m, 2h."""
    if seconds < 120:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def cmd_get(args) -> int:
    if args.what in ("clusters", "cluster"):
        rows = []
        for name, record in _readable_clusters().items():
            if record is None:
                rows.append([name, "<unreadable>", "-", "-", f"netsim --cluster {name} gc"])
            else:
                rows.append(
                    [
                        name,
                        record.mode,
                        str(len(record.nodes)),
                        str(len(record.pods)),
                        record.source,
                    ]
                )
        print(table(rows, ["NAME", "MODE", "NODES", "PODS", "SOURCE"]))
        return 0
    _, record = pick_cluster(args.cluster)
    what = {
        "no": "nodes",
        "node": "nodes",
        "po": "pods",
        "pod": "pods",
        "svc": "services",
        "service": "services",
        "ep": "endpoints",
        "ev": "events",
        "event": "events",
        "ns": "namespaces",
        "namespace": "namespaces",
        "deploy": "deployments",
        "deployment": "deployments",
        "rs": "replicasets",
        "replicaset": "replicasets",
        "netpol": "networkpolicies",
        "networkpolicy": "networkpolicies",
        "gnp": "globalnetworkpolicies",
        "globalnetworkpolicy": "globalnetworkpolicies",
        "networkpolicy.projectcalico.org": "networkpolicies.projectcalico.org",
    }.get(args.what, args.what)
    if what == "events":
        return _events(record, args.output)
    from netsim import registry, selector

    chosen = selector.parse(args.selector or "")

    def shown(obj: dict) -> bool:
        meta = obj["metadata"]
        return (args.all_namespaces or meta.get("namespace") == args.namespace) and chosen(
            meta.get("labels") or {}
        )

    store = storemod.of(record.cluster, record.spec.datastore)  # the objects come from etcd
    if what == "nodes":
        pods_listed = registry.listed(store, registry.PODS)
        counts: dict[str, int] = {}
        for p in pods_listed:
            counts[p["spec"]["nodeName"]] = counts.get(p["spec"]["nodeName"], 0) + 1
        items = []
        for obj in registry.listed(store, registry.NODES):
            if not chosen(obj["metadata"].get("labels") or {}):
                continue
            n = obj["metadata"]["name"]
            local = record.nodes.get(n)
            items.append(
                {
                    "name": n,
                    "netns": local.netns if local else "",
                    "ip": _internal_ip(obj),
                    "podCIDR": ",".join(obj["spec"].get("podCIDRs", [])),
                    "segment": local.segment if local else "",
                    "mode": record.mode,
                    "pods": counts.get(n, 0),
                    "status": _node_status(local, obj),
                }
            )
        header = ["NAME", "STATUS", "INTERNAL-IP", "POD-CIDR", "PODS"]
        rows = [[i["name"], i["status"], i["ip"], i["podCIDR"], str(i["pods"])] for i in items]
        if args.output == "wide":
            header += ["SEGMENT", "MODE", "NETNS"]
            rows = [
                r + [i["segment"], i["mode"], i["netns"]] for r, i in zip(rows, items, strict=True)
            ]
    elif what == "pods":
        from netsim.daemons.kubelet import POD_STATUS
        from netsim.podstatus import columns

        published = {
            kv.key.rsplit("/", 1)[1]: kv.json() for kv in store.range(POD_STATUS, prefix=True)
        }
        items = []
        for obj in filter(shown, registry.listed(store, registry.PODS)):
            n, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
            key = object_key(namespace, n)
            local = record.pods.get(key)
            status = published.get(key, {})
            ready, state, restarts = (
                columns(status) if "phase" in status else ("0/1", "ContainerCreating", 0)
            )
            if local and not nsmod.exists(local.netns):  # removed behind netsim's back
                state = "Lost"
            items.append(
                {
                    "name": n,
                    "namespace": namespace,
                    "node": obj["spec"]["nodeName"],
                    "ip": obj["status"]["podIP"],
                    "netns": local.netns if local else "",
                    "veth": local.veth if local else "",
                    "labels": obj["metadata"].get("labels", {}),
                    "ready": ready,
                    "status": state,
                    "restarts": restarts,
                    "phase": status.get("phase", "Pending"),
                    "containerStatuses": status.get("containerStatuses", []),
                    "initContainerStatuses": status.get("initContainerStatuses", []),
                }
            )
        header = ["NAME", "READY", "STATUS", "RESTARTS", "IP", "NODE"]
        rows = [
            [i["name"], i["ready"], i["status"], str(i["restarts"]), i["ip"], i["node"]]
            for i in items
        ]
        if args.output == "wide":
            header += ["VETH", "NETNS"]
            rows = [r + [i["veth"], i["netns"]] for r, i in zip(rows, items, strict=True)]
    elif what == "deployments":
        items = imperative.deployment_items(store, record, shown)
        header = ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
        rows = [
            [
                i["name"],
                f"{i['ready']}/{i['replicas']}",
                str(i["updated"]),
                str(i["available"]),
                _age(i["age"]),
            ]
            for i in items
        ]
    elif what == "replicasets":
        items = imperative.replicaset_items(store, record, shown)
        header = ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]
        rows = [
            [i["name"], str(i["desired"]), str(i["current"]), str(i["ready"]), _age(i["age"])]
            for i in items
        ]
    elif what == "namespaces":
        items = [
            {"name": o["metadata"]["name"], "labels": o["metadata"].get("labels", {})}
            for o in registry.listed(store, registry.NAMESPACES)
        ]
        header = ["NAME", "STATUS", "LABELS"]
        rows = [
            [i["name"], "Active", ",".join(f"{k}={v}" for k, v in sorted(i["labels"].items()))]
            for i in items
        ]
    elif what in ("services", "endpoints"):
        held = {
            (o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in registry.listed(store, registry.ENDPOINTS)
        }
        items = [
            _service_item(obj, held.get((obj["metadata"]["namespace"], obj["metadata"]["name"])))
            for obj in filter(shown, registry.listed(store, registry.SERVICES))
        ]
        if what == "services":
            header = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
            rows = [
                [i["name"], i["type"], i["clusterIP"], i["externalIP"], _ports(i["ports"])]
                for i in items
            ]
            if args.output == "wide":
                header.append("SELECTOR")
                rows = [
                    r + [",".join(f"{k}={v}" for k, v in i["selector"].items())]
                    for r, i in zip(rows, items, strict=True)
                ]
        else:
            header = ["NAME", "ENDPOINTS"]
            rows = [
                [
                    i["name"],
                    ",".join(
                        f"{e['ip']}:{port}" for e in i["endpoints"] for port in e["ports"] if port
                    )
                    or "<none>",
                ]
                for i in items
            ]
    elif what == "networkpolicies":
        items = [
            {
                "name": o["metadata"]["name"],
                "namespace": o["metadata"]["namespace"],
                "podSelector": _selector_text(o.get("spec", {}).get("podSelector") or {}),
                "policyTypes": record.policies[
                    f"NetworkPolicy/{o['metadata']['namespace']}/{o['metadata']['name']}"
                ].types,
            }
            for o in filter(shown, registry.listed(store, registry.NETWORK_POLICIES))
        ]
        header = ["NAME", "POD-SELECTOR", "POLICY-TYPES"]
        rows = [[i["name"], i["podSelector"], ",".join(i["policyTypes"])] for i in items]
    elif what in ("globalnetworkpolicies", "networkpolicies.projectcalico.org"):
        prefix = registry.GLOBAL_POLICIES if what[0] == "g" else registry.CALICO_POLICIES
        items = [
            {
                "name": o["metadata"]["name"],
                "namespace": o["metadata"].get("namespace", ""),
                "order": o.get("spec", {}).get("order", ""),
                "selector": o.get("spec", {}).get("selector", "all()"),
            }
            for o in registry.listed(store, prefix)
            if what[0] == "g" or shown(o)
        ]
        header = ["NAME", "ORDER", "SELECTOR"]
        rows = [[i["name"], str(i["order"]), i["selector"]] for i in items]
    else:
        raise UsageError(
            f"cannot get {args.what!r}: use nodes, pods, services, endpoints, deployments, "
            "replicasets, namespaces, networkpolicies (globalnetworkpolicies, "
            "networkpolicies.projectcalico.org: Calico's), events or clusters"
        )
    if args.show_labels and "LABELS" not in header:
        header.append("LABELS")
        rows = [
            r + [",".join(f"{k}={v}" for k, v in i.get("labels", {}).items()) or "<none>"]
            for r, i in zip(rows, items, strict=True)
        ]
    if args.all_namespaces and what in (
        "pods",
        "services",
        "endpoints",
        "deployments",
        "replicasets",
        "networkpolicies",
        "networkpolicies.projectcalico.org",
    ):
        header = ["NAMESPACE", *header]
        rows = [[i["namespace"], *r] for r, i in zip(rows, items, strict=True)]
    if args.output == "json":
        print(json.dumps({"cluster": record.cluster, "items": items}, indent=2))
    else:
        print(table(rows, header))
    return 0


def _selector_text(selector: dict) -> str:
    """A LabelSelector as kubectl prints it: k=v,k in (a,b); <none> when it selects all."""
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for e in selector.get("matchExpressions") or []:
        op, values = e["operator"], ",".join(e.get("values") or [])
        parts.append(
            {"In": f"{e['key']} in ({values})", "NotIn": f"{e['key']} notin ({values})"}.get(
                op, e["key"] if op == "Exists" else f"!{e['key']}"
            )
        )
    return ",".join(parts) or "<none>"


def _node_status(local, obj: dict) -> str:
    """kubectl's STATUS: Ready, or NotReady once the node controller judged it; Lost when
    its namespace is gone."""
    from netsim.controller import is_ready

    if local is None or not nsmod.exists(local.netns):
        return "Lost"
    return "Ready" if is_ready(obj) else "NotReady"


def _internal_ip(node: dict) -> str:
    addresses = node.get("status", {}).get("addresses", [])
    return next((a["address"] for a in addresses if a.get("type") == "InternalIP"), "")


def _service_item(obj: dict, endpoints: dict | None) -> dict:
    """A Service and its Endpoints as stored, in the shape `get services -o json` prints."""
    spec = obj["spec"]
    ports = [
        {
            "port": p["port"],
            "target_port": p.get("targetPort", p["port"]),
            "protocol": p.get("protocol", "TCP"),
            "name": p.get("name", ""),
            "node_port": p.get("nodePort"),
        }
        for p in spec.get("ports", [])
    ]
    by_pod: dict[str, dict] = {}
    for subset in (endpoints or {}).get("subsets", []):
        port = subset["ports"][0]
        index = next((i for i, p in enumerate(ports) if p["name"] == port.get("name", "")), None)
        for address in subset.get("addresses", []):
            pod = address.get("targetRef", {}).get("name", address["ip"])
            entry = by_pod.setdefault(
                pod, {"pod": pod, "ip": address["ip"], "ports": [None] * len(ports)}
            )
            if index is not None:
                entry["ports"][index] = port["port"]
    return {
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace", "default"),
        "labels": obj["metadata"].get("labels", {}),
        "type": spec.get("type", "ClusterIP"),
        "externalIP": ",".join(
            i["ip"] for i in obj.get("status", {}).get("loadBalancer", {}).get("ingress", [])
        )
        or ("<pending>" if spec.get("type") == "LoadBalancer" else "<none>"),
        "externalTrafficPolicy": spec.get("externalTrafficPolicy", ""),
        "internalTrafficPolicy": spec.get("internalTrafficPolicy", "Cluster"),
        "healthCheckNodePort": spec.get("healthCheckNodePort"),
        "clusterIP": spec.get("clusterIP", ""),
        "ports": ports,
        "selector": spec.get("selector", {}),
        "endpoints": sorted(by_pod.values(), key=lambda e: services.ip_key(e["ip"])),
    }


def _ports(ports: list[dict]) -> str:
    return ",".join(
        f"{p['port']}" + (f":{p['node_port']}" if p.get("node_port") else "") + f"/{p['protocol']}"
        for p in ports
    )


def cmd_describe(args) -> int:
    name, record = pick_cluster(args.cluster)
    from netsim import describe

    if args.what == "cluster":
        print(describe.cluster(record))
        return 0
    if not args.name:
        raise UsageError(f"describe {args.what} needs a name")
    if args.what in ("deployment", "deployments", "deploy"):
        print(imperative.describe_deployment(record, args.name))
        return 0
    if args.what in ("service", "services", "svc"):
        print(imperative.describe_service(record, args.name))
        return 0
    args.name = key_of(record, args.name)
    _present(record, args.name)
    if args.what in ("node", "no", "nodes"):
        print(describe.node(record, args.name))
    elif args.what in ("pod", "po", "pods"):
        print(describe.pod(record, args.name))
    else:
        raise UsageError(
            f"cannot describe {args.what!r}: use cluster, node, pod, service or deployment"
        )
    return 0


def cmd_logs(args) -> int:
    from netsim import logs

    _, record = pick_cluster(args.cluster)
    return logs.show(record, key_of(record, args.pod), args.container, args.previous, args.follow)


def cmd_exec(args) -> int:
    command = list(args.command)
    while command[:1] in (["-n"], ["--namespace"]) and len(command) > 1:  # after the pod
        NAMESPACE[0], command = command[1], command[2:]
    command = command[1:] if command[:1] == ["--"] else command
    _, record = pick_cluster(args.cluster)
    kind, netns, _ = resolve(record, args.target)
    if not netns:
        raise NetsimError(f"{args.target} is not a pod, node or client")
    if not command:
        raise NetsimError("give a command after --, e.g. netsim exec web-0 -- ip route")
    env = dict(os.environ)
    # as in the pod's containers: its resolv.conf and hosts, its name as the hostname, and
    # the environment a container starts with (not the caller's)
    if kind == "pod":
        nsmod.enter_as_container(netns, args.target, NAMESPACE[0])
        env = {"PATH": PATH, "HOME": "/root", "HOSTNAME": args.target}
        env |= {k: os.environ[k] for k in ("TERM", "LANG") if k in os.environ}
    else:
        nsmod.enter_as_container(netns)
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        raise NetsimError(f"command not found: {command[0]}") from None


def cmd_ping(args) -> int:
    _, record = pick_cluster(args.cluster)
    src_kind, netns, src_ip = resolve(record, args.src)
    if not netns:
        raise NetsimError(f"{args.src} is not a pod, node or client to ping from")
    _, _, dst_ip = resolve(record, args.dst)
    result = probe.ping(netns, dst_ip, count=args.count)
    rtt = (
        "rtt min/avg/max {:.3f}/{:.3f}/{:.3f} ms".format(*result.rtt)
        if result.rtt
        else "no replies"
    )
    print(
        f"{args.src} ({src_ip}) -> {args.dst} ({dst_ip}): {result.received}/{result.sent} "
        f"replies, {result.loss:.0f}% loss, {rtt}"
    )
    return 0 if result.received else 1


def cmd_curl(args) -> int:
    _, record = pick_cluster(args.cluster)
    _, netns, _ = resolve(record, args.src)
    if not netns:
        raise NetsimError(f"{args.src} is not a pod, node or client to connect from")
    host, port, path = probe.parse_url(args.url)
    _, _, ip = resolve(record, host)
    failures = 0
    for i in range(args.count):
        reply = probe.http_get(netns, ip, port, path)
        if reply.error:
            failures += 1
            print(f"{i + 1}: error: {reply.error} ({ip}:{port})")
        else:
            print(f"{i + 1}: {reply.body.strip()}" if args.count > 1 else reply.body.strip())
    return 1 if failures else 0


def cmd_gc(args) -> int:
    report = teardown.gc(args.cluster)
    if not any(report.values()):
        print("nothing to collect")
    for name, items in report.items():
        for item in items:
            print(f"cluster/{name}: {item}")
    return 0


def cmd_doctor(args) -> int:
    from netsim.kernel import features

    kinds = features.link_kinds()
    print("kernel link kinds:")
    print(table([[k, "yes" if v else "MISSING"] for k, v in kinds.items()], ["KIND", "PRESENT"]))
    print("\ntools:")
    print(
        table(
            [
                [t, p or f"MISSING (apt-get install {features.TOOLS[t]})"]
                for t, p in features.tools().items()
            ],
            ["TOOL", "PATH"],
        )
    )
    print("\nmodes:")
    from netsim import modes

    print(table([[m.name, m.data_path()] for m in modes.every()], ["MODE", "DATA PATH"]))
    return 0 if kinds["veth"] and kinds["bridge"] else 1


def cmd_bench_scale(args) -> int:
    """How the build grows with the pods: sizes x modes; progress on stderr, a table out."""
    from netsim import scale

    modes = [m.strip() for m in (args.modes or "").split(",") if m.strip()] or scale.default_modes()
    try:
        sizes = [int(n) for n in (args.sizes or "").split(",") if n.strip()] or scale.SIZES
    except ValueError:
        raise NetsimError(f"--sizes {args.sizes!r}: give pod counts, e.g. 500,1000") from None
    from netsim.modes import MODES

    for mode in modes:
        if mode not in MODES:
            raise NetsimError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    if any(not 1 <= n <= 25000 for n in sizes):
        raise NetsimError("--sizes: each size must be 1 to 25000 pods (254 nodes of 100)")
    points = scale.run(
        modes, sizes, lambda line: print(f"bench: {line}", file=sys.stderr, flush=True)
    )
    print(scale.table(points))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(scale.as_json(points), fh, indent=2)
        print(f"wrote {args.json}")
    if args.png:
        os.makedirs(args.png, exist_ok=True)
        print(f"wrote {scale.chart(points, os.path.join(args.png, 'scale.png'))}")
    return 0 if all(p.reached and not p.errors for p in points) else 1


def cmd_bench(args) -> int:
    """The encapsulation-overhead matrix; progress on stderr, the table on stdout."""
    from netsim import bench

    if args.scale:
        return cmd_bench_scale(args)

    options = bench.Options(
        repetitions=args.repetitions, seconds=args.seconds, streams=args.streams, sweep=args.sweep
    )
    if args.modes:
        options.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.paths:
        options.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    result = bench.run(options, lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    print(bench.table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    if args.csv:
        bench.write_csv(result, args.csv)
        print(f"wrote {args.csv}")
    if args.png:
        for path in bench.write_charts(result, args.png):
            print(f"wrote {path}")
    return 0


def cmd_trace(args) -> int:
    """One probe from SRC to DST, seen at every interface on its way."""
    from netsim import trace

    _, record = pick_cluster(args.cluster)
    proto = "tcp" if args.tcp else "udp" if args.udp else args.proto
    result = trace.trace(
        record,
        _qualified(record, args.src),
        _qualified(record, args.dst),
        proto=proto,
        port=args.tcp or args.udp,
        pcap=args.pcap,
        timeout=args.timeout,
    )
    print(trace.format_trace(result))
    return 0 if result.delivered else 1


def cmd_policy_check(args) -> int:
    """One connection from SRC to DST, traced: allowed or denied, and which policy said so."""
    from netsim import policy_check

    _, record = pick_cluster(args.cluster)
    if not 0 < args.timeout <= 30:
        raise UsageError(f"--timeout {args.timeout:g}: give 0 < timeout <= 30 seconds")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: give a port from 1 to 65535")
    result = policy_check.check(
        record,
        _qualified(record, args.src),
        _qualified(record, args.dst),
        args.port,
        "UDP" if args.udp else "TCP",
        args.timeout,
    )
    print(policy_check.describe(result))
    return 0 if result.allowed else 1


def _qualified(record: Record, word: str) -> str:
    """NAMESPACE/NAME, or NAME in the namespace of -n, as the record's key."""
    if "/" in word:
        namespace, _, name = word.partition("/")
        return object_key(namespace, name)
    return key_of(record, word)


def cmd_capture(args) -> int:
    """tcpdump on one interface of a node, pod or client, into a pcap Wireshark opens."""
    from netsim import trace

    _, record = pick_cluster(args.cluster)
    print(
        f"capturing on {args.target} {args.iface or 'eth0'} for up to {args.duration:g} s or "
        f"{args.count} packets ...",
        file=sys.stderr,
        flush=True,
    )
    packets = trace.capture(record, args.target, args.iface, args.write, args.count, args.duration)
    print(f"wrote {packets} packets to {args.write}")
    return 0


def cmd_graph(args) -> int:
    from netsim import graph

    _, record = pick_cluster(args.cluster)
    print(f"wrote {graph.render(record, args.output)}")
    return 0


def cmd_node(args) -> int:
    """`node stop NAME` (a power cut) and `node start NAME` (power back, daemons resync)."""
    from netsim import membership

    name, _ = pick_cluster(args.cluster)
    if args.node_command == "stop":
        membership.stop(name, args.name)
        print(f"node/{args.name} stopped (its processes killed, its underlay port down)")
    else:
        took = membership.start(name, args.name)
        print(f"node/{args.name} started; its daemons applied the store in {took:.2f}s")
    return 0


def cmd_bgp_status(args) -> int:
    """Each BIRD's BGP sessions, as `birdc show protocols` reports them, peers named."""
    from netsim.bgp import bird

    _, record = pick_cluster(args.cluster)
    hosts = {h.name: h for h in record.hosts()}
    by_ip = {h.ip.replace(".", "_"): n for n, h in hosts.items()}
    rows, down = [], 0
    for name, host in hosts.items():
        if host.bird is None:
            continue
        for p in bird.protocols(host.bird.dir):
            if p["proto"] != "BGP":
                continue
            peer = next((n for ip, n in by_ip.items() if p["name"].endswith(ip)), p["name"])
            rows.append([name, peer, p["name"], p["state"], p["info"], p["since"]])
            down += not p["info"].startswith("Established")
    if not rows:
        raise NetsimError(f"cluster {record.cluster} runs no BGP (mode {record.mode})")
    print(table(rows, ["NODE", "PEER", "PROTOCOL", "STATE", "INFO", "SINCE"]))
    return 1 if down else 0


def cmd_demo(args) -> int:
    """The README's first command: apply, look (at the nodes, the pods, the cluster's etcd),
    ping across nodes, curl a pod, look a Service up in the cluster DNS, delete."""
    file = args.file or str(DEFAULT_TOPOLOGY)
    model, _ = topology.load(file)
    steps = [
        ["apply", "-f", file],
        ["--cluster", model.name, "get", "nodes", "-o", "wide"],
        ["--cluster", model.name, "get", "pods", "-o", "wide"],
        ["--cluster", model.name, "describe", "cluster"],  # the etcd the cluster keeps its state in
    ]
    status = 0
    try:
        for step in steps:
            status |= _run_step(step)
        _, record = pick_cluster(model.name)
        pods = [p for p in record.pods.values() if p.pod.namespace == "default"]
        a = pods[0]
        b = next((p for p in pods if p.node != a.node), pods[-1])
        status |= _run_step(["--cluster", model.name, "ping", a.name, b.name])
        status |= _run_step(
            [
                "--cluster",
                model.name,
                "curl",
                a.name,
                f"http://{b.name}:{HOSTNAME_PORT}/",
                "--count",
                "2",
            ]
        )
        status |= _run_step(
            ["--cluster", model.name, "exec", "--fork", a.name, "--", "ip", "route"]
        )
        service = next((s.name for s in record.services.values() if s.namespace == "default"), "")
        if service:  # the coredns pod's server starts with the cluster: give it a moment
            lookup = ["getent", "hosts", service]
            deadline = time.monotonic() + 15
            while (
                time.monotonic() < deadline
                and subprocess.run(
                    ["ip", "netns", "exec", a.netns, *lookup], capture_output=True
                ).returncode
            ):
                time.sleep(0.3)
            status |= _run_step(["--cluster", model.name, "exec", "--fork", a.name, "--", *lookup])
    finally:
        status |= _run_step(["delete", "-f", file])
    print("\ndemo " + ("passed" if status == 0 else "FAILED"))
    return status


def _run_step(argv: list[str]) -> int:
    print(f"\n$ netsim {' '.join(argv)}", flush=True)
    return main(argv, exit=False)


# -- entry ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netsim",
        description="A Kubernetes data plane (flannel, "
        "Calico, kube-proxy) built from Linux kernel objects.",
    )
    p.add_argument("--cluster", help="the cluster to act on (default: the only one)")
    _namespace_flags(p, "default", False)
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    a = sub.add_parser("apply", help="create or converge a cluster from a topology file")
    a.add_argument("-f", "--file", required=True)
    a.add_argument(
        "--cni",
        choices=("in-process", "exec"),
        default="in-process",
        help="wire new pods in-process (fast), or by executing each node's CNI "
        "config list as a container runtime does (runs chained plugins)",
    )
    a.set_defaults(func=cmd_apply)
    sc = sub.add_parser("scale", help="set a Deployment's replicas (until the next apply -f)")
    sc.add_argument("target", nargs="+", help="deployment/NAME (or: deployment NAME)")
    sc.add_argument("--replicas", type=int, required=True)
    sc.set_defaults(func=cmd_scale)
    ex = sub.add_parser("expose", help="a Service for a Deployment (until the next apply -f)")
    ex.add_argument("target", nargs="+", help="deployment/NAME (or: deployment NAME)")
    ex.add_argument("--port", type=int, required=True)
    ex.add_argument("--target-port", type=int)
    ex.add_argument("--name")
    ex.add_argument(
        "--type", choices=("ClusterIP", "NodePort", "LoadBalancer"), default="ClusterIP"
    )
    ex.add_argument("--protocol", choices=("TCP", "UDP"), default="TCP")
    ex.add_argument("--node-port", type=int)
    ex.add_argument("--session-affinity", choices=("None", "ClientIP"), default="None")
    ex.add_argument("--affinity-timeout", type=int)
    ex.set_defaults(func=cmd_expose)
    cni = sub.add_parser("cni", help="the CNI plugin executable")
    cni_sub = cni.add_subparsers(dest="cni_command", required=True)
    inst = cni_sub.add_parser(
        "install",
        help="install netsim's plugin into a CNI bin directory under its type name, netsim",
    )
    inst.add_argument("--bin-dir", default="/opt/cni/bin")
    inst.set_defaults(func=cmd_cni_install)
    d = sub.add_parser(
        "delete", help="remove the cluster a topology file names (-f), or one pod (delete pod NAME)"
    )
    d.add_argument("-f", "--file")
    d.add_argument("pod", nargs="*", metavar="pod|service|deployment NAME")
    d.set_defaults(func=cmd_delete, name=None)
    d = sub.add_parser("down", help="remove a cluster by name")
    d.add_argument("name")
    d.set_defaults(func=cmd_delete, file=None, pod=None)
    g = sub.add_parser("get", help="list nodes, pods, services, endpoints, events or clusters")
    g.add_argument("what")
    g.add_argument("-o", "--output", choices=["wide", "json"])
    g.add_argument("-l", "--selector", help="a label selector: k=v, k!=v, 'k in (a,b)', k, !k")
    g.add_argument("--show-labels", action="store_true", help="a LABELS column")
    g.set_defaults(func=cmd_get)
    ds = sub.add_parser("describe", help="show the cluster (its etcd), a node or a pod in detail")
    ds.add_argument("what")
    ds.add_argument("name", nargs="?")
    ds.set_defaults(func=cmd_describe)
    lo = sub.add_parser("logs", help="what a pod's container printed")
    lo.add_argument("pod")
    lo.add_argument("-c", "--container", help="the container (default: the pod's first)")
    lo.add_argument("-f", "--follow", action="store_true", help="keep printing what comes")
    lo.add_argument("-p", "--previous", action="store_true", help="the run before the last")
    lo.set_defaults(func=cmd_logs)
    e = sub.add_parser("exec", help="run a command in a pod's (or node's) namespace")
    e.add_argument("--fork", action="store_true", help=argparse.SUPPRESS)
    e.add_argument("target")
    e.add_argument("command", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_exec)
    pi = sub.add_parser("ping", help="ping from a pod/node/client to a pod/node/client or IP")
    pi.add_argument("src")
    pi.add_argument("dst")
    pi.add_argument("-c", "--count", type=int, default=3)
    pi.set_defaults(func=cmd_ping)
    c = sub.add_parser("curl", help="HTTP GET from a pod over fresh connections")
    c.add_argument("src")
    c.add_argument("url")
    c.add_argument("--count", type=int, default=1)
    c.set_defaults(func=cmd_curl)
    gc = sub.add_parser("gc", help="remove what crashed or killed runs left behind")
    gc.set_defaults(func=cmd_gc)
    doc = sub.add_parser("doctor", help="kernel features, tools, and which data paths apply")
    doc.set_defaults(func=cmd_doctor)
    b = sub.add_parser(
        "bench",
        help="what each data plane costs: throughput, latency, MTU, "
        "CPU per GB, against the plain-routing floor",
    )
    b.add_argument("--modes", help="comma-separated (default: all)")
    b.add_argument(
        "--paths",
        help="comma-separated: pod-same-node, pod-cross-node, "
        "pod-clusterip, client-nodeport (default: all)",
    )
    b.add_argument("--repetitions", type=int, default=3)
    b.add_argument("--seconds", type=int, default=2, help="per iperf3 run")
    b.add_argument("--streams", type=int, default=4, help="parallel TCP streams")
    b.add_argument("--sweep", action="store_true", help="TCP throughput by MSS, 96 to 1460")
    b.add_argument(
        "--scale",
        action="store_true",
        help="instead: build time, rate and memory "
        "by cluster size (flannel-vxlan and calico-vxlan, 100 pods per node)",
    )
    b.add_argument("--sizes", help="with --scale: pod counts (default 500,1000,2000,5000,10000)")
    b.add_argument(
        "--json", help="write every sample, the machine and the carriers (--scale: every point)"
    )
    b.add_argument("--csv", help="write every sample")
    b.add_argument(
        "--png", metavar="DIR", help="write throughput.png and latency.png (--scale: scale.png)"
    )
    b.set_defaults(func=cmd_bench)
    tr = sub.add_parser("trace", help="one probe from SRC to DST, shown at every interface")
    tr.add_argument("src", help="pod (or node, client)")
    tr.add_argument("dst", help="pod, node, client (name or IP), or Service (name or ClusterIP)")
    tr.add_argument("--proto", choices=("icmp", "tcp", "udp"))
    tr.add_argument("--tcp", type=int, metavar="PORT", help="a TCP SYN to this port")
    tr.add_argument("--udp", type=int, metavar="PORT", help="a UDP datagram to this port")
    tr.add_argument("--pcap", help="write every captured copy (pcapng, one interface per hop)")
    tr.add_argument("--timeout", type=float, default=3.0)
    tr.set_defaults(func=cmd_trace)
    cap = sub.add_parser("capture", help="tcpdump on a node, pod or client interface")
    cap.add_argument("target", help="node, pod, client, underlay or router")
    cap.add_argument("iface", nargs="?", help="default eth0")
    cap.add_argument("-w", "--write", required=True, help="the pcap file")
    cap.add_argument("-c", "--count", type=int, default=100)
    cap.add_argument("--duration", type=float, default=10.0)
    cap.set_defaults(func=cmd_capture)
    gr = sub.add_parser("graph", help="a picture of the cluster: .png, .svg or .dot")
    gr.add_argument("-o", "--output", default="cluster.png")
    gr.set_defaults(func=cmd_graph)
    node = sub.add_parser("node", help="stop a node as a power cut does, or start it again")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    for verb, text in (
        ("stop", "kill the node's processes and take its underlay port down"),
        ("start", "bring the node back: port up, agent, daemons resync from etcd"),
    ):
        v = node_sub.add_parser(verb, help=text)
        v.add_argument("name")
        v.set_defaults(func=cmd_node)
    bgp = sub.add_parser("bgp", help="Calico's BGP sessions")
    bgp_sub = bgp.add_subparsers(dest="bgp_command", required=True)
    bgp_sub.add_parser("status", help="every BIRD's sessions (birdc show protocols)").set_defaults(
        func=cmd_bgp_status
    )
    _imperative_parsers(sub)
    demo = sub.add_parser("demo", help="apply the default topology, ping, curl, delete")
    demo.add_argument("-f", "--file")
    demo.set_defaults(func=cmd_demo)
    return p


def _imperative_parsers(sub) -> None:
    st = sub.add_parser("set", help="set image deployment/NAME CONTAINER=IMAGE: a rolling update")
    st.add_argument("what", metavar="image")
    st.add_argument("words", nargs="+", metavar="deployment/NAME CONTAINER=IMAGE")
    st.set_defaults(func=imperative.cmd_set)
    po = sub.add_parser("policy", help="network policies: check what they let through")
    po_sub = po.add_subparsers(dest="policy_verb", required=True)
    pc = po_sub.add_parser(
        "check", help="is a connection from SRC to DST allowed, and by which policy (traced)"
    )
    pc.add_argument("src", help="a pod: NAME (in -n) or NAMESPACE/NAME")
    pc.add_argument("dst", help="a pod or Service: NAME (in -n) or NAMESPACE/NAME")
    pc.add_argument("--port", type=int, required=True)
    pc.add_argument("--udp", action="store_true", help="UDP rather than TCP")
    pc.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for an answer")
    pc.set_defaults(func=cmd_policy_check)
    ro = sub.add_parser("rollout", help="a Deployment's rollout: status, history, undo, ...")
    ro_sub = ro.add_subparsers(dest="rollout_verb", required=True)
    for verb, text in (
        ("status", "wait until the rollout is done, printing its progress"),
        ("history", "the revisions (--revision N: one's pod template)"),
        ("undo", "roll back to the previous revision (or --to-revision N)"),
        ("pause", "stop the rollout where it is"),
        ("resume", "go on with a paused rollout"),
        ("restart", "replace every pod, rolling"),
    ):
        v = ro_sub.add_parser(verb, help=text)
        v.add_argument("words", nargs="+", metavar="deployment/NAME")
        v.set_defaults(func=imperative.cmd_rollout, timeout=0.0, watch=True, revision=0)
        v.set_defaults(to_revision=0)
        if verb == "status":
            v.add_argument(
                "--timeout",
                type=imperative.duration,
                default=0.0,
                help="how long to wait: 90s, 2m, ... (0: no limit)",
            )
            v.add_argument("-w", "--watch", type=lambda t: t.lower() != "false", default=True)
        elif verb == "history":
            v.add_argument("--revision", type=int, default=0)
        elif verb == "undo":
            v.add_argument("--to-revision", type=int, default=0)
    cr = sub.add_parser(
        "create",
        help="create deployment NAME --image=IMAGE [-- COMMAND ...]",
        usage="netsim create deployment NAME --image=IMAGE [--replicas N] [--port P] "
        "[-- COMMAND ...]",
    )
    cr.add_argument("what", metavar="deployment")
    cr.add_argument("name")
    cr.add_argument("--image", required=True)
    cr.add_argument("--replicas", type=int, default=1)
    cr.add_argument("--port", type=int)
    cr.set_defaults(func=imperative.cmd_create, command=[])
    ru = sub.add_parser(
        "run",
        help="run NAME --image=IMAGE [--port P] [-- ARGS ...]: a pod",
        usage="netsim run NAME --image=IMAGE [--port P] [--labels k=v,...] [--restart R] "
        "[--command] [-- ARGS ...]",
    )
    ru.add_argument("name")
    ru.add_argument("--image", required=True)
    ru.add_argument("--port", type=int)
    ru.add_argument("--labels", "-l", help="k=v,k2=v2 (default run=NAME)")
    ru.add_argument("--restart", choices=("Always", "OnFailure", "Never"), default="Always")
    ru.add_argument(
        "--command",
        dest="as_command",
        action="store_true",
        help="the words after -- are the command",
    )
    ru.set_defaults(func=imperative.cmd_run, command=[])
    la = sub.add_parser("label", help="label pod|deployment|service NAME k=v ... (k- removes)")
    la.add_argument("words", nargs="+", metavar="KIND NAME k=v")
    la.add_argument("--overwrite", action="store_true")
    la.set_defaults(func=imperative.cmd_label)


def _namespace_flags(p: argparse.ArgumentParser, namespace, all_namespaces) -> None:
    p.add_argument(
        "-n", "--namespace", default=namespace, help="the namespace of pods and Services named"
    )
    p.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=all_namespaces,
        help="list the objects of every namespace",
    )


def _container_words(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`create deployment NAME ... -- COMMAND` and `run NAME ... -- ARGS`: the words after
    `--` are the container's, whatever they look like (argparse would read their flags)."""
    if "--" not in argv:
        return argv, None
    words = iter(argv[: argv.index("--")])
    for word in words:
        if word in ("--cluster", "-n", "--namespace"):
            next(words, None)
        elif not word.startswith("-"):
            if word in ("create", "run"):
                return argv[: argv.index("--")], argv[argv.index("--") + 1 :]
            break
    return argv, None


GLOBAL_FLAGS = {"--cluster": 1, "-n": 1, "--namespace": 1, "-A": 0, "--all-namespaces": 0}


def hoisted(argv: list[str], error=None) -> list[str]:
    """kubectl takes --cluster (its --context), -n and -A anywhere before `--` (or the command
    after `exec POD`), between a kind and a name too (`describe pod -n y c`): they are moved
    before the command, where the parser reads them."""
    front, rest, words = [], [], iter(argv)
    for word in words:
        positional = [w for w in rest if not w.startswith("-")]
        if word == "--" or positional[:1] == ["exec"] and len(positional) == 2:
            rest += [word, *words]  # the command's words (exec's may follow its target)
            break
        flag = word.split("=", 1)[0] if word.startswith("--") else word
        if flag in GLOBAL_FLAGS:
            front.append(word)
            if GLOBAL_FLAGS[flag] and "=" not in word:
                value = next(words, None)
                if value is None and error is not None:
                    error(f"argument {flag}: expected one argument")
                front.append(value or "")
        else:
            rest.append(word)
    return front + rest


def main(argv: list[str] | None = None, exit: bool = True) -> int:
    argv, container = _container_words(sys.argv[1:] if argv is None else list(argv))
    reader = parser()
    args = reader.parse_args(hoisted(argv, reader.error))
    if container is not None:
        args.command = container
    NAMESPACE[0] = args.namespace
    if os.geteuid() != 0:
        print(
            "netsim: must run as root (it creates network namespaces): sudo netsim ...",
            file=sys.stderr,
        )
        code = 1
    else:
        try:
            if args.verb == "exec" and args.fork:
                code = _exec_forked(args)
            else:
                code = args.func(args)
        except TopologyError as exc:
            print(f"netsim: error: {exc}", file=sys.stderr)
            code = exc.exit_code
        except NetsimError as exc:
            print(f"netsim: error: {exc}", file=sys.stderr)
            code = exc.exit_code
        except KeyboardInterrupt:
            code = 130
        except BrokenPipeError:  # `netsim get pods | head`: the reader has gone, as for ls
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 141
    if exit:
        sys.exit(code)
    return code


def _exec_forked(args) -> int:
    """exec, but in a child, so the demo can go on afterwards."""
    pid = os.fork()
    if pid == 0:
        try:
            cmd_exec(args)
        except NetsimError as exc:
            print(f"netsim: error: {exc}", file=sys.stderr)
        os._exit(127)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    main()
