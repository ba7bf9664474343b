"""Exact global top-k mask over a model's worth of fp32 scores (issue 2 targets).

Scores: ``|w|`` of Llama-like weight tensors (``model_like_shapes``, ~200 tensors, per-tensor
scales), produced by the fused score kernel (``kind="magnitude"``) which also returns the level-0
key histogram. Rows per ratio:

* ``ours+hist``  -- ``select_topk_mask(scores, ratio=r, histogram=hist)`` (histogram from the
  score kernel: refinement histograms, then one mask pass -- fused with the last refinement when
  the boundary bucket is small (topk_mask_collect));
* ``ours``       -- the same without the histogram (one more pass over the scores);
* ``cat+topk``   -- ``torch.topk(torch.cat(flat scores), k, sorted=False)``;
* ``cat+kthvalue`` -- ``torch.kthvalue(torch.cat(flat scores), N - k + 1)`` (threshold only).

The baselines stop at indices / a threshold (no mask), which favours them. Bytes moved: ours =
(full passes over the scores, counted from the primitive calls of one run) x 4 B/elem + N/8 B of
mask bits; baselines = cat (4 B read + 4 B write) + one 4 B read. Peak extra RSS from one
separate call per row; our small per-tensor bit arrays reuse heap memory freed earlier, so ours is
also measured once on a fresh heap (first call, printed above the table).

    python bench/bench_select.py            # 1e8 elements (about 2-3 minutes on 2 cores)
    python bench/bench_select.py --n 1e6    # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import wagle_ext  # noqa: E402
from wagle_ext import ops  # noqa: E402
from _common import PeakRSS, copy_bandwidth, model_like_shapes, numel, print_table, timeit, write_json, run_gpu_twin_if_asked  # noqa: E402


def make_scores(n: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = []
    for i, shape in enumerate(model_like_shapes(n)):
        scale = 0.02 * (1.0 + (i % 7))  # per-tensor scale heterogeneity, as in a real model
        weights.append(torch.randn(*shape, generator=g).mul_(scale))
    scores, hist = wagle_ext.attribution_scores(weights, kind="magnitude", return_histogram=True)
    del weights
    return scores, hist


def count_passes(fn) -> int:
    """Full passes over the scores made by one call of fn (radix_histogram, count_key,
    topk_mask_bits and topk_mask_collect each read every score once)."""
    from wagle_ext.ops import _backends, select as ops_select  # modules that resolve kernels by _impl

    calls = {"n": 0}
    real = _backends._impl
    patched = (ops, ops_select, _backends)

    def counting(op, device):
        f = real(op, device)
        if op not in ("radix_histogram", "count_key", "topk_mask_bits", "topk_mask_collect"):
            return f

        def wrapped(*a, **kw):
            calls["n"] += 1
            return f(*a, **kw)

        return wrapped

    for mod in patched:
        mod._impl = counting
    try:
        fn()
    finally:
        for mod in patched:
            mod._impl = real
    return calls["n"]


def main(argv=None) -> None:
    run_gpu_twin_if_asked(argv, "bench_score_gpu")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:i] to run the GPU twin (bench_score_gpu.py)")
    ap.add_argument("--n", type=float, default=1e8, help="total score elements (default 1e8)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of our rows")
    ap.add_argument("--baseline-reps", type=int, default=3, help="timed repetitions of torch baselines")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.2, 0.8])
    ap.add_argument("--json", default=None, help="output path (default bench/results/select.json)")
    args = ap.parse_args(argv)

    print(f"backend: {wagle_ext.backend_info()}")
    bw = copy_bandwidth()
    scores, hist = make_scores(args.n)
    n = sum(s.numel() for s in scores)
    assert n == numel(model_like_shapes(args.n))
    print(f"{len(scores)} tensors, N = {n:,} fp32 scores ({4 * n / 2**20:.0f} MiB); "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write); threads {torch.get_num_threads()}\n")

    # Our extra memory, measured on a fresh heap before anything else runs: later calls reuse heap
    # memory freed by earlier ones, so their RSS barely moves (the column below is then ~0).
    with PeakRSS() as rss:
        out = wagle_ext.select_topk_mask(scores, ratio=args.ratios[0], histogram=hist)
    out_bytes = sum(m.bits.numel() for m in out)
    del out
    first_call_rss = rss.extra
    print(f"ours+hist, first call: extra RSS {first_call_rss / 2**20:.1f} MiB "
          f"({first_call_rss / n:.3f} B/elem); mask bits returned {out_bytes / 2**20:.1f} MiB (N/8)\n")

    rows = []
    for ratio in args.ratios:
        k = int(n * ratio)

        def ours_hist():
            return wagle_ext.select_topk_mask(scores, ratio=ratio, histogram=hist)

        def ours():
            return wagle_ext.select_topk_mask(scores, ratio=ratio)

        def cat_topk():
            flat = torch.cat([s.reshape(-1) for s in scores])
            return torch.topk(flat, k, sorted=False)

        def cat_kth():
            flat = torch.cat([s.reshape(-1) for s in scores])
            return torch.kthvalue(flat, n - k + 1)

        # Correctness guard: our masks select exactly k and agree with the kthvalue threshold.
        masks = ours_hist()
        assert sum(m.nnz for m in masks) == k
        thr = float(cat_kth().values)
        sel_min = min(float(s.reshape(-1)[m.to_bool().reshape(-1)].min()) for s, m in zip(scores, masks) if m.nnz)
        assert sel_min == thr, (sel_min, thr)
        del masks

        spec = [
            ("ours+hist", ours_hist, args.reps, None),
            ("ours", ours, args.reps, None),
            ("cat+topk", cat_topk, args.baseline_reps, 12 * n),
            ("cat+kthvalue", cat_kth, args.baseline_reps, 12 * n),
        ]
        results = {}
        for name, fn, reps, nbytes in spec:
            with PeakRSS() as rss:
                out = fn()  # also the warm-up; kept alive so the exit sample counts the output
            del out
            t = timeit(fn, reps=reps, warmup=0)
            passes = None
            if nbytes is None:
                passes = count_passes(fn)
                nbytes = passes * 4 * n + n // 8
            results[name] = t["median_s"]
            rows.append({
                "ratio": ratio, "row": name, "median_ms": 1e3 * t["median_s"], "min_ms": 1e3 * t["min_s"],
                "reps": reps, "passes": passes, "GB_per_s": nbytes / t["median_s"] / 1e9,
                "frac_copy_bw": nbytes / t["median_s"] / bw, "extra_rss_MiB": rss.extra / 2**20,
                "extra_rss_B_per_elem": rss.extra / n,
            })
        for r in rows[-4:]:
            r["x_vs_topk"] = results["cat+topk"] / results[r["row"]]
            r["x_vs_kthvalue"] = results["cat+kthvalue"] / results[r["row"]]

    print_table(rows, [
        ("ratio", "ratio", ".2f"), ("row", "row", "s"), ("median_ms", "median ms", ".1f"),
        ("min_ms", "min ms", ".1f"), ("reps", "reps", "d"), ("passes", "passes", "d"),
        ("x_vs_topk", "x topk", ".1f"), ("x_vs_kthvalue", "x kthvalue", ".1f"),
        ("GB_per_s", "GB/s", ".1f"), ("frac_copy_bw", "of copy bw", ".2f"),
        ("extra_rss_MiB", "extra RSS MiB", ".1f"), ("extra_rss_B_per_elem", "B/elem", ".3f"),
    ])
    write_json("select", {"n": n, "tensors": len(scores), "copy_bandwidth_Bps": bw,
                          "ours_first_call_extra_rss_B": first_call_rss, "mask_bits_B": out_bytes,
                          "rows": rows}, args.json)


if __name__ == "__main__":
    main()
