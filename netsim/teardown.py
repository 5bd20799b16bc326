"""Removing clusters: `delete` removes everything a cluster's record, journal and names hold;
`gc` removes what crashed or killed runs left behind."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

from netsim import agents, state
from netsim.errors import NetsimError
from netsim.kernel import ipip_bpf, proc
from netsim.kernel import netns as nsmod
from netsim.record import Record


def delete(name: str, progress: Callable[[str], None] = lambda _: None) -> list[str]:
    """Remove everything of the cluster; list what was removed."""
    with state.locked(name):
        record = _readable(name)
        cleared: list[str] = []

        def processes_gone() -> None:  # no daemon of the cluster writes to its store now
            cleared.extend(_clear_users_store(record))
            state.remove(name)

        removed = _remove_everything(name, record, before_namespaces=processes_gone)
        removed += cleared
    from netsim import store

    store.forget(name)
    progress(f"removed {len(removed)} objects")
    return removed


def _clear_users_store(record: Record | None) -> list[str]:
    """The keys and leases netsim wrote into the user's etcd (netsim's own etcd goes with its
    data). The store is the cluster's alone (check_owner made sure): real layouts carry no
    cluster name, so the prefixes netsim writes go whole."""
    if record is None or record.spec.datastore.own:
        return []
    from netsim import store as storemod

    store = storemod.of(record.cluster, record.spec.datastore)
    try:
        owner = store.get(storemod.OWNER)
        if owner is None or owner.json().get("name") != record.cluster:
            return [f"etcd keys left in place: {store} is not cluster {record.cluster}'s"]
        for node in record.nodes.values():
            if node.lease:
                store.revoke(node.lease)  # its keys go with it
        prefixes = (*storemod.WRITTEN, storemod.NETSIM)
        count = sum(store.delete(p, prefix=True) for p in prefixes)
    except NetsimError as exc:
        return [f"etcd keys left in place ({exc})"]
    return [f"{count} keys in {store}"]


def _readable(name: str) -> Record | None:
    """The record, or None when there is none or it cannot be read (names still find all)."""
    try:
        return state.load(name)
    except NetsimError:
        return None


def _processes_in(name: str) -> list[tuple[int, int]]:
    """Every (pid, start) a record holds, read as plain JSON: a record this netsim cannot
    decode (another version's, or damaged) still names the processes it started."""
    try:
        with open(os.path.join(state.cluster_dir(name), "state.json")) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return []
    found, todo = [], [data]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if isinstance(item.get("pid"), int) and isinstance(item.get("start"), int):
                found.append((item["pid"], item["start"]))
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


def _namespaces(record: Record) -> list[str]:
    return (
        [p.netns for p in record.pods.values()]
        + [h.netns for h in record.hosts()]
        + [record.underlay.netns, record.router.netns]
        + ([record.master.netns] if record.master else [])
    )


def _remove_everything(
    name: str, record: Record | None, before_namespaces: Callable[[], None] = lambda: None
) -> list[str]:
    processes, namespaces = [], []
    journal = state.journal_entries(name)
    if record:
        processes += agents.daemons(record)
        namespaces += _namespaces(record)
    else:
        processes += _processes_in(name)
    processes += [(e["pid"], e["start"]) for e in journal if "pid" in e]
    namespaces += [e["netns"] for e in journal if "netns" in e]
    prefix = state.netns_prefix(name)
    namespaces += [n for n in nsmod.names() if n.startswith(prefix)]
    removed = [f"process {pid}" for pid, started in set(processes) if proc.alive(pid, started)]
    # netsim's etcd goes with its data, so it is not asked to shut down cleanly
    etcd = [(m.etcd.pid, m.etcd.start) for m in [record and record.master] if m and m.etcd]
    signalled = proc.terminate(etcd, signal.SIGKILL)
    signalled |= proc.terminate([p for p in set(processes) if p not in etcd])
    # while they exit: the namespaces' names
    ours = [netns for netns in dict.fromkeys(namespaces) if netns.startswith(prefix)]
    removed += [f"netns {n}" for n in nsmod.unlink_all(state.netns_dir(name), ours)]
    proc.finish(signalled)
    # the record goes once its processes are gone, then every namespace with one unmount (the
    # kernel tears them down in the background); a crash in between leaves only what carries
    # the cluster's name, which gc finds
    before_namespaces()
    nsmod.remove_group(state.netns_dir(name))
    for netns in nsmod.etc_names():  # the pods' resolv.conf and hosts (the kubelets')
        if netns.startswith(prefix):
            nsmod.remove_etc(netns)
    for netns in ipip_bpf.pinned_namespaces():  # eBPF pins outlive their namespace
        if netns.startswith(prefix) and ipip_bpf.remove_pins(netns):
            removed.append(f"bpf pins of {netns}")
    return removed


def gc(only: str | None = None) -> dict[str, list[str]]:
    """For a cluster with no committed record, remove everything with its name; for a
    committed one, what its journal names beyond the record. A cluster another netsim run is
    changing is left alone."""
    names = set(state.clusters())
    names |= {
        n.split(".")[1]
        for n in nsmod.names()
        if n.startswith(state.PREFIX + ".") and n.count(".") >= 2
    }
    names |= set(nsmod.groups(state.netns_root()))  # only their mounts left
    names |= {  # only their pods' files in /etc/netns left
        n.split(".")[1]
        for n in nsmod.etc_names()
        if n.startswith(state.PREFIX + ".") and n.count(".") >= 2
    }
    names.discard("probe")
    report: dict[str, list[str]] = {}
    for name in sorted(names):
        if only and name != only:
            continue
        try:
            with state.locked(name, wait=False):
                record = _readable(name)
                if record is None:
                    report[name] = _remove_everything(name, None)
                    state.remove(name)
                else:
                    report[name] = _collect_leftovers(name, record)
        except NetsimError as exc:
            report[name] = [f"skipped: {exc}"]
    return report


def _collect_leftovers(name: str, record: Record) -> list[str]:
    keep = set(_namespaces(record))
    keep_pids = set(agents.daemons(record))
    removed = []
    for entry in state.journal_entries(name):
        if (
            "pid" in entry
            and (entry["pid"], entry["start"]) not in keep_pids
            and proc.alive(entry["pid"], entry["start"])
        ):
            proc.stop([(entry["pid"], entry["start"])])
            removed.append(f"process {entry['pid']}")
    for netns in nsmod.names():
        if netns.startswith(state.netns_prefix(name)) and netns not in keep:
            nsmod.remove(netns)
            removed.append(f"netns {netns}")
    for netns in nsmod.etc_names():
        if netns.startswith(state.netns_prefix(name)) and netns not in keep:
            nsmod.remove_etc(netns)
            removed.append(f"/etc/netns/{netns}")
    state.save(record)  # clears the journal
    return removed
