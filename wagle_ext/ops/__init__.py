"""The one door to every wagle kernel: typed public wrappers that validate their inputs and run the
op on the back end chosen for the device, plus the fake (meta) kernels of ``torch.ops.wagle``.

Every layer above calls the kernels through this package, never ``torch.ops.wagle`` directly.
Ops take and return plain tensors (bit arrays, scores, histograms) and :class:`PackedMask`, the
bit-array value type of this layer (``packed_mask``; a bit array plus its shape, built on the
``bits`` ops); :mod:`wagle_ext.masks` builds named mask sets on top.

Modules: ``bits`` (pack/unpack/popcount), ``packed_mask`` (PackedMask), ``_backends`` (extension loading, back-end choice: ``resolve_backend``, ``backend_info``),
``select`` (the radix-select algorithm and its collectives), ``adamw`` (masked AdamW and compact
gradients). Back ends, in order of preference: ``cuda``, ``triton``, ``cpp``, ``reference`` (see
``_backends``; override with ``WAGLE_BACKEND``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .._checks import as_tensor_list, check_float, check_like, check_ratio
from . import select as _select
from ._backends import (_CPP_ERROR, BACKENDS, HAS_CPP, HIST_SIZE, _backend_has, _has_kernel, _impl,  # noqa: F401
                        _triton_module, backend_info, resolve_backend)
from .adamw import (MASKED_ADAMW_CHUNK, gather_masked, gather_masked_prevalidated_, masked_adamw_,
                    masked_adamw_chunk_offsets, masked_adamw_prevalidated_, torch_fused_adamw_tail)
from .bits import pack_bits, popcount_bits, unpack_bits
from .packed_mask import PackedMask
from .select import collect_and_resolve as _collect_and_resolve

__all__ = [
    "attribution_scores",
    "select_topk_mask",
    "PackedMask",
    "score_histogram",
    "pack_bits",
    "unpack_bits",
    "popcount_bits",
    "masked_adamw_",
    "masked_adamw_chunk_offsets",
    "masked_adamw_prevalidated_",
    "gather_masked",
    "gather_masked_prevalidated_",
    "torch_fused_adamw_tail",
    "backend_info",
    "resolve_backend",
    "BACKENDS",
    "HIST_SIZE",
    "KERNEL_SCORE_KINDS",
    "MASKED_ADAMW_CHUNK",
]

#: Score kinds the fused ``attribution_score`` kernel computes (+ a Hessian variant of ``"wagle"``);
#: :data:`wagle_ext.attribution.SCORE_KINDS` adds the kinds computed in PyTorch.
KERNEL_SCORE_KINDS = ("wagle", "snip", "gradient", "magnitude")


# ----------------------------------------------------------------------------- fake kernels
if HAS_CPP:

    @torch.library.register_fake("wagle::attribution_score")
    def _(weight, grad_forget, grad_retain, hessian, kind, gamma, eps):
        return (torch.empty_like(weight, dtype=torch.float32, memory_format=torch.contiguous_format),
                weight.new_empty(HIST_SIZE, dtype=torch.int64))

    @torch.library.register_fake("wagle::attribution_score_out")
    def _(weight, grad_forget, grad_retain, hessian, kind, gamma, eps, out, hist):
        return None

    @torch.library.register_fake("wagle::radix_histogram")
    def _(scores, prefix, prefix_bits):
        return scores[0].new_empty(HIST_SIZE, dtype=torch.int64)

    @torch.library.register_fake("wagle::count_key")
    def _(scores, key):
        return scores[0].new_empty(len(scores), dtype=torch.int64)

    @torch.library.register_fake("wagle::topk_mask_collect")
    def _(scores, prefix, prefix_bits, largest):
        ctx = torch.library.get_ctx()
        c = ctx.new_dynamic_size()
        bits = [s.new_empty((s.numel() + 7) // 8, dtype=torch.uint8) for s in scores]
        return (bits, scores[0].new_empty(c, dtype=torch.int64), scores[0].new_empty(c, dtype=torch.int64),
                scores[0].new_empty(c, dtype=torch.int64))

    @torch.library.register_fake("wagle::topk_mask_bits")
    def _(scores, threshold_key, largest, ties_take):
        return [s.new_empty((s.numel() + 7) // 8, dtype=torch.uint8) for s in scores]

    @torch.library.register_fake("wagle::pack_bits")
    def _(mask):
        return mask.new_empty((mask.numel() + 7) // 8, dtype=torch.uint8)

    @torch.library.register_fake("wagle::unpack_bits")
    def _(bits, numel):
        return bits.new_empty(numel, dtype=torch.bool)

    @torch.library.register_fake("wagle::popcount_bits")
    def _(bits, numel):
        return torch.library.get_ctx().new_dynamic_size()


    @torch.library.register_fake("wagle::masked_adamw_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets,
          step_offsets, *, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, weight_decay_mode,
          grad_scale=None, found_inf=None, torch_tail=8, compact_grads=False):
        return None

    @torch.library.register_fake("wagle::masked_adamw_master_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets,
          step_offsets, master_weights, *, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, weight_decay_mode,
          grad_scale=None, found_inf=None, torch_tail=8, compact_grads=False, rounding_seeds=()):
        return None

    @torch.library.register_fake("wagle::gather_masked_")
    def _(out, src, bits, chunk_offsets, accumulate):
        return None


# ----------------------------------------------------------------------------- scores
def attribution_scores(
    weights: Sequence[torch.Tensor],
    grads_forget: Optional[Sequence[torch.Tensor]] = None,
    grads_retain: Optional[Sequence[torch.Tensor]] = None,
    *,
    kind: str = "wagle",
    gamma: float = 1e-6,
    hessian: Optional[Sequence[torch.Tensor]] = None,
    eps: float = 1e-8,
    out: Optional[Sequence[torch.Tensor]] = None,
    return_histogram: bool = False,
):
    """Per-weight attribution scores, one fused pass per tensor.

    Args:
        weights: tensors ``w`` (float32/bfloat16/float16), any shapes.
        grads_forget: accumulated forget-loss gradients ``g_f``, one per weight, same shapes.
        grads_retain: accumulated retain-loss gradients ``g_r`` (needed by ``kind="wagle"``).
        kind: ``"wagle"``: ``|(w - g_r / gamma) * g_f|`` (WAGLE, Jia et al. 2024), or with a
            diagonal Hessian estimate ``hessian=h``: ``|(w - g_r / (h + eps)) * g_f|``;
            ``"snip"``: ``|w * g_f|``; ``"gradient"``: ``|g_f|`` (SalUn); ``"magnitude"``: ``|w|``.
        gamma: the constant Hessian diagonal of WAGLE (> 0); ignored when ``hessian`` is given.
        hessian: optional per-weight diagonal Hessian estimates (e.g. a Fisher diagonal).
        eps: added to ``hessian`` before dividing.
        out: optional preallocated contiguous float32 outputs (one per weight, same numel); may
            alias ``grads_forget`` when those are contiguous float32 (scores then overwrite them).
        return_histogram: also return the int64[2049] key histogram of all scores, computed in
            the same pass; pass it to :func:`select_topk_mask` to save one pass over the scores.

    Returns:
        ``list[Tensor]`` of float32 scores shaped like ``weights`` (and the histogram when
        ``return_histogram``). Nothing is mutated except ``out``.
    """
    weights = as_tensor_list(weights, "weights")
    if kind not in KERNEL_SCORE_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_SCORE_KINDS}, got {kind!r}")
    gf = as_tensor_list(grads_forget, "grads_forget") if grads_forget is not None else None
    gr = as_tensor_list(grads_retain, "grads_retain") if grads_retain is not None else None
    hs = as_tensor_list(hessian, "hessian") if hessian is not None else None
    if kind != "magnitude" and gf is None:
        raise ValueError(f"kind={kind!r} needs grads_forget")
    if kind == "wagle" and gr is None:
        raise ValueError("kind='wagle' needs grads_retain (use kind='snip' for |w * g_f|)")
    if hs is not None and kind != "wagle":
        raise ValueError(f"hessian is only used by kind='wagle', got kind={kind!r}")
    if hs is None and kind == "wagle" and not (isinstance(gamma, (int, float)) and gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    for name, lst in (("grads_forget", gf), ("grads_retain", gr), ("hessian", hs), ("out", out)):
        if lst is not None and len(lst) != len(weights):
            raise ValueError(f"{name} has {len(lst)} tensors but weights has {len(weights)}")
    if out is not None:
        out = as_tensor_list(out, "out")
    internal_kind = "wagle_hessian" if hs is not None else kind

    scores: list[torch.Tensor] = []
    device = weights[0].device if weights else torch.device("cpu")
    # An empty histogram tells the fused kernel to skip the histogram work (scores only).
    hist = torch.zeros(HIST_SIZE if return_histogram else 0, dtype=torch.int64, device=device)
    backend = resolve_backend("attribution_score", device) if weights else "reference"
    fused = backend in ("cpp", "cuda")
    score_op = torch.ops.wagle.attribution_score_out if fused else _impl("attribution_score", device)
    gamma, eps = float(gamma), float(eps)
    for i, w in enumerate(weights):
        check_float(w, f"weights[{i}]")
        if w.device != device:
            raise ValueError(f"weights[{i}] is on {w.device} but weights[0] is on {device}")
        g_f = gf[i] if gf is not None and kind != "magnitude" else None
        g_r = gr[i] if gr is not None and kind == "wagle" else None
        h = hs[i] if hs is not None else None
        for t, name in ((g_f, "grads_forget"), (g_r, "grads_retain"), (h, "hessian")):
            if t is not None:
                check_like(t, w, f"{name}[{i}]", f"weights[{i}]")
        if out is not None:
            o = out[i]
            if o.dtype != torch.float32 or not o.is_contiguous() or o.numel() != w.numel():
                raise ValueError(f"out[{i}] must be a contiguous float32 tensor with {w.numel()} elements")
            if o.device != device:
                raise ValueError(f"out[{i}] is on {o.device} but weights[{i}] is on {device}")
        if fused:
            o = out[i] if out is not None else torch.empty(w.shape, dtype=torch.float32, device=device)
            score_op(w, g_f, g_r, h, internal_kind, gamma, eps, o, hist)
            s = o.view(w.shape)
        else:
            s, hi = score_op(w, g_f, g_r, h, internal_kind, gamma, eps)
            if return_histogram:
                hist += hi.to(device)
            if out is not None:
                out[i].view(w.shape).copy_(s)
                s = out[i].view(w.shape)
        scores.append(s)
    hist_total = hist
    return (scores, hist_total) if return_histogram else scores


def score_histogram(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64[2049] key histogram of all ``scores`` (entry 2048 counts NaNs); see wagle_ext/kernels/reference.py."""
    scores = as_tensor_list(scores, "scores")
    if not scores:
        return torch.zeros(HIST_SIZE, dtype=torch.int64)
    for i, s in enumerate(scores):
        check_float(s, f"scores[{i}]")
    return _impl("radix_histogram", scores[0].device)([s.contiguous() for s in scores], 0, 0)


# ----------------------------------------------------------------------------- selection
def select_topk_mask(
    scores: Sequence[torch.Tensor],
    *,
    ratio: Optional[float] = None,
    k: Optional[int] = None,
    scope: str = "global",
    largest: bool = True,
    histogram: Optional[torch.Tensor] = None,
    process_group=None,
) -> list:
    """Exact top-k selection as one :class:`PackedMask` per score tensor.

    Args:
        scores: float tensors (float32/bfloat16/float16), any shapes, one device.
        ratio: fraction of elements to select, in (0, 1]; ``k = int(N * ratio)`` where N is the
            total element count (``scope="global"``) or each tensor's count (``"per_tensor"``).
        k: exact number of elements to select (instead of ``ratio``), in [0, N]; with
            ``scope="per_tensor"`` each tensor selects ``min(k, numel)``.
        scope: ``"global"`` (one threshold over all tensors, never concatenated or sorted) or
            ``"per_tensor"``.
        largest: select the largest scores (True) or the smallest.
        histogram: the int64[2049] histogram of exactly these scores (``attribution_scores(...,
            return_histogram=True)``), saving one pass. Global scope only.

        process_group: multi-process selection (``scope="global"``): ``True`` for the default
            ``torch.distributed`` group, or a group. Each process passes ITS OWN score tensors (a rank
            may pass none, e.g. an empty list, and still joins the collectives); the
            global order is rank-major (rank 0's tensors first) and ``k``/``ratio`` refer to the
            total over all processes. Only int64 histograms (a few KB) and counts cross processes.

    Ties at the threshold go to the lowest global index (tensor order, then flat index), so the
    result is deterministic and has exactly k selected bits. NaN scores raise ``ValueError``.
    """
    scores = as_tensor_list(scores, "scores")
    if (ratio is None) == (k is None):
        raise ValueError("pass exactly one of ratio= or k=")
    if ratio is not None:
        check_ratio(ratio)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"scope must be 'global' or 'per_tensor', got {scope!r}")
    for i, s in enumerate(scores):
        check_float(s, f"scores[{i}]")
        if s.device != scores[0].device:
            raise ValueError(f"scores[{i}] is on {s.device} but scores[0] is on {scores[0].device}")
    if histogram is not None:
        if scope != "global":
            raise ValueError("histogram= is only used with scope='global'")
        if histogram.dtype != torch.int64 or histogram.numel() != HIST_SIZE:
            raise ValueError(f"histogram must be int64[{HIST_SIZE}] (from attribution_scores(..., return_histogram=True))")
    if not scores and process_group is None:
        if k not in (None, 0):
            raise ValueError(f"k must be in [0, 0] for empty scores, got {k}")
        return []
    n_total = sum(s.numel() for s in scores)

    if process_group is not None:
        if scope != "global":
            raise ValueError("process_group= needs scope='global'")
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group= given but torch.distributed is not initialised")
        t = torch.tensor([n_total], dtype=torch.int64, device=_select.selection_device(scores, process_group))
        dist.all_reduce(t, group=None if process_group is True else process_group)
        n_total = int(t.item())
    if scope == "global":
        kk = int(n_total * ratio) if ratio is not None else k
        if not 0 <= kk <= n_total:
            raise ValueError(f"k must be in [0, {n_total}], got {kk}")
        groups = [(list(range(len(scores))), kk)]
    else:
        groups = []
        for i, s in enumerate(scores):
            if k is not None and k < 0:
                raise ValueError(f"k must be >= 0, got {k}")
            kk = int(s.numel() * ratio) if ratio is not None else min(k, s.numel())
            groups.append(([i], kk))

    masks: list = [None] * len(scores)
    for idx, kk in groups:
        group = [scores[i].contiguous() for i in idx]
        bits = _select.select_bits(group, int(kk), bool(largest), histogram, process_group,
                                   collect=_collect_and_resolve)
        for j, i in enumerate(idx):
            masks[i] = PackedMask(bits[j], scores[i].shape, kk if len(idx) == 1 and process_group is None else None)
    return masks
