"""End-to-end bench: one GradDiff unlearning step of a ~0.5B-parameter Llama config (fp32, batch 1,
short sequences) -- peak RSS and step time:

  (a) ``wagle_way``: transformers Trainer loop (UnlearnTrainer with no mask) + ``torch.optim.AdamW``
      + ``p.grad *= mask`` before every optimizer step (WAGLE ``src/unlearn/base.py``);
  (b) ``masked``:    UnlearnTrainer + MaskedAdamW (compact state, frozen weights untouched),
at mask ratios 0.05 and 0.2. Each case runs in its own process (peak RSS = ru_maxrss of that
process, which includes the model); the step time is the median of the steps after the first.

    python bench/bench_unlearn.py [--layers 32] [--hidden 1024] [--steps 3] [--seq 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, write_json  # noqa: E402


def llama(args):
    """A randomly initialised LlamaForCausalLM of the bench's size (hidden, layers, vocab; intermediate
    ``args.intermediate`` or 2.75 x hidden), built directly in ``args.dtype`` (default float32): a bf16
    7B model is never materialised in fp32 (27 GB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    inter = getattr(args, "intermediate", None) or int(args.hidden * 2.75)
    heads = getattr(args, "heads", None) or args.hidden // 64
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512)
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


def random_mask(model, ratio: float, gen, slice_elems: int = 1 << 20):
    """A random MaskSet of density ~ratio, built in slices of ``slice_elems`` elements (bits packed
    per slice) so neither an N-sized score buffer nor a tensor-sized random temporary inflates the
    peak or leaves freed heap behind (scoring and selection have their own benches)."""
    import torch

    import wagle_ext

    masks = {}
    for n, p in model.named_parameters():
        numel = p.numel()
        parts = [wagle_ext.pack_bits(torch.rand(min(slice_elems, numel - i), generator=gen) < ratio)
                 for i in range(0, numel, slice_elems)]  # slice_elems % 8 == 0: slices pack back to back
        masks[n] = wagle_ext.PackedMask(torch.cat(parts), p.shape)
    return wagle_ext.MaskSet(masks)


def graddiff_data(args, gen):
    """``args.steps`` forget/retain pairs of random token sequences (length ``args.seq``) and their collator."""
    import torch

    def seq():
        ids = torch.randint(3, args.vocab, (args.seq,), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def collate(items):
        return {k: {f: torch.stack([it[k][f] for it in items]) for f in items[0][k]} for k in ("forget", "retain")}

    return [{"forget": seq(), "retain": seq()} for _ in range(args.steps)], collate


def step_timer(times: list):
    """A TrainerCallback appending each optimizer step's wall time (s) to ``times``."""
    import time

    import transformers

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - self.t)

    return Timer()


def mask_grads_callback(model, mask):
    """WAGLE's way (``src/unlearn/base.py``): ``p.grad *= mask`` before every optimizer step, with the
    mask kept as dense bool tensors (1 B/param; WAGLE itself keeps float masks)."""
    import transformers

    bool_masks = {n: m.to_bool() for n, m in mask.for_model(model).items()}

    class MaskGrads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, a, s, c, model=None, **kw):
            for n, p in model.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(bool_masks[n])

    return MaskGrads()


def training_args(args, **kw):
    import tempfile

    import transformers

    base = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=args.steps,
                learning_rate=1e-5, weight_decay=0.1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                save_strategy="no", disable_tqdm=True, logging_steps=10**6, max_grad_norm=1.0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def run_case(args, mode: str) -> dict:
    """Build the model, a random mask of ``args.ratio`` and GradDiff data, then run ``args.steps``
    unlearning steps in this process, as ``mode``:

      ``hf_adamw``:     Trainer loop + ``torch.optim.AdamW`` + ``p.grad *= mask`` (WAGLE's way);
      ``masked_dense``: UnlearnTrainer + MaskedAdamW (dense gradients);
      ``compact``:      the same with ``grad_mode="compact"``;
      ``compact_sib``:  the same with ``step_in_backward=True`` (and ``max_grad_norm=0``).

    Returns params, nnz, peak RSS (``ru_maxrss``, bytes), step times (median after the first) and
    ``memory_report`` after the run."""
    import resource

    import torch

    from wagle_ext import memory_report
    from wagle_ext.unlearn.trainer import UnlearnTrainer

    torch.manual_seed(0)
    model = llama(args)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    mask = random_mask(model, args.ratio, g)
    data, collate = graddiff_data(args, g)
    times = []
    if mode == "hf_adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
        tr = UnlearnTrainer(model=model, args=training_args(args), objective="graddiff", train_dataset=data,
                            data_collator=collate, optimizers=(opt, None),
                            callbacks=[step_timer(times), mask_grads_callback(model, mask)])
    else:
        kw = {"grad_mode": "dense" if mode == "masked_dense" else "compact", "step_in_backward": mode == "compact_sib"}
        targs = training_args(args, max_grad_norm=0.0 if mode == "compact_sib" else 1.0)
        tr = UnlearnTrainer(model=model, args=targs, objective="graddiff", mask=mask, train_dataset=data,
                            data_collator=collate, callbacks=[step_timer(times)], **kw)
    tr.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steady = sorted(times[1:]) if len(times) > 1 else times
    return {"mode": mode, "ratio": args.ratio, "params": n_params, "nnz": sum(m.nnz for m in mask.values()),
            "peak_rss_B": peak, "step_s": steady[len(steady) // 2], "first_step_s": times[0],
            "memory_report_after": memory_report(tr.model, tr.optimizer)}


def worker(args) -> dict:
    out = run_case(args, {"wagle_way": "hf_adamw", "masked": "masked_dense"}[args.mode])
    out["mode"] = args.mode
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ratio", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(worker(args), f)
        return
    rows = []
    for ratio in args.ratios:
        for mode in ("wagle_way", "masked"):
            out = tempfile.mktemp(suffix=".json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--mode", mode, "--ratio", str(ratio),
                   "--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
                   "--seq", str(args.seq), "--steps", str(args.steps)]
            print(f"running {mode} at ratio {ratio} ...", flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-2000:])
                rows.append({"mode": mode, "ratio": ratio, "error": r.stderr[-300:]})
                continue
            with open(out) as f:
                rows.append(json.load(f))
    by = {(r["mode"], r["ratio"]): r for r in rows if "error" not in r}
    for r in rows:
        base = by.get(("wagle_way", r["ratio"]))
        if "error" in r or base is None:
            continue
        r["peak_rss_GB"] = r["peak_rss_B"] / 1e9
        r["mem_vs_wagle_way"] = r["peak_rss_B"] / base["peak_rss_B"]
        r["time_vs_wagle_way"] = r["step_s"] / base["step_s"]
    print()
    print_table([r for r in rows if "error" not in r], [
        ("mode", "mode", "s"), ("ratio", "ratio", ".2f"), ("params", "params", ",d"), ("peak_rss_GB", "peak RSS GB", ".2f"),
        ("mem_vs_wagle_way", "mem / (a)", ".2f"), ("step_s", "step s", ".2f"), ("time_vs_wagle_way", "time / (a)", ".2f")])
    write_json("bench_unlearn", {"config": {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "seq", "steps")},
                                 "rows": rows}, args.json)


if __name__ == "__main__":
    main()
