"""``wagle demo``: the embedded benchmark; first the forget-quality / model-utility fronts of every
objective x mask kind over learning rates and seeds (a ``wagle sweep``: ``fronts.png``, the table of
the best forget quality at >= 95% / 90% of the original utility), then every objective x mask kind at
one ratio, step budget and learning rate with the full evaluation, attacks and G-effect: one table,
``results.json`` and the forget-quality / model-utility figure."""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Sequence

from ..plotting import plot_tradeoff
from .config import LORA_KINDS, DemoConfig, LoraSettings, config_to_dict
from .pipeline import _benchmark, _build_mask, _Job, _log, _lora_model, _unlearn
from .runs import RunDir

__all__ = ["run_demo", "TABLE_COLUMNS"]

# Columns of the demo table: (results key, header, format).
TABLE_COLUMNS = [
    ("objective", "objective", "{}"), ("mask", "mask", "{}"), ("ratio", "ratio", "{:.2f}"),
    ("forget_quality", "forget_quality", "{:.3g}"), ("model_utility", "model_utility", "{:.3f}"),
    ("forget_Q_A_Prob", "forget_prob", "{:.3f}"), ("forget_truth_ratio", "forget_TR", "{:.3f}"),
    ("forget_Q_A_ROUGE", "forget_ROUGE", "{:.3f}"), ("retain_Q_A_Prob", "retain_prob", "{:.3f}"),
    ("retain_Q_A_ROUGE", "retain_ROUGE", "{:.3f}"), ("relearn25_acc", "relearn25_acc", "{:.2f}"),
    ("prompt_worst_acc", "prompt_worst_acc", "{:.2f}"), ("degenerate", "degenerate", "{:.2f}"),
    ("seconds", "seconds", "{:.1f}"),
]


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
    """The main job: build or reuse the embedded benchmark; with ``cfg.front`` run the fronts sweep
    (``sweep/``, ``fronts.png``); then for every objective and mask kind unlearn from the target at
    ``cfg.ratio`` for ``cfg.unlearn.steps`` steps, evaluate, print the table, write ``results.json``
    and ``forget_quality_vs_utility.png`` under ``cfg.out``. ``track: smollm2``: the real-knowledge
    track instead (:mod:`wagle_ext.app.track_smollm2`)."""
    if cfg.track == "smollm2":
        from .track_smollm2 import run_smollm2_track

        return run_smollm2_track(cfg)
    with _Job("demo", cfg) as run:
        return _run_demo(cfg, run)


def _run_demo(cfg: DemoConfig, run: RunDir) -> dict:
    import torch

    from ..eval import evaluate_tofu

    t_start = time.perf_counter()
    out = run.work
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

    front = _front(cfg, out) if cfg.front else None
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
        if kind == "dense" or kind in LORA_KINDS:
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
    geffects: dict = {}
    n_runs = len(cfg.objectives) * len(cfg.masks)
    for objective in cfg.objectives:
        for kind in cfg.masks:
            run_dir = os.path.join(out, "runs", f"{objective}_{kind}")
            _log(f"[demo] ({len(rows) + 1}/{n_runs}) {objective} with {kind} mask: "
                 f"{cfg.unlearn.steps} steps, lr {cfg.unlearn.learning_rate:g}")
            t0 = time.perf_counter()
            model = copy.deepcopy(bench.target)
            torch.manual_seed(cfg.unlearn.seed)
            callbacks = []
            if cfg.geffect_every and kind in ("dense", "wagle"):
                callbacks.append(_geffect_probe(bench, forget, retain, objective, masks[kind], cfg))
            lora_info = None
            if kind in LORA_KINDS:
                lo = LoraSettings(rank=cfg.lora_rank, init="fila" if kind == "lora+fila" else "default",
                                  targets="wagle" if kind == "lora+wagle" else "all", ratio=cfg.ratio, gamma=cfg.gamma)
                model, lora_info = _lora_model(model, bench.tokenizer, forget, retain, lo, mask=masks.get("wagle"),
                                               seed=cfg.unlearn.seed, progress=False)
            train = _unlearn(model, bench.tokenizer, forget, retain, objective, masks.get(kind), cfg.unlearn, run_dir,
                             demo=True, callbacks=callbacks)
            train.pop("trainer")
            if lora_info is not None:  # evaluate and attack the merged model (what `wagle unlearn` exports)
                model = model.merge_and_unload()
                n_params = sum(p.numel() for p in model.parameters())
            if callbacks:
                geffects.setdefault(objective, {})[kind] = callbacks[0].result
            t_train = time.perf_counter() - t0
            s = evaluate(model, run_dir)
            row = {"objective": objective, "mask": kind, "ratio": 1.0 if kind == "dense" else cfg.ratio, **s,
                   "train_loss": train["train_loss"], "train_seconds": t_train}
            if lora_info is not None:  # ratio: trainable adapter parameters / model parameters
                row.update(ratio=lora_info["trainable"] / n_params, lora=lora_info)
            if cfg.attacks:
                row.update(_attack_columns(model, bench.tokenizer, forget, cfg, run_dir))
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            _log(f"         forget_quality {s.get('forget_quality', float('nan')):.3g}  model_utility "
                 f"{s['model_utility']:.3f}  forget_prob {s['forget_Q_A_Prob']:.3f}  ({row['seconds']:.1f} s)")
            del model

    if cfg.attacks:
        for ref in references:
            ref.update(_attack_columns(bench.target if ref["mask"] == "(target model)" else bench.retain,
                                       bench.tokenizer, forget, cfg, None))
    geffect_pngs = []
    for objective, res in geffects.items():
        from ..eval.g_effect import plot_g_effect

        res = {k: v for k, v in res.items() if v["records"]}  # runs shorter than geffect_every record nothing
        if not res:
            continue
        geffect_pngs.append(plot_g_effect(res, os.path.join(out, f"g_effect_{objective}.png"),
                                          title=f"G-effect of {objective}: dense vs WAGLE mask (ratio {cfg.ratio:g}; "
                                          "symlog axes)", frozen=True, symlog=True))
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
        "g_effect": geffects,
        "front": front,
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
    _log(f"[demo] wrote results.json, table.txt, forget_quality_vs_utility.png, masks/, runs/"
         f"{', fronts.png, sweep/' if front else ''} under {run.path}")
    return results


def _front(cfg: DemoConfig, out: str) -> dict:
    """The fronts: ``wagle sweep`` of the demo's grid into ``<out>/sweep`` (its table logged,
    ``fronts.png`` copied next to the demo's results)."""
    import shutil

    from .config import demo_sweep_config
    from .sweep import run_sweep

    scfg = demo_sweep_config(cfg)
    scfg.out = os.path.join(out, "sweep")
    n = len(cfg.objectives) * len(cfg.seeds) * len(cfg.learning_rates) * len(scfg.masks)
    _log(f"[demo] fronts: {n} runs ({len(cfg.objectives)} objectives x {len(scfg.masks)} masks x "
         f"{len(cfg.learning_rates)} learning rates x {len(cfg.seeds)} seeds), {cfg.unlearn.steps} steps each, "
         f"evaluated every {cfg.eval_every} (fast metrics) -> sweep/")
    t0 = time.perf_counter()
    path = run_sweep(scfg)
    with open(os.path.join(path, "results.json")) as f:
        res = json.load(f)
    shutil.copyfile(os.path.join(path, "fronts.png"), os.path.join(out, "fronts.png"))
    _log("[demo] fronts over learning rates and seeds (sweep/table.txt, fronts.png):\n" + res["table"])
    return {"dir": "sweep", "seconds": time.perf_counter() - t0, "utility_key": res["utility_key"],
            "table": res["table"], "table_rows": res["table_rows"], "n_runs": res["n_runs"],
            "mask_diagnostics": res.get("mask_diagnostics")}


def _geffect_probe(bench, forget, retain, objective, mask, cfg):
    """The G-effect callback of one demo run (batches drawn like the training batches, another seed)."""
    from torch.utils.data import DataLoader

    from ..eval.g_effect import GEffectCallback
    from ..unlearn.data import ForgetRetainDataset, QACollator

    ds = ForgetRetainDataset(forget, retain, seed=cfg.unlearn.seed + 1)
    loader = DataLoader(ds, batch_size=cfg.unlearn.batch_size, collate_fn=QACollator(bench.tokenizer))
    return GEffectCallback(objective, loader, every=cfg.geffect_every, mask=mask)


def _attack_columns(model, tok, forget, cfg, run_dir) -> dict:
    """Forget accuracy (ROUGE-L recall >= 0.5) after 25 relearning steps on 10% of the forget set
    (measured on the rest), the worst case over prompt rewrites, and the fraction of degenerate
    answers; the full results go to ``attacks.json`` in ``run_dir``."""
    from ..eval.attacks import output_quality, prompt_attack, relearn_attack
    from ..eval.metrics import greedy_generate

    relearn = relearn_attack(model, tok, forget, fraction=0.1, steps=(0, 25), learning_rate=cfg.attack_learning_rate,
                             seed=cfg.unlearn.seed, max_new_tokens=48, eval_batch_size=cfg.eval_batch_size)
    prompts = prompt_attack(model, tok, forget, max_new_tokens=48, batch_size=cfg.eval_batch_size)
    gens = greedy_generate(model, tok, [it["question"] for it in forget], batch_size=cfg.eval_batch_size,
                           max_new_tokens=48, progress=False)
    quality = output_quality(gens)
    if run_dir is not None:
        with open(os.path.join(run_dir, "attacks.json"), "w") as f:
            json.dump({"relearn": relearn, "prompt": prompts,
                       "output_quality": {k: v for k, v in quality.items() if k != "per_item"}, "generations": gens},
                      f, indent=2, default=float)
    return {"relearn0_acc": relearn["curve"][0]["accuracy"], "relearn25_acc": relearn["curve"][-1]["accuracy"],
            "prompt_worst_acc": prompts["worst_case"]["accuracy"], "prompt_worst_template": prompts["worst_case"]["template"],
            "degenerate": quality["degenerate_rate"], "refusal": quality["refusal_rate"]}
