"""The imperative verbs of the Kubernetes guides, as kubectl prints them: `set image`,
`rollout status|history|undo|pause|resume|restart`, `create deployment`, `run`, `label`,
`delete service|deployment`, and the Deployment and ReplicaSet listings.

Each change is an imperative override on top of the cluster's file (netsim.topology's
`with_overrides`), applied at once; a rollout then goes on in the node controller process
(netsim/deployments.py). `apply -f` of the cluster's file makes the file the truth again,
as `kubectl apply` would, rolling back to its template.
"""

from __future__ import annotations

import json
import sys
import time

from netsim import rollout, state, topology
from netsim import store as storemod
from netsim.errors import NetsimError, UsageError
from netsim.model import object_key
from netsim.record import Record


def _cli():
    from netsim import cli

    return cli


def _namespace() -> str:
    return _cli().NAMESPACE[0]


def current_bodies(record: Record) -> list:
    """The cluster's documents as they stand: its file with every override on top."""
    import yaml

    if not record.source:
        raise NetsimError(f"cluster {record.cluster} has no topology file on record")
    with open(record.source) as fh:
        bodies = [b for b in yaml.safe_load_all(fh) if b is not None]
    return topology.with_overrides(bodies, json.loads(json.dumps(record.overrides)))


def find(record: Record, kind: str, name: str) -> dict:
    """The object of that kind and name in the namespace (-n), as the cluster holds it now."""
    for body in current_bodies(record):
        if topology.object_id(body) == (kind, _namespace(), name):
            return body
    where = "" if kind == "GlobalNetworkPolicy" else f" in namespace {_namespace()}"
    raise NetsimError(f'{PLURALS[kind]} "{name}" not found{where}')


def _overrides(record: Record) -> dict:
    return json.loads(json.dumps(record.overrides))


def target(words: list[str], kinds: dict[str, str]) -> tuple[str, str, list[str]]:
    """`KIND/NAME rest...` or `KIND NAME rest...` -> (Kind, name, rest)."""
    if not words:
        raise UsageError(f"name a {' or '.join(sorted(set(kinds.values())))}: KIND/NAME")
    first, rest = words[0], words[1:]
    if "/" in first:
        kind, _, name = first.partition("/")
    elif rest:
        kind, name, rest = first, rest[0], rest[1:]
    else:
        kind, name = first, ""
    if kind not in kinds or not name:
        raise UsageError(
            f"cannot use {' '.join(words[:2])!r}: write "
            f"{'|'.join(sorted(set(v.lower() for v in kinds.values())))}/NAME"
        )
    return kinds[kind], name, rest


DEPLOYMENT = {"deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment"}
KINDS = {
    **DEPLOYMENT,
    "pod": "Pod",
    "pods": "Pod",
    "po": "Pod",
    "service": "Service",
    "services": "Service",
    "svc": "Service",
    "networkpolicy": "NetworkPolicy",
    "networkpolicies": "NetworkPolicy",
    "netpol": "NetworkPolicy",
    "globalnetworkpolicy": "GlobalNetworkPolicy",
    "globalnetworkpolicies": "GlobalNetworkPolicy",
    "gnp": "GlobalNetworkPolicy",
    "networkpolicy.projectcalico.org": "NetworkPolicy.projectcalico.org",
    "networkpolicies.projectcalico.org": "NetworkPolicy.projectcalico.org",
}
SINGULARS = {
    "Deployment": "deployment.apps",
    "Service": "service",
    "Pod": "pod",
    "NetworkPolicy": "networkpolicy.networking.k8s.io",
    "GlobalNetworkPolicy": "globalnetworkpolicy.projectcalico.org",
    "NetworkPolicy.projectcalico.org": "networkpolicy.projectcalico.org",
}
PLURALS = {
    "Deployment": "deployments.apps",
    "Service": "services",
    "Pod": "pods",
    "NetworkPolicy": "networkpolicies.networking.k8s.io",
    "GlobalNetworkPolicy": "globalnetworkpolicies.projectcalico.org",
    "NetworkPolicy.projectcalico.org": "networkpolicies.projectcalico.org",
}


# -- set image, rollout -------------------------------------------------------------------------


def cmd_set(args) -> int:
    if args.what != "image":
        raise UsageError(
            f"cannot set {args.what!r}: netsim sets image (set image deployment/NAME C=IMAGE)"
        )
    _, name, pairs = target(args.words, DEPLOYMENT)
    if not pairs or any("=" not in p for p in pairs):
        raise UsageError("write CONTAINER=IMAGE after deployment/NAME (* for every container)")
    _, record = _cli().pick_cluster(args.cluster)
    template = json.loads(json.dumps(find(record, "Deployment", name)["spec"]["template"]))
    spec = template.setdefault("spec", {})
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    for pair in pairs:
        container, _, image = pair.partition("=")
        found = [c for c in containers if container in ("*", c.get("name"))]
        if not found or not image:
            raise UsageError(f'unable to find container named "{container}"')
        for c in found:
            c["image"] = image
    return _roll(record, name, template, "image updated")


def _roll(record: Record, name: str, template: dict, said: str) -> int:
    overrides = _overrides(record)
    overrides.setdefault("templates", {})[object_key(_namespace(), name)] = template
    _quiet_reapply(record, overrides)
    print(f"deployment.apps/{name} {said}")
    return 0


def _quiet_reapply(record: Record, overrides: dict) -> None:
    from netsim import cluster

    model, notes = topology.load(record.source, overrides)
    for note in notes:
        print(f"netsim: {note}", file=sys.stderr)
    cluster.apply(model, overrides=overrides)


def _rollout_state(record: Record, name: str) -> rollout.RolloutState:
    key = object_key(_namespace(), name)
    find(record, "Deployment", name)
    found = record.rollouts.get(key)
    if found is None:
        raise NetsimError(
            f"deployment {name} has no ReplicaSets: the cluster names pods by ordinal "
            "(spec.controlPlane.podNames: Ordinal); use podNames: ReplicaSet for rollouts"
        )
    return found


def cmd_rollout(args) -> int:
    _, name, rest = target(args.words, DEPLOYMENT)
    if rest:
        raise UsageError(f"unexpected {' '.join(rest)!r} after deployment/{name}")
    _, record = _cli().pick_cluster(args.cluster)
    state_ = _rollout_state(record, name)
    key = object_key(_namespace(), name)
    verb = args.rollout_verb
    if verb == "status":
        return _status(record, name, args.timeout, args.watch)
    if verb == "history":
        return _history(state_, name, args.revision)
    if verb == "undo":
        if record.deployments[key].paused:
            raise NetsimError(
                "you cannot rollback a paused deployment; resume it first with "
                "`netsim rollout resume` and try again"
            )
        revisions = sorted((rs.revision for rs in state_.replicasets), reverse=True)
        if args.to_revision:
            wanted = args.to_revision
            if wanted not in revisions:
                raise NetsimError(f"unable to find specified revision {wanted} in history")
        elif len(revisions) < 2:
            raise NetsimError(f'no rollout history found for deployment "{name}"')
        else:
            wanted = revisions[1]
        template = next(rs.template for rs in state_.replicasets if rs.revision == wanted)
        if record.deployments[key].template == template:
            print(
                f"deployment.apps/{name} skipped rollback (current template already matches "
                f"revision {wanted})"
            )
            return 0
        return _roll(record, name, template, "rolled back")
    if verb in ("pause", "resume"):
        paused = verb == "pause"
        if record.deployments[key].paused == paused:
            raise NetsimError(
                f'deployments.apps "{name}" is {"already" if paused else "not"} paused'
            )
        overrides = _overrides(record)
        overrides.setdefault("paused", {})[key] = paused
        _quiet_reapply(record, overrides)
        print(f"deployment.apps/{name} {'paused' if paused else 'resumed'}")
        return 0
    if verb == "restart":
        if record.deployments[key].paused:
            raise NetsimError(
                f'deployments.apps "{name}" is paused: resume it first (rollout resume)'
            )
        template = json.loads(json.dumps(record.deployments[key].template))
        meta = template.setdefault("metadata", {})
        meta.setdefault("annotations", {})[rollout.RESTARTED_AT] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()
        )
        return _roll(record, name, template, "restarted")
    raise NetsimError(f"unknown rollout verb {verb}")


def _history(state_: rollout.RolloutState, name: str, revision: int | None) -> int:
    sets = sorted(state_.replicasets, key=lambda rs: rs.revision)
    if revision:
        rs = next((rs for rs in sets if rs.revision == revision), None)
        if rs is None:
            raise NetsimError(f"unable to find the specified revision {revision}")
        print(f"deployment.apps/{name} with revision #{revision}")
        print(pod_template(rs.template, rs.hash))
        return 0
    print(f"deployment.apps/{name}")
    rows = [[str(rs.revision), rs.cause or "<none>"] for rs in sets]
    print(_cli().table(rows, ["REVISION", "CHANGE-CAUSE"]))
    return 0


def pod_template(template: dict, hash_: str = "") -> str:
    """A pod template as kubectl describes it."""
    meta = template.get("metadata") or {}
    labels = dict(meta.get("labels") or {}) | ({rollout.HASH_LABEL: hash_} if hash_ else {})
    lines = ["Pod Template:"]
    label_text = "\n           ".join(f"{k}={v}" for k, v in labels.items()) or "<none>"
    lines.append(f"  Labels:  {label_text}")
    annotations = meta.get("annotations") or {}
    if annotations:
        lines.append(
            "  Annotations:  "
            + "\n                ".join(f"{k}: {v}" for k, v in annotations.items())
        )
    lines.append("  Containers:")
    for c in (template.get("spec") or {}).get("containers") or []:
        lines.append(f"   {c.get('name')}:")
        lines.append(f"    Image:      {c.get('image') or '<netsim hostname server>'}")
        ports = [
            f"{p.get('containerPort')}/{p.get('protocol', 'TCP')}" for p in c.get("ports") or []
        ]
        lines.append(f"    Port:       {', '.join(ports) or '<none>'}")
        if c.get("command"):
            lines.append(f"    Command:    {' '.join(map(str, c['command']))}")
        if c.get("args"):
            lines.append(f"    Args:       {' '.join(map(str, c['args']))}")
    return "\n".join(lines)


def deployment_status(store, record: Record, key: str) -> dict | None:
    """The Deployment's counts as `rollout status` and `get deployments` read them: the
    stored object, and how many of its pods their kubelets report ready, and available (for
    minReadySeconds: ready that long, by the controller's clock in the record)."""
    from netsim.deployments import DEPLOYMENTS
    from netsim.pods import _statuses

    dep = record.deployments.get(key)
    held = store.get(f"{DEPLOYMENTS}{dep.namespace}/{dep.name}") if dep else None
    if held is None:
        return None
    obj = held.json()
    state_ = record.rollouts.get(key)
    if state_ is not None:
        every = [p for rs in state_.replicasets for p in rs.pods]
    else:  # pods by ordinal
        every = [
            e.pod.name
            for e in record.pods.values()
            if e.pod.owner == dep.name and e.pod.namespace == dep.namespace
        ]
    keys = [object_key(dep.namespace, p) for p in every]
    found = _statuses(store, [record.pods[k].pod for k in keys if k in record.pods])
    ready = {k for k, s in found.items() if "error" not in s and s.get("ready", True)}
    now = time.time()

    def available(pod: str) -> bool:
        k = object_key(dep.namespace, pod)
        # ready since the controller saw it so, or (ready after its last step) since then
        since = state_.ready_since.get(pod, state_.checked) if dep.min_ready and state_ else now
        return k in ready and now - since >= dep.min_ready

    status = obj.get("status", {})
    return {
        "object": obj,
        "replicas": dep.replicas,
        "updated": status.get("updatedReplicas", 0),
        "total": status.get("replicas", 0),
        "ready": len(ready),
        "available": sum(map(available, every)),  # old and new, as availableReplicas
        "reason": next(
            (c.get("reason") for c in status.get("conditions", []) if c["type"] == "Progressing"),
            "",
        ),
    }


def _status(record: Record, name: str, timeout: float, watch: bool) -> int:
    """kubectl's rollout status (polymorphichelpers/rollout_status.go): a line each time the
    state changes, until every replica is updated and available."""
    store = storemod.of(record.cluster, record.spec.datastore)
    key = object_key(_namespace(), name)
    deadline = time.monotonic() + timeout if timeout else None
    said = ""
    while True:
        record = state.load(record.cluster) or record
        found = deployment_status(store, record, key)
        if found is None:
            raise NetsimError(f'deployments.apps "{name}" not found')
        if found["reason"] == "ProgressDeadlineExceeded":
            raise NetsimError(f'deployment "{name}" exceeded its progress deadline')
        wait = "Waiting for deployment " + f'"{name}" rollout to finish: '
        if found["updated"] < found["replicas"]:
            line = (
                wait
                + f"{found['updated']} out of {found['replicas']} new replicas have been updated..."
            )
        elif found["total"] > found["updated"]:
            line = (
                wait
                + f"{found['total'] - found['updated']} old replicas are pending termination..."
            )
        elif found["available"] < found["updated"]:
            line = (
                wait
                + f"{found['available']} of {found['updated']} updated replicas are available..."
            )
        else:
            print(f'deployment "{name}" successfully rolled out', flush=True)
            return 0
        if line != said:
            print(line, flush=True)
            said = line
        if not watch:
            return 0
        if deadline is not None and time.monotonic() > deadline:
            raise NetsimError("timed out waiting for the condition")
        time.sleep(0.1)


# -- create, run, label, delete -------------------------------------------------------------------


def _container_name(image: str) -> str:
    """kubectl create deployment names the container after the image: its last path part,
    without tag or digest."""
    base = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    return base or "app"


def _add_object(record: Record, body: dict, said: str) -> int:
    cli = _cli()
    ident = topology.object_id(body)
    if any(topology.object_id(b) == ident for b in current_bodies(record)):
        plural = {"Deployment": "deployments.apps", "Pod": "pods"}[ident[0]]
        raise NetsimError(f'{plural} "{ident[2]}" already exists')
    overrides = _overrides(record)
    overrides["objects"] = [*overrides.get("objects", []), body]
    overrides["deleted"] = [d for d in overrides.get("deleted", []) if tuple(d) != ident]
    cli._check_objects(record, [body], "the command line")
    _quiet_reapply(record, overrides)
    print(said)
    return 0


def cmd_create(args) -> int:
    if args.what not in ("deployment", "deploy"):
        raise UsageError(f"cannot create {args.what!r}: netsim creates deployments")
    name = args.name
    _, record = _cli().pick_cluster(args.cluster)
    container: dict = {"name": _container_name(args.image), "image": args.image}
    if args.command:
        container["command"] = list(args.command)
    if args.port:
        container["ports"] = [{"containerPort": args.port}]
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": _namespace(), "labels": {"app": name}},
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [container]},
            },
        },
    }
    return _add_object(record, body, f"deployment.apps/{name} created")


def cmd_run(args) -> int:
    _, record = _cli().pick_cluster(args.cluster)
    labels = {"run": args.name}
    if args.labels:
        labels = dict(pair.split("=", 1) for pair in args.labels.split(",") if "=" in pair)
    container: dict = {"name": args.name, "image": args.image}
    if args.command:
        container["command" if args.as_command else "args"] = list(args.command)
    if args.port:
        container["ports"] = [{"containerPort": args.port}]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": args.name, "namespace": _namespace(), "labels": labels},
        "spec": {"containers": [container], "restartPolicy": args.restart},
    }
    return _add_object(record, body, f"pod/{args.name} created")


def cmd_label(args) -> int:
    kind, name, pairs = target(args.words, KINDS)
    if not pairs:
        raise UsageError("write at least one label: k=v, or k- to remove it")
    _, record = _cli().pick_cluster(args.cluster)
    key = object_key(_namespace(), name)
    if kind == "Pod":
        entry = record.pods.get(key)
        if entry is None:
            raise NetsimError(f'pods "{name}" not found')
        labels = dict(entry.pod.labels)
    else:
        labels = dict((find(record, kind, name).get("metadata") or {}).get("labels") or {})
    change: dict[str, str | None] = {}
    for pair in pairs:
        if pair.endswith("-") and "=" not in pair:
            change[pair[:-1]] = None
            continue
        k, eq, v = pair.partition("=")
        if not eq:
            raise UsageError(f"invalid label {pair!r}: write k=v, or k- to remove it")
        if k in labels and labels[k] != v and not args.overwrite:
            raise NetsimError(f"'{k}' already has a value ({labels[k]}), and --overwrite is false")
        change[k] = v
    check = {k: v for k, v in change.items() if v is not None}
    topology.parse_labels(check, "the command line")
    overrides = _overrides(record)
    held = overrides.setdefault("labels", {}).setdefault(f"{kind}/{key}", {})
    held.update(change)
    _quiet_reapply(record, overrides)
    what = {"Pod": "pod", "Service": "service", "Deployment": "deployment.apps"}[kind]
    print(f"{what}/{name} {'labeled' if check else 'unlabeled'}")
    return 0


def delete_object(args, kind: str, name: str) -> int:
    """`kubectl delete service|deployment NAME`: gone until the next `apply -f` of the file."""
    _, record = _cli().pick_cluster(args.cluster)
    body = find(record, kind, name)
    ident = topology.object_id(body)
    overrides = _overrides(record)
    overrides["objects"] = [
        o for o in overrides.get("objects", []) if topology.object_id(o) != ident
    ]
    overrides["services"] = [
        o for o in overrides.get("services", []) if topology.object_id(o) != ident
    ]
    overrides["deleted"] = [*overrides.get("deleted", []), list(ident)]
    _quiet_reapply(record, overrides)
    print(f'{SINGULARS[kind]} "{name}" deleted')
    return 0


# -- listings -------------------------------------------------------------------------------------


def _stored(store, prefix: str, shown):
    """The stored objects under the prefix that `get` shows (namespace, -l), with metadata."""
    for kv in store.range(prefix, prefix=True):
        obj = kv.json()
        if shown(obj):
            yield obj, obj["metadata"]


def deployment_items(store, record: Record, shown) -> list[dict]:
    from netsim.deployments import DEPLOYMENTS

    items = []
    now = time.time()
    for obj, meta in _stored(store, DEPLOYMENTS, shown):
        key = object_key(meta["namespace"], meta["name"])
        found = deployment_status(store, record, key) or {}
        sets = record.rollouts.get(key)
        created = min((rs.created for rs in sets.replicasets), default=now) if sets else now
        items.append(
            {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": meta.get("labels", {}),
                "replicas": obj["spec"]["replicas"],
                "ready": found.get("ready", 0),
                "updated": found.get("updated", 0),
                "available": found.get("available", 0),
                "age": now - created,
                "object": obj,
            }
        )
    return items


def replicaset_items(store, record: Record, shown) -> list[dict]:
    from netsim.deployments import REPLICASETS
    from netsim.pods import _statuses

    items = []
    now = time.time()
    for obj, meta in _stored(store, REPLICASETS, shown):
        dep = meta["ownerReferences"][0]["name"]
        sets = record.rollouts.get(object_key(meta["namespace"], dep))
        rs = sets.by_hash(meta["labels"][rollout.HASH_LABEL]) if sets else None
        pods = [
            record.pods[k].pod
            for k in (object_key(meta["namespace"], p) for p in (rs.pods if rs else []))
            if k in record.pods
        ]
        found = _statuses(store, pods)
        items.append(
            {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": meta.get("labels", {}),
                "desired": obj["spec"]["replicas"],
                "current": obj["status"]["replicas"],  # terminating pods are not counted
                "ready": min(
                    obj["status"]["replicas"],
                    sum("error" not in s and s.get("ready", True) for s in found.values()),
                ),
                "revision": meta["annotations"].get(rollout.REVISION, ""),
                "age": now - (rs.created if rs else now),
                "object": obj,
            }
        )
    return items


# -- describe -------------------------------------------------------------------------------------


def _pairs(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) or "<none>"


def describe_deployment(record: Record, name: str) -> str:
    store = storemod.of(record.cluster, record.spec.datastore)
    key = object_key(_namespace(), name)
    found = deployment_status(store, record, key)
    if found is None:
        raise NetsimError(f'deployments.apps "{name}" not found')
    dep, state_ = record.deployments[key], record.rollouts.get(key)
    obj = found["object"]
    new = state_.by_hash(rollout.template_hash(dep.template)) if state_ else None
    strategy = dep.strategy
    lines = [
        f"Name:                   {dep.name}",
        f"Namespace:              {dep.namespace}",
        f"Labels:                 {_pairs(dep.labels)}",
        "Annotations:            "
        + (_pairs(obj["metadata"].get("annotations", {})).replace("=", ": ")),
        f"Selector:               {_pairs(dep.selector)}",
        f"Replicas:               {dep.replicas} desired | {found['updated']} updated | "
        f"{found['total']} total | {found['available']} available | "
        f"{max(dep.replicas - found['available'], 0)} unavailable",
        f"StrategyType:           {strategy}",
        f"MinReadySeconds:        {dep.min_ready}",
    ]
    if strategy == "RollingUpdate":
        lines.append(
            f"RollingUpdateStrategy:  {dep.max_unavailable} max unavailable, "
            f"{dep.max_surge} max surge"
        )
    lines.append(pod_template(dep.template))
    conditions = obj.get("status", {}).get("conditions", [])
    lines.append("Conditions:")
    lines.append("  Type           Status  Reason")
    lines.append("  ----           ------  ------")
    for c in conditions:
        lines.append(f"  {c['type']:<14} {c['status']:<7} {c['reason']}")
    old = [rs for rs in (state_.replicasets if state_ else []) if rs is not new and rs.replicas]

    def rs_text(rs) -> str:
        name = rollout.replicaset_name(dep.name, rs.hash)
        return f"{name} ({rs.replicas}/{rs.replicas} replicas created)"

    lines.append(f"OldReplicaSets:         {', '.join(map(rs_text, old)) or '<none>'}")
    lines.append(f"NewReplicaSet:          {rs_text(new) if new else '<none>'}")
    from netsim import events

    said = [e for e in events.read(record.cluster) if e["node"] == f"deployment/{key}"]
    lines.append("Events:" + ("" if said else "  <none>"))
    now = time.time()
    for e in said[-10:]:
        lines.append(
            f"  Normal  ScalingReplicaSet  {_cli()._age(now - e['time'])} ago  {e['message']}"
        )
    return "\n".join(lines)


def describe_service(record: Record, name: str) -> str:
    from netsim import registry

    store = storemod.of(record.cluster, record.spec.datastore)
    where = f"{_namespace()}/{name}"
    held = store.get(registry.SERVICES + where)
    if held is None:
        raise NetsimError(f'services "{name}" not found')
    obj = held.json()
    ends = store.get(registry.ENDPOINTS + where)
    item = _cli()._service_item(obj, ends.json() if ends else None)
    spec = obj["spec"]
    lines = [
        f"Name:              {name}",
        f"Namespace:         {_namespace()}",
        f"Labels:            {_pairs(obj['metadata'].get('labels', {}))}",
        f"Selector:          {_pairs(spec.get('selector', {}))}",
        f"Type:              {spec.get('type', 'ClusterIP')}",
        f"IP:                {spec.get('clusterIP', '')}",
    ]
    for i, port in enumerate(item["ports"]):
        pname = port["name"] or "<unset>"
        lines.append(f"Port:              {pname}  {port['port']}/{port['protocol']}")
        lines.append(f"TargetPort:        {port['target_port']}/{port['protocol']}")
        if port["node_port"]:
            lines.append(f"NodePort:          {pname}  {port['node_port']}/{port['protocol']}")
        addresses = [f"{e['ip']}:{e['ports'][i]}" for e in item["endpoints"] if e["ports"][i]]
        lines.append(f"Endpoints:         {','.join(addresses) or '<none>'}")
    lines.append(f"Session Affinity:  {spec.get('sessionAffinity', 'None')}")
    if spec.get("type") == "LoadBalancer":
        lines.append(f"LoadBalancer Ingress:     {item['externalIP']} (VIP)")
    if spec.get("externalTrafficPolicy"):
        lines.append(f"External Traffic Policy:  {spec['externalTrafficPolicy']}")
    lines.append(f"Internal Traffic Policy:  {spec.get('internalTrafficPolicy', 'Cluster')}")
    if spec.get("healthCheckNodePort"):
        lines.append(f"HealthCheck NodePort:     {spec['healthCheckNodePort']}")
    return "\n".join(lines)


def duration(text: str) -> float:
    """kubectl's durations for --timeout: 90, 90s, 2m, 1h, 1m30s."""
    import argparse
    import re

    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: write e.g. 90s, 2m or 1m30s")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)
