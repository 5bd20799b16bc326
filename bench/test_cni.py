"""One pod's CNI ADD and DEL: in-process (what netsim calls when it builds a cluster) and the
executable as a container runtime starts it (fork, setns into the node, exec, stdin/stdout).

    .venv/bin/python -m pytest bench/test_cni.py --benchmark-columns=min,median,max

Goals (issue 3): in-process ADD median <= 5 ms; the executable's ADD <= 150 ms.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import uuid

import pytest

from cni import commands, plugin, spec
from netsim.kernel import netns as nsmod

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
ROUNDS = 40


@pytest.fixture
def node(tmp_path):
    """A throwaway node namespace (with forwarding, as flanneld leaves it) and its config."""
    prefix = f"netsim.bc{uuid.uuid4().hex[:6]}"
    made = [f"{prefix}.node"]
    nsmod.create(made[0])
    conf = {
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "netsim",
        "mode": "flannel-host-gw",
        "node": {"network": "10.244.0.0/16", "subnet": "10.244.0.0/20", "mtu": 1450},
        "ipam": {
            "type": "netsim-host-local",
            "routes": [{"dst": "10.244.0.0/16"}],
            "dataDir": str(tmp_path),
        },
    }
    counter = itertools.count()

    def new_pod() -> str:
        name = f"{prefix}.p{next(counter)}"
        nsmod.create(name)
        made.append(name)
        return name

    yield made[0], conf, new_pod
    for name in made:
        nsmod.remove(name)


def _env(command: str, pod: str) -> spec.Env:
    return spec.Env(command, pod.rsplit(".", 1)[1], nsmod.path(pod), "eth0")


def test_add_in_process(benchmark, node):
    netns, raw, new_pod = node
    conf = spec.parse_conf(json.dumps(raw).encode(), "ADD")
    result = benchmark.pedantic(
        lambda pod: commands.add(conf, _env("ADD", pod), netns),
        setup=lambda: ((new_pod(),), {}),
        rounds=ROUNDS,
    )
    assert result["ips"][0]["address"].startswith("10.244.")


def test_del_in_process(benchmark, node):
    netns, raw, new_pod = node
    conf = spec.parse_conf(json.dumps(raw).encode(), "DEL")

    def added():
        pod = new_pod()
        commands.add(conf, _env("ADD", pod), netns)
        return (pod,), {}

    benchmark.pedantic(
        lambda pod: commands.delete(conf, _env("DEL", pod), netns), setup=added, rounds=ROUNDS
    )


def test_add_executable(benchmark, node, tmp_path):
    """The launcher `netsim cni install` writes, started as containerd starts a plugin."""
    netns, raw, new_pod = node
    stdin = json.dumps(raw).encode()
    executable = plugin.install(str(tmp_path / "bin"))

    def run(pod: str) -> subprocess.CompletedProcess:
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": pod.rsplit(".", 1)[1],
            "CNI_NETNS": nsmod.path(pod),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/usr/lib/cni",
            "PATH": os.environ["PATH"],
        }
        return subprocess.run(
            [executable],
            input=stdin,
            env=env,
            capture_output=True,
            preexec_fn=lambda: nsmod.enter_for_exec(netns),
        )

    done = benchmark.pedantic(run, setup=lambda: ((new_pod(),), {}), rounds=ROUNDS // 2)
    assert done.returncode == 0, done.stdout
