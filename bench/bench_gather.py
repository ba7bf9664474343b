"""gather_masked (the compact-gradient hook's one pass: dense gradient -> fp32 buffer of its masked
entries) vs PyTorch's ways of doing the same, per tensor over model-like shapes (fp32 gradients):

  ours:          ``wagle_ext.gather_masked(g, bits, dir, out=buf)`` (bit mask, 1 bit/param)
  masked_select: ``torch.masked_select(g, bool_mask, out=buf)`` (dense bool mask kept, 1 B/param)
  index_select:  ``torch.index_select(g.view(-1), 0, idx, out=buf)`` (int64 indices kept, 8 B/selected)

Densities 0.05 / 0.2; random masks (independent bits) and clustered (256-element runs). Bandwidth:
the bytes the kernel must move -- 1/8 B/param of bits, the 64-byte lines of the gradient that hold a
selected element (read), 4 B per selected element (written) -- as a fraction of a copy probe
measured in the same run. (A clustered mask skips most lines: the time of a full pass over the
gradient, 4 B/param, is the other yardstick: ``full-pass BW``.)

    python bench/bench_gather.py [--size 1e8] [--densities 0.05 0.2] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_bandwidth, model_like_shapes, numel, print_table, timeit, write_json  # noqa: E402

from wagle_ext import PackedMask, ops  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1e8)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--kinds", nargs="+", default=["random", "clustered"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shapes = model_like_shapes(args.size)
    n_total = numel(shapes)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    bw = copy_bandwidth()
    print(f"{len(shapes)} tensors, {n_total:,} fp32 elements; copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    for density in args.densities:
        for kind in args.kinds:
            bools, packed, dirs, idxs, outs = [], [], [], [], []
            lines = 0  # 64-byte lines of the gradients holding a selected element
            for g in grads:
                n = g.numel()
                if kind == "random":
                    sel = torch.rand(n, generator=gen) < density
                else:
                    sel = (torch.rand((n + 255) // 256, generator=gen) < density).repeat_interleave(256)[:n]
                bools.append(sel.view(g.shape))
                pad = (-n) % 16
                lines += int(torch.cat([sel, sel.new_zeros(pad)]).view(-1, 16).any(1).sum())
                pm = PackedMask.from_bool(sel)
                packed.append(pm.bits)
                dirs.append(ops.masked_adamw_chunk_offsets(pm.bits, n))
                idxs.append(sel.nonzero().squeeze(1))
                outs.append(torch.empty(int(sel.sum())))
            nnz = sum(o.numel() for o in outs)

            def ours():
                for g, b, d, o in zip(grads, packed, dirs, outs):
                    torch.ops.wagle.gather_masked_(o, g, b, d, False)

            def masked_select():
                for g, m, o in zip(grads, bools, outs):
                    torch.masked_select(g, m, out=o)

            def index_select():
                for g, i, o in zip(grads, idxs, outs):
                    torch.index_select(g.view(-1), 0, i, out=o)

            t = {name: timeit(fn, reps=args.reps)["median_s"]
                 for name, fn in (("ours", ours), ("masked_select", masked_select), ("index_select", index_select))}
            # the three must agree
            ours()
            ref = [o.clone() for o in outs]
            masked_select()
            assert all(torch.equal(a, b) for a, b in zip(ref, outs))
            nbytes = 64 * lines + n_total / 8 + 4 * nnz
            full = 4 * n_total + n_total / 8 + 4 * nnz
            rows.append({"density": density, "kind": kind, "nnz": nnz, "ours_ms": 1e3 * t["ours"],
                         "masked_select_ms": 1e3 * t["masked_select"], "index_select_ms": 1e3 * t["index_select"],
                         "vs_masked_select": t["masked_select"] / t["ours"],
                         "vs_index_select": t["index_select"] / t["ours"], "bw_frac": nbytes / t["ours"] / bw,
                         "full_pass_bw_frac": full / t["ours"] / bw, "lines_touched_frac": lines / (n_total / 16),
                         "mask_bytes_ours": sum(b.numel() for b in packed) + 8 * sum(d.numel() for d in dirs),
                         "mask_bytes_bool": n_total, "mask_bytes_index": 8 * nnz})
    print_table(rows, [("density", "density", ".2f"), ("kind", "mask", "s"), ("ours_ms", "ours ms", ".1f"),
                       ("masked_select_ms", "masked_select ms", ".1f"), ("vs_masked_select", "speed-up", ".2f"),
                       ("index_select_ms", "index_select ms", ".1f"), ("vs_index_select", "speed-up", ".2f"),
                       ("lines_touched_frac", "lines read", ".0%"), ("bw_frac", "of copy BW", ".0%"),
                       ("full_pass_bw_frac", "full-pass BW", ".0%")])
    write_json("bench_gather", {"config": {"size": n_total, "tensors": len(shapes), "reps": args.reps},
                                "copy_bandwidth_Bps": bw, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
