"""Peak memory of WAGLE scoring on a ~110M-parameter Llama config: streaming vs non-streaming.

Each mode runs in its own subprocess (so freed memory of one mode cannot hide another's peak), on
the same randomly initialised ``LlamaForCausalLM`` (no downloads) and the same few short batches.
Children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (see ``main``). Reported: peak RSS above the RSS after the model was built (``extra``), in MB and in units of one
fp32 copy of the weights ("buffers"), and wall time (noisy on a shared machine).

Modes:
* ``wagle_loop``  -- WAGLE's own loop (``generate_mask.py::snip_advanced``, fp32 accumulators):
  ``zero_grad``, backward, ``acc[name] += p.grad``; then scores into a new dict.
* ``non_streaming`` -- ``score_model(stream=False)``: hook-accumulated g_f and g_r stay alive next
  to a fresh score buffer.
* ``streaming``   -- ``score_model(stream=True)``: scores overwrite the g_f accumulator and g_r is
  freed tensor by tensor.
* ``streaming_bf16`` -- ``streaming`` on a bf16 copy of the model (fp32 accumulators).

Expected: ``streaming`` ~ 2 fp32 buffers (g_r + g_f, the scores overwrite g_f) plus the per-step
working set (activations saved for backward and one parameter's transient gradient); the other
fp32 modes ~ 3 buffers (g_f + g_r + scores; WAGLE's loop also holds all ``.grad`` next to both
accumulators during the retain pass, overlapping with activations being freed).

Usage: ``python bench/bench_attribution.py [--batches 4] [--seq 64] [--modes a,b]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _common import PeakRSS, print_table, write_json  # noqa: E402

MODES = ("wagle_loop", "non_streaming", "streaming", "streaming_bf16")
CONFIG = dict(vocab_size=16000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=12, intermediate_size=2048, max_position_embeddings=512,
              tie_word_embeddings=False)


def _batches(n: int, seq: int, batch: int, vocab: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # a "prompt" quarter without loss, like QA batches
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _wagle_loop(model, forget, retain, gamma=1e-6):
    """WAGLE's snip_advanced, with fp32 accumulators (its own code sums in the bf16 model dtype)."""
    from wagle_ext import attribution_scores

    def acc(loader):
        model.eval()
        model.zero_grad(set_to_none=True)
        g = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in model.named_parameters()}
        for b in loader:
            model(**b).loss.backward()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        g[n] += p.grad.float()
            model.zero_grad(set_to_none=True)
        return g

    g_f = acc(forget)
    g_r = acc(retain)
    names = list(g_f)
    ws = [p.detach() for _, p in model.named_parameters()]
    scores = attribution_scores(ws, [g_f[n] for n in names], [g_r[n] for n in names], kind="wagle", gamma=gamma)
    return dict(zip(names, scores))


def run_mode(mode: str, n_batches: int, seq: int, batch: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from wagle_ext.attribution import score_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    if mode.endswith("bf16"):
        model = model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    forget = _batches(n_batches, seq, batch, CONFIG["vocab_size"], 1)
    retain = _batches(n_batches, seq, batch, CONFIG["vocab_size"], 2)
    # One warm-up forward/backward so one-time allocator/thread-pool growth is not counted.
    model(**forget[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if mode == "wagle_loop":
            scores = _wagle_loop(model, forget, retain)
        else:
            scores = score_model(model, forget, retain, kind="wagle", stream=mode.startswith("streaming"),
                                 progress=False)
    dt = time.perf_counter() - t0
    checksum = float(sum(float(s.double().sum()) for s in scores.values()))
    del scores
    fp32_bytes = n_params * 4
    return {
        "mode": mode,
        "params": n_params,
        "weights_MB": weight_bytes / 2**20,
        "base_rss_MB": mem.base / 2**20,
        "peak_rss_MB": mem.peak / 2**20,
        "extra_MB": mem.extra / 2**20,
        "extra_fp32_buffers": mem.extra / fp32_bytes,
        "seconds": dt,
        "score_checksum": checksum,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4, help="batches per pass (forget and retain)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="output path (default bench/results/bench_attribution.json)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.batches, args.seq, args.batch_size)))
        return
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batches", str(args.batches),
               "--seq", str(args.seq), "--batch-size", str(args.batch_size)]
        # A fixed glibc mmap threshold turns off its dynamic growth, so large tensors are always
        # mmapped and returned to the OS when freed: RSS then tracks live tensors, and memory freed
        # before the measurement (warm-up gradients) cannot hide inside the baseline.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if res.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  {mode}: done in {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    print(f"\nWAGLE scoring peak memory, Llama config {CONFIG['num_hidden_layers']} layers x hidden "
          f"{CONFIG['hidden_size']}, vocab {CONFIG['vocab_size']} ({rows[0]['params'] / 1e6:.1f}M params); "
          f"{args.batches} forget + {args.batches} retain batches of {args.batch_size}x{args.seq} tokens\n")
    print_table(rows, [("mode", "mode", "s"), ("weights_MB", "weights MB", ".0f"), ("peak_rss_MB", "peak RSS MB", ".0f"),
                       ("extra_MB", "extra MB", ".0f"), ("extra_fp32_buffers", "extra / fp32 weights", ".2f"),
                       ("seconds", "time s", ".1f")])
    sums = {r["mode"]: r["score_checksum"] for r in rows if not r["mode"].endswith("bf16")}
    if len(set(sums.values())) > 1:
        print(f"\nWARNING: score checksums differ between fp32 modes: {sums}")
    write_json("bench_attribution", {"config": CONFIG, "batches": args.batches, "seq": args.seq,
                                     "batch_size": args.batch_size, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
