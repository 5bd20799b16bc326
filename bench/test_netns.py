"""Removing many named namespaces: one by one (as `ip netns del` does) against all at once
with the tmpfs they are mounted on (as `netsim delete` does).

    NETSIM_NETNS_COUNT=5000 .venv/bin/python -m pytest bench/test_netns.py \\
        --benchmark-columns=min,median,max

Each unmount costs the kernel more the more mounts there are beside it; the tmpfs goes with a
single unmount, and what is left is unlinking the names in /run/netns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest
from conftest import needs_root

from netsim.kernel import netns as nsmod

pytestmark = needs_root
COUNT = int(os.environ.get("NETSIM_NETNS_COUNT", "2000"))


@pytest.fixture
def group():
    tag = uuid.uuid4().hex[:6]
    root = tempfile.mkdtemp(prefix="netsim-bench-netns-")
    under = os.path.join(root, tag)
    names = [f"netsim.bns{tag}.{i}" for i in range(COUNT)]
    yield under, names
    nsmod.unlink_all(under, names)
    nsmod.remove_group(under)
    shutil.rmtree(root, ignore_errors=True)


def _made(under: str, names: list[str]):
    for name in names:
        nsmod.create(name, under=under, file=name.rsplit(".", 1)[1])
    return (under, names), {}


def test_remove_one_by_one(benchmark, group):
    under, names = group

    def remove(under, names):
        for name in names:
            assert nsmod.remove(name)

    benchmark.pedantic(remove, setup=lambda: _made(under, names), rounds=2, iterations=1)


def test_remove_with_one_unmount(benchmark, group):
    under, names = group

    def remove(under, names):
        assert len(nsmod.unlink_all(under, names)) == len(names)
        nsmod.remove_group(under)

    benchmark.pedantic(remove, setup=lambda: _made(under, names), rounds=2, iterations=1)
