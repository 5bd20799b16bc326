"""The `netsim bench` matrix through pytest-benchmark, so its figures land in
`--benchmark-json` and can be compared across commits: every cell (mode x path), each with the
floor measured in the same run, and the MSS and datagram-size sweeps per mode; the figures are
in each benchmark's extra_info (the time measured is that of the whole measurement).

    .venv/bin/python -m pytest bench/test_matrix.py --benchmark-json=matrix.json
"""

from __future__ import annotations

import os

import pytest

from netsim import bench

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.mark.parametrize("path", bench.PATHS)
@pytest.mark.parametrize("mode", bench.MODES)
def test_cell(benchmark, mode, path):
    options = bench.Options(modes=[mode], paths=[path], repetitions=1, seconds=1)
    result = benchmark.pedantic(bench.run, args=(options,), rounds=1, iterations=1)
    cell = next(r for r in result["medians"] if r["mode"] == mode and r["path"] == path)
    benchmark.extra_info.update({k: v for k, v in cell.items() if v is not None})
    benchmark.extra_info["carrier"] = result["modes"][mode]["carrier"]
    assert cell["tcp_gbps"] > 0


@pytest.mark.parametrize("mode", bench.MODES)
def test_sweeps(benchmark, mode):
    options = bench.Options(
        modes=[mode], paths=["pod-cross-node"], repetitions=1, seconds=1, sweep=True
    )
    result = benchmark.pedantic(bench.run, args=(options,), rounds=1, iterations=1)
    sweep = result["sweep"][mode]
    benchmark.extra_info.update({f"tcp_gbps_mss_{mss}": v for mss, v in sweep.items()})
    for size, cell in result["udp_sweep"][mode].items():
        benchmark.extra_info[f"udp_gbps_len_{size}"] = cell["gbps"]
        benchmark.extra_info[f"udp_loss_pct_len_{size}"] = cell["loss_pct"]
    assert all(v > 0 for v in sweep.values())
