"""Benchmark: fused attribution score (+ histogram) vs eager PyTorch, on a model's worth of tensors.

Rows (kind="wagle", constant gamma; and with a diagonal Hessian tensor):
  * eager, fresh outputs     -- ``((w - g_r / gamma) * g_f).abs()`` per tensor, as research code writes it
  * eager, preallocated      -- the same expression with ``out=``/in-place into preallocated buffers
  * wagle_ext, fresh outputs -- ``attribution_scores(...)`` (scores + fused 11-bit histogram)
  * wagle_ext, out=          -- ``attribution_scores(..., out=bufs)`` (+ histogram)
  * wagle_ext, no histogram  -- scores only (``return_histogram=False``), for reference

Bytes moved per element: 16 (read w, g_f, g_r; write s), 20 with a Hessian tensor. Achieved GB/s
is reported as a fraction of the copy bandwidth (read + write) measured in the same run.

    python bench/bench_score.py [--n 1e8] [--reps 5] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PeakRSS, copy_bandwidth, model_like_shapes, numel, print_table, timeit, write_json, run_gpu_twin_if_asked  # noqa: E402

import wagle_ext  # noqa: E402


def main(argv=None):
    run_gpu_twin_if_asked(argv, "bench_score_gpu")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:i] to run the GPU twin (bench_score_gpu.py)")
    ap.add_argument("--n", type=float, default=1e8, help="total elements (default 1e8)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the weights (gradient accumulators stay float32)")
    ap.add_argument("--json", default=None, help="output path (default bench/results/bench_score.json)")
    args = ap.parse_args(argv)

    info = wagle_ext.backend_info()
    if not info["cpp"]:
        sys.exit(f"the C++ extension is not built: {info['cpp_error']}")
    shapes = model_like_shapes(args.n)
    n = numel(shapes)
    wdtype = getattr(torch, args.dtype)
    gamma = 1e-6
    print(f"{len(shapes)} tensors, {n:,} elements, weights {args.dtype}, threads {torch.get_num_threads()}, "
          f"cpu_isa {info['cpu_isa']}")

    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=gen).mul_(0.02).to(wdtype) for s in shapes]
    gfs = [torch.randn(s, generator=gen).mul_(1e-3) for s in shapes]
    grs = [torch.randn(s, generator=gen).mul_(1e-6) for s in shapes]
    hs = [torch.rand(s, generator=gen).mul_(1e-3) for s in shapes]
    outs = [torch.empty(s) for s in shapes]
    for o in outs:
        o.zero_()  # fault the pages in: preallocated means resident

    bw = copy_bandwidth()
    print(f"copy bandwidth probe: {bw / 1e9:.1f} GB/s (read + write)")
    wbytes = torch.empty(0, dtype=wdtype).element_size()

    def eager_fresh(hessian):
        if hessian:
            return [((w - gr / (h + 1e-8)) * gf).abs() for w, gf, gr, h in zip(ws, gfs, grs, hs)]
        return [((w - gr / gamma) * gf).abs() for w, gf, gr in zip(ws, gfs, grs)]

    def eager_prealloc(hessian):
        for w, gf, gr, h, o in zip(ws, gfs, grs, hs, outs):
            if hessian:
                torch.add(h, 1e-8, out=o)
                torch.div(gr, o, out=o)
            else:
                torch.div(gr, gamma, out=o)
            torch.sub(w, o, out=o)
            torch.mul(o, gf, out=o)
            torch.abs(o, out=o)

    def ours_fresh(hessian):
        return wagle_ext.attribution_scores(ws, gfs, grs, gamma=gamma, hessian=hs if hessian else None,
                                            return_histogram=True)

    def ours_out(hessian):
        return wagle_ext.attribution_scores(ws, gfs, grs, gamma=gamma, hessian=hs if hessian else None,
                                            out=outs, return_histogram=True)

    def ours_out_nohist(hessian):
        return wagle_ext.attribution_scores(ws, gfs, grs, gamma=gamma, hessian=hs if hessian else None,
                                            out=outs)

    # Correctness guard: the fused kernel must agree with the eager expression (same float32 ops).
    for hessian in (False, True):
        ref = eager_fresh(hessian)
        got = ours_fresh(hessian)[0]
        bad = sum(int((a != b).sum()) for a, b in zip(ref, got))
        if wdtype == torch.float32 and bad:
            sys.exit(f"fused scores differ from the eager expression in {bad} elements (hessian={hessian})")
        del ref, got

    rows = []
    for hessian in (False, True):
        nbytes = n * (wbytes + 4 + 4 + (4 if hessian else 0) + 4)
        label = "wagle + hessian" if hessian else "wagle (gamma)"
        cases = [("eager, fresh outputs", eager_fresh), ("eager, preallocated", eager_prealloc),
                 ("wagle_ext, fresh outputs", ours_fresh), ("wagle_ext, out=", ours_out),
                 ("wagle_ext, out=, no histogram", ours_out_nohist)]
        times = {}
        for name, fn in cases:
            with PeakRSS() as mem:
                r = fn(hessian)
                del r
            t = timeit(lambda: fn(hessian), reps=args.reps, warmup=1)
            times[name] = t["median_s"]
            rows.append({"kind": label, "impl": name, "median_s": t["median_s"], "min_s": t["min_s"],
                         "gbps": nbytes / t["median_s"] / 1e9, "frac_copy_bw": nbytes / t["median_s"] / bw,
                         "extra_mem_mb": mem.extra / 2**20, "bytes_per_elem": nbytes / n})
        for r in rows[-len(cases):]:
            r["speedup_vs_eager_fresh"] = times["eager, fresh outputs"] / r["median_s"]
            r["speedup_vs_eager_prealloc"] = times["eager, preallocated"] / r["median_s"]

    for r in rows:
        r["median_ms"] = r["median_s"] * 1e3
    print()
    print_table(rows, [("kind", "kind", "s"), ("impl", "impl", "s"), ("median_ms", "median ms", ".1f"),
                       ("speedup_vs_eager_fresh", "x eager fresh", ".2f"),
                       ("speedup_vs_eager_prealloc", "x eager prealloc", ".2f"), ("gbps", "GB/s", ".1f"),
                       ("frac_copy_bw", "of copy BW", ".0%"), ("extra_mem_mb", "extra MiB", ".0f")])
    write_json("bench_score", {"n": n, "tensors": len(shapes), "weight_dtype": args.dtype, "gamma": gamma,
                               "copy_bandwidth_gbps": bw / 1e9, "backend": info, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
