"""``wagle attack``: is it really forgotten? Runs the attacks of :mod:`wagle_ext.eval.attacks` on a
model's forget set and writes one ``ATTACK_<kind>.json`` per attack plus ``ATTACKS.json`` (all of them,
and a one-line summary per attack) into the run directory.

    wagle attack --model saves/unlearn/model --data.forget forget.json \\
                 --attacks "[relearn, in_context, prompt, output_quality]" --reference_model retain-model/

``--reference_model`` (e.g. the retain-only model) is attacked the same way when given, as the
baseline a truly forgotten model should match, and it scores the unlearned model's answers'
perplexity in ``output_quality``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from .config import DataConfig  # noqa: F401  (a field type of AttackConfig)
from .embedded_benchmark import BenchmarkConfig
from .pipeline import _benchmark, _device_dtype, _Job, _load_data, _load_model, _log

__all__ = ["AttackConfig", "run_attack", "ATTACK_KINDS"]

ATTACK_KINDS = ("relearn", "in_context", "prompt", "output_quality")


@dataclasses.dataclass
class AttackConfig:
    """``wagle attack``: attacks on the forget set of a (typically unlearned) model."""

    DATA_FIELDS = ("forget",)  # the attacks read the forget set only (config.py's data checks)

    out: str = "saves/attack"
    model: str = "embedded"
    tokenizer: Optional[str] = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    attacks: list = dataclasses.field(default_factory=lambda: list(ATTACK_KINDS))
    reference_model: Optional[str] = None  # attacked too (baseline), and the perplexity judge of output_quality
    relearn_fraction: float = 0.1
    relearn_steps: list = dataclasses.field(default_factory=lambda: [0, 5, 10, 25, 50])
    relearn_learning_rate: float = 1e-4
    relearn_batch_size: int = 4
    in_context_extra: int = 2      # other items' facts put into the context as distractors
    max_new_tokens: int = 64
    threshold: float = 0.5         # an answer counts as correct at ROUGE-L recall >= threshold
    batch_size: int = 16
    seed: int = 0
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    cache_dir: Optional[str] = None
    num_threads: int = 1
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False


def validate_attack(cfg: AttackConfig) -> None:
    """Field checks of :class:`AttackConfig` (ValueError naming the field)."""
    if not cfg.attacks:
        raise ValueError("attacks: name at least one of " + ", ".join(ATTACK_KINDS))
    for i, a in enumerate(cfg.attacks):
        if a not in ATTACK_KINDS:
            raise ValueError(f"attacks[{i}]: unknown attack {a!r} (known: {', '.join(ATTACK_KINDS)})")
    if not 0.0 < cfg.relearn_fraction < 1.0:
        raise ValueError(f"relearn_fraction: must be in (0, 1), got {cfg.relearn_fraction}")
    if not cfg.relearn_steps or any(not isinstance(k, int) or k < 0 for k in cfg.relearn_steps):
        raise ValueError(f"relearn_steps: must be step counts >= 0, got {cfg.relearn_steps}")
    for k in ("relearn_batch_size", "max_new_tokens", "batch_size"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"{k}: must be >= 1, got {getattr(cfg, k)}")
    if cfg.relearn_learning_rate <= 0:
        raise ValueError(f"relearn_learning_rate: must be > 0, got {cfg.relearn_learning_rate}")
    if not 0.0 < cfg.threshold <= 1.0:
        raise ValueError(f"threshold: must be in (0, 1], got {cfg.threshold}")
    if cfg.in_context_extra < 0:
        raise ValueError(f"in_context_extra: must be >= 0, got {cfg.in_context_extra}")


def _attack_one(kind: str, model: Any, tok: Any, forget: list, cfg: AttackConfig, judge: Any = None) -> dict:
    from ..eval import attacks
    from ..eval.metrics import greedy_generate

    if kind == "relearn":
        return attacks.relearn_attack(model, tok, forget, fraction=cfg.relearn_fraction, steps=cfg.relearn_steps,
                                      learning_rate=cfg.relearn_learning_rate, batch_size=cfg.relearn_batch_size,
                                      seed=cfg.seed, max_new_tokens=cfg.max_new_tokens, threshold=cfg.threshold,
                                      eval_batch_size=cfg.batch_size)
    if kind == "in_context":
        return attacks.in_context_attack(model, tok, forget, extra_context=min(cfg.in_context_extra, len(forget) - 1),
                                         seed=cfg.seed, max_new_tokens=cfg.max_new_tokens, threshold=cfg.threshold,
                                         batch_size=cfg.batch_size)
    if kind == "prompt":
        return attacks.prompt_attack(model, tok, forget, max_new_tokens=cfg.max_new_tokens, threshold=cfg.threshold,
                                     batch_size=cfg.batch_size)
    questions = [it["question"] for it in forget]
    gens = greedy_generate(model, tok, questions, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                           progress=False)
    res = attacks.output_quality(gens, questions=questions if judge is not None else None,
                                 reference_model=judge, tokenizer=tok if judge is not None else None,
                                 batch_size=cfg.batch_size)
    res["generations"] = gens
    return res


def _summary(kind: str, res: dict) -> str:
    if kind == "relearn":
        c = res["curve"]
        return "forget accuracy " + ", ".join(f"k={x['step']}: {x['accuracy']:.2f}" for x in c)
    if kind == "in_context":
        return (f"accuracy without context {res['without']['accuracy']:.2f}, with the fact in context "
                f"{res['with_context']['accuracy']:.2f}")
    if kind == "prompt":
        w = res["worst_case"]
        return f"worst-case accuracy {w['accuracy']:.2f} ({w['template']})"
    return (f"refusals {res['refusal_rate']:.2f}, degenerate {res['degenerate_rate']:.2f}, other "
            f"{res['other_rate']:.2f}")


def run_attack(cfg: AttackConfig) -> str:
    validate_attack(cfg)
    with _Job("attack", cfg) as run:
        device, dtype = _device_dtype(cfg)
        bench = _benchmark(cfg) if cfg.model == "embedded" or cfg.data.source == "embedded" else None
        forget = _load_data(cfg, bench, fields=("forget",))["forget"]
        model, tok = _load_model(cfg, bench, device, dtype)
        models = {"model": model}
        if cfg.reference_model is not None:
            models["reference_model"], _ = _load_model(cfg, bench, device, dtype, name=cfg.reference_model)
        model.eval()
        results: dict = {}
        for kind in cfg.attacks:
            results[kind] = {}
            for who, m in models.items():
                with run.phase(f"{kind}/{who}"):
                    judge = models.get("reference_model") if kind == "output_quality" and who == "model" else None
                    res = _attack_one(kind, m, tok, forget, cfg, judge=judge)
                results[kind][who] = res
                _log(f"[attack] {kind} on {who}: {_summary(kind, res)}")
            with open(run.file(f"ATTACK_{kind}.json"), "w") as f:
                json.dump(results[kind], f, indent=2, default=float)
        summary = {k: {who: _summary(k, r) for who, r in v.items()} for k, v in results.items()}
        with open(run.file("ATTACKS.json"), "w") as f:
            json.dump({"summary": summary, "results": results, "forget_items": len(forget)}, f, indent=2, default=float)
        run.update(device=str(device), summary=summary)
    return run.path
