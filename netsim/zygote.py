"""The agents' zygote: one process per cluster that imports everything a node agent runs
(the daemons, the etcd client, netlink, nftables) once, then forks an agent per node on
request, as Android's zygote starts apps.

A node agent started from scratch costs a Python start and ~0.3 s of imports, and ~40 MiB of
its own; a hundred of them would take 30 s of CPU while the cluster is built and 4 GiB. Forked
from the zygote they start in milliseconds and share the imported code and objects with it and
with each other (copy-on-write, the objects frozen out of the collector's reach so it does
not touch their pages): what each agent adds is its own pods' and daemons' state. `netsim
bench --scale` reports the agents' memory as PSS, each shared page counted once.

netsim sends {"node", "netns", "cluster", "log"} as one JSON line with the agent's control
socket attached (SCM_RIGHTS); the zygote forks, answers {"pid": N}, and the child becomes the
agent (own session, output to its log). Children are reaped by the kernel (SIGCHLD ignored).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

PRELOAD = (
    "netsim.agent",
    "netsim.daemons",
    "netsim.daemons.informer",
    "netsim.daemons.flanneld",
    "netsim.daemons.felix",
    "netsim.daemons.kubelet",
    "netsim.daemons.kube_proxy",
    "netsim.kernel.netlink",
    "netsim.kernel.nft",
    "netsim.kubeproxy.nftables",
    "netsim.kubeproxy.userspace",
    "netsim.userspace_tunnel",
    "netsim.modes",
    "netsim.controller",
    "netsim.events",
    "netsim.record",
    "netsim.registry",
    "netsim.store.client",
    "etcd3gw",
    "requests",
    "msgspec",
)


def preload() -> None:
    import gc
    import importlib

    from netsim import modes

    for name in PRELOAD:
        importlib.import_module(name)
    modes.every()  # every mode's module, as the daemons ask for them
    gc.collect()
    gc.freeze()  # the collector leaves these objects (and their shared pages) alone


def serve(listener: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
    while True:
        conn, _ = listener.accept()
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 65536, 1)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                _become_agent(request, fds[0])  # never returns
            os.close(fds[0])
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _become_agent(request: dict, control_fd: int) -> None:
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the agent waits for its containers
        # below etcd and netsim itself: a hundred kube-proxies syncing at once must not
        # starve the store they read (a real node's daemons do not share its cores)
        os.nice(5)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        from netsim import agent

        control = socket.socket(fileno=control_fd)
        print(
            f"netsim agent {os.getpid()} for node {request['node']} of cluster "
            f"{request['cluster']} (forked from the zygote)",
            flush=True,
        )
        agent.Agent(control, os.path.dirname(control.getsockname()), request["netns"]).run()
    finally:
        os._exit(1)


def fork_agent(zygote_path: str, control: socket.socket, request: dict) -> int:
    """Ask the zygote for an agent with this control socket; its PID."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(zygote_path)
        socket.send_fds(sock, [json.dumps(request).encode()], [control.fileno()])
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("the zygote closed the connection")
            data += chunk
    return int(json.loads(data)["pid"])


def main() -> None:
    """python -m netsim.zygote FD CLUSTER (FD: the inherited, listening socket)."""
    listener = socket.socket(fileno=int(sys.argv[1]))
    preload()
    print(f"netsim zygote {os.getpid()} for cluster {sys.argv[2]}: preloaded", flush=True)
    serve(listener)


if __name__ == "__main__":
    main()
