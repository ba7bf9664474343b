"""Selection over named scores: :func:`build_mask` turns a ``{name: scores}`` dict into a
:class:`MaskSet` with provenance (global / per-tensor top-k through :func:`wagle_ext.ops.select_topk_mask`,
per-row top-k here in :func:`select_per_row`).

A mask marks the weights **selected for update** (WAGLE convention: ``ratio`` is the fraction of
weights that train, i.e. density = 1 - sparsity; WAGLE ``generate_mask.py::get_mask``). The radix
select runs in ``wagle_ext.ops``.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..ops import PackedMask, select_topk_mask
from .._checks import FLOAT_DTYPES, check_ratio
from ..naming import model_fingerprint
from .distributed import all_gather_masks, world_size
from .maskset import SCOPES, MaskSet
from .streaming import StreamingTopK

__all__ = ["select_per_row", "build_mask", "is_score_groups"]


def is_score_groups(scores: Any) -> bool:
    """True for *grouped scores*: not a mapping, but an iterable of ``{name: scores}`` mappings (the
    groups, in global order) with ``.shapes`` (``{name: shape}`` of every name the groups will
    yield, in that order) and optionally ``.info`` (read after the iteration). What
    :func:`wagle_ext.attribution.score_model` returns with ``memory_budget=`` / ``groups=``."""
    return (not isinstance(scores, Mapping) and isinstance(getattr(scores, "shapes", None), Mapping)
            and isinstance(scores, Iterable))

PatternArg = Union[None, str, Sequence[str]]


def _compile_patterns(patterns: PatternArg, arg: str) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for i, p in enumerate(patterns):
        if not isinstance(p, str):
            raise TypeError(f"{arg}[{i}] must be a str (a regular expression), got {type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{arg}[{i}] = {p!r} is not a valid regular expression: {exc}") from None
    return out


def _matches(name: str, pats: list) -> bool:
    return any(p.search(name) for p in pats)


def select_per_row(scores: torch.Tensor, ratio: float, *, chunk_elements: int = 1 << 22) -> PackedMask:
    """Exact per-row top-k: in every row of a 2-D ``scores`` tensor select ``int(cols * ratio)``
    elements with the largest scores (Wanda's per-output-row rule, WAGLE ``generate_mask.py::wanda``).

    Ties go to the lowest column index (a stable descending sort per row). A 1-D tensor is one row;
    a tensor with more than two dimensions is viewed as ``[shape[0], -1]``. Memory: the sort runs on
    blocks of rows of about ``chunk_elements`` elements (int64 indices, 8 bytes per element), so
    peak extra memory is ~12 bytes x ``chunk_elements`` regardless of the tensor size.

    Args:
        scores: float tensor (float32/bfloat16/float16), no NaNs.
        ratio: fraction of each row to select, in (0, 1].
    Returns:
        :class:`PackedMask` shaped like ``scores`` on its device.
    """
    check_ratio(ratio)
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point tensor")
    shape = scores.shape
    if scores.numel() == 0:
        return PackedMask.full(shape, False, device=scores.device)
    rows2d = scores.reshape(1, -1) if scores.dim() <= 1 else scores.reshape(shape[0], -1)
    n_rows, n_cols = rows2d.shape
    k = int(n_cols * ratio)
    sel = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=scores.device)
    if k and n_rows:
        if torch.isnan(rows2d).any():
            raise ValueError("scores contain NaN values; NaN scores cannot be ranked")
        step = max(1, chunk_elements // max(n_cols, 1))
        for r0 in range(0, n_rows, step):
            block = rows2d[r0:r0 + step].to(torch.float32)
            # +0.0 canonicalises -0.0 so that it ties with +0.0 (the kernels' key convention).
            idx = torch.sort(block + 0.0, dim=1, descending=True, stable=True).indices[:, :k]
            sel[r0:r0 + step].scatter_(1, idx, True)
    return PackedMask(PackedMask.from_bool(sel).bits, shape, k * n_rows)


def build_mask(
    scores: Union[Mapping[str, torch.Tensor], Iterable[Mapping[str, torch.Tensor]]],
    ratio: float,
    *,
    scope: str = "global",
    include: PatternArg = None,
    exclude: PatternArg = None,
    excluded: str = "frozen",
    missing: str = "frozen",
    allow_empty: bool = False,
    model: Optional[torch.nn.Module] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    process_group=None,
    gather: bool = True,
) -> "MaskSet":
    """Select the top ``ratio`` of weights by score, exactly and deterministically.

    Args:
        scores: ``{parameter name: float scores}`` (any shapes, one device, no NaNs), in
            parameter order; larger = more important = selected first. Typically from
            :func:`wagle_ext.attribution.compute_scores`; its ``.info`` (score kind, gamma, model
            fingerprint, ...) is copied into the mask metadata when present.
            Or *grouped scores* (:func:`is_score_groups`, e.g. ``score_model(...,
            memory_budget="16GB")``): the groups are consumed one at a time and never held together
            -- global scope keeps only the running top-k candidates (:class:`StreamingTopK`: 1 bit
            per weight + one score per selected weight), the other scopes select per tensor as it
            arrives -- and the result is the MaskSet ``build_mask`` gives for all groups merged
            into one mapping (same bits, same metadata plus the groups' provenance). Not with
            ``process_group``.
        ratio: fraction of the **included** weights selected for update, in (0, 1]. The count is
            exactly ``int(N * ratio)`` with N = all included elements (``"global"``), each
            tensor's elements (``"per_tensor"``) or each row's columns (``"per_row"``).
        scope: ``"global"`` (one threshold over all included tensors, WAGLE), ``"per_tensor"``
            (SNIP ``layer_wise=True``), or ``"per_row"`` (Wanda: per output row of 2-D weights).
        include: regular expression(s) (``re.search`` on the parameter name); when given only
            matching parameters take part in the selection.
        exclude: regular expression(s); matching parameters never take part, e.g.
            ``exclude=["embed_tokens", "norm", "lm_head"]``.
        excluded: what the mask says for parameters in ``scores`` left out by include/exclude:
            ``"frozen"`` (all-False entry: never updated), ``"dense"`` (all-True entry: updated
            densely, WAGLE's Wanda convention), or ``"absent"`` (no entry; consumers apply
            :attr:`MaskSet.missing`).
        missing: how consumers treat model parameters with no entry at all (not in ``scores``, or
            ``excluded="absent"``): ``"frozen"`` (default: never updated, so the mask's density is
            what trains) or ``"dense"`` (updated normally: WAGLE's Wanda baseline convention for
            embeddings/norms/lm_head, which a per-tensor Wanda score does not cover). Stored as
            :attr:`MaskSet.missing`; :func:`trainable_report` counts what actually trains.
        allow_empty: False (default) raises ``ValueError`` when the selection is empty (``ratio``
            too small for the scope: ``int(N * ratio) == 0`` globally, or in every tensor / row),
            since training with it would be a silent no-op; True returns the empty mask.
        model: when given, its :func:`model_fingerprint` is recorded (otherwise one from
            ``scores.info``, else none) and the names are checked against it.
        metadata: extra JSON-serialisable provenance stored with the mask.
        process_group: multi-process global selection (``True`` = default ``torch.distributed``
            group, or a group). Each process passes ITS OWN contiguous block of the parameters (see
            :func:`partition_names`; global order is rank-major) and ``ratio`` refers to the total
            over all processes. Only int64 histograms (a few KB per radix level) cross processes,
            never scores. The result equals the one-process mask.
        gather: with ``process_group``, all-gather the bits so every process returns the full
            :class:`MaskSet` (ratio/8 bytes per weight cross processes); ``False`` returns each
            process's own block only.

    Ties at the threshold go to the lowest index (parameter order, then flat index; per row: the
    lowest column), so masks are identical across runs, back ends and process counts.

    Returns:
        :class:`MaskSet` on the scores' device. Nothing is mutated.
    """
    check_ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if excluded not in ("frozen", "dense", "absent"):
        raise ValueError(f"excluded must be 'frozen', 'dense' or 'absent', got {excluded!r}")
    if missing not in ("dense", "frozen"):
        raise ValueError(f"missing must be 'frozen' or 'dense', got {missing!r}")
    if not isinstance(scores, Mapping) and is_score_groups(scores):
        return _build_mask_grouped(scores, ratio, scope=scope, include=include, exclude=exclude,
                                   excluded=excluded, missing=missing, allow_empty=allow_empty, model=model,
                                   metadata=metadata, process_group=process_group)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping name -> tensor, got {type(scores).__name__}")
    inc = _compile_patterns(include, "include")
    exc = _compile_patterns(exclude, "exclude")
    for name, s in scores.items():
        if not isinstance(name, str):
            raise TypeError(f"scores keys must be parameter names (str), got {type(name).__name__}")
        if not isinstance(s, torch.Tensor) or s.dtype not in FLOAT_DTYPES:
            raise TypeError(f"scores[{name!r}] must be a float32/bfloat16/float16 tensor")

    names = list(scores.keys())
    selected_names = [n for n in names if (not inc or _matches(n, inc)) and not _matches(n, exc)]
    if not selected_names and process_group is None:
        raise ValueError(
            f"no parameter left to select from: include={include!r}, exclude={exclude!r} matched "
            f"none/all of {len(names)} names (first: {names[:3]})")

    if not allow_empty:
        _check_not_empty(scores, selected_names, ratio, scope, process_group)

    masks: dict = {}
    if scope == "global":
        tensors = [scores[n] for n in selected_names]
        if process_group is not None and not tensors:
            # This process holds no block: it still takes part in the collective histogram
            # reductions, with one empty tensor (select_topk_mask needs a tensor to learn the device).
            dev = next(iter(scores.values())).device if scores else torch.device("cpu")
            select_topk_mask([torch.empty(0, device=dev)], ratio=ratio, scope="global",
                                 process_group=process_group)
        else:
            for n, pm in zip(selected_names, select_topk_mask(
                    tensors, ratio=ratio, scope="global", process_group=process_group)):
                masks[n] = pm
    elif scope == "per_tensor":
        for n, pm in zip(selected_names, select_topk_mask(
                [scores[n] for n in selected_names], ratio=ratio, scope="per_tensor")):
            masks[n] = pm
    else:
        for n in selected_names:
            masks[n] = select_per_row(scores[n], ratio)

    ordered: "OrderedDict[str, PackedMask]" = OrderedDict()
    for n in names:
        if n in masks:
            ordered[n] = masks[n]
        elif excluded != "absent":
            ordered[n] = PackedMask.full(scores[n].shape, excluded == "dense", device=scores[n].device)
    return _mask_set(ordered, getattr(scores, "info", None), ratio, scope, include, exclude, excluded, missing,
                     model, metadata, process_group, gather)


def _mask_set(ordered, scores_info, ratio, scope, include, exclude, excluded, missing, model, metadata,
              process_group, gather) -> MaskSet:
    info = dict(scores_info or {})
    meta: dict = {k: v for k, v in info.items() if _jsonable(v)}
    meta.update({
        "ratio": float(ratio),
        "scope": scope,
        "include": _pattern_list(include),
        "exclude": _pattern_list(exclude),
        "excluded": excluded,
    })
    if metadata:
        for k, v in metadata.items():
            if not _jsonable(v):
                raise TypeError(f"metadata[{k!r}] must be JSON-serialisable, got {type(v).__name__}")
            meta[k] = v
    fingerprint = model_fingerprint(model) if model is not None else info.get("model_fingerprint")
    meta.pop("model_fingerprint", None)

    if process_group is not None:
        meta["world_size"] = world_size(process_group)
        if gather:
            ordered = all_gather_masks(ordered, process_group)
    result = MaskSet(ordered, metadata=meta, fingerprint=fingerprint, missing=missing)
    if model is not None and (process_group is None or gather):
        result.check_compatible(model, strict=False)
    return result


def _build_mask_grouped(groups, ratio: float, *, scope: str, include: PatternArg, exclude: PatternArg,
                        excluded: str, missing: str, allow_empty: bool, model, metadata, process_group) -> MaskSet:
    """``build_mask`` over grouped scores, one group alive at a time (see ``build_mask``; arguments
    already checked there)."""
    if process_group is not None:
        raise ValueError("grouped scores (memory_budget=/groups=) are selected on one process; "
                         "process_group= is not supported with them")
    inc = _compile_patterns(include, "include")
    exc = _compile_patterns(exclude, "exclude")
    shapes = OrderedDict((n, torch.Size(s)) for n, s in groups.shapes.items())
    names = list(shapes)
    selected_names = [n for n in names if (not inc or _matches(n, inc)) and not _matches(n, exc)]
    if not selected_names:
        raise ValueError(
            f"no parameter left to select from: include={include!r}, exclude={exclude!r} matched "
            f"none/all of {len(names)} names (first: {names[:3]})")
    # Shapes alone decide k and emptiness: meta tensors stand in for the scores.
    meta = {n: torch.empty(shapes[n], device="meta") for n in selected_names}
    if not allow_empty:
        _check_not_empty(meta, selected_names, ratio, scope, None)
    chosen = set(selected_names)
    streaming = StreamingTopK(int(sum(shapes[n].numel() for n in selected_names) * ratio)) \
        if scope == "global" else None
    masks: dict = {}
    seen: list = []
    device = None
    for group in groups:
        if not isinstance(group, Mapping):
            raise TypeError(f"each group must be a mapping name -> tensor, got {type(group).__name__}")
        batch = []
        for n, s in group.items():
            if not isinstance(n, str):
                raise TypeError(f"scores keys must be parameter names (str), got {type(n).__name__}")
            if not isinstance(s, torch.Tensor) or s.dtype not in FLOAT_DTYPES:
                raise TypeError(f"scores[{n!r}] must be a float32/bfloat16/float16 tensor")
            if len(seen) >= len(names) or names[len(seen)] != n:
                expected = names[len(seen)] if len(seen) < len(names) else "nothing"
                raise ValueError(f"grouped scores yielded {n!r} where .shapes announces {expected!r}")
            if s.shape != shapes[n]:
                raise ValueError(f"scores[{n!r}] has shape {tuple(s.shape)}; .shapes says {tuple(shapes[n])}")
            seen.append(n)
            device = s.device if device is None else device
            if n not in chosen:
                if excluded != "absent":
                    masks[n] = PackedMask.full(s.shape, excluded == "dense", device=s.device)
            elif scope == "global":
                batch.append((n, s))
            elif scope == "per_tensor":
                masks[n] = select_topk_mask([s], ratio=ratio, scope="per_tensor")[0]
            else:
                masks[n] = select_per_row(s, ratio)
        if batch:
            streaming.push(batch)  # type: ignore[union-attr]
        del batch, group
    if len(seen) != len(names):
        raise ValueError(f"grouped scores yielded {len(seen)} of the {len(names)} tensors .shapes announces "
                         f"(first missing: {names[len(seen)]!r})")
    if streaming is not None:
        masks.update(streaming.finish())
    ordered: "OrderedDict[str, PackedMask]" = OrderedDict((n, masks[n]) for n in names if n in masks)
    return _mask_set(ordered, getattr(groups, "info", None), ratio, scope, include, exclude, excluded, missing,
                     model, metadata, None, True)


def _check_not_empty(scores, names, ratio: float, scope: str, process_group) -> None:
    """Raise ``ValueError`` when ``ratio`` selects nothing in ``scope`` (before any selection)."""
    n_total = sum(scores[n].numel() for n in names)
    if process_group is not None and scope != "global":
        return  # not supported: select_topk_mask says so
    if scope == "global":
        if process_group is not None:
            world_size(process_group)  # a clear error when torch.distributed is not initialised
            group = None if process_group is True else process_group
            nccl = torch.distributed.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            counts = torch.tensor([n_total], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(counts, group=group)
            n_total = int(counts.item())
        k = int(n_total * ratio)
        where = f"{n_total} weights"
    elif scope == "per_tensor":
        k = sum(int(scores[n].numel() * ratio) for n in names)
        largest = max((scores[n].numel() for n in names), default=0)
        where = f"{n_total} weights (per tensor: int(numel * ratio) is 0 in every tensor, the largest has {largest})"
    else:
        def cols(t: torch.Tensor) -> int:
            return t.numel() if t.dim() <= 1 else (t.numel() // t.shape[0] if t.shape[0] else 0)

        k = sum(int(cols(scores[n]) * ratio) for n in names if scores[n].numel())
        widest = max((cols(scores[n]) for n in names), default=0)
        where = f"{n_total} weights (per row: int(columns * ratio) is 0 in every row, the widest has {widest} columns)"
    if k == 0:
        raise ValueError(f"ratio {ratio:g} selects 0 of {where}; training with an empty mask would update "
                         "nothing. Use a larger ratio, or pass allow_empty=True to build an empty mask on purpose")


def _pattern_list(p: PatternArg) -> list:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
