"""The cluster's record under /run/netsim/<cluster>/: what netsim made, so it can change or
remove exactly that.

- state.json: the committed record (netsim.record.Record as JSON), replaced atomically when an
  apply or delete finishes.
- journal: one JSON line per namespace or process, written *before* it is created by a run
  that has not committed yet; `gc` reads it after a crash.
- lock: flock-ed by the run that is changing the cluster, so gc never races a live apply.
- etcd/: netsim's etcd for the cluster (its data on a ramfs of its own, its log).
- nodes/<node>/: subnet.env, the CNI IPAM store, the agent's socket and log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from netsim.errors import NetsimError

if TYPE_CHECKING:
    from netsim.record import Record

ROOT = os.environ.get("NETSIM_STATE_ROOT", "/run/netsim")
PREFIX = "netsim"  # every namespace is netsim.<cluster>.<role>[.<name>]


def cluster_dir(cluster: str) -> str:
    return os.path.join(ROOT, cluster)


def node_dir(cluster: str, node: str) -> str:
    return os.path.join(ROOT, cluster, "nodes", node)


def netns_root() -> str:
    """Where clusters' namespaces are mounted, one tmpfs each. A dot name: no cluster can be
    called so."""
    return os.path.join(ROOT, ".netns")


def netns_dir(cluster: str) -> str:
    """Where the cluster's namespaces are mounted (a tmpfs; /run/netns links there)."""
    return os.path.join(netns_root(), cluster)


def netns_prefix(cluster: str) -> str:
    """Names are DNS-1123 labels (no dots), so this prefix belongs to one cluster only."""
    return f"{PREFIX}.{cluster}."


def clusters() -> list[str]:
    try:
        return sorted(
            d
            for d in os.listdir(ROOT)
            if not d.startswith(".") and os.path.isdir(os.path.join(ROOT, d))
        )
    except FileNotFoundError:
        return []


def load(cluster: str) -> Record | None:
    from netsim import record

    path = os.path.join(cluster_dir(cluster), "state.json")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    return record.decode(data, path, cluster)


def save(rec: Record) -> None:
    """Commit the record atomically; the journal of this run is no longer needed."""
    from netsim import record

    directory = cluster_dir(rec.cluster)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "state.json.tmp")
    with open(tmp, "wb") as fh:
        fh.write(record.encode(rec, indent=1))
    os.replace(tmp, os.path.join(directory, "state.json"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, "journal"))


def remove(cluster: str) -> None:
    """The cluster's directory: its tmpfs goes with one unmount (a directory left by an older
    netsim, or made without a lock, is removed file by file)."""
    from netsim.kernel import tmpfs

    directory = cluster_dir(cluster)
    tmpfs.remove(os.path.join(directory, "etcd"))  # its own ramfs, if the directory is not one
    tmpfs.remove(directory)
    shutil.rmtree(directory, ignore_errors=True)


def journal(cluster: str, entry: dict[str, Any]) -> None:
    """Note an object about to be created, so a crash cannot hide it from gc."""
    directory = cluster_dir(cluster)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "journal"), "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def journal_entries(cluster: str) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(cluster_dir(cluster), "journal")) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def locked(cluster: str, wait: bool = True) -> Iterator[None]:
    """Hold the cluster's lock; with wait=False raise at once if another run holds it. The
    cluster's directory is a tmpfs of its own from here on."""
    from netsim.kernel import tmpfs

    held = _held.__dict__.setdefault("clusters", set())
    if cluster in held:  # this thread holds it already (a controller's apply of the record)
        yield
        return
    directory = cluster_dir(cluster)
    tmpfs.mount(directory)
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise NetsimError(
                f"cluster {cluster} is being changed by another netsim run; wait for it to finish"
            ) from None
        held.add(cluster)
        try:
            yield
        finally:
            held.discard(cluster)
    finally:
        os.close(fd)


_held = threading.local()  # the clusters whose lock this thread holds


def write_file(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
