"""The `netsim bench` matrix through pytest-benchmark, so its figures land in
`--benchmark-json` and can be compared across commits: one cell per mode (pod to pod across
nodes) with the floor measured in the same run; the figures are in each benchmark's extra_info.

    .venv/bin/python -m pytest bench/test_matrix.py --benchmark-json=matrix.json
"""

from __future__ import annotations

import os

import pytest

from netsim import bench

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.mark.parametrize("mode", bench.MODES)
def test_mode_cross_node(benchmark, mode):
    options = bench.Options(modes=[mode], paths=["pod-cross-node"], repetitions=1, seconds=1)
    result = benchmark.pedantic(bench.run, args=(options,), rounds=1, iterations=1)
    cell = next(r for r in result["medians"] if r["mode"] == mode and
                r["path"] == "pod-cross-node")
    benchmark.extra_info.update({k: v for k, v in cell.items() if v is not None})
    benchmark.extra_info["carrier"] = result["modes"][mode]["carrier"]
    assert cell["tcp_gbps"] > 0
