"""Memory bench: peak RSS of GradDiff unlearning steps (batch 1, sequence 64, fp32 weights, random
mask of ratio 0.05) for Llama configs of about 0.5B, 1B and 1.5B parameters:

  (a) ``hf_adamw``:     transformers Trainer loop + ``torch.optim.AdamW`` + ``p.grad *= mask`` (WAGLE's way;
                        masks kept as dense bool tensors, 1 B/param);
  (b) ``masked_dense``: UnlearnTrainer + MaskedAdamW, dense gradients (``grad_mode="dense"``);
  (c) ``compact``:      UnlearnTrainer + MaskedAdamW, ``grad_mode="compact"`` (compact gradients in backward
                        hooks, at most one dense gradient alive);
  (d) ``compact_sib``:  (c) with ``step_in_backward=True`` (no clipping: ``max_grad_norm=0``).

Each case runs in its own process; peak RSS = ``ru_maxrss`` of that process (model construction, the
Python runtime and activations included). ``tensors GB`` is the theory for weights + gradients + optimizer
state + masks alone (no activations). A case whose tensors alone exceed the memory available at launch is
not run (it would be killed by the OOM killer); the table says so and gives its bytes.

    python bench/bench_memory.py [--configs 0.5B 1B 1.5B] [--modes hf_adamw masked_dense compact compact_sib]
    python bench/bench_memory.py --config llama2-7b --modes hf_adamw compact --ratios 0.05 0.02 0.01 --steps 2

``llama2-7b`` (Llama-2-7B shapes, 6.74B parameters, bf16 weights, built directly in bf16): (a) needs
16 B/param + masks (108 GB; reported, not run here); (c) keeps fp32 master copies, moments and compact
gradients of the selected weights only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import numel, print_table, write_json  # noqa: E402

# name -> (hidden, layers, intermediate, heads, dtype); intermediate None = 2.75 * hidden, heads None =
# hidden / 64; vocab 32000, untied embeddings. llama2-7b: Llama-2-7B's shapes (6.74B parameters), bf16.
CONFIGS = {"0.5B": (1024, 32, None, None, "float32"), "1B": (2048, 16, None, None, "float32"),
           "1.5B": (2048, 26, None, None, "float32"), "llama2-7b": (4096, 32, 11008, 32, "bfloat16")}
DEFAULT_CONFIGS = ["0.5B", "1B", "1.5B"]
MODES = ("hf_adamw", "masked_dense", "compact", "compact_sib")
LABEL = {"hf_adamw": "(a) HF+AdamW+grad*=mask", "masked_dense": "(b) MaskedAdamW dense",
         "compact": "(c) compact", "compact_sib": "(d) compact+step_in_bwd"}


def llama_shapes(hidden: int, layers: int, vocab: int, inter: Optional[int] = None) -> list:
    """Parameter shapes of the bench's LlamaForCausalLM (to size a case before building it)."""
    inter = inter or int(hidden * 2.75)
    per_layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    return [(vocab, hidden)] + per_layer * layers + [(hidden,), (vocab, hidden)]


def tensor_bytes(mode: str, shapes: list, ratio: float, dtype: str = "float32") -> int:
    """Theory: weights + gradients + optimizer state + masks (bytes) for one step of ``mode``. With
    bf16/fp16 weights (2 B/param) the optimizer keeps fp32 master copies of the selected weights
    (4 B per selected weight; dense AdamW: 4 B/param) and gradients are 2 B/param."""
    sizes = [numel([s]) for s in shapes]
    n = sum(sizes)
    nnz = int(ratio * n)
    w = 4 if dtype == "float32" else 2
    weights = w * n
    if mode == "hf_adamw":  # dense grads, exp_avg + exp_avg_sq (+ fp32 master copy for 16-bit), bool masks
        return weights + w * n + 8 * n + (4 * n if w == 2 else 0) + n
    bits_dir = n // 8 + 8 * sum((s + 4095) // 4096 + 1 for s in sizes)
    state = 8 * nnz + bits_dir + (4 * nnz if w == 2 else 0)
    if mode == "masked_dense":
        return weights + w * n + state
    largest = w * max(sizes)  # the one dense gradient alive at a time
    # compact and compact_sib: the compact buffers are allocated up front in both (step_in_backward
    # accumulates the forget term's gradient there until the retain term's backward updates)
    return weights + 4 * nnz + largest + state


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args) -> dict:
    from bench_unlearn import run_case

    return run_case(args, args.mode)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument("--config", dest="configs", nargs="+", choices=list(CONFIGS), help="alias of --configs")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--ratios", type=float, nargs="+", default=None, help="several ratios (a memory curve)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=None, help="override a config's hidden size (smoke tests)")
    ap.add_argument("--layers", type=int, default=None, help="override a config's layer count (smoke tests)")
    ap.add_argument("--force", action="store_true", help="run cases whose tensors exceed the available memory")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--intermediate", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--heads", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help="override a config's weight dtype (float32, bfloat16)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(worker(args), f)
        return
    rows = []
    for name in args.configs:
        hidden, layers, inter, heads, dtype = CONFIGS[name]
        hidden = args.hidden or hidden
        layers = args.layers or layers
        dtype = args.dtype or dtype
        shapes = llama_shapes(hidden, layers, args.vocab, inter)
        for ratio in args.ratios or [args.ratio]:
            for mode in args.modes:
                need = tensor_bytes(mode, shapes, ratio, dtype)
                row = {"config": name, "mode": mode, "case": LABEL[mode], "hidden": hidden, "layers": layers,
                       "dtype": dtype, "ratio": ratio, "tensor_bytes": need, "tensors_GB": need / 1e9}
                avail = mem_available()
                if need > avail and not args.force:
                    row["status"] = f"not run: tensors alone need {need / 1e9:.1f} GB > {avail / 1e9:.1f} GB available"
                    print(f"{name} {mode} ratio {ratio}: {row['status']}", flush=True)
                    rows.append(row)
                    continue
                out = tempfile.mktemp(suffix=".json")
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--mode", mode, "--ratio",
                       str(ratio), "--seq", str(args.seq), "--steps", str(args.steps), "--vocab", str(args.vocab),
                       "--hidden", str(hidden), "--layers", str(layers), "--dtype", dtype]
                cmd += ["--intermediate", str(inter)] if inter else []
                cmd += ["--heads", str(heads)] if heads else []
                print(f"running {name} {mode} ratio {ratio} ...", flush=True)
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    why = "killed (out of memory?)" if r.returncode in (-9, 137) else f"failed (rc {r.returncode})"
                    print(r.stderr[-2000:])
                    row["status"] = why
                    rows.append(row)
                    continue
                with open(out) as f:
                    row.update(json.load(f))
                row["status"] = "ok"
                row["peak_rss_GB"] = row["peak_rss_B"] / 1e9
                rows.append(row)
    for r in rows:
        base = next((b for b in rows if b["config"] == r["config"] and b["mode"] == "hf_adamw"
                     and b["ratio"] == r["ratio"]), None)
        if "peak_rss_B" in r and base is not None:
            if "peak_rss_B" in base:
                r["peak_vs_a"] = r["peak_rss_B"] / base["peak_rss_B"]
            r["vs_a_tensors"] = r["peak_rss_B"] / base["tensor_bytes"]
    print()
    print_table(rows, [
        ("config", "config", "s"), ("case", "case", "s"), ("dtype", "dtype", "s"), ("ratio", "ratio", "g"),
        ("params", "params", ",d"),
        ("tensors_GB", "tensors GB", ".2f"), ("peak_rss_GB", "peak RSS GB", ".2f"),
        ("peak_vs_a", "peak / (a) peak", ".2f"), ("vs_a_tensors", "peak / (a) tensors", ".2f"),
        ("step_s", "step s", ".1f"), ("status", "status", "s")])
    write_json("bench_memory", {"config": {k: getattr(args, k) for k in ("configs", "ratio", "seq", "steps", "vocab")},
                                "mem_available_B": mem_available(), "rows": rows},
               args.json)


if __name__ == "__main__":
    main()
