"""WAGLE attribution on randomly initialised Llama configs (no downloads), three sections:

* ``memory``  -- peak memory of scoring: streaming vs non-streaming (below).
* ``speed``   -- batched attribution passes (issue 16.3): ``score_model`` over D forget + D retain
  examples of mixed lengths vs a plain training forward+backward (``model(**b).loss.backward()``,
  ``zero_grad``) over the same batches at the same batch size, interleaved in the same process;
  the ratio (goal <= 1.2) and the batch-1 -> batch-B speed-up. Also checks that batch-B scores equal
  batch-1 scores to fp32 rounding.
* ``bounded`` -- bounded-memory attribution (issue 16.2): ``score_model(memory_budget=)`` +
  ``build_mask`` vs the unbounded run, each in its own process: groups, data passes, time, peak RSS
  above the model, and whether the masks are bit-identical (checksums).

Memory section:

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

Usage: ``python bench/bench_attribution.py [--sections memory,speed,bounded] [--batches 4] [--seq 64]
[--modes a,b] [--examples 32] [--speed-batch 8] [--groups 4,8]``
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
SECTIONS = ("memory", "speed", "bounded")
SPEED_CONFIG = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=688, max_position_embeddings=512,
                    tie_word_embeddings=False)
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


def _mixed_examples(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list:
    """``n`` (ids, n_prompt) pairs with lengths uniform in [min_len, max_len]: QA-like sequences."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append((torch.randint(4, vocab, (t,), generator=g), t // 4))
    return out


def _collate(examples: list, batch: int) -> list:
    """Right-padded batches (pad 0, label -100, attention 0), as the package's collators make."""
    out = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        T = max(len(ids) for ids, _ in chunk)
        ids_t = torch.zeros((len(chunk), T), dtype=torch.long)
        lab = torch.full((len(chunk), T), -100, dtype=torch.long)
        am = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, (ids, n_prompt) in enumerate(chunk):
            ids_t[j, :len(ids)] = ids
            lab[j, n_prompt:len(ids)] = ids[n_prompt:]
            am[j, :len(ids)] = 1
        out.append({"input_ids": ids_t, "attention_mask": am, "labels": lab})
    return out


def run_speed(n_examples: int, batch: int, min_len: int, max_len: int, reps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from wagle_ext.attribution import score_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SPEED_CONFIG)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    forget = _mixed_examples(n_examples, min_len, max_len, SPEED_CONFIG["vocab_size"], 1)
    retain = _mixed_examples(n_examples, min_len, max_len, SPEED_CONFIG["vocab_size"], 2)
    rows = []
    scores_by_bs = {}
    for bs in sorted({1, batch}):
        fb, rb = _collate(forget, bs), _collate(retain, bs)

        def plain():
            for b in fb + rb:
                model(**b, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)

        def attribution():
            return score_model(model, fb, rb, kind="wagle", progress=False)

        plain()  # warm-up
        t_plain, t_attr = [], []
        for _ in range(reps):  # interleaved, so machine noise hits both alike; min of reps
            t0 = time.perf_counter()
            plain()
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scores_by_bs[bs] = attribution()
            t_attr.append(time.perf_counter() - t0)
        tokens = sum(int(b["attention_mask"].sum()) for b in fb + rb)
        padded = sum(b["attention_mask"].numel() for b in fb + rb)
        rows.append({"batch_size": bs, "examples": 2 * n_examples, "batches": len(fb) + len(rb),
                     "padding_frac": 1 - tokens / padded, "plain_fwd_bwd_s": min(t_plain),
                     "attribution_s": min(t_attr), "ratio": min(t_attr) / min(t_plain)})
    ref = scores_by_bs[1]
    other = scores_by_bs[max(scores_by_bs)]
    max_rel = max(float((other[n] - ref[n]).abs().max()) / max(float(ref[n].abs().max()), 1e-30) for n in ref)
    b1 = next(r for r in rows if r["batch_size"] == 1)
    for r in rows:
        r["speedup_vs_bs1"] = b1["attribution_s"] / r["attribution_s"]
    return {"params": n_params, "rows": rows, "max_rel_score_diff_bs1_vs_bsB": max_rel}


def run_bounded(groups: int, n_batches: int, seq: int, batch: int, ratio: float) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from wagle_ext.attribution import score_model
    from wagle_ext.masks import build_mask

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    n_params = sum(p.numel() for p in model.parameters())
    forget = _batches(n_batches, seq, batch, CONFIG["vocab_size"], 1)
    retain = _batches(n_batches, seq, batch, CONFIG["vocab_size"], 2)
    model(**forget[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    budget = None
    if groups > 1:
        biggest = max(p.numel() for p in model.parameters())
        budget = max(8 * n_params // groups, 8 * biggest)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if budget is None:
            scores = score_model(model, forget, retain, kind="wagle", progress=False)
            passes, n_groups = 2, 1
        else:
            scores = score_model(model, forget, retain, kind="wagle", progress=False, memory_budget=budget)
        mask = build_mask(scores, ratio)
        if budget is not None:
            passes, n_groups = scores.info["grouped"]["data_passes"], len(scores)
        del scores
    dt = time.perf_counter() - t0
    return {"mode": "unbounded" if budget is None else f"budget {budget / 2**20:.0f} MiB",
            "budget_MB": None if budget is None else budget / 2**20, "groups": n_groups, "data_passes": passes,
            "params": n_params, "seconds": dt, "extra_MB": mem.extra / 2**20,
            "extra_fp32_buffers": mem.extra / (4 * n_params), "mask_checksum": mask.checksum(),
            "selected": mask.total_selected}


def _child(args_list: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__)] + args_list
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"child {args_list} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--batches", type=int, default=4, help="batches per pass (forget and retain)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--examples", type=int, default=32, help="speed: forget examples (and as many retain)")
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=24)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--groups", default="4,8", help="bounded: target group counts")
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="output path (default bench/results/bench_attribution.json)")
    args = ap.parse_args()
    if args.child:
        if args.child.startswith("bounded:"):
            out = run_bounded(int(args.child.split(":")[1]), args.batches, args.seq, args.batch_size, args.ratio)
        else:
            out = run_mode(args.child, args.batches, args.seq, args.batch_size)
        print(json.dumps(out))
        return
    sections = args.sections.split(",")
    for sec in sections:
        if sec not in SECTIONS:
            raise SystemExit(f"unknown section {sec!r}; choose from {SECTIONS}")
    common = ["--batches", str(args.batches), "--seq", str(args.seq), "--batch-size", str(args.batch_size)]
    payload: dict = {"config": CONFIG, "batches": args.batches, "seq": args.seq, "batch_size": args.batch_size}
    if "memory" in sections:
        rows = []
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
            rows.append(_child(["--child", mode] + common))
            print(f"  {mode}: done in {rows[-1]['seconds']:.1f} s", file=sys.stderr)
        print(f"\nWAGLE scoring peak memory, Llama config {CONFIG['num_hidden_layers']} layers x hidden "
              f"{CONFIG['hidden_size']}, vocab {CONFIG['vocab_size']} ({rows[0]['params'] / 1e6:.1f}M params); "
              f"{args.batches} forget + {args.batches} retain batches of {args.batch_size}x{args.seq} tokens\n")
        print_table(rows, [("mode", "mode", "s"), ("weights_MB", "weights MB", ".0f"),
                           ("peak_rss_MB", "peak RSS MB", ".0f"), ("extra_MB", "extra MB", ".0f"),
                           ("extra_fp32_buffers", "extra / fp32 weights", ".2f"), ("seconds", "time s", ".1f")])
        sums = {r["mode"]: r["score_checksum"] for r in rows if not r["mode"].endswith("bf16")}
        if len(set(sums.values())) > 1:
            print(f"\nWARNING: score checksums differ between fp32 modes: {sums}")
        payload["rows"] = rows
    if "speed" in sections:
        sp = run_speed(args.examples, args.speed_batch, args.min_len, args.max_len, args.reps)
        print(f"\nBatched attribution vs plain training forward+backward, Llama config "
              f"{SPEED_CONFIG['num_hidden_layers']} layers x hidden {SPEED_CONFIG['hidden_size']} "
              f"({sp['params'] / 1e6:.1f}M params); {args.examples} forget + {args.examples} retain examples of "
              f"{args.min_len}-{args.max_len} tokens; min of {args.reps} interleaved reps, "
              f"{torch.get_num_threads()} threads\n")
        print_table(sp["rows"], [("batch_size", "batch", "d"), ("batches", "batches", "d"),
                                 ("padding_frac", "padding", ".2f"), ("plain_fwd_bwd_s", "plain fwd+bwd s", ".2f"),
                                 ("attribution_s", "attribution s", ".2f"), ("ratio", "ratio (goal <= 1.2)", ".3f"),
                                 ("speedup_vs_bs1", "speed-up vs batch 1", ".2f")])
        print(f"\nmax |score(batch {args.speed_batch}) - score(batch 1)| / max|score| over tensors: "
              f"{sp['max_rel_score_diff_bs1_vs_bsB']:.2e}")
        payload["speed"] = {"config": SPEED_CONFIG, "examples": args.examples, "min_len": args.min_len,
                            "max_len": args.max_len, "reps": args.reps, **sp}
    if "bounded" in sections:
        rows = [_child(["--child", "bounded:1", "--ratio", str(args.ratio)] + common)]
        for g in (int(x) for x in args.groups.split(",") if x):
            rows.append(_child([f"--child", f"bounded:{g}", "--ratio", str(args.ratio)] + common))
        ref = rows[0]
        for r in rows:
            r["time_vs_unbounded"] = r["seconds"] / ref["seconds"]
            r["mask_identical"] = r["mask_checksum"] == ref["mask_checksum"]
        print(f"\nBounded-memory WAGLE attribution + exact global top-{args.ratio:g} mask, Llama config "
              f"{CONFIG['num_hidden_layers']} layers x hidden {CONFIG['hidden_size']} ({ref['params'] / 1e6:.1f}M "
              f"params); {args.batches} forget + {args.batches} retain batches of {args.batch_size}x{args.seq}\n")
        print_table(rows, [("mode", "mode", "s"), ("groups", "groups", "d"), ("data_passes", "data passes", "d"),
                           ("seconds", "time s", ".1f"), ("time_vs_unbounded", "time x", ".2f"),
                           ("extra_MB", "extra RSS MB", ".0f"), ("extra_fp32_buffers", "extra / fp32 weights", ".2f"),
                           ("mask_identical", "mask bit-identical", "")])
        payload["bounded"] = {"ratio": args.ratio, "rows": rows}
    write_json("bench_attribution", payload, args.json)


if __name__ == "__main__":
    main()
