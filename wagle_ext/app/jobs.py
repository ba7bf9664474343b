"""The single-step jobs: ``wagle score`` / ``mask`` / ``unlearn`` / ``eval`` / ``bench``. Each
writes into a :class:`~wagle_ext.app.runs.RunDir` (``<out>.partial`` renamed to ``out`` on success).
``wagle unlearn --eval_every N`` evaluates along the run (:func:`_trajectory_setup`, also used by
``wagle sweep``) into ``trajectory.json``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

from .config import BenchConfig, EvalConfig, ScoreConfig, UnlearnConfig
from .config import source_root as _source_root
from .pipeline import (_benchmark, _compute_scores, _device_dtype, _embedded_splits, _fisher, _Job, _load_model,
                       _log, _lora_model, _model_tokenizer_data, _trajectory_evaluator, _unlearn)
from .runs import is_main_process

__all__ = ["run_score", "run_unlearn", "run_eval", "run_bench"]


def run_score(cfg: ScoreConfig, *, with_mask: bool) -> str:
    """``wagle score`` (scores.safetensors + the mask) / ``wagle mask`` (the mask; from ``cfg.scores``
    when given, without computing gradients)."""
    job = "mask" if with_mask else "score"
    if cfg.scores is not None and not with_mask:
        raise ValueError("scores: only `wagle mask` reads precomputed scores")
    if cfg.memory_budget is not None and not with_mask:
        raise ValueError("memory_budget: scores of a bounded run are produced group by group and never held "
                         "at once; use `wagle mask --memory_budget ...` (mask straight from the grouped passes)")
    if cfg.kind == "fisher":
        if with_mask or cfg.scores is not None or cfg.memory_budget is not None:
            raise ValueError("kind: fisher importances are written by `wagle score --kind fisher` (no mask, no "
                             "--scores, no --memory_budget); use them with `wagle unlearn --lora.init fila "
                             "--lora.importances <out>/fisher.safetensors`")
        return _run_fisher(cfg)
    with _Job(job, cfg) as run:
        if cfg.scores is not None:
            model = None
            if cfg.model != "embedded":  # bind (names, fingerprint) to the user's model when given
                device, dtype = _device_dtype(cfg)
                model, _ = _load_model(cfg, None, device, dtype)
            with run.phase("load_scores"):
                scores, info = _read_scores(cfg.scores, model)
            _log(f"[mask] {info.get('kind', '?')} scores of {len(scores)} tensors from {cfg.scores}")
        else:
            model, tok, data, _, device = _model_tokenizer_data(cfg)
            _log(f"[score] {cfg.kind} scores on {len(data['forget'])} forget / {len(data['retain'])} retain items "
                 f"on {device}")
            with run.phase("score"):
                scores = _compute_scores(model, tok, data["forget"], data["retain"], cfg.kind, cfg.gamma,
                                         seed=cfg.seed, max_batches=cfg.max_batches, batch_size=cfg.batch_size,
                                         progress=True, memory_budget=cfg.memory_budget,
                                         forget_target=cfg.forget_target)
            if cfg.memory_budget is not None:
                _log(f"[score] memory budget {cfg.memory_budget}: {len(scores.groups)} parameter groups, "
                     f"{2 * len(scores.groups)} passes over the data")
            info = {"kind": cfg.kind, "gamma": str(cfg.gamma)}
            if cfg.forget_target != "answer":
                info["forget_target"] = cfg.forget_target
            if not with_mask:
                from safetensors.torch import save_file

                # safetensors lists tensors by name; the parameter order (which breaks ties in the
                # selection) travels in the metadata
                meta = {**{k: str(v) for k, v in info.items()}, "order": json.dumps(list(scores))}
                save_file({n: s.detach().float().cpu().contiguous() for n, s in scores.items()},
                          run.file("scores.safetensors"), metadata=meta)
                _log("[score] wrote scores.safetensors")
        with run.phase("select"):
            target = info.get("forget_target")
            mask = _select(scores, cfg, model, {"forget_target": target} if target else None)
        mask.save(run.file("mask.safetensors"))
        mask.plot(run.file("mask.png"), title=f"{info.get('kind', cfg.kind)} mask, ratio {cfg.ratio:g}")
        with open(run.file("mask_stats.json"), "w") as f:
            json.dump(mask.stats(), f, indent=2, default=float)
        _log(f"[mask] {mask.total_selected} of {mask.numel} weights selected ({mask.density:.4f}, scope "
             f"{cfg.scope}, parameters without scores: {cfg.missing}); wrote mask.safetensors, mask.png, "
             "mask_stats.json")
        run.update(mask={"selected": mask.total_selected, "numel": mask.numel, "density": mask.density})
    return run.path


def _run_fisher(cfg: ScoreConfig) -> str:
    """``wagle score --kind fisher``: LoKU's Fisher importances of every decoder linear -> fisher.safetensors."""
    with _Job("score", cfg) as run:
        model, tok, data, _, device = _model_tokenizer_data(cfg)
        _log(f"[score] fisher importances on {len(data['forget'])} forget items paired with random retain items, "
             f"batch size {cfg.fisher_batch_size}, on {device}")
        with run.phase("score"):
            imp = _fisher(model, tok, data["forget"], data["retain"], cfg.fisher_batch_size, seed=cfg.seed)
        imp.save(run.file("fisher.safetensors"))
        run.update(fisher={"weights": len(imp.forget), "forget_tokens": imp.forget_tokens,
                           "retain_tokens": imp.retain_tokens})
        _log(f"[score] wrote fisher.safetensors ({len(imp.forget)} weights; {imp.forget_tokens} forget / "
             f"{imp.retain_tokens} retain label tokens)")
    return run.path


def _read_scores(path: str, model=None):
    """{name: float tensor} in parameter order (the order ``wagle score`` recorded, else the model's,
    else the file's) and the metadata of a ``scores.safetensors``; one-line errors naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            info = dict(f.metadata() or {})
            names = list(f.keys())
            order = json.loads(info.pop("order", "null")) or []
            if model is not None:
                order = [n for n, _ in model.named_parameters()]
            rank = {n: i for i, n in enumerate(order)}
            pos = {n: i for i, n in enumerate(names)}
            names.sort(key=lambda n: (rank.get(n, len(rank)), pos[n]))
            scores = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"scores: {path} is not a readable scores file ({msg})") from None
    if not scores:
        raise ValueError(f"scores: {path} holds no tensors")
    for k, v in scores.items():
        if not v.is_floating_point():
            raise ValueError(f"scores: {path}: tensor {k!r} is {v.dtype}, expected floating-point scores")
    return scores, info


def _select(scores, cfg: ScoreConfig, model, metadata: Optional[dict] = None):
    from ..masks import build_mask

    kwargs = {"scope": cfg.scope, "model": model, "missing": cfg.missing}
    if metadata:
        kwargs["metadata"] = metadata
    if cfg.allow_empty:
        kwargs["allow_empty"] = True
    mask = build_mask(scores, cfg.ratio, **kwargs)
    if mask.total_selected == 0 and not cfg.allow_empty:  # older build_mask without its own check
        raise ValueError(f"ratio {cfg.ratio:g} selects 0 of {mask.numel} weights; raise --ratio "
                         "(or pass --allow_empty true)")
    return mask


def _load_mask(path: str, model):
    from ..masks import MaskSet

    try:
        return MaskSet.load(path, model=model)
    except (ValueError, KeyError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(msg if path in msg else f"mask {path}: {msg}") from None
    except Exception as e:  # e.g. safetensors' SafetensorError on a file that is not one
        raise ValueError(f"mask {path}: not a readable MaskSet file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _weights_digest(model) -> str:
    """sha256 of the model's state (names and raw bytes): equal digests = bit-identical weights.
    Under FSDP2 (DTensor weights) it covers this rank's own shards: ranks then differ by design."""
    import hashlib

    import torch

    from ..masks.sharding import local_tensor

    h = hashlib.sha256()
    for n, p in model.state_dict().items():
        h.update(n.encode())
        h.update(local_tensor(p).detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _trajectory_setup(cfg: Any, bench: Any, tok: Any, device, dtype, work_dir: str) -> tuple:
    """(evaluate, info) for the evaluation along a run: the sets of ``wagle eval`` (:func:`_eval_sets`
    with ``cfg.eval``'s options), the forget-quality reference (the embedded benchmark's retain
    evaluation, ``eval.retain_model_eval``, or ``eval.retain_model`` evaluated once here into
    ``<work_dir>/trajectory_reference``) and ``eval.metrics``. ``info``: what is evaluated, and
    ``utility_key`` (``model_utility``, or ``model_utility_no_rouge`` for ``fast``)."""
    import types

    e, d = cfg.eval, cfg.data
    sets, fs, retain_sets, holdout, max_new = _eval_sets(
        types.SimpleNamespace(data=d, retain_sets=e.retain_sets, max_new_tokens=e.max_new_tokens), bench)
    ref = e.retain_model_eval
    if ref == "embedded" or (ref is None and e.retain_model is None and d.source == "embedded"):
        if bench is None or d.source != "embedded":
            raise ValueError("eval.retain_model_eval: 'embedded' needs data.source: embedded")
        ref = bench.retain_eval_path
    if e.retain_model is not None:
        from ..eval import evaluate_tofu

        retain_model, _ = _load_model(cfg, bench, device, dtype, name=e.retain_model)
        ref = os.path.join(work_dir, "trajectory_reference")
        _log(f"[eval] evaluating the retain model {e.retain_model} once (forget-quality reference) -> {ref}")
        evaluate_tofu(retain_model, tok, sets, forget_split=fs, retain_sets=tuple(retain_sets), holdout=holdout,
                      batch_size=e.batch_size, max_new_tokens=max_new, out_dir=ref, progress=False)
        del retain_model
    evaluate = _trajectory_evaluator(tok, sets, fs, retain_sets, metrics=e.metrics, reference=ref,
                                     holdout=holdout if e.metrics == "all" else None, batch_size=e.batch_size,
                                     max_new_tokens=max_new)
    info = {"metrics": e.metrics, "forget_set": fs, "n_forget": len(sets[fs]), "retain_sets": list(retain_sets),
            "holdout": holdout if e.metrics == "all" else None, "reference": ref, "max_new_tokens": max_new,
            "utility_key": "model_utility" if e.metrics == "all" else "model_utility_no_rouge"}
    return evaluate, info


def _geffect_callback(cfg: UnlearnConfig, tok: Any, data: dict, mask: Any, path: str):
    """The G-effect probe of ``wagle unlearn --geffect_every N``: batches drawn like the training
    batches (same batch size, another seed), the trainer's objective and reference (bound by
    ``_unlearn``), split masked/frozen when there is a mask."""
    from torch.utils.data import DataLoader

    from ..eval.g_effect import GEffectCallback
    from ..unlearn.data import ForgetRetainDataset, QACollator

    ds = ForgetRetainDataset(data["forget"], data["retain"], seed=cfg.unlearn.seed + 1)
    loader = DataLoader(ds, batch_size=cfg.unlearn.batch_size, shuffle=False, collate_fn=QACollator(tok))
    return GEffectCallback(cfg.objective, loader, every=cfg.geffect_every, mask=mask, path=path)


def run_unlearn(cfg: UnlearnConfig) -> str:
    with _Job("unlearn", cfg, resume=cfg.resume) as run:
        model, tok, data, bench, device = _model_tokenizer_data(cfg)
        mask = _load_mask(cfg.mask, model) if cfg.mask else None
        lora = cfg.lora.rank > 0
        what = "dense" if mask is None else f"mask {cfg.mask}"
        if lora:
            lo = cfg.lora
            with run.phase("lora"):
                model, info = _lora_model(model, tok, data["forget"], data["retain"], lo, mask=mask,
                                          seed=cfg.unlearn.seed)
            mask = None  # a mask only placed the adapters
            run.update(lora=info)
            if "fila_eps_dominated" in info:
                _log(f"[unlearn] FILA: the retain Fisher is below eps=1e-5 in {100 * info['fila_eps_dominated']:.1f}% "
                     "of the entries (there the row weights follow the forget Fisher alone)")
            what = (f"LoRA rank {lo.rank} ({lo.init} init) on {info['adapted_modules']} modules "
                    f"({'WAGLE-placed' if lo.targets == 'wagle' else 'all targets'}), {info['trainable']} trainable "
                    "parameters")
        _log(f"[unlearn] {cfg.objective} on {len(data['forget'])} forget / {len(data['retain'])} retain items, "
             f"{what}, {cfg.unlearn.steps} steps on {device}")
        callbacks = []
        if cfg.eval_every:
            from ..unlearn.trajectory import TrajectoryCallback

            with run.phase("eval_setup"):
                evaluate, info = _trajectory_setup(cfg, bench, tok, device, _device_dtype(cfg)[1], run.work)
            _log(f"[unlearn] evaluating every {cfg.eval_every} steps ({info['metrics']} metrics: {info['forget_set']} "
                 f"and {', '.join(info['retain_sets']) or 'no utility sets'}) into trajectory.json")
            callbacks.append(TrajectoryCallback(evaluate, cfg.eval_every, run.file("trajectory.json"), log=_log))
            run.update(trajectory=info)
        geffect = None
        if cfg.geffect_every:
            geffect = _geffect_callback(cfg, tok, data, mask, run.file("g_effect.json"))
            callbacks.append(geffect)
            _log(f"[unlearn] recording the G-effect every {cfg.geffect_every} steps into g_effect.json")
        t0 = time.perf_counter()
        with run.phase("unlearn"):
            res = _unlearn(model, tok, data["forget"], data["retain"], cfg.objective, mask, cfg.unlearn,
                           run.dir("trainer"), cfg.objective_kwargs,
                           device=device, run=run, resume=cfg.resume, callbacks=callbacks)
        trainer = res.pop("trainer")
        report = getattr(trainer, "trainable_report", None)
        digest = _weights_digest(model)
        digests = [digest]
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            digests = [None] * dist.get_world_size()
            dist.all_gather_object(digests, digest)
        with run.phase("save"):
            if lora:  # merged weights in model/ (loads as any model), base + adapter in adapter/ (docs/lora.md)
                if is_main_process():
                    from ..lora import save_adapter_with_base, save_merged

                    save_merged(model, run.dir("model"))
                    save_adapter_with_base(model, run.dir("adapter"), tokenizer=tok)
            else:
                trainer.save_model(run.dir("model"))
            if is_main_process():
                tok.save_pretrained(os.path.join(run.work, "model"))
                with open(run.file("train_log.json"), "w") as f:
                    json.dump({**res, "seconds": time.perf_counter() - t0}, f, indent=2, default=float)
        if geffect is not None and is_main_process() and geffect.result["records"]:
            from ..eval.g_effect import plot_g_effect

            plot_g_effect({cfg.objective: geffect.result}, run.file("g_effect.png"),
                          title=f"G-effect of {cfg.objective} ({'dense' if mask is None else 'masked'})")
        run.update(device=str(device), trainable=report, weights_sha256_by_rank=digests)
        _log(f"[unlearn] train loss {res['train_loss']:.4f} in {time.perf_counter() - t0:.1f} s; model saved to "
             "model/" + (" (adapters merged; base + adapter in adapter/)" if lora else ""))
    return run.path


def _eval_sets(cfg: EvalConfig, bench: Any) -> tuple:
    """(sets {name: items}, forget name, retain_sets, holdout name or None, max_new_tokens)."""
    from .loading import load_qa_data

    d = cfg.data
    if d.source == "embedded":
        from .embedded_benchmark import EVAL_MAX_NEW_TOKENS

        names = _embedded_splits(bench, d)
        fs = names["forget"]
        if fs not in bench.data:
            raise ValueError(f"data.forget: split {fs!r} not found in the embedded benchmark "
                             f"(have: {', '.join(sorted(bench.data))})")
        retain_sets = list(cfg.retain_sets) if cfg.retain_sets is not None else ["retain_eval", "world_facts"]
        sets = {fs: bench.data[fs]}
        for i, s in enumerate(retain_sets):
            if s not in bench.data:
                raise ValueError(f"retain_sets[{i}]: set {s!r} not found (have: {', '.join(sorted(bench.data))})")
            sets[s] = bench.data[s]
        return sets, fs, retain_sets, None, cfg.max_new_tokens or EVAL_MAX_NEW_TOKENS
    cols = d.columns or None
    full = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    found: dict = {}
    if d.source is not None:
        from ..eval.tofu_data import find_tofu_eval_sets

        found = dict(find_tofu_eval_sets(d.source, d.forget))
    sets: dict = {}
    fs = "forget"

    def load(field: str, spec: str, require) -> list:
        items = load_qa_data(d.source, spec, columns=cols, require=require, field=field, log=_log)
        if not items:
            raise ValueError(f"{field}: {spec} holds no items")
        return items

    sets[fs] = load("data.forget", found.get("forget", d.forget), full)
    retain_sets: list = []
    wanted = cfg.retain_sets
    for key, req in (("retain", full), ("real_authors", ("question", "answer", "perturbed_answer")),
                     ("world_facts", ("question", "answer", "perturbed_answer"))):
        spec = found.get(key)
        if key == "retain" and spec is None and d.retain is not None:
            spec = d.retain
        if spec is None or (wanted is not None and key not in wanted):
            continue
        sets[key] = load(f"data ({key})", spec, req)
        retain_sets.append(key)
    if wanted is not None:
        for i, s in enumerate(wanted):
            if s not in sets:
                raise ValueError(f"retain_sets[{i}]: set {s!r} not found in {d.source or 'the data files'} "
                                 f"(found: {', '.join(k for k in sets if k != fs) or 'none'})")
    holdout = None
    spec = d.holdout or found.get("holdout")
    if spec is not None:
        sets["holdout"] = load("data.holdout", spec, ("question", "answer"))
        holdout = "holdout"
    return sets, fs, retain_sets, holdout, cfg.max_new_tokens or 200


def run_eval(cfg: EvalConfig) -> str:
    from ..eval import evaluate_tofu

    with _Job("eval", cfg) as run:
        device, dtype = _device_dtype(cfg)
        bench = _benchmark(cfg) if cfg.model == "embedded" or cfg.data.source == "embedded" else None
        sets, fs, retain_sets, holdout, max_new = _eval_sets(cfg, bench)
        ref = cfg.retain_model_eval
        if ref == "embedded" or (ref is None and cfg.retain_model is None and cfg.data.source == "embedded"):
            if bench is None or cfg.data.source != "embedded":
                raise ValueError("retain_model_eval: 'embedded' needs data.source: embedded")
            ref = bench.retain_eval_path
        model, tok = _load_model(cfg, bench, device, dtype)
        retain_model = None
        if cfg.retain_model is not None:
            retain_model, _ = _load_model(cfg, bench, device, dtype, name=cfg.retain_model)
        _log(f"[eval] {fs}: {len(sets[fs])} items; utility sets: {', '.join(retain_sets) or 'none'}"
             f"{'; holdout ' + str(len(sets[holdout])) if holdout else ''}; forget quality against "
             f"{cfg.retain_model or ref or 'nothing (no retain model given)'}; {max_new} new tokens")
        t0 = time.perf_counter()
        with run.phase("eval"):
            summary = evaluate_tofu(model, tok, sets, forget_split=fs, retain_sets=tuple(retain_sets),
                                    holdout=holdout, retain_model_eval=ref, retain_model=retain_model,
                                    batch_size=cfg.batch_size, max_new_tokens=max_new, out_dir=run.work,
                                    progress=True)
        for k in ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_truth_ratio", "forget_Q_A_ROUGE",
                  "privleak"):
            if k in summary:
                _log(f"  {k:20s} {summary[k]:.4g}")
        run.update(device=str(device), summary=summary)
        _log(f"[eval] done in {time.perf_counter() - t0:.1f} s; wrote TOFU_EVAL.json, TOFU_SUMMARY.json")
    return run.path


def run_bench(cfg: BenchConfig) -> Optional[str]:
    root = _source_root()
    if root is None:
        _log("[bench] the microbenchmarks live in bench/ of a source checkout of wagle-ext; this installation "
             "has none (clone the repository and run `make bench` or `wagle bench` there)")
        return None
    out = os.path.abspath(cfg.out) if os.path.isabs(cfg.out) or cfg.out != BenchConfig.out else \
        os.path.join(root, cfg.out)
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "WAGLE_BENCH_OUT": out}
    extra = ["--device", cfg.device] if cfg.device != "cpu" else []
    for s in cfg.scripts:
        _log(f"[bench] {s}")
        r = subprocess.run([sys.executable, os.path.join(root, "bench", s), *extra], cwd=root, env=env)
        if r.returncode != 0:
            raise ValueError(f"bench/{s} failed with exit status {r.returncode} (its output is above)")
    _log(f"[bench] results (tables above, JSON) under {out}")
    return out
