"""The etcd netsim runs for a cluster, as the guides run one on their master: Debian's etcd in
the control-plane namespace netsim.<cluster>.master, listening on the underlay on 2379, its
data and log under /run/netsim/<cluster>/etcd/. Started by PID, ended by PID."""

from __future__ import annotations

import os
import time

from netsim.errors import NetsimError
from netsim.kernel import proc, tmpfs
from netsim.store.client import CLIENT_PORT, Store, StoreError

PEER_PORT = 2380
LOG = "etcd.log"


def directory(cluster_dir: str) -> str:
    return os.path.join(cluster_dir, "etcd")


def log_path(cluster_dir: str) -> str:
    return os.path.join(directory(cluster_dir), LOG)


def argv(name: str, ip: str, data_dir: str) -> list[str]:
    """One member named after the cluster's master; clients on the underlay address and on
    the namespace's loopback (etcdctl inside the master namespace needs no --endpoints)."""
    return [
        "etcd",
        "--name",
        name,
        "--data-dir",
        data_dir,
        "--listen-client-urls",
        f"http://{ip}:{CLIENT_PORT},http://127.0.0.1:{CLIENT_PORT}",
        "--advertise-client-urls",
        f"http://{ip}:{CLIENT_PORT}",
        "--listen-peer-urls",
        f"http://{ip}:{PEER_PORT}",
        "--initial-advertise-peer-urls",
        f"http://{ip}:{PEER_PORT}",
        "--initial-cluster",
        f"{name}=http://{ip}:{PEER_PORT}",
        "--initial-cluster-state",
        "new",
        # a member alone elects itself after its election timeout: etcd's 1 s default made
        # a cluster wait 0.3-1 s for its store; the underlay is one host's bridges
        "--heartbeat-interval",
        "10",
        "--election-timeout",
        "100",
        "--max-txn-ops",
        "1024",
        "--snapshot-count",
        "100000",
        "--log-level",
        "warn",
        "--logger",
        "zap",
    ]


def start(
    cluster_dir: str, netns: str, name: str, ip: str, started=lambda process: None
) -> tuple[int, int]:
    """Start etcd in the master namespace and wait until it answers; (pid, start time).
    `started` hears of the process as soon as it exists, before the wait, so a failure to
    answer cannot hide it."""
    from shutil import which

    if which("etcd") is None:
        raise NetsimError(
            "etcd not found: netsim keeps the cluster's state in etcd "
            "(apt-get install etcd-server etcd-client, or run ./bootstrap)"
        )
    home = directory(cluster_dir)
    # ramfs, not the state's tmpfs: etcd preallocates 2 x 64 MiB of WAL with fallocate, which
    # tmpfs fills with pages (freeing them cost delete 25 ms); ramfs has no fallocate, so etcd
    # extends the files sparsely and only what it writes takes memory
    tmpfs.mount(home, fstype="ramfs")
    process = proc.spawn(argv(name, ip, os.path.join(home, "data")), os.path.join(home, LOG), netns)
    started(process)
    wait_ready(Store([f"http://{ip}:{CLIENT_PORT}"], netns), process, log_path(cluster_dir))
    return process


def wait_ready(store: Store, process: tuple[int, int], log: str, timeout: float = 20.0) -> None:
    """Until the member answers a read (it has elected itself leader)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.revision()
            return
        except StoreError:
            if not proc.alive(*process):
                raise NetsimError(f"etcd exited at start; its log is {log}") from None
            if time.monotonic() > deadline:
                raise NetsimError(
                    f"etcd did not answer within {timeout:.0f} s; its log is {log}"
                ) from None
            time.sleep(0.02)
