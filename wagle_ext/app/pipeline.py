"""The pieces every ``wagle`` job is built from: the job's run directory and log
(:class:`~wagle_ext.app.runs.RunDir`), device/dtype, the model and the data of a config, scores,
masks, one unlearning run with :class:`~wagle_ext.unlearn.trainer.UnlearnTrainer` (progress lines,
checkpoints, ``--resume``, extra callbacks such as the trajectory evaluation) and the evaluator that
:class:`~wagle_ext.unlearn.trajectory.TrajectoryCallback` calls along the run
(:func:`_trajectory_evaluator`: the full TOFU protocol, or its generation-free ``fast`` subset)."""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Optional, Sequence

from ..unlearn.data import FORGET_TARGETS
from .config import FORGET_GRADIENT_KINDS, config_to_dict
from .config import source_root as _source_root
from .runs import RunDir, is_main_process

__all__ = ["last_checkpoint"]

_LOG_SINK: list = []  # the current job's RunDir (its log() prints and appends to log.txt)


def _log(msg: str) -> None:
    if _LOG_SINK:
        _LOG_SINK[-1].log(msg)
    elif is_main_process():
        print(msg, flush=True)


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
    try:  # datasets' own bars and warnings would garble the one-line errors and log files
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------------------------
# shared pieces: run directory, device, model, data, masks, unlearning
# ------------------------------------------------------------------------------------------------

class _Job:
    """One job's run: its :class:`RunDir` (``<out>.partial`` renamed to ``out`` on success), log sink,
    threads and quiet transformers. ``with _Job(tag, cfg) as run:``."""

    def __init__(self, tag: str, cfg: Any, *, resume: bool = False):
        _set_threads(getattr(cfg, "num_threads", 1))
        _quiet_transformers()
        _init_distributed(cfg)
        self.run = RunDir(cfg.out, overwrite=bool(getattr(cfg, "overwrite", False)), resume=resume, job=tag,
                          config=config_to_dict(cfg), source_root=_source_root())

    def __enter__(self) -> RunDir:
        from .. import _util

        _LOG_SINK.append(self.run)
        self._old_sink, _util.progress_sink = _util.progress_sink, self.run.log  # progress lines into log.txt
        self.run.__enter__()
        self.run.log(f"[{self.run.job}] writing to {self.run.work} (renamed to {self.run.path} when done)")
        return self.run

    def __exit__(self, *exc: Any) -> bool:
        from .. import _util

        try:
            return self.run.__exit__(*exc)
        finally:
            _LOG_SINK.remove(self.run)
            _util.progress_sink = self._old_sink


def _init_distributed(cfg: Any) -> None:
    """Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) set up the process group before
    anything else (``accelerate.PartialState``: gloo on CPU, NCCL on CUDA), so that the output
    directory's checks and the data are coordinated across ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState

    device = getattr(cfg, "device", "auto")
    PartialState(cpu=device == "cpu")


def _device_dtype(cfg: Any):
    from .loading import resolve_device, resolve_dtype

    device = resolve_device(getattr(cfg, "device", "cpu"))
    dtype = resolve_dtype(getattr(cfg, "dtype", "float32"), device)
    return device, dtype


def _benchmark(cfg: Any):
    from .embedded_benchmark import load_or_build_benchmark

    return load_or_build_benchmark(cfg.benchmark, cache_dir=cfg.cache_dir,
                                   rebuild=bool(getattr(cfg, "rebuild", False)), log=_log)


def _load_model(cfg: Any, bench: Any, device, dtype, name: Optional[str] = None):
    """(model, tokenizer): the benchmark's target (``embedded``) or the user's model on ``device``."""
    from .loading import check_vocab, load_model_and_tokenizer

    name = cfg.model if name is None else name
    if name == "embedded":
        model = copy.deepcopy(bench.target).to(device=device, dtype=dtype)
        tok = bench.tokenizer
    else:
        model, tok = load_model_and_tokenizer(name, cfg.tokenizer, device=device, dtype=dtype, log=_log)
    check_vocab(model, tok)
    return model, tok


def _embedded_splits(bench: Any, d: Any) -> dict:
    fs = d.forget or bench.config.forget_split
    rs = d.retain or "retain" + str(100 - int(bench.config.forget_split[len("forget"):])).zfill(2)
    return {"forget": fs, "retain": rs}


def _load_data(cfg: Any, bench: Any, fields: Sequence[str] = ("forget", "retain")) -> dict:
    """{field: items} for ``data.<field>`` (see :class:`DataConfig`); one-line errors name the field."""
    from .loading import load_qa_data

    d = cfg.data
    out = {}
    if d.source == "embedded":
        names = _embedded_splits(bench, d)
        for f in fields:
            split = names[f]
            if split not in bench.data:
                raise ValueError(f"data.{f}: split {split!r} not found in the embedded benchmark "
                                 f"(have: {', '.join(sorted(bench.data))})")
            out[f] = bench.data[split]
        return out
    for f in fields:
        spec = getattr(d, f)
        if spec is None:
            continue
        items = load_qa_data(d.source, spec, columns=d.columns or None, field=f"data.{f}", log=_log)
        if not items:
            raise ValueError(f"data.{f}: {spec} holds no items")
        out[f] = items
    return out


def _model_tokenizer_data(cfg: Any):
    """(model, tokenizer, {"forget": items, "retain": items}, benchmark or None, device)."""
    device, dtype = _device_dtype(cfg)
    bench = _benchmark(cfg) if cfg.model == "embedded" or cfg.data.source == "embedded" else None
    data = _load_data(cfg, bench)  # data errors before the (slow) model load
    model, tok = _load_model(cfg, bench, device, dtype)
    return model, tok, data, bench, device


def _compute_scores(model, tok, forget, retain, kind: str, gamma: float, seed: int = 0,
                    max_batches: Optional[int] = None, batch_size: int = 8, progress: bool = False,
                    hessian: Optional[str] = None, memory_budget: Optional[str] = None,
                    forget_target: str = "answer"):
    """Attribution scores (a ``{name: tensor}`` dict, or with ``memory_budget`` grouped scores that
    re-run the data passes per group: hand them to ``build_mask`` once). The accumulated gradient is a
    sum of per-example gradients, so ``batch_size`` changes the speed, not the scores.
    ``forget_target="refusal"``: the forget gradient is taken on the forget questions answered with
    refusals (:func:`~wagle_ext.unlearn.data.refusal_targets`: those PO's data of ``seed`` draws), the
    forget loss of PO/IdkPO -- WAGLE's ``snip_advanced_CL``; only for the kinds of
    ``FORGET_GRADIENT_KINDS``."""
    from torch.utils.data import DataLoader

    from ..attribution import score_model
    from ..unlearn.data import QACollator, refusal_targets

    if forget_target not in FORGET_TARGETS:
        raise ValueError(f"forget_target must be one of {FORGET_TARGETS}, got {forget_target!r}")
    if forget_target == "refusal":
        if kind not in FORGET_GRADIENT_KINDS:
            raise ValueError(f"forget_target 'refusal' changes the forget gradient; kind {kind!r} takes none "
                             f"(kinds with one: {', '.join(FORGET_GRADIENT_KINDS)})")
        forget = refusal_targets(forget, retain, seed=seed)
    coll = QACollator(tok)
    fl = DataLoader(forget, batch_size=batch_size, collate_fn=coll)
    rl = DataLoader(retain, batch_size=batch_size, collate_fn=coll)
    return score_model(model, fl, rl, kind=kind, gamma=gamma, seed=seed, max_batches=max_batches,
                       progress=progress, hessian=hessian, memory_budget=memory_budget)


def _build_mask(model, tok, forget, retain, kind: str, ratio: float, gamma: float, seed: int = 0,
                scope: str = "global", max_batches: Optional[int] = None):
    from ..masks import build_mask

    scores = _compute_scores(model, tok, forget, retain, kind, gamma, seed=seed, max_batches=max_batches)
    mask = build_mask(scores, ratio, scope=scope, model=model)
    return scores, mask


def _fisher(model, tok, forget, retain, batch_size: int, seed: int = 0, modules=None, progress: bool = True):
    """LoKU's importances: one pass over the forget items, each paired with a seeded random retain item
    (:class:`ForgetRetainDataset`), ``batch_size`` pairs per batch (the Fisher depends on it)."""
    from torch.utils.data import DataLoader

    from ..lora import fisher_importance
    from ..unlearn.data import ForgetRetainDataset, QACollator

    loader = DataLoader(ForgetRetainDataset(forget, retain, seed=seed), batch_size=batch_size, shuffle=False,
                        collate_fn=QACollator(tok))
    return fisher_importance(model, loader, loader, modules=modules, forget_key="forget", retain_key="retain",
                             progress=progress)


def _lora_model(model, tok, forget, retain, lo, *, mask=None, seed: int = 0, progress: bool = True):
    """(PEFT model, info) for ``--lora.*`` (:class:`~wagle_ext.app.config.LoraSettings`): FILA importances
    (computed or read), adapters on every target linear or placed by WAGLE mass (``mask``, else WAGLE scores
    computed here) within the budget, then ``add_lora``."""
    from ..lora import FisherImportance, add_lora, lora_param_count, lora_target_modules, select_lora_targets

    t0 = time.perf_counter()
    info: dict = {"rank": lo.rank, "alpha": lo.alpha if lo.alpha is not None else 2.0 * lo.rank, "init": lo.init,
                  "targets": lo.targets}
    imp = None
    if lo.init == "fila":
        if lo.importances is not None:
            imp = FisherImportance.load(lo.importances)
            info["importances"] = lo.importances
        else:
            imp = _fisher(model, tok, forget, retain, lo.fisher_batch_size, seed=seed, modules=lo.modules,
                          progress=progress)
            info["importances"] = f"computed (batch size {lo.fisher_batch_size})"
        info["fisher_seconds"] = time.perf_counter() - t0
    targets = lo.modules
    if lo.targets == "wagle":
        linears = lora_target_modules(model, lo.modules)
        budget = lo.budget or sum(lora_param_count(m.weight.shape, lo.rank) for m in linears.values())
        source = mask
        if source is None:
            source = _compute_scores(model, tok, forget, retain, "wagle", lo.gamma, seed=seed, progress=progress)
        targets = select_lora_targets(source, budget, rank=lo.rank, proportional=True, ratio=lo.ratio, model=model,
                                      modules=lo.modules)
        info.update(budget=budget, placement=targets.ranks, placement_source="mask" if mask is not None else
                    f"wagle scores (ratio {lo.ratio:g}, gamma {lo.gamma:g})")
    peft_model = add_lora(model, rank=lo.rank, alpha=lo.alpha, targets=targets, init=lo.init, importances=imp,
                          dropout=lo.dropout, seed=seed)
    if lo.init == "fila":  # where eps swamps the retain Fisher, FILA ranks rows by the forget Fisher alone
        info["fila_eps_dominated"] = peft_model.wagle_fila["default"]["eps_dominated"]
    info["adapted_modules"] = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    info["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    info["seconds"] = time.perf_counter() - t0
    return peft_model, info


class _ProgressCallback:
    """One plain line per logged step: ``[unlearn] step 10/40  loss 1.2345  grad_norm 0.88  lr 1e-05
    12.3 s elapsed, ETA 36.9 s`` (through the job's log, so it lands in ``log.txt`` too)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        import transformers

        class _CB(transformers.TrainerCallback):
            def __init__(self):
                self.t0 = None
                self.step0 = 0

            def on_train_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()
                self.step0 = state.global_step

            def on_log(self, args, state, control, logs=None, **kw):
                if not state.is_world_process_zero or not logs or "loss" not in logs:
                    return
                done = state.global_step - self.step0
                elapsed = time.perf_counter() - self.t0
                eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
                parts = [f"loss {logs['loss']:.4f}"]
                if logs.get("grad_norm") is not None:
                    parts.append(f"grad_norm {float(logs['grad_norm']):.3g}")
                if "learning_rate" in logs:
                    parts.append(f"lr {float(logs['learning_rate']):.3g}")
                _log(f"[unlearn] step {state.global_step}/{state.max_steps}  " + "  ".join(parts) +
                     f"  {elapsed:.1f} s elapsed, ETA {eta:.1f} s")

            def on_save(self, args, state, control, **kw):
                if _LOG_SINK:
                    _LOG_SINK[-1].keep_on_failure()  # checkpoints are kept for --resume if the run dies
                if state.is_world_process_zero:
                    _log(f"[unlearn] checkpoint at step {state.global_step}")

        return _CB()


def last_checkpoint(directory: str) -> Optional[str]:
    """The newest complete ``checkpoint-N`` under ``directory`` (``trainer_state.json`` is written
    last, so a checkpoint cut short by a kill is skipped), or None."""
    if not os.path.isdir(directory):
        return None
    best = None
    for name in os.listdir(directory):
        if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            n = int(name[len("checkpoint-"):])
            if best is None or n > best[0]:
                best = (n, path)
    return best[1] if best else None


def _unlearn(model, tok, forget, retain, objective: str, mask, u, out_dir: str, objective_kwargs=None, *,
             device=None, run: Optional[RunDir] = None, resume: bool = False, demo: bool = False,
             callbacks: Sequence[Any] = ()):
    """Unlearn ``model`` in place with :class:`UnlearnTrainer`; returns the trainer's final log.
    ``demo``: no progress lines, no checkpoints; ``callbacks``: added to the trainer (after its own)."""
    import transformers

    from ..unlearn.data import ForgetRetainDataset, QACollator
    from ..unlearn.trainer import UnlearnTrainer

    kw = dict(objective_kwargs or {})
    kw.setdefault("alpha", u.alpha)
    if objective.lower() in ("npo", "simnpo", "tnpo", "wtnpo", "dpo"):
        kw.setdefault("beta", u.npo_beta)
    save = u.save_steps > 0 and not demo
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=u.batch_size, learning_rate=u.learning_rate,
        max_steps=u.steps, lr_scheduler_type="constant", warmup_steps=0, weight_decay=u.weight_decay,
        max_grad_norm=u.max_grad_norm, logging_steps=u.logging_steps or max(1, u.steps // 10),
        save_strategy="steps" if save else "no", save_steps=u.save_steps if save else 500,
        save_total_limit=u.save_total_limit if save else None, report_to=[],
        use_cpu=device is None or device.type == "cpu", seed=u.seed, data_seed=u.seed, disable_tqdm=True)
    ds = ForgetRetainDataset(forget, retain, seed=u.seed, refusal=objective.lower() in ("po", "idkpo", "dpo"))
    # compact gradients keep only masked entries: dense (mask-free) runs always use dense gradients
    compact = mask is not None and u.grad_mode == "compact"
    trainer = UnlearnTrainer(model=model, args=args, objective=objective, objective_kwargs=kw, mask=mask,
                             train_dataset=ds, data_collator=QACollator(tok),
                             grad_mode="compact" if compact else "dense",
                             step_in_backward=compact and u.step_in_backward,
                             master_weights=u.master_weights, rounding=u.rounding)
    rescore = None
    if mask is not None and u.rescore_every:
        from torch.utils.data import DataLoader

        from ..unlearn.rescore import RescoreCallback

        coll = QACollator(tok)
        scored = forget
        if mask.metadata.get("forget_target") == "refusal":  # re-score on what the mask was scored on
            from ..unlearn.data import refusal_targets

            scored = refusal_targets(forget, retain, seed=u.seed)
        rescore = RescoreCallback(u.rescore_every, DataLoader(scored, batch_size=8, collate_fn=coll),
                                  DataLoader(retain, batch_size=8, collate_fn=coll))
        callbacks = [*callbacks, rescore]
    trainer.remove_callback(transformers.PrinterCallback)  # our own progress lines instead of raw log dicts
    if not demo:
        from ..masks import format_trainable_report

        trainer.add_callback(_ProgressCallback())
        if trainer.trainable_report is not None:  # what will move, honestly counted (frozen = bit-identical)
            _log("[unlearn] " + format_trainable_report(trainer.trainable_report))
    for cb in callbacks:
        if hasattr(cb, "bind_trainer"):  # e.g. the G-effect probe: the trainer's objective and reference model
            cb.bind_trainer(trainer)
        trainer.add_callback(cb)
    checkpoint = None
    if resume:
        checkpoint = last_checkpoint(out_dir)
        if checkpoint is None:
            raise ValueError(f"resume: no complete checkpoint under {out_dir} (was --unlearn.save_steps set?)")
        _log(f"[unlearn] resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    model.eval()
    if rescore is not None and rescore.history and not demo:
        _log("[unlearn] mask re-scored at steps " + ", ".join(
            f"{h['step']} (kept {h['kept']:.1%})" for h in rescore.history))
    return {"train_loss": float(result.training_loss), "log_history": trainer.state.log_history,
            "rescore_history": rescore.history if rescore is not None else None, "trainer": trainer}


# ------------------------------------------------------------------------------------------------
# evaluation along the trajectory
# ------------------------------------------------------------------------------------------------

def _trajectory_evaluator(tok, sets: dict, forget_split: str, retain_sets: Sequence[str], *, metrics: str,
                          reference=None, holdout: Optional[str] = None, batch_size: int = 32,
                          max_new_tokens: int = 200):
    """``model -> {metric: float}`` for :class:`~wagle_ext.unlearn.trajectory.TrajectoryCallback`.

    ``metrics="all"``: :func:`~wagle_ext.eval.evaluate_tofu` on ``sets`` (the numbers ``wagle eval``
    reports: ROUGE by greedy generation, OU's 9-component ``model_utility``, privleak with a holdout).
    ``metrics="fast"``: no generation -- answer probabilities and truth ratios of the forget set and of
    each retain-type set, ``forget_quality`` and ``model_utility_no_rouge`` (the harmonic mean of the
    utility components without the ROUGE ones); each value equals the one of ``evaluate_tofu`` under the
    same name. ``reference``: the retain model's evaluation (``TOFU_EVAL.json`` path or dict) for
    forget quality, read once here; None: no forget quality."""
    from ..eval import evaluate_tofu, load_retain_eval, resolve_tofu_sets

    if metrics == "all":
        def evaluate_all(model) -> dict:
            return evaluate_tofu(model, tok, sets, forget_split=forget_split, retain_sets=tuple(retain_sets),
                                 holdout=holdout, retain_model_eval=reference, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, progress=False)

        return evaluate_all
    if metrics != "fast":
        raise ValueError(f"eval.metrics must be all or fast, got {metrics!r}")
    prefixes, _ = resolve_tofu_sets(sets, forget_split, tuple(retain_sets), None)
    ref_tr = None
    if reference is not None:
        from ..eval import forget_set_identity

        ref = load_retain_eval(reference)
        mine = forget_set_identity(sets[forget_split])
        if ref["forget_items"] is not None and ref["forget_items"] != mine or \
                ref["forget_items"] is None and ref["n_items"] != mine["n"]:
            raise ValueError(f"retain-model evaluation {ref['where']} was made on a different forget set than "
                             "the one evaluated here")
        ref_tr = ref["forget_truth_ratios"]

    def evaluate_fast(model) -> dict:
        return _fast_metrics(model, tok, sets, forget_split, prefixes, ref_tr, batch_size)

    return evaluate_fast


def _fast_metrics(model, tok, sets: dict, forget_split: str, prefixes: dict, ref_tr, batch_size: int) -> dict:
    """The generation-free subset of the TOFU protocol (see :func:`_trajectory_evaluator`), computed as
    :func:`~wagle_ext.eval.evaluate_tofu` computes it (same batches, same formulas)."""
    import math

    import numpy as np

    from ..eval import (answer_log_probs, answer_probability, forget_quality, model_utility, normalised_probability,
                        truth_ratio, truth_ratio_score)
    from ..unlearn.data import QACollator

    col = QACollator(tok)

    def mean(x) -> float:
        return float(np.mean(np.asarray(x, dtype=np.float64)))

    def field(items, key):
        return answer_log_probs(model, tok, [it["question"] for it in items], [it[key] for it in items], batch_size,
                                collator=col, progress=False)

    def perturbed(items) -> list:
        flat_q, flat_a, owner = [], [], []
        for i, it in enumerate(items):
            for a in it["perturbed_answer"]:
                flat_q.append(it["question"])
                flat_a.append(a)
                owner.append(i)
        lp = answer_log_probs(model, tok, flat_q, flat_a, batch_size, collator=col, progress=False).mean_log_prob
        rows: list = [[] for _ in items]
        for o, v in zip(owner, lp.tolist()):
            rows[o].append(v)
        return rows

    def prob(lp) -> float:
        return mean(answer_probability(lp.sum_log_prob, lp.num_tokens))

    model.eval()
    forget = sets[forget_split]
    true, para, pert = field(forget, "answer"), field(forget, "paraphrased_answer"), perturbed(forget)
    tr = truth_ratio(para.mean_log_prob, pert)
    out = {"forget_Q_A_Prob": prob(true), "forget_Q_A_PARA_Prob": prob(para),
           "forget_truth_ratio": truth_ratio_score(tr, "closer_to_1_better")}
    if ref_tr is not None:
        out["forget_quality"] = float(forget_quality(tr, ref_tr))
    utility = {}
    for s, p in prefixes.items():
        items = sets[s]
        true, pert = field(items, "answer"), perturbed(items)
        if p == "retain":
            para = field(items, "paraphrased_answer")
            out[f"{p}_Q_A_Prob"] = utility[f"{p}_Q_A_Prob"] = prob(true)
            r = truth_ratio(para.mean_log_prob, pert)
        else:
            true_p = answer_probability(true.sum_log_prob, true.num_tokens)
            norm = normalised_probability(true_p, [[math.exp(v) for v in row] for row in pert])
            out[f"{p}_Q_A_Prob"] = prob(true)
            out[f"{p}_Q_A_Prob_normalised"] = utility[f"{p}_Q_A_Prob_normalised"] = mean(norm)
            r = truth_ratio(true.mean_log_prob, pert)
        out[f"{p}_Truth_Ratio"] = utility[f"{p}_Truth_Ratio"] = truth_ratio_score(r, "true_better")
    if utility:
        out["model_utility_no_rouge"] = model_utility(utility)
    return out
