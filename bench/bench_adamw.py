"""MaskedAdamW step time and state size vs torch AdamW (fused / foreach) with ``grad *= mask``.

Model-like tensor shapes (~200 tensors), fp32 params and grads; densities 1.0 .. 0.01; random masks
(independent bits) and clustered masks (contiguous 256-element runs, like attribution masks).
Baselines are timed on the plain step (the ``grad *= mask`` multiply is NOT included, which favours
them). Every MaskedAdamW configuration is timed right next to a fresh torch-fused timing on the same
tensors and the ratio uses that pair (min over reps, robust to a shared, noisy machine).
Bandwidth: dense-equivalent 28 B/param/step divided by time, as a fraction of a copy probe
measured in the same run.

bf16 rows (``--bf16-densities``, default 1.0 and 0.1 clustered; ``--bf16-densities`` with no value
skips them): bf16 params and grads, MaskedAdamW with compact fp32 master weights (the default for
bf16) against torch AdamW(fused=True) on the same bf16 params (bf16 state), each timed next to a
fresh torch timing. Bytes counted per step: torch fused bf16 reads p, g, m, v and writes p, m, v =
14 B/param; MaskedAdamW with master weights reads g (2), master, m, v (12) and writes p (2),
master, m, v (12) = 26 B per selected element, plus n/8 B of mask bits. "% copy" of those bytes
over time, against the copy probe.

    python bench/bench_adamw.py [--sizes 5e7 1e8] [--densities 1 0.5 0.2 0.1 0.01] [--reps 3]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_bandwidth, model_like_shapes, numel, print_table, timeit, write_json, run_gpu_twin_if_asked  # noqa: E402

import wagle_ext  # noqa: E402
from wagle_ext import MaskedAdamW, PackedMask  # noqa: E402

DENSE_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq per param
DENSE_TRAFFIC = 28     # B/param/step of fused AdamW (docs/kernels.md 2.3)


def make_masks(params, density: float, kind: str, gen: torch.Generator) -> list:
    masks = []
    for p in params:
        n = p.numel()
        if density >= 1.0:
            sel = torch.ones(n, dtype=torch.bool)
        elif kind == "random":
            sel = torch.rand(n, generator=gen) < density
        else:  # clustered: 256-element runs
            blocks = (n + 255) // 256
            sel = (torch.rand(blocks, generator=gen) < density).repeat_interleave(256)[:n]
        masks.append(PackedMask.from_bool(sel.view(p.shape)))
        del sel
    return masks


TORCH_BF16_TRAFFIC = 14  # B/param/step of torch fused AdamW on bf16 params with bf16 state
MASTER_TRAFFIC = 26      # B/selected element/step of MaskedAdamW bf16 + fp32 master weights


def bf16_rows(shapes, args, copy_bps: float, gen: torch.Generator) -> list:
    """bf16 params: MaskedAdamW with compact fp32 master weights vs torch AdamW(fused) on bf16."""
    rows = []
    n = numel(shapes)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(torch.bfloat16)
    fused = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
    fused.step()
    t0 = timeit(fused.step, reps=args.reps, warmup=1)["min_s"]
    rows.append({"params": n, "tensors": len(shapes), "impl": "torch fused bf16", "mask": "-", "density": 1.0,
                 "ms": t0 * 1e3, "vs_fused": 1.0, "state_MB": n * 4 / 2**20, "state_ratio": 1.0,
                 "GBps": TORCH_BF16_TRAFFIC * n / t0 / 1e9, "pct_copy": 100 * TORCH_BF16_TRAFFIC * n / t0 / copy_bps})
    runs = [(d, "nearest") for d in args.bf16_densities] + [(args.bf16_densities[0], "stochastic")]
    for d, rounding in runs:
        masks = make_masks(params, d, "clustered", gen)
        # master_weights: on for bf16 (the default)
        opt = MaskedAdamW(params, masks=masks, lr=1e-5, weight_decay=0.1, rounding=rounding)
        opt.step()
        t = timeit(opt.step, reps=args.reps, warmup=1)["min_s"]
        tf = timeit(fused.step, reps=args.reps, warmup=0)["min_s"]
        sb = opt.state_bytes()
        nnz = sum(int(opt.state[p]["exp_avg"].numel()) for p in params if p in opt.state)
        moved = MASTER_TRAFFIC * nnz + (n / 8 if d < 1 else 0)
        rows.append({"params": n, "tensors": len(shapes),
                     "impl": "MaskedAdamW bf16+master" + (" SR" if rounding == "stochastic" else ""),
                     "mask": "clustered" if d < 1 else "full", "density": d, "ms": t * 1e3, "fused_ms": tf * 1e3,
                     "vs_fused": t / tf, "speedup": tf / t, "state_MB": sb["total"] / 2**20,
                     "state_ratio": sb["total"] / (n * 4), "GBps": moved / t / 1e9,
                     "pct_copy": 100 * moved / t / copy_bps})
        print(f"  {n:.2e} bf16+master {rounding:10s} d={d:<5} {t * 1e3:8.1f} ms (torch fused bf16 {tf * 1e3:.1f})  x{tf / t:5.2f}  "
              f"{moved / t / 1e9:.1f} GB/s = {100 * moved / t / copy_bps:.0f}% of copy", flush=True)
        del opt, masks
        gc.collect()
    del params, fused
    gc.collect()
    return rows


def main(argv=None) -> None:
    run_gpu_twin_if_asked(argv, "bench_adamw_gpu")
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:i] to run the GPU twin (bench_adamw_gpu.py)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[5e7, 1e8])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.01])
    ap.add_argument("--kinds", nargs="+", default=["random", "clustered"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-foreach", action="store_true", help="skip the (slow) foreach baseline")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (1 gives steadier ratios on a shared machine)")
    ap.add_argument("--bf16-densities", type=float, nargs="*", default=[1.0, 0.1],
                    help="densities of the bf16 + master-weights rows (clustered masks below 1); none: skip")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    copy_bps = copy_bandwidth()
    print(f"copy probe: {copy_bps / 1e9:.1f} GB/s (read + write); backends: {wagle_ext.backend_info()}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        shapes = model_like_shapes(size, n_layers=22)
        n = numel(shapes)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3

        base = {}
        for name, kw in (("fused", dict(fused=True)), ("foreach", dict(foreach=True))):
            if name == "foreach" and args.no_foreach:
                continue
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, **kw)
            opt.step()  # allocate state
            t = timeit(opt.step, reps=args.reps, warmup=1)["min_s"]
            base[name] = t
            rows.append({"params": n, "tensors": len(shapes), "impl": f"torch {name}", "mask": "-", "density": 1.0,
                         "ms": t * 1e3, "vs_fused": t / base["fused"], "state_MB": n * DENSE_STATE_BYTES / 2**20,
                         "state_ratio": 1.0, "GBps": DENSE_TRAFFIC * n / t / 1e9,
                         "pct_copy": 100 * DENSE_TRAFFIC * n / t / copy_bps})
            if name == "fused":
                fused_opt = opt
            else:
                del opt
            gc.collect()

        for kind in args.kinds:
            for d in args.densities:
                if d >= 1.0 and kind != args.kinds[0]:
                    continue  # a full mask is the same for every kind
                masks = make_masks(params, d, kind, gen)
                opt = MaskedAdamW(params, masks=masks, lr=1e-5, weight_decay=0.1)
                opt.step()
                t = timeit(opt.step, reps=args.reps, warmup=1)["min_s"]
                tf = timeit(fused_opt.step, reps=args.reps, warmup=0)["min_s"]
                sb = opt.state_bytes()
                rows.append({"params": n, "tensors": len(shapes), "impl": "MaskedAdamW",
                             "mask": kind if d < 1 else "full", "density": d, "ms": t * 1e3,
                             "fused_ms": tf * 1e3, "vs_fused": t / tf, "speedup": tf / t,
                             "state_MB": sb["total"] / 2**20,
                             "state_ratio": sb["total"] / (n * DENSE_STATE_BYTES),
                             "GBps": DENSE_TRAFFIC * n / t / 1e9,
                             "pct_copy": 100 * DENSE_TRAFFIC * n / t / copy_bps})
                print(f"  {n:.2e} {kind:9s} d={d:<5} {t * 1e3:8.1f} ms (fused {tf * 1e3:.1f})  x{tf / t:5.2f} vs fused  "
                      f"state {sb['total'] / (n * DENSE_STATE_BYTES):.4f} of dense", flush=True)
                del opt, masks
                gc.collect()
        del params, fused_opt
        gc.collect()
        if args.bf16_densities:
            rows += bf16_rows(shapes, args, copy_bps, gen)

    print()
    print_table(rows, [("params", "params", ".2e"), ("tensors", "tensors", "d"), ("impl", "impl", "s"),
                       ("mask", "mask", "s"), ("density", "density", "g"), ("ms", "ms/step", ".1f"), ("fused_ms", "fused ms", ".1f"),
                       ("vs_fused", "time/fused", ".3f"), ("speedup", "speedup", ".2f"),
                       ("state_MB", "state MB", ".1f"), ("state_ratio", "state/dense", ".4f"),
                       ("GBps", "dense-eq GB/s", ".1f"), ("pct_copy", "% copy", ".0f")])
    write_json("bench_adamw", {"copy_GBps": copy_bps / 1e9, "dense_traffic_B_per_param": DENSE_TRAFFIC,
                               "rows": rows}, path=args.json)


if __name__ == "__main__":
    main()
