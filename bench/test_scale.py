"""The scale benchmark: one cluster of N pods (100 per node) per mode, built, checked (first pod
to last, the Service), re-applied and deleted; pods per second, the agents' and the kernel's
memory in extra_info. `netsim bench --scale` runs the whole curve (500 to 10,000 pods)."""

from __future__ import annotations

import os

import pytest

from netsim import scale

SIZES = [int(n) for n in os.environ.get("NETSIM_SCALE_SIZES", "1000").split(",")]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")


@pytest.mark.parametrize("pods", SIZES)
@pytest.mark.parametrize("mode", scale.default_modes())
def test_scale(benchmark, mode, pods):
    points = []
    benchmark.pedantic(lambda: points.append(scale.measure(mode, pods)), rounds=1, iterations=1)
    point = points[0]
    benchmark.extra_info.update(
        {
            k: round(v, 2) if isinstance(v, float) else v
            for k, v in scale.as_json([point])[0].items()
        }
    )
    assert point.reached and not point.errors, point
