"""GPU benchmark of one masked AdamW step (``wagle::masked_adamw_``) over Llama-like tensor lists.

For each GPU back end usable here (``cuda`` kernels: one launch for the list; compiled ``triton``:
one launch per tensor), at each mask density, reports:

* time per step (median of CUDA-event timings, ms), state steps on the CPU as MaskedAdamW keeps
  them (so the timed call includes the per-call host work and its one flag read);
* GB/s of the bytes the step must move at that density (random mask: bits + the 32-byte sectors of
  p/g that hold a selected element, read p and g, write p; + 16 B per selected element for m and v)
  and that as a fraction of a device copy probe (``dst.copy_(src)``, read + write) of the same run;
* the ratio against ``torch.optim.AdamW(fused=True)`` on the same tensors (the dense fused step that
  a masked update replaces: grad *= mask would still pay it in full).

With ``--dtype bfloat16 --master`` (or float16) the masked step keeps compact fp32 master weights
(``wagle::masked_adamw_master_``, what MaskedAdamW does for bf16/fp16 by default; ``--rounding
stochastic`` adds seeds): + 8 B per selected element (read and write the master copy), and p is
only written there. torch fused AdamW on the same bf16 tensors keeps bf16 state.

Usage: python bench/bench_adamw_gpu.py [--device cuda] [--numel 1e8] [--dtype float32]
       [--densities 0.01,0.05,0.3,1] [--reps 10] [--backends cuda,triton] [--master]
       [--rounding nearest|stochastic] [--json PATH]
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
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of params and grads")
    p.add_argument("--densities", default="0.01,0.05,0.3,1", help="comma-separated mask densities")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--backends", default="cuda,triton", help="comma-separated GPU back ends to try")
    p.add_argument("--master", action="store_true", help="compact fp32 master weights (bf16/fp16 dtypes)")
    p.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest")
    p.add_argument("--json", default=None, help="output path (default bench/results/bench_adamw_gpu.json)")
    return p.parse_args(argv)


def needed_bytes(n: int, esize: int, density: float, master: bool = False) -> float:
    """Bytes a masked step must move for a random mask of this density (see the module doc); with
    master weights p is only written (2 sectors' worth instead of 3) and the master copy is read
    and written (8 B per selected element)."""
    per_sector = 32 // esize
    touched = 1.0 - (1.0 - density) ** per_sector
    return n / 8 + (2 if master else 3) * n * esize * touched + (24 if master else 16) * n * density


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_adamw_gpu: no CUDA device (torch.cuda.is_available() is False); nothing measured.")
        return 0
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"bench_adamw_gpu: --device must be a CUDA device, got {args.device!r}")
        return 2
    torch.cuda.set_device(device)
    from wagle_ext import ops
    from wagle_ext.kernels import triton as tk

    dtype = DTYPES[args.dtype]
    if args.master and dtype == torch.float32:
        print("bench_adamw_gpu: --master needs --dtype bfloat16 or float16 (fp32 params are their own master)")
        return 2
    shapes = model_like_shapes(args.numel, n_layers=args.layers)
    n = numel(shapes)
    esize = torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(0)
    ps = [(torch.randn(s, generator=gen, device=device) * 0.05).to(dtype) for s in shapes]
    gs = [(torch.randn(s, generator=gen, device=device) * 1e-3).to(dtype) for s in shapes]
    bw = cuda_copy_bandwidth(device, 1 << 30, args.reps)

    # torch.optim.AdamW(fused=True): the dense step on the same tensors.
    tparams = [torch.nn.Parameter(p.clone()) for p in ps]
    for tp, g in zip(tparams, gs):
        tp.grad = g.clone()
    topt = torch.optim.AdamW(tparams, lr=1e-4, weight_decay=0.1, fused=True)
    t_torch = cuda_time(topt.step, args.reps)
    del topt, tparams
    rows = [{"backend": "torch fused", "density": 1.0, "ms": t_torch * 1e3,
             "gbs": needed_bytes(n, esize, 1.0) / t_torch / 1e9,
             "frac_copy": needed_bytes(n, esize, 1.0) / t_torch / bw, "ratio": 1.0}]

    for density in [float(d) for d in args.densities.split(",") if d.strip()]:
        sels = [torch.rand(s, generator=gen, device=device) < density for s in shapes]
        bits = [ops.pack_bits(m) for m in sels]
        dirs = [ops.masked_adamw_chunk_offsets(b, m.numel()) for b, m in zip(bits, sels)]
        nnzs = [int(d[-1]) for d in dirs]
        ms = [torch.zeros(k, device=device) for k in nnzs]
        vs = [torch.zeros(k, device=device) for k in nnzs]
        steps = [torch.tensor(1.0) for _ in shapes]  # CPU steps, as MaskedAdamW keeps them
        e32 = torch.empty(0, dtype=torch.int32, device=device)
        kw = dict(lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
                  weight_decay_mode="masked", grad_scale=None, found_inf=None, torch_tail=8)
        need = needed_bytes(n, esize, density, args.master)
        op = "masked_adamw_master_" if args.master else "masked_adamw_"
        if args.master:
            mws = [ops.gather_masked(p, b, d) for p, b, d in zip(ps, bits, dirs)]
            if args.rounding == "stochastic":
                kw["rounding_seeds"] = list(range(1, len(ps) + 1))
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if not ops._backend_has(backend, op, device):
                print(f"bench_adamw_gpu: back end {backend!r} unavailable here, skipped")
                continue
            fn = getattr(torch.ops.wagle, op) if backend == "cuda" else getattr(tk, op)
            extra = (mws,) if args.master else ()
            t = cuda_time(lambda: fn(ps, gs, ms, vs, [], steps, bits, dirs, [e32] * len(ps), *extra, **kw), args.reps)
            rows.append({"backend": backend, "density": density, "ms": t * 1e3, "gbs": need / t / 1e9,
                         "frac_copy": need / t / bw, "ratio": t_torch / t})
        del sels, bits, dirs, ms, vs

    print(f"device {torch.cuda.get_device_name(device)}; {len(shapes)} tensors, {n / 1e6:.1f}M elements "
          f"({args.dtype}{', fp32 master weights, ' + args.rounding if args.master else ''}); copy probe {bw / 1e9:.0f} GB/s (read + write)")
    print_table(rows, [("backend", "backend", "s"), ("density", "density", ".2f"), ("ms", "ms", ".2f"),
                       ("gbs", "GB/s", ".0f"), ("frac_copy", "of copy", ".2f"),
                       ("ratio", "speed-up vs torch fused", ".2f")])
    write_json("bench_adamw_gpu", {
        "device": torch.cuda.get_device_name(device), "numel": n, "tensors": len(shapes), "dtype": args.dtype,
        "master_weights": args.master, "rounding": args.rounding if args.master else None,
        "copy_bytes_per_s": bw, "rows": rows,
        "note": "GB/s counts the bytes a masked step must move at that density (random mask); "
                "ratios are torch fused AdamW time / our time"}, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
