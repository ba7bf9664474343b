"""Summarise the statistics that the statistical tests record (conftest's ``record_stat``).

    python tools/calibrate_stats.py build/stress/stats.jsonl [--markdown]

For every (test, statistic): the number of runs, min, max, mean, and the configuration (seed,
threads, ATen capability, WAGLE_CPU_ISA) of each extreme. A bound in a test is set from these
extremes with a margin; docs/testing.md keeps the table of bounds and measured extremes.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def summarise(rows):
    groups = defaultdict(list)
    for r in rows:
        groups[(r["test"], r["stat"])].append(r)
    out = []
    for (test, stat), rs in sorted(groups.items()):
        vals = [r["value"] for r in rs]
        lo = min(rs, key=lambda r: r["value"])
        hi = max(rs, key=lambda r: r["value"])
        cfg = lambda r: f"seed={r['seed']} t={r['threads']} {r['aten_cpu'] or '-'}/{r['wagle_isa'] or '-'}"  # noqa: E731
        out.append({"test": test, "stat": stat, "n": len(vals), "min": min(vals), "max": max(vals),
                    "mean": statistics.fmean(vals), "argmin": cfg(lo), "argmax": cfg(hi)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stats", help="JSON-lines file written through WAGLE_STATS_FILE")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    with open(args.stats) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        print("no statistics recorded")
        return 0
    table = summarise(rows)
    if args.markdown:
        print("| test | statistic | runs | min | max | mean | min at | max at |")
        print("|---|---|---|---|---|---|---|---|")
        for t in table:
            print(f"| {t['test']} | {t['stat']} | {t['n']} | {t['min']:.4g} | {t['max']:.4g} | {t['mean']:.4g} "
                  f"| {t['argmin']} | {t['argmax']} |")
    else:
        for t in table:
            print(f"{t['test']:<70} {t['stat']:<18} n={t['n']:<3} min={t['min']:<10.4g} max={t['max']:<10.4g} "
                  f"mean={t['mean']:<10.4g} (min at {t['argmin']}; max at {t['argmax']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
