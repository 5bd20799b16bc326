"""Print netsim's figures as ratios to the ip -batch reference measured in the same run."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None)]
    medians = {b.name.split("[")[0]: b.stats.median for b in benches}
    lines = [f"{b.name}: agents' RSS {b.extra_info['agents_rss_mib']} MiB" for b in benches
             if "agents_rss_mib" in b.extra_info]
    for verb in ("apply", "delete"):
        ours, ref = medians.get(f"test_{verb}_netsim"), medians.get(f"test_{verb}_reference")
        if ours and ref:
            lines.append(f"{verb}: netsim {ours:.3f}s, ip -batch reference {ref:.3f}s, "
                         f"ratio {ours / ref:.2f}x")
    if lines:
        terminalreporter.write_sep("-", "netsim vs the ip -batch reference (medians)")
        for line in lines:
            terminalreporter.write_line(line)
