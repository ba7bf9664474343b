"""Scores from weights and accumulated gradients, per weight: the second stage of attribution
(:func:`compute_scores`: the fused :func:`wagle_ext.ops.attribution_scores` kinds, or ``random`` /
``wanda`` in PyTorch), and :func:`score_model`, which runs gradients -> scores end to end.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..naming import model_fingerprint, normalize_param_name
from ..ops import KERNEL_SCORE_KINDS, attribution_scores
from .gradients import (GradientDict, LossFn, accumulate_gradients, collect_input_norms, decoder_linear_names,
                        estimate_hessian_diagonal)
from .grouped import GroupedScores, accumulator_bytes_per_param, parse_bytes, plan_groups

__all__ = ["SCORE_KINDS", "ScoreDict", "compute_scores", "score_model", "wagle_term_norms"]

logger = logging.getLogger("wagle_ext.attribution")

#: Every score kind :func:`compute_scores` knows: the fused kernel's plus two computed in PyTorch.
SCORE_KINDS = KERNEL_SCORE_KINDS + ("random", "wanda")


class ScoreDict(OrderedDict):
    """``{parameter name: float32 scores}`` with ``.info`` (score kind, gamma, hessian, model
    fingerprint, term norms, ...), copied by :func:`wagle_ext.masks.build_mask` into the mask
    metadata."""

    info: dict

    def __init__(self, *args, info: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.info = dict(info or {})


# ----------------------------------------------------------------------------- scores
def _stable_seed(seed: int, name: str) -> int:
    # Normalised name: a DDP/PEFT-wrapped model draws the same values as the bare one.
    h = hashlib.sha256(f"{int(seed)}:{normalize_param_name(name)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _random_scores(shape: torch.Size, seed: int, name: str, device: torch.device) -> torch.Tensor:
    # One CPU generator per tensor, seeded by (seed, name): the same values whichever subset of
    # parameters a process scores (multi-process blocks) and whatever the device.
    gen = torch.Generator().manual_seed(_stable_seed(seed, name))
    return torch.rand(shape, generator=gen, dtype=torch.float32).to(device)


class _TermNorms:
    """Running sums behind :func:`wagle_term_norms`, so grouped attribution adds tensors group by
    group and gets the same floats as one call over all tensors (same order of additions)."""

    def __init__(self) -> None:
        self.w2 = 0.0
        self.r2 = 0.0
        self.n_w = 0
        self.n = 0

    def add(self, weights, grads_retain, *, gamma: float, hessian=None, eps: float = 1e-8) -> None:
        chunk = 1 << 20  # bounded temporaries (~12 MB): this runs next to full-model accumulators
        for i, (w, g) in enumerate(zip(weights, grads_retain)):
            wflat = w.detach().reshape(-1)
            gflat = g.reshape(-1)
            hflat = hessian[i].reshape(-1) if hessian is not None else None
            for lo in range(0, wflat.numel(), chunk):
                wf = wflat[lo:lo + chunk].to(torch.float32)
                gf = gflat[lo:lo + chunk].to(torch.float32)
                if hflat is not None:
                    r = gf / (hflat[lo:lo + chunk].to(torch.float32) + eps)
                else:
                    r = gf / gamma
                # vector_norm accumulates in float64 without a float64 copy (4x faster than .double()).
                self.w2 += float(torch.linalg.vector_norm(wf, dtype=torch.float64)) ** 2
                self.r2 += float(torch.linalg.vector_norm(r, dtype=torch.float64)) ** 2
                self.n_w += int(torch.count_nonzero(wf.abs() > r.abs()))
            self.n += wflat.numel()

    def result(self) -> dict:
        wn, rn = math.sqrt(float(self.w2)), math.sqrt(float(self.r2))
        return {
            "weight_norm": wn,
            "retain_term_norm": rn,
            "retain_over_weight": (rn / wn) if wn > 0 else math.inf,
            "frac_weight_dominant": (self.n_w / self.n) if self.n else 0.0,
            "dominant": "weight" if wn >= rn else "retain_gradient",
        }


def _log_terms(terms: dict, hessian_given: bool) -> None:
    denom = "||g_r/(h+eps)||" if hessian_given else "||g_r||/gamma"
    logger.info("wagle score terms: ||w|| = %.4g, %s = %.4g (ratio %.3g); |w| > |retain term| for %.3g%% "
                "of weights; dominant: %s", terms["weight_norm"], denom, terms["retain_term_norm"],
                terms["retain_over_weight"], 100 * terms["frac_weight_dominant"], terms["dominant"])


def wagle_term_norms(
    weights: Sequence[torch.Tensor],
    grads_retain: Sequence[torch.Tensor],
    *,
    gamma: float = 1e-6,
    hessian: Optional[Sequence[torch.Tensor]] = None,
    eps: float = 1e-8,
) -> dict:
    """Sizes of the two terms of WAGLE's bracket ``w - g_r / gamma`` (docs/algorithms.md 1.2 "scale
    warning"): ``weight_norm`` = ||w||_2, ``retain_term_norm`` = ||g_r / gamma||_2 (or
    ``||g_r / (h + eps)||``), their ratio, ``frac_weight_dominant`` = fraction of elements with
    ``|w| > |g_r / gamma|``, and ``dominant`` (``"weight"`` or ``"retain_gradient"``). Reads only."""
    t = _TermNorms()
    t.add(weights, grads_retain, gamma=gamma, hessian=hessian, eps=eps)
    return t.result()


def compute_scores(
    model: torch.nn.Module,
    g_f: Optional[Mapping[str, torch.Tensor]] = None,
    g_r: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    kind: str,
    gamma: float = 1e-6,
    hessian: Optional[Mapping[str, torch.Tensor]] = None,
    eps: float = 1e-8,
    seed: int = 0,
    input_norms: Optional[Mapping[str, torch.Tensor]] = None,
    names: Optional[Sequence[str]] = None,
    inplace: bool = False,
    log_terms: bool = True,
) -> ScoreDict:
    """Per-weight attribution scores (float32, larger = more important = selected first).

    Kinds (docs/algorithms.md 1.2, 1.5, 4):

    * ``wagle``: ``|(w - g_r / gamma) * g_f|`` (WAGLE ``snip_advanced``); with ``hessian=h`` (a
      diagonal estimate, :func:`estimate_hessian_diagonal`) ``|(w - g_r / (h + eps)) * g_f|``.
    * ``snip``: ``|w * g_f|``;  ``gradient``: ``|g_f|`` (SalUn);  ``magnitude``: ``|w|``.
    * ``random``: U(0, 1), from a CPU generator seeded by ``(seed, normalised parameter name)``.
    * ``wanda``: ``|W_ij| * ||X_j||_2`` with ``input_norms`` from :func:`collect_input_norms`;
      scores only the Linear weights in ``input_norms`` (select per row:
      ``build_mask(scores, ratio, scope="per_row")``).

    The first four run through :func:`wagle_ext.attribution_scores` (fused C++/CUDA/Triton kernel).

    Args:
        model: its ``named_parameters()`` give ``w`` (values read, never written).
        g_f, g_r: accumulated forget/retain gradients ``{name: tensor}`` (any float dtype), e.g. from
            :func:`accumulate_gradients`. ``g_f`` fixes which parameters are scored.
        gamma: WAGLE's constant Hessian diagonal (``unlearn.mu``, 1e-6 in the released configs);
            it is paired with SUMMED gradients there (docs/pitfalls.md #6).
        hessian: ``{name: diagonal estimate}``; replaces ``gamma``.
        seed: for ``random``.
        names: score only these parameters (e.g. this process's block, see
            :func:`wagle_ext.masks.partition_names`); default: the keys of ``g_f`` / ``input_norms``,
            or every parameter with ``requires_grad`` (``magnitude``, ``random``).
        inplace: write scores over the ``g_f`` tensors (must be contiguous float32) and delete each
            ``g_r`` / ``hessian`` entry from those dicts once its tensor is scored, so peak memory
            stays at the inputs' size. **Mutates** ``g_f``, ``g_r`` and ``hessian``.
        log_terms: for ``wagle``, log (INFO, logger ``wagle_ext.attribution``) and record in
            ``.info["terms"]`` which term of ``w - g_r/gamma`` dominates (:func:`wagle_term_norms`);
            with WAGLE's defaults the weight term is usually negligible.

    Returns:
        :class:`ScoreDict` ``{name: float32 tensor shaped like the parameter}`` on each parameter's
        device, in parameter order; ``.info`` holds the provenance for the mask metadata.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = OrderedDict(model.named_parameters())
    if kind in ("wagle", "snip", "gradient") and g_f is None:
        raise ValueError(f"kind={kind!r} needs g_f (accumulated forget gradients)")
    if kind == "wagle" and g_r is None:
        raise ValueError("kind='wagle' needs g_r (accumulated retain gradients); use kind='snip' for |w * g_f|")
    if kind == "wanda" and input_norms is None:
        raise ValueError("kind='wanda' needs input_norms= (from collect_input_norms(model, calibration_loader))")
    if hessian is not None and kind != "wagle":
        raise ValueError(f"hessian is only used by kind='wagle', got kind={kind!r}")
    if kind == "wagle" and hessian is None and not (
            isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if inplace and kind not in ("wagle", "snip", "gradient"):
        raise ValueError(f"inplace=True writes over g_f; kind={kind!r} does not read g_f")

    if names is None:
        if kind == "wanda":
            names = list(input_norms.keys())  # type: ignore[union-attr]
        elif g_f is not None and kind != "magnitude":
            names = list(g_f.keys())
        else:
            names = [n for n, p in params.items() if p.requires_grad]
    names = list(names)
    for n in names:
        if n not in params:
            raise ValueError(f"{n!r} is not a parameter of the model")
        for d, dname in ((g_f if kind in ("wagle", "snip", "gradient") else None, "g_f"),
                         (g_r if kind == "wagle" else None, "g_r"), (hessian, "hessian"),
                         (input_norms if kind == "wanda" else None, "input_norms")):
            if d is not None and n not in d:
                raise ValueError(f"{dname} has no entry for parameter {n!r}")

    info: dict = {"score_kind": kind, "model_fingerprint": model_fingerprint(model)}
    if kind == "wagle":
        if hessian is None:
            info.update({"gamma": float(gamma), "hessian": "constant"})
        else:
            info.update({"hessian": getattr(hessian, "info", {}).get("hessian_method", "diagonal"), "eps": float(eps)})
    if kind == "random":
        info["seed"] = int(seed)
    for d, key in ((g_f, "forget_grad"), (g_r, "retain_grad"), (hessian, "hessian_info")):
        if d is not None and getattr(d, "info", None) and kind in ("wagle", "snip", "gradient"):
            if key != "retain_grad" or kind == "wagle":
                info[key] = dict(d.info)

    if kind == "wagle" and log_terms:
        acc = _TermNorms()
        acc.add([params[n] for n in names], [g_r[n] for n in names], gamma=gamma,  # type: ignore[index]
                hessian=None if hessian is None else [hessian[n] for n in names], eps=eps)
        info["terms"] = acc.result()
        _log_terms(info["terms"], hessian is not None)

    out = ScoreDict(info=info)
    for n in names:
        w = params[n].detach()
        if kind == "random":
            out[n] = _random_scores(w.shape, seed, n, w.device)
            continue
        if kind == "wanda":
            norm = input_norms[n].to(device=w.device, dtype=torch.float32)  # type: ignore[index]
            if w.dim() != 2 or norm.shape != (w.shape[1],):
                raise ValueError(f"input_norms[{n!r}] has shape {tuple(norm.shape)}; expected ({w.shape[1]},) "
                                 f"for a weight of shape {tuple(w.shape)}")
            out[n] = w.to(torch.float32).abs() * norm.unsqueeze(0)
            continue
        gf = g_f[n] if (g_f is not None and kind != "magnitude") else None
        gr = g_r[n] if kind == "wagle" else None  # type: ignore[index]
        h = hessian[n] if hessian is not None else None
        o = None
        if inplace:
            if gf.dtype != torch.float32 or not gf.is_contiguous():
                raise ValueError(f"inplace=True needs contiguous float32 g_f; g_f[{n!r}] is {gf.dtype}"
                                 + ("" if gf.is_contiguous() else ", non-contiguous"))
            o = [gf.view(-1)]
        s = attribution_scores([w], None if gf is None else [gf], None if gr is None else [gr], kind=kind,
                               gamma=float(gamma), hessian=None if h is None else [h], eps=eps, out=o)[0]
        out[n] = s.view(w.shape)
        if inplace:
            # The scores now live in g_f's storage; free what this tensor needed.
            if g_r is not None and kind == "wagle":
                del g_r[n]  # type: ignore[attr-defined]
            if hessian is not None:
                del hessian[n]  # type: ignore[attr-defined]
    return out


# ----------------------------------------------------------------------------- end to end
def score_model(
    model: torch.nn.Module,
    forget_loader: Optional[Iterable] = None,
    retain_loader: Optional[Iterable] = None,
    *,
    kind: str = "wagle",
    gamma: float = 1e-6,
    hessian: Union[None, str, Mapping[str, torch.Tensor]] = None,
    reduction: str = "sum",
    stream: bool = True,
    forget_loss_fn: Optional[LossFn] = None,
    retain_loss_fn: Optional[LossFn] = None,
    forget_key: Optional[str] = None,
    retain_key: Optional[str] = None,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
    max_batches: Optional[int] = None,
    progress: bool = True,
    memory_budget: Union[None, int, str] = None,
    groups: Optional[Sequence[Sequence[str]]] = None,
) -> Union[ScoreDict, GroupedScores]:
    """Gradients and scores in one call (WAGLE ``snip_advanced`` and its baselines).

    Order (as WAGLE): one pass over ``retain_loader`` for ``g_r`` (``kind="wagle"``), then one pass
    over ``forget_loader`` for ``g_f``. For ``wanda`` the forget loader is the calibration set.

    Args:
        hessian: ``None`` (constant ``gamma``), ``"fisher"`` or ``"ema"`` (estimated from the retain
            loader first, :func:`estimate_hessian_diagonal`), or precomputed ``{name: tensor}``.
        stream: ``True``: scores are written over the ``g_f`` accumulator and ``g_r`` is freed tensor
            by tensor, so peak memory is weights + ``g_r`` + ``g_f`` (one accumulator + one
            gradient buffer). ``False``: ``g_f``/``g_r`` stay alive next to a fresh score buffer
            (weights + 3 buffers). Scores are identical.
        forget_loss_fn / retain_loss_fn: default :func:`causal_lm_sequence_loss` (for PO pass the
            refusal-target batches as the forget loader, WAGLE ``snip_advanced_CL``).
        forget_key / retain_key: ``batch_key`` for paired loaders.
        memory_budget: bounded-memory attribution: bytes (int) or a string such as ``"16GB"`` /
            ``"16GiB"`` for the per-weight fp32 buffers of the attribution (``g_r`` + ``g_f`` = 8 B
            per weight for ``wagle``, 12 with an estimated Hessian, 4 for the other kinds; see
            :func:`plan_groups`). The parameters are split into consecutive groups that fit and a
            :class:`GroupedScores` is returned instead of a ScoreDict: nothing runs until it is
            iterated, each group then runs its own data passes (``len(groups)`` x the passes of an
            unbounded run) and yields its scores, bit-identical to the unbounded ones.
            ``build_mask(grouped, ratio)`` gives the same MaskSet as ``build_mask`` of the unbounded
            scores (docs/algorithms.md 5.2).
        groups: explicit groups instead of ``memory_budget``: lists of parameter names that
            together cover the scored parameters, each a consecutive run in parameter order.
        Other arguments as in :func:`accumulate_gradients` and :func:`compute_scores`.

    Returns:
        :class:`ScoreDict`, or :class:`GroupedScores` with ``memory_budget`` / ``groups``.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    acc_kw = dict(reduction=reduction, max_batches=max_batches, progress=progress, names=names)
    if memory_budget is not None or groups is not None:
        return _grouped(model, forget_loader, retain_loader, kind=kind, gamma=gamma, hessian=hessian,
                        reduction=reduction, forget_loss_fn=forget_loss_fn, retain_loss_fn=retain_loss_fn,
                        forget_key=forget_key, retain_key=retain_key, seed=seed, names=names,
                        max_batches=max_batches, progress=progress, memory_budget=memory_budget, groups=groups)
    if kind in ("magnitude", "random"):
        return compute_scores(model, kind=kind, seed=seed, names=names)
    if forget_loader is None:
        raise ValueError(f"kind={kind!r} needs forget_loader")
    if kind == "wanda":
        norms = collect_input_norms(model, forget_loader, batch_key=forget_key, max_batches=max_batches,
                                    progress=progress, names=None if names is None else
                                    [n for n in decoder_linear_names(model) if n in set(names)])
        return compute_scores(model, kind="wanda", input_norms=norms)
    h = None
    if kind == "wagle":
        if retain_loader is None:
            raise ValueError("kind='wagle' needs retain_loader")
        if isinstance(hessian, str):
            h = estimate_hessian_diagonal(model, retain_loader, retain_loss_fn, method=hessian,
                                          batch_key=retain_key, max_batches=max_batches, progress=progress,
                                          names=names)
        elif hessian is not None:
            h = hessian
        g_r = accumulate_gradients(model, retain_loader, retain_loss_fn, batch_key=retain_key,
                                   desc="retain gradients", **acc_kw)
    elif hessian is not None:
        raise ValueError(f"hessian is only used by kind='wagle', got kind={kind!r}")
    else:
        g_r = None
    g_f = accumulate_gradients(model, forget_loader, forget_loss_fn, batch_key=forget_key,
                               desc="forget gradients", **acc_kw)
    if stream and isinstance(h, Mapping) and not isinstance(hessian, str):
        h = OrderedDict(h)  # never delete entries from the caller's dict
        h_info = getattr(hessian, "info", None)
        if h_info:
            h = GradientDict(h, info=h_info)
    scores = compute_scores(model, g_f, g_r, kind=kind, gamma=gamma, hessian=h, inplace=stream)
    del g_f, g_r, h
    return scores


def _check_groups(model: torch.nn.Module, groups: Sequence[Sequence[str]], names: Optional[Sequence[str]],
                  kind: str) -> list:
    """Explicit groups: lists of names, together the scored parameters, consecutive in parameter order."""
    if isinstance(groups, (str, bytes)) or not all(
            not isinstance(g, (str, bytes)) and all(isinstance(n, str) for n in g) for g in groups):
        raise TypeError("groups must be a sequence of sequences of parameter names")
    groups = [list(g) for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError("groups must be non-empty lists of parameter names")
    if kind == "wanda":
        scored = decoder_linear_names(model)
        if names is not None:
            scored = [n for n in scored if n in set(names)]
    else:
        scored = [n for n, p in model.named_parameters() if p.requires_grad]
        if names is not None:
            scored = [n for n in scored if n in set(names)]
    flat = [n for g in groups for n in g]
    if flat != scored:
        raise ValueError("groups must be consecutive runs of the scored parameters in parameter order, together "
                         f"all of them ({len(scored)} names, first {scored[:2]}); got {len(flat)} names, "
                         f"first {flat[:2]}")
    return groups


def _grouped(model, forget_loader, retain_loader, *, kind, gamma, hessian, reduction, forget_loss_fn,
             retain_loss_fn, forget_key, retain_key, seed, names, max_batches, progress, memory_budget,
             groups) -> GroupedScores:
    """``score_model`` with ``memory_budget`` / ``groups``: a :class:`GroupedScores` whose groups are
    scored exactly as the unbounded path scores them (same passes, same order, same kernels)."""
    if kind in ("wagle", "snip", "gradient", "wanda") and forget_loader is None:
        raise ValueError(f"kind={kind!r} needs forget_loader")
    if kind == "wagle" and retain_loader is None:
        raise ValueError("kind='wagle' needs retain_loader")
    if hessian is not None and kind != "wagle":
        raise ValueError(f"hessian is only used by kind='wagle', got kind={kind!r}")
    if isinstance(hessian, str) and hessian not in ("fisher", "ema"):
        raise ValueError(f"hessian must be None, 'fisher', 'ema' or a mapping, got {hessian!r}")
    estimated = isinstance(hessian, str)
    if memory_budget is not None and groups is not None:
        raise ValueError("pass memory_budget= or groups=, not both")
    if groups is not None:
        groups = _check_groups(model, groups, names, kind)
        budget = None
    else:
        budget = parse_bytes(memory_budget)
        plan_names = names
        if kind == "wanda":
            plan_names = [n for n in decoder_linear_names(model) if names is None or n in set(names)]
        groups = plan_groups(model, budget, kind=kind, hessian_estimated=estimated, names=plan_names)
    params = OrderedDict(model.named_parameters())
    shapes = OrderedDict((n, params[n].shape) for g in groups for n in g)
    per_group = {"wagle": 2 + int(estimated), "snip": 1, "gradient": 1}.get(kind, 0)
    plan = {"groups": len(groups), "memory_budget_bytes": budget,
            "bytes_per_weight": accumulator_bytes_per_param(kind, estimated),
            "largest_group_weights": max(sum(params[n].numel() for n in g) for g in groups),
            "data_passes_per_group": per_group,
            "data_passes": per_group * len(groups) + (1 if kind == "wanda" else 0)}
    acc_kw = dict(reduction=reduction, max_batches=max_batches, progress=progress)
    state: dict = {}

    def score_group(i: int, group: list) -> ScoreDict:
        tag = f" [group {i + 1}/{len(groups)}]"
        if i == 0:
            state["terms"] = _TermNorms()
            if kind == "wanda":
                state["norms"] = collect_input_norms(model, forget_loader, batch_key=forget_key,
                                                     max_batches=max_batches, progress=progress,
                                                     names=[n for g in groups for n in g])
        if kind in ("magnitude", "random"):
            return compute_scores(model, kind=kind, seed=seed, names=group)
        if kind == "wanda":
            return compute_scores(model, kind="wanda", input_norms=state["norms"], names=group)
        h = g_r = None
        if kind == "wagle":
            if estimated:
                h = estimate_hessian_diagonal(model, retain_loader, retain_loss_fn, method=hessian,
                                              batch_key=retain_key, max_batches=max_batches, progress=progress,
                                              names=group)
            elif hessian is not None:
                h = GradientDict(((n, hessian[n]) for n in group), info=getattr(hessian, "info", None))
            g_r = accumulate_gradients(model, retain_loader, retain_loss_fn, batch_key=retain_key,
                                       desc="retain gradients" + tag, names=group, **acc_kw)
        g_f = accumulate_gradients(model, forget_loader, forget_loss_fn, batch_key=forget_key,
                                   desc="forget gradients" + tag, names=group, **acc_kw)
        if kind == "wagle":
            state["terms"].add([params[n] for n in group], [g_r[n] for n in group], gamma=gamma,
                               hessian=None if h is None else [h[n] for n in group])
        return compute_scores(model, g_f, g_r, kind=kind, gamma=gamma, hessian=h, inplace=True, log_terms=False)

    def finalize(info: dict) -> None:
        if kind == "wagle":
            info["terms"] = state["terms"].result()
            _log_terms(info["terms"], hessian is not None)
        state.clear()

    return GroupedScores(groups, shapes, score_group, finalize, plan)
