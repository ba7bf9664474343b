"""``wagle sweep``: forget-quality / model-utility trade-off curves over a grid of unlearning runs.

Grid: objectives x mask kinds (``dense``, the score kinds, ``wagle`` once per gamma of ``gammas``; the
LoRA kinds ``lora``, ``lora+fila`` and ``lora+wagle`` train adapters of rank ``lora_rank`` instead,
``lora+wagle`` placed by the WAGLE mask of each ratio and gamma) x
ratios x selection scopes (``build_mask``'s ``global``, ``per_tensor``, ``per_row``; ``dense`` has
one ratio, 1, and no scope) x forget targets (the kinds with a forget gradient: scored on the forget
answers, or on refusals, PO's forget loss) x re-scoring intervals x learning rates x seeds. Every run
unlearns from the same model and is evaluated every ``eval_every`` steps
(:class:`~wagle_ext.unlearn.trajectory.TrajectoryCallback` with the evaluator of ``wagle unlearn
--eval_every``); its trajectory starts at step 0 with the original model's evaluation, made once per
model.

Seeds vary the unlearning run (the order of the forget batches and the retain items paired with them;
the benchmark's models have no dropout). With ``seed_benchmark`` the embedded benchmark is also rebuilt
per seed (``benchmark.seed + seed``: other fictitious authors, another initialisation; each benchmark is
trained once and cached), so the spread covers the models too; each run is then compared with its own
original model. Masks depend on kind, gamma, ratio, model and data and on ``mask_seed`` -- never on the
learning rate or the unlearning seed -- and are built once (``masks/<key>.safetensors``).

Long file: one job whose pieces share its key scheme and directory layout (the grid and its run keys,
mask building and diagnostics, run execution, resumption, aggregation into curves, fronts and table).

Layout of ``out`` (a :class:`~wagle_ext.app.runs.RunDir`): ``runs/<key>/result.json`` (settings,
trajectory, seconds; ``<key>`` = hash of the run's settings) and ``trajectory.json``; ``references/``
(the original and retain models' evaluations); ``masks/``; ``results.json``, ``table.txt`` and
``fronts.png``. Rerunning into the same ``out`` continues it: runs whose ``result.json`` exists are
skipped (a changed setting changes the key, so only the new runs run); ``--overwrite`` starts afresh.

Aggregation (``results.json``): per setting (objective, mask, ratio, lr) and step, the mean and standard
deviation over seeds of model utility and of log10 forget quality (forget quality spans orders of
magnitude; its seeds are averaged in log space, i.e. a geometric mean). The table: per method (objective,
mask) and threshold (model utility >= 95% / 90% of the original model's), each seed's best forget
quality over the trajectory points that keep that utility, then mean and spread over seeds, for the
ratio/lr setting of the method with the best mean (each method at its own tuned setting). The original
model (step 0) always qualifies, so every seed has a value. The axes are a
:class:`~wagle_ext.app.front_axes.FrontAxes`: forget quality here; a track that brings its own model,
data and metrics (``wagle demo --track smollm2``: no retain model, so forget answer probability, lower =
better) runs the same grid, table and fronts through ``_run_sweep(cfg, run, hooks)``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import time
import types
from typing import Any, Optional

from .config import FORGET_GRADIENT_KINDS, LORA_KINDS, SweepConfig, config_to_dict
from .front_axes import FORGET_QUALITY, FrontAxes
from .pipeline import _benchmark, _device_dtype, _Job, _load_data, _load_model, _log, _set_threads, _unlearn
from .runs import RunDir

__all__ = ["run_sweep", "THRESHOLDS"]

THRESHOLDS = (0.95, 0.90)
_FORMAT = 1  # enters every run key: bump when a run's result changes meaning
#: UnlearnSettings fields added after sweeps existed, with the value that reproduces the older runs:
#: left out of a run's key at that value, so a sweep made before them resumes instead of starting over.
_LATER_UNLEARN_FIELDS: dict = {"rescore_every": 0}
#: kinds that read no mask file, hence have no ratio (lora+wagle's ratio is that of the mask placing it)
_MASKLESS = ("dense", "lora", "lora+fila")
_CONTEXTS: dict = {}  # per process: (context, sweep dir, eval settings) -> loaded model, data, evaluator


def run_sweep(cfg: SweepConfig) -> str:
    """Run the sweep of ``cfg`` (module docstring); returns the output directory."""
    out = os.path.abspath(cfg.out)
    partial = out + ".partial"
    resume = False
    if not cfg.overwrite:
        if os.path.isdir(partial):
            resume = True
        elif _is_sweep_dir(out):  # a finished sweep: continue it (new runs only), then rename back
            os.rename(out, partial)
            resume = True
    with _Job("sweep", cfg, resume=resume) as run:
        run.keep_on_failure()  # finished runs survive a failure (the next rerun skips them)
        _run_sweep(cfg, run)
    return run.path


def _is_sweep_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "run.json")) as f:
            return json.load(f).get("job") == "sweep"
    except (OSError, ValueError):
        return False


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# the model + data + evaluator of one benchmark seed (loaded once per process)
# ------------------------------------------------------------------------------------------------

def _bench_seeds(cfg: SweepConfig) -> dict:
    """unlearning seed -> benchmark seed (the same for all unless ``seed_benchmark``)."""
    return {s: cfg.benchmark.seed + s if cfg.seed_benchmark else cfg.benchmark.seed for s in cfg.seeds}


def _context_identity(cfg: SweepConfig, bseed: int) -> dict:
    ident = {"model": cfg.model, "tokenizer": cfg.tokenizer, "data": dataclasses.asdict(cfg.data)}
    if cfg.model == "embedded" or cfg.data.source == "embedded":
        ident["benchmark"] = {**dataclasses.asdict(cfg.benchmark), "seed": bseed}
    return ident


def _context(cfg: SweepConfig, bseed: int, work: str) -> Any:
    """The original model, tokenizer, forget/retain data and trajectory evaluator for benchmark seed
    ``bseed`` (cached per process; a retain model of ``eval.retain_model`` is evaluated once, into
    ``<work>/references/<ctx>/retain_model``, and reused from there)."""
    from .jobs import _trajectory_setup

    ident = _context_identity(cfg, bseed)
    ckey = _key(ident)
    cache_key = _key([ckey, work, dataclasses.asdict(cfg.eval), cfg.cache_dir, cfg.device, cfg.dtype])
    if cache_key in _CONTEXTS:
        return _CONTEXTS[cache_key]
    device, dtype = _device_dtype(cfg)
    c = copy.deepcopy(cfg)
    c.benchmark = dataclasses.replace(cfg.benchmark, seed=bseed)
    bench = _benchmark(c) if cfg.model == "embedded" or cfg.data.source == "embedded" else None
    data = _load_data(c, bench)
    model, tok = _load_model(c, bench, device, dtype)
    ref_dir = os.path.join(work, "references", ckey)
    done = os.path.join(ref_dir, "trajectory_reference")  # where _trajectory_setup evaluates eval.retain_model
    if c.eval.retain_model is not None and os.path.isfile(os.path.join(done, "TOFU_EVAL.json")):
        c.eval = dataclasses.replace(c.eval, retain_model=None, retain_model_eval=done)
    evaluate, info = _trajectory_setup(c, bench, tok, device, dtype, ref_dir)
    ctx = types.SimpleNamespace(key=ckey, ident=ident, bench=bench, model=model, tok=tok, data=data,
                                evaluate=evaluate, info=info, device=device, ref_dir=ref_dir)
    while len(_CONTEXTS) >= 4:  # each holds a model: keep the few most recent
        _CONTEXTS.pop(next(iter(_CONTEXTS)))
    _CONTEXTS[cache_key] = ctx
    return ctx


def _references(cfg: SweepConfig, ctx: Any) -> dict:
    """The original (and, on the embedded benchmark, the retain) model's metrics, cached under ``references/``."""
    from ..unlearn.trajectory import preserved_training_state

    path = os.path.join(ctx.ref_dir, "references.json")
    cached = _read_json(path)
    if cached is not None and cached.get("eval") == dataclasses.asdict(cfg.eval):
        return cached
    refs: dict = {"eval": dataclasses.asdict(cfg.eval), "identity": ctx.ident}
    models = [("target", ctx.model)] + ([("retain", ctx.bench.retain)] if ctx.bench is not None else [])
    for name, model in models:
        t0 = time.perf_counter()
        with preserved_training_state(model):
            refs[name] = {"metrics": ctx.evaluate(model), "seconds": time.perf_counter() - t0}
    if "forget_quality" not in refs["target"]["metrics"]:
        raise ValueError("wagle sweep needs forget quality: give eval.retain_model or eval.retain_model_eval "
                         "(the embedded benchmark brings its own)")
    _write_json(path, refs)
    return refs


def _targets(cfg: SweepConfig, kind: str) -> list:
    """The forget targets a mask kind is built for: all of ``forget_targets`` for the kinds with a forget
    gradient, else the answers only (their scores do not depend on it)."""
    return list(cfg.forget_targets) if kind in FORGET_GRADIENT_KINDS else ["answer"]


def _mask_grid(cfg: SweepConfig) -> list:
    """(kind, [targets], [scopes]) of the masks to build: the mask kinds of the grid, and the global
    WAGLE masks on the forget answers that place the adapters of ``lora+wagle``."""
    grid = [(k, _targets(cfg, k), list(cfg.scopes)) for k in cfg.masks if k != "dense" and k not in LORA_KINDS]
    if "lora+wagle" in cfg.masks:
        grid.append(("wagle", ["answer"], ["global"]))
    return grid


def _masks(cfg: SweepConfig, ctx: Any, work: str) -> dict:
    """{(kind, gamma, ratio, scope, forget target): mask file} for this context, each built once (scores
    once per kind, gamma and forget target)."""
    from ..masks import build_mask
    from .pipeline import _compute_scores

    out = {}
    forget, retain = ctx.data["forget"], ctx.data["retain"]
    for kind, targets, scopes in _mask_grid(cfg):
        for gamma, target in itertools.product(cfg.gammas if kind == "wagle" else [None], targets):
            scores = None
            for ratio, scope in itertools.product(cfg.ratios, scopes):
                if (kind, gamma, ratio, scope, target) in out:  # wagle for lora+wagle, already in the grid
                    continue
                ident = {"ctx": ctx.ident, "kind": kind, "gamma": gamma, "ratio": ratio, "seed": cfg.mask_seed}
                if scope != "global":  # the keys of global masks stay those of sweeps before scopes existed
                    ident["scope"] = scope
                if target != "answer":  # likewise for masks scored on the forget answers
                    ident["forget_target"] = target
                mkey = _key(ident)
                path = os.path.join(work, "masks", f"{kind}_{mkey}.safetensors")
                if not os.path.isfile(path):
                    t0 = time.perf_counter()
                    if scores is None:
                        hess = gamma if isinstance(gamma, str) else None
                        g = gamma if isinstance(gamma, (int, float)) else 1e-6
                        scores = _compute_scores(ctx.model, ctx.tok, forget, retain, kind, g, seed=cfg.mask_seed,
                                                 hessian=hess, forget_target=target)
                    meta = {"forget_target": target} if target != "answer" else None
                    mask = build_mask(scores, ratio, scope=scope, model=ctx.model, metadata=meta)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    mask.save(path + ".tmp")
                    os.replace(path + ".tmp", path)
                    _log(f"[sweep] mask {_method(kind, gamma, scope, target=target)} ratio {ratio:g}: "
                         f"{mask.total_selected} of {mask.numel} weights ({time.perf_counter() - t0:.1f} s)")
                out[(kind, gamma, ratio, scope, target)] = path
    return out


def _diagnostics(cfg: SweepConfig, contexts: dict, mask_files: dict, work: str) -> dict:
    """Per benchmark context: :func:`~wagle_ext.app.mask_diagnostics.mask_diagnostics` of its masks,
    logged and written to ``masks/diagnostics.json``."""
    from ..masks import MaskSet
    from .mask_diagnostics import format_mask_diagnostics, mask_diagnostics

    out = {}
    for bseed, ctx in contexts.items():
        masks, ratios, terms = {}, {}, {}
        for (b, kind, gamma, ratio, scope, target), path in mask_files.items():
            if b != bseed:
                continue
            label = f"{_method(kind, gamma, scope, target=target)} @{ratio:g}"
            masks[label], ratios[label] = MaskSet.load(path), ratio
            if "terms" in masks[label].metadata:  # WAGLE scores record which term of w - g_r/gamma dominates
                terms[label] = masks[label].metadata["terms"]
        if masks:
            out[ctx.key] = mask_diagnostics(masks, ratios, terms)
            _log("[sweep] masks:\n" + format_mask_diagnostics(out[ctx.key]))
    _write_json(os.path.join(work, "masks", "diagnostics.json"), out)
    return out


# ------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------

def _method(kind: str, gamma: Any, scope: str = "global", rescore: int = 0, target: str = "answer",
            rank: Optional[int] = None) -> str:
    g = None if gamma is None else (f"h={gamma}" if isinstance(gamma, str) else f"gamma={gamma:g}")
    if kind in LORA_KINDS:  # adapters of rank r; lora+wagle placed by the WAGLE mask of that gamma
        return f"{kind}(r={rank}" + (f", {g})" if kind == "lora+wagle" else ")")
    name = kind if kind != "wagle" else f"wagle({g})"
    if kind == "dense":
        return name
    return (name + ("" if target == "answer" else f"@{target}") + ("" if scope == "global" else f"/{scope}")
            + (f"+rescore{rescore}" if rescore else ""))


def _specs(cfg: SweepConfig, work: str, ident: Optional[dict] = None) -> list:
    """One dict per run of the grid: its settings (hashed into its key) and where it writes. ``ident``:
    the context identity of a track that brings its own model and data (else the config's)."""
    seeds = _bench_seeds(cfg)
    unlearn = dataclasses.asdict(cfg.unlearn)
    specs = []
    for objective in cfg.objectives:
        for kind in cfg.masks:
            masked = kind != "dense" and kind not in LORA_KINDS  # the axes of masks
            for gamma, target, scope, rescore in itertools.product(
                    cfg.gammas if kind in ("wagle", "lora+wagle") else [None], _targets(cfg, kind),
                    cfg.scopes if masked else ["global"], cfg.rescores if masked else [0]):
                for ratio in (cfg.ratios if masked or kind == "lora+wagle" else [1.0]):
                    for lr in cfg.learning_rates:
                        for seed in cfg.seeds:
                            u = {**unlearn, "learning_rate": float(lr), "seed": seed, "save_steps": 0,
                                 "logging_steps": 0, "rescore_every": rescore}
                            for k, default in _LATER_UNLEARN_FIELDS.items():
                                if u.get(k) == default:  # fields added later enter the key only when set
                                    u.pop(k, None)
                            settings = {
                                "format": _FORMAT, "objective": objective, "mask": kind, "gamma": gamma,
                                "ratio": float(ratio), "learning_rate": float(lr), "seed": seed,
                                "method": _method(kind, gamma, scope, rescore, target, cfg.lora_rank),
                                "context": ident if ident is not None else _context_identity(cfg, seeds[seed]),
                                "mask_seed": cfg.mask_seed if kind != "dense" else None, "unlearn": u,
                                "eval_every": cfg.eval_every, "eval": dataclasses.asdict(cfg.eval),
                            }
                            if scope != "global":  # absent for global: earlier sweeps' run keys stay valid
                                settings["scope"] = scope
                            if target != "answer":  # likewise
                                settings["forget_target"] = target
                            if kind in LORA_KINDS:
                                settings["lora_rank"] = cfg.lora_rank
                            key = _key(settings)
                            specs.append({"key": key, "settings": settings, "bench_seed": seeds[seed],
                                          "dir": os.path.join(work, "runs", key)})
    return specs


def _execute(cfg_dict: dict, spec: dict, mask_path: Optional[str], work: str, hooks: Any = None) -> dict:
    """One run (in this process or a worker): unlearn with trajectory evaluation, write ``result.json``.
    ``hooks`` (a track's, in this process): its context, and ``hooks.final(model)`` evaluated at the end."""
    import torch

    from ..masks import MaskSet
    from ..unlearn.trajectory import TrajectoryCallback
    from .config import load_config

    cfg = load_config(SweepConfig, None, cfg_dict) if hooks is None else hooks.cfg
    _set_threads(cfg.num_threads)
    ctx = _context(cfg, spec["bench_seed"], work) if hooks is None else hooks.context
    s = spec["settings"]
    model = copy.deepcopy(ctx.model)
    mask = MaskSet.load(mask_path, model=model) if mask_path else None
    lora_info = None
    if s["mask"] in LORA_KINDS:  # adapters instead of a mask (lora+wagle: placed by the WAGLE mask of mask_path)
        from .config import LoraSettings
        from .pipeline import _lora_model

        lo = LoraSettings(rank=s["lora_rank"], init="fila" if s["mask"] == "lora+fila" else "default",
                          targets="wagle" if s["mask"] == "lora+wagle" else "all")  # placement: the mask itself
        torch.manual_seed(s["seed"])  # the adapters' initialisation is part of the run
        model, lora_info = _lora_model(model, ctx.tok, ctx.data["forget"], ctx.data["retain"], lo, mask=mask,
                                       seed=s["seed"], progress=False)
        lora_info["trainable_fraction"] = lora_info["trainable"] / sum(p.numel() for p in ctx.model.parameters())
        mask = None
    u = dataclasses.replace(cfg.unlearn, **{k: s["unlearn"][k] for k in ("learning_rate", "seed", "save_steps",
                                                                          "logging_steps")},
                            rescore_every=s["unlearn"].get("rescore_every", 0))
    os.makedirs(spec["dir"], exist_ok=True)
    cb = TrajectoryCallback(ctx.evaluate, cfg.eval_every, os.path.join(spec["dir"], "trajectory.json"),
                            at_start=False)
    torch.manual_seed(u.seed)
    t0 = time.perf_counter()
    res = _unlearn(model, ctx.tok, ctx.data["forget"], ctx.data["retain"], s["objective"], mask, u,
                   os.path.join(spec["dir"], "trainer"), device=ctx.device, demo=True, callbacks=[cb])
    result = {"key": spec["key"], "settings": s, "context": ctx.key, "trajectory": cb.entries,
              "train_loss": res["train_loss"], "rescore_history": res["rescore_history"],
              "seconds": time.perf_counter() - t0,
              "eval_seconds": sum(e["seconds"] for e in cb.entries)}
    if lora_info is not None:
        result["lora"] = {k: v for k, v in lora_info.items() if k != "placement"}
    if hooks is not None and hooks.final is not None:
        result["final"] = hooks.final(model)
    import shutil

    shutil.rmtree(os.path.join(spec["dir"], "trainer"), ignore_errors=True)  # no checkpoints in a sweep run
    _write_json(os.path.join(spec["dir"], "result.json"), result)
    return result


def _worker_init(num_threads: int) -> None:
    _set_threads(num_threads)


def _run_sweep(cfg: SweepConfig, run: RunDir, hooks: Any = None) -> dict:
    """The sweep into ``run``. ``hooks``: a track that brings its own model, data and metrics (e.g.
    :func:`~wagle_ext.app.track_smollm2.track_hooks`): ``cfg`` (this config), ``ident`` and ``context``
    (one model context), ``references(ctx)``, ``axes`` (:class:`FrontAxes`), ``final(model)`` (or None)
    and ``what`` (the figure's title); its runs are in this process."""
    t_start = time.perf_counter()
    work = run.work
    specs = _specs(cfg, work, None if hooks is None else hooks.ident)
    axes = FORGET_QUALITY if hooks is None else hooks.axes
    contexts, references, mask_files = {}, {}, {}
    for bseed in sorted(set(_bench_seeds(cfg).values())):
        ctx = _context(cfg, bseed, work) if hooks is None else hooks.context
        contexts[bseed] = ctx
        references[ctx.key] = _references(cfg, ctx) if hooks is None else hooks.references(ctx)
        for k, v in _masks(cfg, ctx, work).items():
            mask_files[(bseed, *k)] = v
    diagnostics = _diagnostics(cfg, contexts, mask_files, work)
    utility_key = next(iter(contexts.values())).info["utility_key"]
    done = {sp["key"]: _read_json(os.path.join(sp["dir"], "result.json")) for sp in specs}
    todo = [sp for sp in specs if done[sp["key"]] is None]
    _log(f"[sweep] {len(specs)} runs ({len(specs) - len(todo)} done before, skipped); {cfg.unlearn.steps} steps "
         f"each, evaluated every {cfg.eval_every} ("
         + (f"{cfg.eval.metrics} metrics); {cfg.workers}" if hooks is None else "the track's metrics); 1")
         + " worker(s)")
    cfg_dict = config_to_dict(cfg)
    jobs = []
    for sp in todo:
        s = sp["settings"]
        mpath = None
        if s["mask"] not in _MASKLESS:  # lora+wagle: the WAGLE mask that places its adapters
            kind = "wagle" if s["mask"] == "lora+wagle" else s["mask"]
            mpath = mask_files[(sp["bench_seed"], kind, s["gamma"], s["ratio"], s.get("scope", "global"),
                                s.get("forget_target", "answer"))]
        jobs.append((cfg_dict, sp, mpath, work))

    def report(i: int, r: dict) -> None:
        s, last = r["settings"], r["trajectory"][-1]["metrics"] if r["trajectory"] else {}
        _log(f"[sweep] ({i}/{len(jobs)}) {s['objective']} {s['method']} ratio {s['ratio']:g} lr {s['learning_rate']:g} "
             f"seed {s['seed']}: {axes.forget_key} {last.get(axes.forget_key, float('nan')):.3g}  {utility_key} "
             f"{last.get(utility_key, float('nan')):.3f}  ({r['seconds']:.1f} s)")

    if cfg.workers > 1 and len(jobs) > 1 and hooks is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(cfg.num_threads,)) as pool:
            futures = {pool.submit(_execute, *j): j[1]["key"] for j in jobs}
            for i, f in enumerate(as_completed(futures), 1):
                done[futures[f]] = f.result()
                report(i, done[futures[f]])
    else:
        for i, j in enumerate(jobs, 1):
            done[j[1]["key"]] = _execute(*j, hooks=hooks)
            report(i, done[j[1]["key"]])

    results = _summarise(cfg, [done[sp["key"]] for sp in specs], references, utility_key, work, axes=axes,
                         what=None if hooks is None else hooks.what)
    results.update(config=cfg_dict, mask_diagnostics=diagnostics, n_runs=len(specs), n_skipped=len(specs) - len(todo),
                   total_seconds=time.perf_counter() - t_start)
    _write_json(os.path.join(work, "results.json"), results)
    _log("\n" + results["table"] + "\n")
    _log(f"[sweep] {len(jobs)} runs in {time.perf_counter() - t_start:.1f} s; wrote results.json, table.txt, "
         f"fronts.png, runs/, masks/, references/ under {run.path}")
    run.update(n_runs=len(specs), n_skipped=len(specs) - len(todo))
    return results



# ------------------------------------------------------------------------------------------------
# aggregation: curves, fronts, table, figure
# ------------------------------------------------------------------------------------------------

def _mean_std(x) -> tuple:
    import numpy as np

    a = np.asarray(x, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _pareto(points: list) -> list:
    """Indices of the non-dominated points (maximise both coordinates)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def _summarise(cfg: SweepConfig, results: list, references: dict, ukey: str, work: str,
               axes: FrontAxes = FORGET_QUALITY, what: Optional[str] = None) -> dict:
    """Curves (mean / std over seeds per step), the table and the fronts of ``axes``' forget metric
    against ``ukey``; writes ``table.txt`` and ``fronts.png`` into ``work``."""
    from ..plotting import plot_fronts

    fk, ck = axes.forget_key, axes.curve_key
    groups: dict = {}
    for r in results:
        s = r["settings"]
        target = references[r["context"]]["target"]["metrics"]
        pts = {0: target, **{e["step"]: e["metrics"] for e in r["trajectory"]}}
        groups.setdefault((s["objective"], s["method"], s["ratio"], s["learning_rate"]), []).append(
            (s["seed"], target[ukey], pts))
    settings = []
    for (objective, method, ratio, lr), members in groups.items():
        steps = sorted(set.intersection(*[set(m[2]) for m in members]))
        curve = []
        for st in steps:
            mu = _mean_std([m[2][st][ukey] for m in members])
            fy = _mean_std([axes.coord(m[2][st][fk]) for m in members])
            curve.append({"step": st, "utility_mean": mu[0], "utility_std": mu[1], f"{ck}_mean": fy[0],
                          f"{ck}_std": fy[1]})
        best = {}
        for thr in THRESHOLDS:
            per_seed = [axes.best(m[fk] for m in pts.values() if m[ukey] >= thr * tmu) for _, tmu, pts in members]
            mean, std = _mean_std(per_seed)
            best[f"{thr:g}"] = {"per_seed": per_seed, "mean": mean, "std": std, "n": len(per_seed)}
        settings.append({"objective": objective, "method": method, "ratio": ratio, "learning_rate": lr,
                         "seeds": sorted(m[0] for m in members), "curve": curve, "best": best})
    kinds = {r["settings"]["method"]: r["settings"]["mask"] for r in results}
    table_rows = []
    for objective in cfg.objectives:
        for method in dict.fromkeys(st["method"] for st in settings if st["objective"] == objective):
            mine = [st for st in settings if st["objective"] == objective and st["method"] == method]
            row = {"objective": objective, "method": method, "mask": kinds[method]}
            for thr in THRESHOLDS:
                t = f"{thr:g}"
                b = max(mine, key=lambda st: axes.rank(st["best"][t]["mean"]))
                row[t] = {**b["best"][t], "ratio": b["ratio"], "learning_rate": b["learning_rate"]}
            table_rows.append(row)
    tmus = sorted({round(ref["target"]["metrics"][ukey], 12) for ref in references.values()})
    tfqs = [ref["target"]["metrics"][fk] for ref in references.values()]
    table = _format_table(table_rows, ukey, tmus, tfqs, len(cfg.seeds), axes)
    with open(os.path.join(work, "table.txt"), "w") as f:
        f.write(table + "\n")
    yk = "log10_y" if axes.log else "y"
    panels, fronts = {}, {}
    for objective in cfg.objectives:
        curves, pool = [], []
        for st in (st for st in settings if st["objective"] == objective):
            xs = [p["utility_mean"] for p in st["curve"]]
            ys = [p[f"{ck}_mean"] for p in st["curve"]]
            curves.append({"method": st["method"], "label": f"ratio {st['ratio']:g}, lr {st['learning_rate']:g}",
                           "x": xs, "xerr": [p["utility_std"] for p in st["curve"]], yk: ys,
                           f"{yk}err": [p[f"{ck}_std"] for p in st["curve"]]})
            pool += [(st["method"], x, y, st["ratio"], st["learning_rate"], p["step"])
                     for x, y, p in zip(xs, ys, st["curve"])]
        per_method = {}
        for method in dict.fromkeys(p[0] for p in pool):
            pts = [p for p in pool if p[0] == method]
            per_method[method] = [pts[i][1:] for i in _pareto([(p[1], axes.rank(p[2])) for p in pts])]
        overall = [pool[i] for i in _pareto([(p[1], axes.rank(p[2])) for p in pool])]
        fronts[objective] = {"per_method": per_method, "overall": overall}
        panels[objective] = {"curves": curves, "fronts": {m: [(p[0], p[1]) for p in v] for m, v in per_method.items()},
                             "overall": [(p[1], p[2]) for p in overall]}
    refs = [{"name": f"{name} model", "x": ref[name]["metrics"][ukey], yk: axes.coord(ref[name]["metrics"][fk])}
            for ref in references.values() for name in ("target", "retain") if name in ref]
    what = what or ("embedded benchmark" if cfg.model == "embedded" else cfg.model)
    plot_fronts(panels, os.path.join(work, "fronts.png"), references=refs, thresholds=THRESHOLDS,
                target_utility=tmus, xlabel=f"{ukey} (higher = better)",
                title=f"{what}: {cfg.unlearn.steps} steps, evaluated every {cfg.eval_every}; mean over "
                      f"{len(cfg.seeds)} seeds (bars: 1 std)", ylabel=axes.ylabel, log_y=axes.log)
    return {"utility_key": ukey, "forget_key": fk, "thresholds": list(THRESHOLDS), "references": references,
            "settings": settings, "table_rows": table_rows, "table": table, "fronts": fronts,
            "runs": [{"key": r["key"], "settings": r["settings"], "trajectory": r["trajectory"],
                      "seconds": r["seconds"], "eval_seconds": r["eval_seconds"],
                      **({"final": r["final"]} if "final" in r else {})} for r in results]}


def _format_table(rows: list, ukey: str, tmus: list, tfqs: list, n_seeds: int,
                  axes: FrontAxes = FORGET_QUALITY) -> str:
    head = ["objective", "method"]
    for thr in THRESHOLDS:
        head += [f"{axes.short} @ {axes.utility_short}>={thr:.0%}", "at"]
    cells = [head]
    for r in rows:
        line = [r["objective"], r["method"]]
        for thr in THRESHOLDS:
            b = r[f"{thr:g}"]
            line += [f"{b['mean']:.3g} ± {b['std']:.2g}",
                     (f"ratio {b['ratio']:g}, " if r["mask"] not in _MASKLESS else "") + f"lr {b['learning_rate']:g}"]
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mu = ", ".join(f"{m:.3f}" for m in tmus)
    fq = ", ".join(f"{f:.3g}" for f in tfqs)
    best = "Best" if axes.higher_is_better else "Lowest"
    return (f"{best} {axes.name} ({axes.short}) at {axes.utility_name} >= 95% / 90% of the original model's ({ukey} "
            f"{mu}; its {axes.short} {fq}): mean ± std over {n_seeds} seed(s); each method at its best ratio/lr "
            "(\"at\")\n" + "\n".join(lines))
