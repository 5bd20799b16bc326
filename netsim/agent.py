"""The node agent: one process per node, in the kubelet's place.

It serves every pod of its node: the built-in hostname server (like agnhost serve-hostname:
each HTTP request and each UDP datagram on the pod's ports is answered with the pod's name) and
the pod's init containers and containers, processes in the pod's namespaces run as the kubelet
runs them (netsim/containers.py: order, restarts, probes, logs; this loop tells it of exits
and timers). A socket opened after entering a pod's namespace stays in that namespace, so one
process serves all pods.

netsim talks to it over a unix socket in the node's state directory, one JSON line each way:
{"tunnel": {...} | null, "lease": {...} | null, "daemons": {...} | null} makes the agent serve
the node's userspace carrier, if the mode has one (netsim/userspace_tunnel.py, in threads of its
own), renew the node's flannel lease as flanneld does (LeaseRenewer), and run the node's
daemons against the store (netsim/daemons: the kubelet, which tells the agent which pods to
serve; flanneld or calico-node; kube-proxy, whose userspace mode's proxy this agent serves:
netsim/kubeproxy/userspace.py); it answers {"ok": true, "errors": {}}. Agents are forked from
the cluster's zygote (netsim/zygote.py), which has imported all of this once.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import os
import queue
import selectors
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable

from netsim.containers import PodContainers
from netsim.kernel import netns as nsmod

HTTP_HEAD = (
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n"
)


class Agent:
    def __init__(self, control: socket.socket, log_dir: str, netns: str):
        self.sel = selectors.DefaultSelector()
        self.pods: dict[str, dict] = {}  # name -> spec, sockets, procs
        self.control, self.log_dir = control, log_dir
        self.netns = netns
        self.tunnel = None  # a userspace carrier (netsim.userspace_tunnel.Tunnel)
        self.proxy = None  # kube-proxy's userspace mode (netsim.kubeproxy.userspace.Proxy)
        self.tunnel_key: dict = {}
        self.renewer: LeaseRenewer | None = None  # flanneld's renewal of the node's lease
        self.informer = None  # the node's daemons against the store (netsim/daemons)
        self.daemons_config: dict | None = None
        self.sel.register(self.control, selectors.EVENT_READ, ("control-accept", None))
        # the kubelet's requests, from its thread, are served by the event loop's
        self.requests: queue.Queue = queue.Queue()
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self.wake_read, selectors.EVENT_READ, ("wake", None))
        self.timers: list = []  # heap of (when, n, Timer)
        self.counter = itertools.count()
        self.exits: dict[int, int] = {}  # container pid -> its pidfd, watched for its exit
        self.changed: Callable = lambda pod, status, pids: None  # the kubelet's, via serve
        self.environment: Callable[[str], dict] = lambda pod: {}

    # -- pods ----------------------------------------------------------------------------------

    def sync_tunnel(self, spec: dict | None) -> str | None:
        """Serve the userspace carrier this node needs (or none); an error as text."""
        try:
            if self.tunnel is not None and (
                spec is None or {k: v for k, v in spec.items() if k != "peers"} != self.tunnel_key
            ):
                self.tunnel.close()
                self.tunnel = None
            if spec is None:
                return None
            if self.tunnel is None:
                from netsim.userspace_tunnel import Tunnel  # only nodes that need it pay

                self.tunnel = Tunnel.open(
                    self.netns,
                    spec["kind"],
                    spec["name"],
                    spec["local_ip"],
                    spec["mtu"],
                    spec["peers"],
                    address=spec.get("address"),
                )
                self.tunnel.start()
                self.tunnel_key = {k: v for k, v in spec.items() if k != "peers"}
            else:
                self.tunnel.update_peers(spec["peers"])
        except (OSError, ValueError, RuntimeError) as exc:
            return f"tunnel {spec.get('name') if spec else ''}: {exc}"
        return None

    def sync_daemons(self, config: dict | None) -> str | None:
        """Run the node's daemons (netsim/daemons) with this configuration, or none; an
        error as text. An unchanged configuration leaves them running."""
        if config == self.daemons_config:
            return None
        previous = None
        if self.informer is not None:
            self.informer.stop()
            previous, self.informer = self.informer.worker, None
        self.daemons_config = config
        if config is None:
            return None
        try:
            from netsim.daemons import start  # only agents that run daemons pay

            self.informer = start(
                config,
                self.log_dir,
                lambda: self.tunnel,
                self.userspace_proxy,
                self.serve,
                previous,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            return f"daemons: {exc}"
        return None

    def userspace_proxy(self):
        """kube-proxy's userspace mode, served by this agent (made on first use by the node's
        kube-proxy daemon)."""
        if self.proxy is None:
            from netsim.kubeproxy.userspace import Proxy

            self.proxy = Proxy(self.netns)
            self.proxy.start()
        return self.proxy

    def serve(
        self,
        wanted: dict[str, dict],
        changed: Callable[[str, dict, list[int]], None] | None = None,
        environment: Callable[[str], dict] | None = None,
        timeout: float = 60.0,
    ) -> dict:
        """Serve exactly these pods (called by the kubelet, from its thread): {"pids": the
        PIDs of each one's containers, "statuses": each one's status (phase, ready, container
        statuses), "errors": pod -> why it could not start}. Later changes of a pod's status
        are told to `changed(pod, status, pids)` (from the agent's loop: it must not wait);
        `environment` gives a pod's containers the variables of the Services that exist when
        they start."""
        if changed is not None:
            self.changed = changed
        if environment is not None:
            self.environment = environment
        done, box = threading.Event(), {}
        self.post(lambda: box.update(reply=self.sync(wanted)) or done.set())
        if not done.wait(timeout):
            raise RuntimeError(f"the agent did not serve its pods within {timeout:.0f} s")
        return box["reply"]

    def post(self, work: Callable[[], None]) -> None:
        """Run this on the agent's loop (from any thread)."""
        self.requests.put(work)
        os.write(self.wake_write, b"w")

    def later(self, delay: float, work: Callable[[], None]) -> Timer:
        """Run this on the agent's loop after `delay` seconds (unless cancelled)."""
        timer = Timer(work)
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.counter), timer))
        return timer

    def watch_exit(self, proc: subprocess.Popen, then: Callable[[int], None]) -> None:
        """Call `then(returncode)` on the loop once the process exits."""
        fd = os.pidfd_open(proc.pid)
        self.exits[proc.pid] = fd
        self.sel.register(fd, selectors.EVENT_READ, ("exit", (proc, then)))

    def watch_fd(self, fd: int, then: Callable[[bool], None]) -> None:
        """Call `then(True)` on the loop once a byte comes on fd, `then(False)` when it
        closes first; the fd is closed after."""
        self.sel.register(fd, selectors.EVENT_READ, ("signal", then))

    def _on_signal(self, fd: int, then: Callable[[bool], None]) -> None:
        self.sel.unregister(fd)
        data = os.read(fd, 1)
        os.close(fd)
        then(bool(data))

    def unwatch(self, proc: subprocess.Popen) -> None:
        fd = self.exits.pop(proc.pid, None)
        if fd is not None:
            self.sel.unregister(fd)
            os.close(fd)

    def spawn(
        self,
        argv,
        env: dict,
        log_path: str,
        netns: str,
        hostname: str,
        namespace: str,
        keep: tuple[int, ...] = (),
    ):
        """A container's process: in the pod's namespaces (network, mount with its
        resolv.conf and service account, UTS with its name), output to its log; `keep`:
        descriptors it inherits."""
        from netsim.kernel.proc import die_with_parent

        agent = os.getpid()

        def enter() -> None:
            # a container dies with its agent: a kubelet that starts again makes it again,
            # and nothing of a deleted cluster can outlive it unrecorded
            die_with_parent(agent)
            nsmod.enter_as_container(netns, hostname, namespace)

        with open(log_path, "ab") as log:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
                preexec_fn=enter,
                pass_fds=keep,
            )

    def _on_exit(self, fd: int, data: tuple) -> None:
        proc, then = data
        self.unwatch(proc)
        then(proc.wait())

    def _on_wake(self, fd: int, _: object) -> None:
        while True:
            try:
                os.read(fd, 4096)
            except BlockingIOError:
                break
        while not self.requests.empty():
            self.requests.get()()

    def sync(self, wanted: dict[str, dict]) -> dict:
        for name in list(self.pods):
            if name not in wanted or wanted[name] != self.pods[name]["spec"]:
                self._stop_pod(name)
        errors = {}
        for name, spec in wanted.items():
            if name not in self.pods:
                try:
                    self._start_pod(name, spec)
                except OSError as exc:
                    errors[name] = str(exc)
        return {
            "ok": not errors,
            "errors": errors,
            "serving": sorted(self.pods),
            "pids": {n: self.pids(n) for n in self.pods},
            "statuses": {n: self.status(n) for n in self.pods},
        }

    def pids(self, pod: str) -> list[int]:
        containers = self.pods[pod]["containers"]
        return containers.pids() if containers else []

    def status(self, pod: str) -> dict:
        """The pod's phase, readiness and container statuses."""
        containers = self.pods[pod]["containers"]
        if containers is not None:
            return containers.pod_status()
        return _served_status(
            tuple(c["name"] for c in self.pods[pod]["spec"].get("containers", []))
        )

    def _start_pod(self, name: str, spec: dict) -> None:
        """The pod's built-in hostname server (its sockets, in the pod's namespace) and, when
        it has any, its containers' processes (init containers first: the hostname server
        opens when they are done)."""
        pod: dict = {"spec": spec, "socks": [], "containers": None}
        if spec.get("init") or any(c.get("argv") for c in spec.get("containers", [])):
            pod["containers"] = PodContainers(
                name,
                spec,
                os.path.join(self.log_dir, "logs", name),
                self,
                lambda pod: self.changed(pod, self.status(pod), self.pids(pod)),
                lambda: self.environment(name),
                lambda: self._serve_hostname(name, spec, pod),
            )
        else:
            self._serve_hostname(name, spec, pod)
        self.pods[name] = pod
        if pod["containers"] is not None:
            pod["containers"].start()

    def _serve_hostname(self, name: str, spec: dict, pod: dict) -> None:
        socks = []
        body = spec.get("hostname", name).encode()
        try:
            with nsmod.entered(spec["netns"]):
                for port in spec.get("ports", []):
                    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    tcp.bind(("0.0.0.0", port))
                    tcp.listen(512)
                    tcp.setblocking(False)
                    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    udp.bind(("0.0.0.0", port))
                    udp.setblocking(False)
                    socks += [tcp, udp]
        except OSError:
            for s in socks:
                s.close()
            raise
        for s in socks:
            kind = "tcp-accept" if s.type == socket.SOCK_STREAM else "udp"
            self.sel.register(s, selectors.EVENT_READ, (kind, body))
        pod["socks"] = socks

    def _stop_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        for s in pod["socks"]:
            self.sel.unregister(s)
            s.close()
        if pod["containers"] is not None:
            _end(pod["containers"].stop())

    def shutdown(self, *_: object) -> None:
        """The node goes (netsim delete, node stop): its containers are killed with it, as a
        power cut would; the kernel closes the sockets as we exit."""
        for pod in self.pods.values():
            for proc in pod["containers"].stop() if pod["containers"] else []:
                proc.kill()
        os._exit(0)

    # -- event loop ----------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.shutdown)
        while True:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                try:
                    heapq.heappop(self.timers)[2].fire()
                except Exception:  # noqa: BLE001 -- as above
                    traceback.print_exc()
            wait = self.timers[0][0] - now if self.timers else None
            for key, _ in self.sel.select(wait):
                kind, data = key.data
                try:
                    getattr(self, "_on_" + kind.replace("-", "_"))(key.fileobj, data)
                except (BlockingIOError, ConnectionError):
                    pass
                except Exception:  # noqa: BLE001 -- one pod's trouble must not end the node's agent
                    traceback.print_exc()

    def _on_tcp_accept(self, listener: socket.socket, body: bytes) -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, ("tcp-request", body))

    def _on_tcp_request(self, conn: socket.socket, body: bytes) -> None:
        self.sel.unregister(conn)
        try:
            conn.recv(65536)
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(HTTP_HEAD.format(len(body)).encode() + body)
        except OSError:
            pass
        finally:
            conn.close()

    def _on_udp(self, sock: socket.socket, body: bytes) -> None:
        _, peer = sock.recvfrom(65536)
        sock.sendto(body, peer)

    def _on_control_accept(self, listener: socket.socket, _: object) -> None:
        conn, _ = listener.accept()
        conn.setblocking(True)
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                request = json.loads(line)
                self.renewer = LeaseRenewer.follow(self.renewer, request.get("lease"))
                problems = {
                    "tunnel": self.sync_tunnel(request.get("tunnel")),
                    "daemons": self.sync_daemons(request.get("daemons")),
                }
                errors = {what: text for what, text in problems.items() if text}
                reply = {"ok": not errors, "errors": errors}
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()


@functools.cache
def _served_status(names: tuple[str, ...]) -> dict:
    """The status of a pod whose containers the hostname server serves: running and ready
    from the start (one shared object per set of names: a hundred pods in each agent)."""
    running = [
        {"name": n, "state": {"running": {}}, "restartCount": 0, "ready": True, "started": True}
        for n in names
    ]
    return {"phase": "Running", "ready": True, "containerStatuses": running}


class Timer:
    def __init__(self, work: Callable[[], None]):
        self.work: Callable[[], None] | None = work

    def cancel(self) -> None:
        self.work = None

    def fire(self) -> None:
        if self.work is not None:
            self.work()


class LeaseRenewer(threading.Thread):
    """flanneld's lease renewal: the node's subnet lease is bound to an etcd lease of the
    cluster's TTL (flannel's 24 h), renewed `margin` before it would end (flannel's
    --subnet-lease-renew-margin, 60 minutes; a third of a short TTL), and every minute after
    a failed try. Each renewal is logged."""

    def __init__(self, spec: dict):
        super().__init__(daemon=True, name="lease-renewer")
        self.requested = spec  # as netsim sent it: a renewal of the same lease keeps this one
        self.spec = spec  # the lease renewed now (take_again may have taken a new one)
        self.stopped = threading.Event()

    @classmethod
    def follow(cls, current: LeaseRenewer | None, spec: dict | None) -> LeaseRenewer | None:
        if current is not None and spec in (current.requested, current.spec):
            return current
        if current is not None:
            current.stopped.set()
        if spec is None:
            return None
        renewer = cls(spec)
        renewer.start()
        return renewer

    def run(self) -> None:
        ttl = self.spec["ttl"]
        margin = min(3600, ttl // 3)
        wait = 0  # at its start, as flanneld does: the node may have been away a while
        while not self.stopped.wait(wait):
            from netsim.store.client import Store

            store = Store(self.spec["endpoints"], self.spec["netns"])
            try:
                left = store.keep_alive(self.spec["id"])
                if left <= 0 and not self.take_again(store):
                    return
            except Exception as exc:  # the store is down: flannel retries every minute
                print(f"lease {self.spec['id']:x}: renewal failed ({exc})", flush=True)
                wait = min(60, margin)
                continue
            if left > 0:
                print(f"lease {self.spec['id']:x} renewed: TTL {left} s", flush=True)
            wait = ttl - margin

    def take_again(self, store) -> bool:
        """The lease ended (the node was away longer than its TTL): take the subnet again
        under a new one, as flanneld does at its start, unless another host holds it now."""
        key, value = self.spec["key"], self.spec["value"]
        lease = store.grant(self.spec["ttl"])
        if not store.take(key, value, lease, mine=lambda kv: kv.value.decode() == value):
            print(f"lease {self.spec['id']:x} ended and {key} is another host's", flush=True)
            return False
        print(f"lease {self.spec['id']:x} had ended: {key} taken again as {lease:x}", flush=True)
        self.spec = {**self.spec, "id": lease}
        return True


def _end(procs: list[subprocess.Popen]) -> None:
    """SIGTERM all, then SIGKILL whatever has not exited within two seconds."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(
    control_path: str,
    tunnel: dict | None = None,
    lease: dict | None = None,
    daemons: dict | None = None,
    timeout: float = 30.0,
) -> dict:
    """Ask a running agent to serve this tunnel, keep this flannel lease alive and run the
    node's daemons against the store; return its reply."""
    message = {"tunnel": tunnel, "lease": lease, "daemons": daemons}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control_path)
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def listen(control_path: str) -> socket.socket:
    """The control socket, bound by netsim before the agent starts so that requests can be
    sent at once (they queue in the backlog) without waiting for the agent to come up."""
    if os.path.exists(control_path):
        os.unlink(control_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(control_path)
    sock.listen(64)
    return sock
