"""A rolling update of 10 replicas with the default strategy (maxSurge 25%, maxUnavailable
25%), from `netsim set image` until `netsim rollout status` reports it done, while a client
pod opens fresh connections to the Service's ClusterIP without pause: the time, and how
many requests succeeded (the figure: none lost, at least 99.9%). For each mode given and both
kube-proxy backends.

    .venv/bin/python -m pytest -s bench/test_rollout.py
    NETSIM_ROLLOUT_MODES=flannel-vxlan,calico-vxlan,calico-bgp .venv/bin/python -m pytest -s \\
        bench/test_rollout.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from netsim import state, teardown
from netsim.kernel import netns as nsmod

ROOT = Path(__file__).resolve().parent.parent
NETSIM = [sys.executable, "-m", "netsim"]
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.39"
MODES = os.environ.get("NETSIM_ROLLOUT_MODES", "flannel-vxlan,calico-vxlan").split(",")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _documents(name: str, mode: str, proxy: str) -> list[dict]:
    return [
        {
            "apiVersion": "netsim.dev/v1alpha1",
            "kind": "Cluster",
            "metadata": {"name": name},
            "spec": {
                "cni": {"mode": mode},
                "kubeProxy": {"mode": proxy},
                "underlay": {"segments": [{"name": "lan", "subnet": "172.18.0.0/24"}]},
                "nodes": [{"name": "n1"}, {"name": "n2"}, {"name": "n3"}],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 10,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "web",
                                "image": AGNHOST,
                                "args": ["serve-hostname"],
                                "ports": [{"containerPort": 9376}],
                            }
                        ]
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 9376}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client"},
            "spec": {"nodeName": "n1", "containers": [{"name": "pause", "image": "pause"}]},
        },
    ]


def _netsim(*argv: str) -> str:
    done = subprocess.run([*NETSIM, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class Load:
    """Fresh connections from the client pod to the ClusterIP, one after another per thread,
    each one GET answered in full: counted, failures kept with their reason."""

    def __init__(self, netns: str, address: tuple[str, int], threads: int = 2):
        self.netns, self.address = netns, address
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _one(self) -> None:
        with nsmod.entered(self.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(2)
            sock.connect(self.address)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        if not data.startswith(b"HTTP/1.") or b" 200 " not in data.split(b"\r\n", 1)[0]:
            raise OSError(f"answer {data[:40]!r}")

    def _run(self) -> None:
        deadline = time.monotonic() + 240  # bounded, whatever happens
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self._one()
                with self.lock:
                    self.ok += 1
            except OSError as exc:
                with self.lock:
                    self.failed.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


@pytest.mark.parametrize("proxy", ["nftables", "userspace"])
@pytest.mark.parametrize("mode", MODES)
def test_rolling_update_of_10_replicas_loses_no_request(tmp_path, mode, proxy):
    name = "roll" + uuid.uuid4().hex[:6]
    file = tmp_path / "rollout.yaml"
    file.write_text(yaml.safe_dump_all(_documents(name, mode, proxy), sort_keys=False))
    try:
        _netsim("apply", "-f", str(file))
        record = state.load(name)
        service = record.services["web"]
        load = Load(record.pods["client"].netns, (service.cluster_ip, 80))
        with load:
            time.sleep(1.0)  # the load runs before the update begins
            started = time.monotonic()
            _netsim(
                "set",
                "image",
                "deployment/web",
                "web=registry.k8s.io/e2e-test-images/agnhost:2.40",
                "--cluster",
                name,
            )
            status = _netsim(
                "rollout", "status", "deployment/web", "--timeout=120", "--cluster", name
            )
            took = time.monotonic() - started
            time.sleep(0.5)
        total = load.ok + len(load.failed)
        rate = load.ok / total if total else 0.0
        assert status.strip().endswith('deployment "web" successfully rolled out')
        print(
            f"\n{mode:<14} {proxy:<9} rollout of 10 replicas {took:5.2f} s (set image to rollout "
            f"status done); requests {load.ok}/{total} succeeded ({rate:.4%})"
            + (f"; first failure: {load.failed[0]}" if load.failed else "")
        )
        assert total > 100
        assert rate >= 0.999, load.failed[:5]
    finally:
        teardown.delete(name)
