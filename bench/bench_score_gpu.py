"""GPU benchmark of the fused attribution score (+ histogram) and the exact global top-k mask.

For each GPU back end usable here (``cuda`` kernels, compiled ``triton``), on Llama-like tensor
shapes (bench/_common.model_like_shapes), reports:

* time per call (median of CUDA-event timings, ms);
* achieved GB/s for the score pass (bytes actually moved: inputs read + fp32 scores written) and
  as a fraction of a device copy probe (``dst.copy_(src)``, read + write) measured in the same run;
* the ratio against the PyTorch eager baselines measured in the same run: the score expression
  ``((w - g_r / gamma) * g_f).abs()`` per tensor, and ``torch.topk`` on the concatenated scores
  (+ scatter into a bool mask), the usual way to get a global top-k mask.

Usage: python bench/bench_score_gpu.py [--device cuda] [--numel 1e8] [--dtype float32]
       [--ratio 0.05] [--reps 10] [--backends cuda,triton] [--json PATH]
Without a CUDA device it prints why and exits with status 0 (nothing is measured).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cuda_copy_bandwidth, cuda_time, model_like_shapes, numel, print_table, write_json  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="a CUDA device, e.g. cuda or cuda:1")
    p.add_argument("--numel", type=float, default=1e8, help="total elements over all tensors")
    p.add_argument("--layers", type=int, default=24, help="decoder layers of the Llama-like shapes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of w, g_f, g_r")
    p.add_argument("--ratio", type=float, default=0.05, help="fraction selected by the top-k mask")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--backends", default="cuda,triton", help="comma-separated GPU back ends to try")
    p.add_argument("--json", default=None, help="output path (default bench/results/bench_score_gpu.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_score_gpu: no CUDA device (torch.cuda.is_available() is False); nothing measured.")
        return 0
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"bench_score_gpu: --device must be a CUDA device, got {args.device!r}")
        return 2
    torch.cuda.set_device(device)
    import wagle_ext
    from wagle_ext import ops

    dtype = DTYPES[args.dtype]
    shapes = model_like_shapes(args.numel, n_layers=args.layers)
    n = numel(shapes)
    gamma = 1e-6
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [(torch.randn(s, generator=gen, device=device) * 0.05).to(dtype) for s in shapes]
    gfs = [(torch.randn(s, generator=gen, device=device) * 1e-3).to(dtype) for s in shapes]
    grs = [(torch.randn(s, generator=gen, device=device) * 1e-6).to(dtype) for s in shapes]
    esize = ws[0].element_size()
    score_bytes = n * (3 * esize + 4)  # w, g_f, g_r read; fp32 score written
    k = int(n * args.ratio)

    bw = cuda_copy_bandwidth(device, 1 << 30, args.reps)
    # PyTorch eager baselines, same run.
    t_eager_score = cuda_time(
        lambda: [((w.float() - gr.float() / gamma) * gf.float()).abs() for w, gf, gr in zip(ws, gfs, grs)],
        args.reps)
    ref_scores = [((w.float() - gr.float() / gamma) * gf.float()).abs() for w, gf, gr in zip(ws, gfs, grs)]

    def torch_topk_mask():
        flat = torch.cat([s.reshape(-1) for s in ref_scores])
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
        mask[torch.topk(flat, k, sorted=False).indices] = True
        return mask

    t_topk = cuda_time(torch_topk_mask, max(3, args.reps // 2))

    rows = [
        {"op": "score", "backend": "torch eager", "ms": t_eager_score * 1e3,
         "gbs": score_bytes / t_eager_score / 1e9, "frac_copy": score_bytes / t_eager_score / bw, "ratio": 1.0},
        {"op": "topk mask", "backend": "torch.topk", "ms": t_topk * 1e3, "ratio": 1.0},
    ]
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if not ops._backend_has(backend, "attribution_score", device):
            print(f"bench_score_gpu: back end {backend!r} unavailable here, skipped ({ops.backend_info()})")
            continue
        os.environ["WAGLE_BACKEND"] = backend
        try:
            t_score = cuda_time(lambda: wagle_ext.attribution_scores(ws, gfs, grs, gamma=gamma, return_histogram=True),
                                args.reps)
            scores, hist = wagle_ext.attribution_scores(ws, gfs, grs, gamma=gamma, return_histogram=True)
            t_sel = cuda_time(lambda: wagle_ext.select_topk_mask(scores, k=k, histogram=hist), max(3, args.reps // 2))
            masks = wagle_ext.select_topk_mask(scores, k=k, histogram=hist)
            assert sum(m.nnz for m in masks) == k
        finally:
            del os.environ["WAGLE_BACKEND"]
        rows.append({"op": "score+hist", "backend": backend, "ms": t_score * 1e3, "gbs": score_bytes / t_score / 1e9,
                     "frac_copy": score_bytes / t_score / bw, "ratio": t_eager_score / t_score})
        rows.append({"op": "topk mask", "backend": backend, "ms": t_sel * 1e3, "ratio": t_topk / t_sel})

    print(f"device {torch.cuda.get_device_name(device)}; {len(shapes)} tensors, {n / 1e6:.1f}M elements "
          f"({args.dtype}); k = {k}; copy probe {bw / 1e9:.0f} GB/s (read + write)")
    print_table(rows, [("op", "op", "s"), ("backend", "backend", "s"), ("ms", "ms", ".2f"), ("gbs", "GB/s", ".0f"),
                       ("frac_copy", "of copy", ".2f"), ("ratio", "speed-up vs torch", ".2f")])
    write_json("bench_score_gpu", {
        "device": torch.cuda.get_device_name(device), "numel": n, "tensors": len(shapes), "dtype": args.dtype,
        "k": k, "copy_bytes_per_s": bw, "rows": rows,
        "note": "score GB/s counts inputs read + fp32 scores written; ratios are torch time / our time"},
        path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
