"""The ``wagle`` command line.

    wagle demo   [CONFIG] [--key value ...]   benchmark -> {GradDiff, NPO} x {dense, random, magnitude, wagle}
    wagle score  [CONFIG] [--key value ...]   attribution scores (scores.safetensors)
    wagle mask   [CONFIG] [--key value ...]   scores -> top-ratio MaskSet (mask.safetensors, mask.png)
    wagle unlearn [CONFIG] [--key value ...]  model + mask + objective -> unlearned model
    wagle eval   [CONFIG] [--key value ...]   TOFU-protocol evaluation (TOFU_EVAL.json, TOFU_SUMMARY.json)
    wagle bench  [CONFIG] [--key value ...]   microbenchmarks of a source checkout (bench/)

CONFIG is a YAML or JSON file of the job's fields (:mod:`wagle_ext.config`); ``--key value``
overrides (dotted keys for sections: ``--benchmark.n_authors 8``, ``--unlearn.steps 10``) win over
it. ``wagle <job> --help`` lists the fields and defaults. Every job prints its progress and ends by
naming its output directory. With ``model: embedded`` (the default) the embedded benchmark is built
on first use and cached (:mod:`wagle_ext.embedded_benchmark`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from ..plotting import plot_tradeoff
from .config import (BenchConfig, DemoConfig, EvalConfig, ScoreConfig, UnlearnConfig, config_to_dict,
                     load_config)
from .config import source_root as _source_root

__all__ = ["main", "run_demo"]

JOBS = {"demo": DemoConfig, "score": ScoreConfig, "mask": ScoreConfig, "unlearn": UnlearnConfig,
        "eval": EvalConfig, "bench": BenchConfig}

# Columns of the demo table: (results key, header, format).
TABLE_COLUMNS = [
    ("objective", "objective", "{}"), ("mask", "mask", "{}"), ("ratio", "ratio", "{:.2f}"),
    ("forget_quality", "forget_quality", "{:.3g}"), ("model_utility", "model_utility", "{:.3f}"),
    ("forget_Q_A_Prob", "forget_prob", "{:.3f}"), ("forget_truth_ratio", "forget_TR", "{:.3f}"),
    ("forget_Q_A_ROUGE", "forget_ROUGE", "{:.3f}"), ("retain_Q_A_Prob", "retain_prob", "{:.3f}"),
    ("retain_Q_A_ROUGE", "retain_ROUGE", "{:.3f}"), ("seconds", "seconds", "{:.1f}"),
]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _prepare_out(out: str, cfg: Any) -> str:
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2)
    return out


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is optional until a job needs it
        pass


# ------------------------------------------------------------------------------------------------
# shared pieces: model, data, masks, unlearning
# ------------------------------------------------------------------------------------------------

def _start_job(tag: str, cfg: Any) -> str:
    """Every job's prologue: threads, quiet transformers, the output directory (returned)."""
    _set_threads(cfg.num_threads)
    _quiet_transformers()
    out = _prepare_out(cfg.out, cfg)
    _log(f"[{tag}] output directory {out}")
    return out


def _benchmark(cfg: Any):
    from .embedded_benchmark import load_or_build_benchmark

    return load_or_build_benchmark(cfg.benchmark, cache_dir=cfg.cache_dir,
                                   rebuild=bool(getattr(cfg, "rebuild", False)), log=_log)


def _model_tokenizer_data(cfg: Any):
    """(model, tokenizer, data dict, benchmark or None) for the score/mask/unlearn/eval jobs."""
    bench = None
    if cfg.model == "embedded" or cfg.data.source == "embedded":
        bench = _benchmark(cfg)
    if cfg.model == "embedded":
        model, tok = copy.deepcopy(bench.target), bench.tokenizer
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _log(f"[model] loading {cfg.model}")
        model = AutoModelForCausalLM.from_pretrained(cfg.model)
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    if cfg.data.source == "embedded":
        data = bench.data
    else:
        from ..eval.tofu_data import load_qa_split

        data = {}
        for split in (cfg.data.forget, cfg.data.retain):
            _log(f"[data] loading {cfg.data.source} split {split}")
            data[split] = load_qa_split(cfg.data.source, split=split)
    for field in ("forget", "retain"):
        split = getattr(cfg.data, field)
        if split not in data:
            raise ValueError(f"data.{field}: split {split!r} not found (have: {', '.join(sorted(data))})")
    return model, tok, data, bench


def _build_mask(model, tok, forget, retain, kind: str, ratio: float, gamma: float, seed: int = 0,
                scope: str = "global", max_batches: Optional[int] = None):
    from torch.utils.data import DataLoader

    from ..attribution import score_model
    from ..masks import build_mask
    from ..unlearn.data import QACollator

    coll = QACollator(tok)
    fl = DataLoader(forget, batch_size=1, collate_fn=coll)
    rl = DataLoader(retain, batch_size=1, collate_fn=coll)
    scores = score_model(model, fl, rl, kind=kind, gamma=gamma, seed=seed, max_batches=max_batches, progress=False)
    mask = build_mask(scores, ratio, scope=scope, model=model)
    return scores, mask


def _unlearn(model, tok, forget, retain, objective: str, mask, u, out_dir: str, objective_kwargs=None):
    """Unlearn ``model`` in place with :class:`UnlearnTrainer`; returns the trainer's final log."""
    import transformers

    from ..unlearn.data import ForgetRetainDataset, QACollator
    from ..unlearn.trainer import UnlearnTrainer

    kw = dict(objective_kwargs or {})
    kw.setdefault("alpha", u.alpha)
    if objective.lower() in ("npo", "simnpo", "tnpo", "wtnpo", "dpo"):
        kw.setdefault("beta", u.npo_beta)
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=u.batch_size, learning_rate=u.learning_rate,
        max_steps=u.steps, lr_scheduler_type="constant", warmup_steps=0, weight_decay=u.weight_decay,
        max_grad_norm=u.max_grad_norm, logging_steps=max(1, u.steps // 4), save_strategy="no", report_to=[],
        use_cpu=True, seed=u.seed, data_seed=u.seed, disable_tqdm=True)
    ds = ForgetRetainDataset(forget, retain, seed=u.seed, refusal=objective.lower() in ("po", "idkpo", "dpo"))
    # compact gradients keep only masked entries: dense (mask-free) runs always use dense gradients
    compact = mask is not None and u.grad_mode == "compact"
    trainer = UnlearnTrainer(model=model, args=args, objective=objective, objective_kwargs=kw, mask=mask,
                             train_dataset=ds, data_collator=QACollator(tok),
                             grad_mode="compact" if compact else "dense",
                             step_in_backward=compact and u.step_in_backward)
    trainer.remove_callback(transformers.PrinterCallback)  # our own progress lines instead of raw log dicts
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "log_history": trainer.state.log_history}


# ------------------------------------------------------------------------------------------------
# wagle demo
# ------------------------------------------------------------------------------------------------

def _format_table(rows: Sequence[dict]) -> str:
    def cell(row, key, fmt):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v)

    cells = [[h for _, h, _ in TABLE_COLUMNS]] + [[cell(r, k, f) for k, _, f in TABLE_COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict:
    """The main job: build or reuse the embedded benchmark, then for every objective and mask kind
    unlearn from the target at ``cfg.ratio`` for ``cfg.unlearn.steps`` steps, evaluate, print the
    table, write ``results.json`` and ``forget_quality_vs_utility.png`` under ``cfg.out``."""
    import torch

    from ..eval import evaluate_tofu

    t_start = time.perf_counter()
    out = _start_job("demo", cfg)
    t0 = time.perf_counter()
    bench = _benchmark(cfg)
    t_bench = time.perf_counter() - t0
    fs = bench.config.forget_split
    data = bench.data
    forget, retain = data[fs], data["retain" + str(100 - int(fs[len("forget"):])).zfill(2)]
    eval_sets = {fs: forget, "retain_eval": data["retain_eval"], "world_facts": data["world_facts"]}

    def evaluate(model, where: str) -> dict:
        return evaluate_tofu(model, bench.tokenizer, eval_sets, forget_split=fs,
                             retain_sets=("retain_eval", "world_facts"), retain_model_eval=bench.retain_eval_path,
                             batch_size=cfg.eval_batch_size, max_new_tokens=96, out_dir=where, progress=False)

    _log("[demo] evaluating the target and the retain model (references)")
    references = []
    for name, model in (("target", bench.target), ("retain", bench.retain)):
        t0 = time.perf_counter()
        s = evaluate(model, os.path.join(out, "reference", name))
        references.append({"objective": "-", "mask": f"({name} model)", "ratio": None, **s,
                           "seconds": time.perf_counter() - t0})

    masks: dict = {"dense": None}
    mask_info: dict = {}
    for kind in cfg.masks:
        if kind == "dense":
            continue
        t0 = time.perf_counter()
        _, mask = _build_mask(bench.target, bench.tokenizer, forget, retain, kind, cfg.ratio, cfg.gamma,
                              seed=cfg.unlearn.seed)
        path = os.path.join(out, "masks", f"{kind}_{cfg.ratio:g}.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mask.save(path)
        masks[kind] = mask
        mask_info[kind] = {"path": path, "density": mask.density, "seconds": time.perf_counter() - t0}
        _log(f"[demo] mask {kind}: {mask.total_selected} of {mask.numel} weights ({mask.density:.3f}) "
             f"in {mask_info[kind]['seconds']:.1f} s -> {path}")
    if "wagle" in masks:
        masks["wagle"].plot(os.path.join(out, "masks", "wagle_mask.png"), title=f"WAGLE mask, ratio {cfg.ratio:g}")

    rows = []
    n_runs = len(cfg.objectives) * len(cfg.masks)
    for objective in cfg.objectives:
        for kind in cfg.masks:
            run_dir = os.path.join(out, "runs", f"{objective}_{kind}")
            _log(f"[demo] ({len(rows) + 1}/{n_runs}) {objective} with {kind} mask: "
                 f"{cfg.unlearn.steps} steps, lr {cfg.unlearn.learning_rate:g}")
            t0 = time.perf_counter()
            model = copy.deepcopy(bench.target)
            torch.manual_seed(cfg.unlearn.seed)
            train = _unlearn(model, bench.tokenizer, forget, retain, objective, masks[kind], cfg.unlearn, run_dir)
            t_train = time.perf_counter() - t0
            s = evaluate(model, run_dir)
            row = {"objective": objective, "mask": kind, "ratio": 1.0 if kind == "dense" else cfg.ratio, **s,
                   "train_loss": train["train_loss"], "train_seconds": t_train,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            _log(f"         forget_quality {s.get('forget_quality', float('nan')):.3g}  model_utility "
                 f"{s['model_utility']:.3f}  forget_prob {s['forget_Q_A_Prob']:.3f}  ({row['seconds']:.1f} s)")
            del model

    table = _format_table(references + rows)
    _log("\n" + table + "\n")
    png = os.path.join(out, "forget_quality_vs_utility.png")
    b = bench.config
    plot_tradeoff(rows, references, png, f"Embedded benchmark ({b.n_authors} authors, {fs}), ratio {cfg.ratio:g}, "
                                 f"{cfg.unlearn.steps} steps")
    results = {
        "config": config_to_dict(cfg),
        "benchmark": {"directory": bench.directory, "reused_cache": not bench.built, "seconds": t_bench,
                      "info": bench.info},
        "masks": mask_info,
        "references": references,
        "rows": rows,
        "table": table,
        "total_seconds": time.perf_counter() - t_start,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(table + "\n")
    _log(f"[demo] benchmark {'reused from cache' if not bench.built else 'built'} in {t_bench:.1f} s; "
         f"total {results['total_seconds']:.1f} s")
    _log(f"[demo] wrote results.json, table.txt, forget_quality_vs_utility.png, masks/, runs/ under {out}")
    return results


# ------------------------------------------------------------------------------------------------
# the other jobs
# ------------------------------------------------------------------------------------------------

def run_score(cfg: ScoreConfig, *, with_mask: bool) -> str:
    from safetensors.torch import save_file

    out = _start_job('mask' if with_mask else 'score', cfg)
    model, tok, data, _ = _model_tokenizer_data(cfg)
    t0 = time.perf_counter()
    _log(f"[score] {cfg.kind} scores on {len(data[cfg.data.forget])} forget / {len(data[cfg.data.retain])} retain items")
    scores, mask = _build_mask(model, tok, data[cfg.data.forget], data[cfg.data.retain], cfg.kind, cfg.ratio,
                               cfg.gamma, seed=cfg.seed, scope=cfg.scope, max_batches=cfg.max_batches)
    _log(f"[score] done in {time.perf_counter() - t0:.1f} s")
    if not with_mask:
        save_file({n: s.contiguous() for n, s in scores.items()}, os.path.join(out, "scores.safetensors"),
                  metadata={"kind": cfg.kind, "gamma": str(cfg.gamma)})
        _log("[score] wrote scores.safetensors")
    mask.save(os.path.join(out, "mask.safetensors"))
    mask.plot(os.path.join(out, "mask.png"), title=f"{cfg.kind} mask, ratio {cfg.ratio:g}")
    with open(os.path.join(out, "mask_stats.json"), "w") as f:
        json.dump(mask.stats(), f, indent=2, default=float)
    _log(f"[mask] {mask.total_selected} of {mask.numel} weights selected ({mask.density:.4f}); wrote "
         f"mask.safetensors, mask.png, mask_stats.json")
    return out


def run_unlearn(cfg: UnlearnConfig) -> str:
    from ..masks import MaskSet

    out = _start_job("unlearn", cfg)
    model, tok, data, _ = _model_tokenizer_data(cfg)
    mask = MaskSet.load(cfg.mask, model=model) if cfg.mask else None
    _log(f"[unlearn] {cfg.objective}, {'dense' if mask is None else f'mask density {mask.density:.4f}'}, "
         f"{cfg.unlearn.steps} steps")
    t0 = time.perf_counter()
    res = _unlearn(model, tok, data[cfg.data.forget], data[cfg.data.retain], cfg.objective, mask, cfg.unlearn,
                   os.path.join(out, "trainer"), cfg.objective_kwargs)
    model.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump({**res, "seconds": time.perf_counter() - t0}, f, indent=2, default=float)
    _log(f"[unlearn] train loss {res['train_loss']:.4f} in {time.perf_counter() - t0:.1f} s; model saved to model/")
    return out


def run_eval(cfg: EvalConfig) -> str:
    from ..eval import evaluate_tofu

    out = _start_job("eval", cfg)
    model, tok, data, bench = _model_tokenizer_data(cfg)
    for i, s in enumerate(cfg.retain_sets):
        if s not in data:
            raise ValueError(f"retain_sets[{i}]: set {s!r} not found (have: {', '.join(sorted(data))})")
    ref = cfg.retain_model_eval
    if ref == "embedded":
        if bench is None or cfg.data.source != "embedded":
            raise ValueError("retain_model_eval: 'embedded' needs data.source: embedded")
        ref = bench.retain_eval_path
    sets = {cfg.data.forget: data[cfg.data.forget], **{s: data[s] for s in cfg.retain_sets}}
    t0 = time.perf_counter()
    summary = evaluate_tofu(model, tok, sets, forget_split=cfg.data.forget, retain_sets=tuple(cfg.retain_sets),
                            retain_model_eval=ref, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                            out_dir=out, progress=True)
    for k in ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_truth_ratio", "forget_Q_A_ROUGE"):
        if k in summary:
            _log(f"  {k:20s} {summary[k]:.4g}")
    _log(f"[eval] done in {time.perf_counter() - t0:.1f} s; wrote TOFU_EVAL.json, TOFU_SUMMARY.json")
    return out


def run_bench(cfg: BenchConfig) -> Optional[str]:
    root = _source_root()
    if root is None:
        _log("[bench] the microbenchmarks live in bench/ of a source checkout of wagle-ext; this installation "
             "has none (clone the repository and run `make bench` or `wagle bench` there)")
        return None
    for s in cfg.scripts:
        _log(f"[bench] {s}")
        subprocess.run([sys.executable, os.path.join(root, "bench", s)], cwd=root, check=True)
    out = cfg.out if os.path.isabs(cfg.out) else os.path.join(root, cfg.out)
    _log(f"[bench] results (tables above, JSON) under {out}")
    return out


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------

def _fields_help(cls: type, prefix: str = "") -> list:
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in (
                "BenchmarkConfig", "UnlearnSettings", "DataConfig")):
            sub = getattr(cls(), f.name)
            lines += _fields_help(type(sub), prefix + f.name + ".")
        else:
            default = getattr(cls(), f.name)
            lines.append(f"  --{prefix}{f.name} {json.dumps(default)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wagle <job> [config.yaml|json] [--key value ...]``; returns the exit status (2 on a bad config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="wagle", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:9]))
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("config", nargs="?", help="YAML or JSON file of job fields")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        parser.print_usage(sys.stderr)
        print(f"wagle: error: unknown job {job!r} (choose from {', '.join(sorted(JOBS))})", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(f"usage: wagle {job} [CONFIG.yaml|json] [--key value ...]\n\nfields (defaults):")
        print("\n".join(_fields_help(JOBS[job])))
        return 0
    path = rest[0] if rest and not rest[0].startswith("--") else None
    overrides = rest[1:] if path else rest
    try:
        cfg = load_config(JOBS[job], path, overrides)
    except ValueError as e:
        print(f"wagle {job}: bad config: {e}", file=sys.stderr)
        return 2
    try:
        if job == "demo":
            out = os.path.abspath(run_demo(cfg)["config"]["out"])
        elif job in ("score", "mask"):
            out = run_score(cfg, with_mask=job == "mask")
        elif job == "unlearn":
            out = run_unlearn(cfg)
        elif job == "eval":
            out = run_eval(cfg)
        else:
            out = run_bench(cfg)
    except (ValueError, FileNotFoundError) as e:
        # Problems only visible once data/models are loaded (a split name, a mask for another model):
        # one line naming the cause; WAGLE_DEBUG=1 re-raises for the traceback.
        if os.environ.get("WAGLE_DEBUG"):
            raise
        print(f"wagle {job}: error: {e}", file=sys.stderr)
        return 1
    if out is not None:
        print(f"wagle {job}: results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
