"""Print netsim's figures as ratios to the ip -batch reference measured in the same run; lend
the suite's harness (tests/conftest.py) to the benchmarks that reuse its labs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "netsim_tests_conftest", Path(__file__).resolve().parent.parent / "tests" / "conftest.py"
)
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
needs_root, wait_for = _suite.needs_root, _suite.wait_for  # as tests/test_bgp_bird imports them
etcd = _suite.etcd  # a real etcd of the benchmark's own


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None)]
    medians = {b.name: b.stats.median for b in benches}
    lines = [
        f"{b.name}: agents' PSS {b.extra_info['agents_pss_mib']} MiB"
        for b in benches
        if "agents_pss_mib" in b.extra_info
    ]
    for name, ours in medians.items():
        for verb in ("apply", "delete"):
            ref = medians.get(name.replace(f"test_{verb}_netsim", f"test_{verb}_reference"))
            if name.startswith(f"test_{verb}_netsim") and ref:
                lines.append(
                    f"{name.replace('test_', '').replace('_netsim', '')}: netsim "
                    f"{ours:.3f}s, ip -batch reference {ref:.3f}s, "
                    f"ratio {ours / ref:.2f}x"
                )
    if lines:
        terminalreporter.write_sep("-", "netsim vs the ip -batch reference (medians)")
        for line in lines:
            terminalreporter.write_line(line)
