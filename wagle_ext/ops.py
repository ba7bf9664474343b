"""The one door to every wagle kernel: input validation, back-end choice, fake (meta) kernels.

Back ends, in order of preference for a tensor's device (override with ``WAGLE_BACKEND``):

* ``cuda``      -- ``torch.ops.wagle`` compiled for CUDA (CUDA tensors, CUDA builds only)
* ``triton``    -- ``wagle_ext.kernels.triton`` (CUDA tensors; CPU tensors only when forced, under
  ``TRITON_INTERPRET=1``)
* ``cpp``       -- ``torch.ops.wagle`` CPU kernels from ``wagle_ext._C``
* ``reference`` -- ``wagle_ext.kernels.reference`` (pure PyTorch, always available)

A back end that lacks one op falls through to the next one for that op.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

from .kernels import reference
from .packed_mask import PackedMask

__all__ = [
    "attribution_scores",
    "select_topk_mask",
    "score_histogram",
    "pack_bits",
    "unpack_bits",
    "popcount_bits",
    "backend_info",
    "resolve_backend",
    "HIST_SIZE",
]

HIST_SIZE = reference.HIST_SIZE
BACKENDS = ("cuda", "triton", "cpp", "reference")
SCORE_KINDS = ("wagle", "snip", "gradient", "magnitude")  # public kinds; + a hessian for "wagle"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------- extension loading
try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY static initialisers)

    HAS_CPP = True
    _CPP_ERROR: Optional[str] = None
except ImportError as exc:  # pure-Python install (WAGLE_NO_EXT=1) or a failed build
    HAS_CPP = False
    _CPP_ERROR = str(exc)


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if not HAS_CPP:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"wagle::{op}", dispatch_key)
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _triton_module():
    try:
        from .kernels import triton as triton_kernels

        return triton_kernels if triton_kernels.AVAILABLE else None
    except Exception:  # triton missing or broken: not an error, just not a back end
        return None


def _cpp_available(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return _has_kernel(op, key)


def _backend_has(backend: str, op: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpp":
        return device.type == "cpu" and _cpp_available(op, device)
    if backend == "cuda":
        return device.type == "cuda" and _cpp_available(op, device)
    if backend == "triton":
        mod = _triton_module()
        if mod is None or not hasattr(mod, op):
            return False
        # On CPU tensors Triton only runs in the interpreter, which is for tests: forced only.
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    raise AssertionError(backend)


_warned_fallback: set = set()


def resolve_backend(op: str, device: Union[torch.device, str]) -> str:
    """Name of the back end that runs ``op`` for tensors on ``device``.

    ``WAGLE_BACKEND=reference|cpp|triton|cuda`` forces one (a ``RuntimeError`` says so when it
    cannot run that op on that device).
    """
    device = torch.device(device)
    forced = os.environ.get("WAGLE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"WAGLE_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("WAGLE_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        if not _backend_has(forced, op, device):
            raise RuntimeError(
                f"WAGLE_BACKEND={forced} cannot run {op} on {device.type} tensors here "
                f"({backend_info()})")
        return forced
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpp", "reference")
    for name in order:
        if _backend_has(name, op, device):
            if name == "reference" and device.type == "cuda" and op not in _warned_fallback:
                _warned_fallback.add(op)
                warnings.warn(
                    f"wagle_ext: no CUDA or Triton kernel for {op}; using the pure-PyTorch "
                    "reference on the GPU (slow, memory-hungry).", RuntimeWarning, stacklevel=3)
            return name
    return "reference"


def backend_info() -> dict:
    """Which back ends are usable in this process, and what each device would use.

    Keys: ``cpp`` (bool), ``cpp_error`` (why the extension did not load, or None), ``cuda`` (CUDA
    kernels compiled in), ``triton`` (Triton importable), ``cpu_isa`` (SIMD path of the C++
    kernels), ``cpu`` / ``cuda_default`` (back end used for attribution_score on that device),
    ``forced`` (``WAGLE_BACKEND`` or None).
    """
    info = {
        "cpp": HAS_CPP,
        "cpp_error": _CPP_ERROR,
        "cuda": _has_kernel("attribution_score", "CUDA"),
        "triton": _triton_module() is not None,
        "cpu_isa": torch.ops.wagle.cpu_isa() if HAS_CPP else None,
        "forced": os.environ.get("WAGLE_BACKEND") or None,
    }
    cpu_order = ("cpp", "reference")
    info["cpu"] = next(b for b in cpu_order if _backend_has(b, "attribution_score", torch.device("cpu")))
    if info["cuda"]:
        info["cuda_default"] = "cuda"
    elif info["triton"]:
        info["cuda_default"] = "triton"
    else:
        info["cuda_default"] = "reference"
    return info


def _impl(op: str, device: torch.device) -> Callable:
    backend = resolve_backend(op, device)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.wagle, op)
    if backend == "triton":
        return getattr(_triton_module(), op)
    return getattr(reference, op)


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


# ----------------------------------------------------------------------------- validation helpers
def _as_list(x, name: str) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        raise TypeError(f"{name} must be a sequence of tensors; for a dict pass list(d.values())")
    try:
        out = list(x)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(x).__name__}") from None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    _check_float(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


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
    weights = _as_list(weights, "weights")
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    gf = _as_list(grads_forget, "grads_forget") if grads_forget is not None else None
    gr = _as_list(grads_retain, "grads_retain") if grads_retain is not None else None
    hs = _as_list(hessian, "hessian") if hessian is not None else None
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
        out = _as_list(out, "out")
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
        _check_float(w, f"weights[{i}]")
        if w.device != device:
            raise ValueError(f"weights[{i}] is on {w.device} but weights[0] is on {device}")
        g_f = gf[i] if gf is not None and kind != "magnitude" else None
        g_r = gr[i] if gr is not None and kind == "wagle" else None
        h = hs[i] if hs is not None else None
        for t, name in ((g_f, "grads_forget"), (g_r, "grads_retain"), (h, "hessian")):
            if t is not None:
                _check_like(t, w, f"{name}[{i}]", f"weights[{i}]")
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
    """int64[2049] key histogram of all ``scores`` (entry 2048 counts NaNs); see kernels/reference.py."""
    scores = _as_list(scores, "scores")
    if not scores:
        return torch.zeros(HIST_SIZE, dtype=torch.int64)
    for i, s in enumerate(scores):
        _check_float(s, f"scores[{i}]")
    return _impl("radix_histogram", scores[0].device)([s.contiguous() for s in scores], 0, 0)


# ----------------------------------------------------------------------------- bits
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8[ceil(numel/8)] (little-endian bit order)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {mask.dtype}")
    return _impl("pack_bits", mask.device)(mask.contiguous())


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bit array -> bool[numel]."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8 bits, got {bits.dtype}")
    if bits.numel() * 8 < numel or numel < 0:
        raise ValueError(f"{bits.numel()} bytes cannot hold {numel} bits")
    return _impl("unpack_bits", bits.device)(bits.contiguous(), int(numel))


def popcount_bits(bits: torch.Tensor, numel: int) -> int:
    """Number of set bits among the first ``numel`` bits of a uint8 bit array."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"popcount_bits expects uint8 bits, got {bits.dtype}")
    if bits.numel() * 8 < numel or numel < 0:
        raise ValueError(f"{bits.numel()} bytes cannot hold {numel} bits")
    return int(_impl("popcount_bits", bits.device)(bits.contiguous(), int(numel)))


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
) -> list[PackedMask]:
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
    scores = _as_list(scores, "scores")
    if (ratio is None) == (k is None):
        raise ValueError("pass exactly one of ratio= or k=")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"scope must be 'global' or 'per_tensor', got {scope!r}")
    for i, s in enumerate(scores):
        _check_float(s, f"scores[{i}]")
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
        t = torch.tensor([n_total], dtype=torch.int64, device=_selection_device(scores, process_group))
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

    masks: list[Optional[PackedMask]] = [None] * len(scores)
    for idx, kk in groups:
        group = [scores[i].contiguous() for i in idx]
        bits = _select_bits(group, int(kk), bool(largest), histogram, process_group)
        for j, i in enumerate(idx):
            masks[i] = PackedMask(bits[j], scores[i].shape, kk if len(idx) == 1 and process_group is None else None)
    return masks  # type: ignore[return-value]


def _select_bits(scores: list, k: int, largest: bool, hist: Optional[torch.Tensor], process_group) -> list:
    """Exact top-k bit arrays by MSD radix select on the float keys (kernels.md 4.2):
    11 + 11 + 10 bit digit histograms, stopping as soon as the boundary bucket is taken whole, then
    one mask pass. Ties at an exact threshold key go to the lowest global index: per-tensor tie
    counts give each tensor its quota, in tensor order (rank-major across processes)."""
    # A rank may hold no tensors (multi-process); it still joins every collective.
    device = _selection_device(scores, process_group)

    def op(name: str) -> Callable:
        # The dispatcher cannot route an empty tensor list: the reference handles it (no work).
        return _impl(name, device) if scores else getattr(reference, name)

    radix_histogram = lambda *a: op("radix_histogram")(*a).to(device)  # noqa: E731
    dist = None
    if process_group is not None:
        import torch.distributed as dist

    def reduce_(t: torch.Tensor) -> torch.Tensor:
        if dist is not None:
            dist.all_reduce(t, group=None if process_group is True else process_group)
        return t

    n_local = sum(s.numel() for s in scores)
    n_total = int(reduce_(torch.tensor([n_local], dtype=torch.int64, device=device)).item()) if dist else n_local
    if not 0 <= k <= n_total:
        raise ValueError(f"k must be in [0, {n_total}], got {k}")
    if hist is None:
        hist = radix_histogram(scores, 0, 0)
    else:
        hist = hist.to(device=device, copy=True)
        if int(hist.sum()) != n_local:
            raise ValueError(f"histogram counts {int(hist.sum())} scores but the scores have {n_local} elements")
    hist = reduce_(hist)
    if int(hist[HIST_SIZE - 1]) > 0:
        raise ValueError(f"scores contain {int(hist[HIST_SIZE - 1])} NaN values; NaN scores cannot be ranked")
    if k == 0 or k == n_total:
        fill = 0xFF if k else 0
        out = []
        for s in scores:
            b = torch.full(((s.numel() + 7) // 8,), fill, dtype=torch.uint8, device=device)
            if fill and s.numel() % 8:
                b[-1] = (1 << (s.numel() % 8)) - 1
            out.append(b)
        return out

    need = k
    prefix = 0
    prefix_bits = 0
    threshold = None
    for pb, shift, width in reference.RADIX_LEVELS:
        assert pb == prefix_bits
        h = hist[: 1 << width].cpu()
        order = h.flip(0) if largest else h
        cum = order.cumsum(0)
        pos = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)).item())
        above = int(cum[pos - 1]) if pos > 0 else 0
        digit = (len(order) - 1 - pos) if largest else pos
        count = int(h[digit])
        need -= above
        prefix = (prefix << width) | digit
        prefix_bits += width
        if count == need or prefix_bits == 32:
            # Whole bucket taken, or an exact key: threshold = the bucket's worst key.
            lo = prefix << (32 - prefix_bits)
            hi = lo | ((1 << (32 - prefix_bits)) - 1)
            threshold = lo if largest else hi
            exact_split = count != need
            break
        if dist is None and scores and count <= max(1 << 16, n_total >> 9) and _backend_has_collect(device):
            # Small boundary bucket: one pass writes the mask and returns the bucket's elements,
            # resolved here exactly (instead of another histogram pass plus a mask pass).
            return _collect_and_resolve(scores, prefix, prefix_bits, largest, need)
        hist = reduce_(radix_histogram(scores, prefix, prefix_bits))
    assert threshold is not None
    if exact_split:
        counts = op("count_key")(scores, threshold).cpu()
        before = 0
        if dist is not None:
            world = dist.get_world_size(None if process_group is True else process_group)
            mine = counts.sum().reshape(1).to(device)
            gathered = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine, group=None if process_group is True else process_group)
            rank = dist.get_rank(None if process_group is True else process_group)
            before = int(sum(int(g.item()) for g in gathered[:rank]))
        remaining = max(need - before, 0)
        ties_take = []
        for c in counts.tolist():
            take = min(remaining, c)
            ties_take.append(take)
            remaining -= take
    else:
        ties_take = [-1] * len(scores)
    return op("topk_mask_bits")(scores, int(threshold), largest, ties_take)


def _backend_has_collect(device: torch.device) -> bool:
    # The fused mask+candidates pass is a CPU fast path; other back ends keep the histogram path
    # (a forced back end must run its own primitives, so only when cpp is the one chosen).
    return resolve_backend("topk_mask_bits", device) == "cpp" and _has_kernel("topk_mask_collect", "CPU")


def _collect_and_resolve(scores: list, prefix: int, prefix_bits: int, largest: bool, need: int) -> list:
    """Mask pass + boundary-bucket candidates (``wagle::topk_mask_collect``), then the ``need``
    best candidates -- threshold by ``kthvalue``, ties to the lowest global index (candidates arrive
    in global order) -- set in the bit arrays. O(candidates), no sort."""
    bits, keys, tens, flat = _impl("topk_mask_collect", scores[0].device)(scores, prefix, prefix_bits, largest)
    c = keys.numel()
    thr = torch.kthvalue(keys, c - need + 1 if largest else need).values
    better = keys > thr if largest else keys < thr
    ties = keys == thr
    take = need - int(better.sum())
    chosen = better | (ties & (ties.cumsum(0) <= take))
    tens, flat = tens[chosen], flat[chosen]
    byte = flat >> 3
    val = (1 << (flat & 7)).to(torch.uint8)
    # Candidates are in tensor order, so each tensor's picks are one contiguous run.
    uniq, counts = torch.unique_consecutive(tens, return_counts=True)
    for t, b, v in zip(uniq.tolist(), byte.split(counts.tolist()), val.split(counts.tolist())):
        bits[t].index_add_(0, b, v)  # candidate bits are clear and distinct: adding sets them
    return list(bits)


def _selection_device(scores: list, process_group) -> torch.device:
    """Device of the scores; for a rank without tensors, the device its collectives run on."""
    if scores:
        return scores[0].device
    if process_group is not None:
        import torch.distributed as dist

        group = None if process_group is True else process_group
        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- masked AdamW
MASKED_ADAMW_CHUNK = reference.MASKED_ADAMW_CHUNK
WEIGHT_DECAY_MODES = reference.WEIGHT_DECAY_MODES

if HAS_CPP:

    @torch.library.register_fake("wagle::masked_adamw_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets,
          step_offsets, *, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, weight_decay_mode,
          grad_scale=None, found_inf=None, torch_tail=8, compact_grads=False):
        return None

    @torch.library.register_fake("wagle::gather_masked_")
    def _(out, src, bits, chunk_offsets, accumulate):
        return None


def torch_fused_adamw_tail() -> int:
    """How many trailing elements of each tensor torch's fused CPU AdamW updates in its scalar
    loop, whose FMA contraction of ``exp_avg_sq`` differs from the vector loop (probed on the
    x86-64 wheels: AVX2 and AVX512 builds both use ``numel % 8``). 0 when the build does not use
    FMA (``DEFAULT`` capability): exact parity with torch is then not claimed."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return 8 if cap in ("AVX2", "AVX512") else 0


def masked_adamw_chunk_offsets(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Directory of a bit array for :func:`masked_adamw_`: int64[ceil(numel/4096) + 1], entry ``c``
    = number of set bits before element ``4096*c``, the last entry = nnz. O(numel/8) bytes read,
    in slices (bounded temporary memory)."""
    if bits.dtype != torch.uint8 or bits.dim() != 1:
        raise TypeError("bits must be a 1-D uint8 tensor")
    if bits.numel() != (numel + 7) // 8:
        raise ValueError(f"bits has {bits.numel()} bytes, a mask of {numel} elements needs {(numel + 7) // 8}")
    per_chunk = MASKED_ADAMW_CHUNK // 8  # bytes per chunk
    nchunks = (numel + MASKED_ADAMW_CHUNK - 1) // MASKED_ADAMW_CHUNK
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32, device=bits.device)
    counts = torch.empty(nchunks, dtype=torch.int64, device=bits.device)
    slab = 1024  # chunks per slice: 512 KB of bits, 2 MB of int32 temporaries
    for c0 in range(0, nchunks, slab):
        c1 = min(nchunks, c0 + slab)
        part = bits[c0 * per_chunk: c1 * per_chunk]
        pad = (c1 - c0) * per_chunk - part.numel()
        pc = table[part.long()]
        if pad:
            pc = torch.cat([pc, pc.new_zeros(pad)])
        counts[c0:c1] = pc.view(c1 - c0, per_chunk).sum(1)
    if numel % 8 and bits.numel():
        # Padding bits beyond numel are zero by the PackedMask contract; do not trust it.
        last = int(bits[-1])
        extra = bin(last >> (numel % 8)).count("1")
        if extra:
            raise ValueError("bits has set padding bits beyond numel")
    out = torch.zeros(nchunks + 1, dtype=torch.int64, device=bits.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def _check_hyper(name: str, value, lo=None, lo_open=False, hi=None, hi_open=False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def masked_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    mask_bits: Sequence[Optional[torch.Tensor]],
    chunk_offsets: Sequence[Optional[torch.Tensor]],
    step_offsets: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    amsgrad: bool = False,
    maximize: bool = False,
    weight_decay_mode: str = "masked",
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    compact_grads: bool = False,
) -> None:
    """One masked AdamW step over a list of parameters (one dtype per call), in place.

    Args:
        params: parameters (float32/bfloat16/float16, any shapes; non-contiguous ones are updated
            through a contiguous copy).
        grads: gradients, same dtypes and shapes as ``params``; with ``compact_grads=True``
            contiguous float32[nnz] tensors instead: the selected elements' gradients in flat
            order (:func:`gather_masked`), float32[numel] for a dense param.
        exp_avgs, exp_avg_sqs: compact float32 state, ``nnz`` entries per param (``numel`` for a
            dense param), in flat element order of the selected elements.
        max_exp_avg_sqs: compact float32 state per param with ``amsgrad``; empty list otherwise.
        state_steps: float32 scalar step counts, ALREADY incremented for this step (torch's
            convention; the caller subtracts ``found_inf`` afterwards).
        mask_bits: PackedMask bits (uint8[ceil(numel/8)]) per param, or None for a dense param.
        chunk_offsets: :func:`masked_adamw_chunk_offsets` of each mask (None for dense params).
        step_offsets: optional int32[nnz] per param: element ``j`` uses step ``step - offset[j]``
            (elements introduced by a mask change); None = every element uses ``step``.
        weight_decay_mode: ``"masked"`` (decay selected weights only; the rest are never read or
            written), ``"all"`` (also ``p *= 1 - lr*wd`` on unselected weights, i.e. ``grad *= mask``
            followed by torch AdamW), ``"none"``.
        grad_scale, found_inf: GradScaler tensors (torch fused semantics: grads of selected
            elements are divided by ``grad_scale`` and written back; ``found_inf == 1`` skips).

    Mutates params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and, with ``grad_scale``, grads.
    Arithmetic: identical to ``torch._fused_adamw_`` on CPU (see csrc/common/adamw_math.h).
    """
    params = _as_list(params, "params")
    grads = _as_list(grads, "grads")
    n = len(params)
    exp_avgs = _as_list(exp_avgs, "exp_avgs")
    exp_avg_sqs = _as_list(exp_avg_sqs, "exp_avg_sqs")
    max_exp_avg_sqs = _as_list(max_exp_avg_sqs, "max_exp_avg_sqs")
    state_steps = _as_list(state_steps, "state_steps")
    mask_bits = list(mask_bits)
    chunk_offsets = list(chunk_offsets)
    step_offsets = [None] * n if step_offsets is None else list(step_offsets)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps), ("mask_bits", mask_bits),
                      ("chunk_offsets", chunk_offsets), ("step_offsets", step_offsets)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries but params has {n}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(f"amsgrad=True needs {n} max_exp_avg_sqs, got {len(max_exp_avg_sqs)}")
    if not amsgrad:
        max_exp_avg_sqs = []
    lr = _check_hyper("lr", lr, lo=0.0)
    beta1 = _check_hyper("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    beta2 = _check_hyper("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    weight_decay = _check_hyper("weight_decay", weight_decay, lo=0.0)
    eps = _check_hyper("eps", eps, lo=0.0)
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    empty_u8 = torch.empty(0, dtype=torch.uint8, device=device)
    empty_i64 = torch.empty(0, dtype=torch.int64, device=device)
    empty_i32 = torch.empty(0, dtype=torch.int32, device=device)
    work_p, work_g, copy_back = [], [], []
    bits_l, dir_l, offs_l = [], [], []
    # GPU kernels check the directory against the bits and the state size on the device
    # (bounded slots, one flag read per call), so do not read dir[-1] here: that would be one
    # device synchronisation per tensor.
    nnz_on_device = device.type == "cuda" and resolve_backend("masked_adamw_", device) in ("cuda", "triton")
    for i, (p, g) in enumerate(zip(params, grads)):
        _check_float(p, f"params[{i}]")
        if p.dtype != dtype:
            raise TypeError(f"params[{i}] is {p.dtype} but params[0] is {dtype}; call once per dtype")
        if compact_grads:
            if g.dtype != torch.float32:
                raise TypeError(f"grads[{i}] must be float32 with compact_grads=True, got {g.dtype}")
        elif g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] is {g.dtype} but params[{i}] is {p.dtype}")
        elif g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if p.device != device or g.device != device:
            raise ValueError(f"params[{i}] and grads[{i}] must be on {device}")
        numel = p.numel()
        b, d = mask_bits[i], chunk_offsets[i]
        if (b is None) != (d is None):
            raise ValueError(f"mask_bits[{i}] and chunk_offsets[{i}] must both be given or both be None")
        nnz = numel
        if b is not None:
            if b.dtype != torch.uint8 or b.dim() != 1 or b.numel() != (numel + 7) // 8:
                raise ValueError(f"mask_bits[{i}] must be uint8[{(numel + 7) // 8}] for params[{i}] of shape "
                                 f"{tuple(p.shape)}, got {b.dtype}[{b.numel()}]")
            nch = (numel + MASKED_ADAMW_CHUNK - 1) // MASKED_ADAMW_CHUNK
            if d.dtype != torch.int64 or d.numel() != nch + 1:
                raise ValueError(f"chunk_offsets[{i}] must be int64[{nch + 1}] (masked_adamw_chunk_offsets)")
            nnz = exp_avgs[i].numel() if nnz_on_device else int(d[-1])  # see nnz_on_device
        for name, st in (("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])) + (
                (("max_exp_avg_sqs", max_exp_avg_sqs[i]),) if amsgrad else ()):
            if st.dtype != torch.float32 or st.numel() != nnz or not st.is_contiguous():
                raise ValueError(f"{name}[{i}] must be a contiguous float32 tensor with {nnz} entries "
                                 f"(one per selected element), got {st.dtype}[{st.numel()}]")
        o = step_offsets[i]
        if o is not None and (o.dtype != torch.int32 or o.numel() != nnz):
            raise ValueError(f"step_offsets[{i}] must be int32[{nnz}] or None")
        if compact_grads and (g.numel() != nnz or not g.is_contiguous()):
            raise ValueError(f"grads[{i}] must be a contiguous float32 tensor with {nnz} entries (one per "
                             f"selected element) with compact_grads=True, got {g.numel()}")
        pc = p if p.is_contiguous() else p.contiguous()
        gc = g if g.is_contiguous() else g.contiguous()
        work_p.append(pc)
        work_g.append(gc)
        copy_back.append((pc is not p, gc is not g))
        bits_l.append(empty_u8 if b is None else b.contiguous())
        dir_l.append(empty_i64 if d is None else d.contiguous())
        offs_l.append(empty_i32 if o is None else o.contiguous())
    fn = _impl("masked_adamw_", device)
    extra = {"compact_grads": True} if compact_grads else {}
    fn(work_p, work_g, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, list(state_steps), bits_l, dir_l, offs_l,
       lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=bool(amsgrad),
       maximize=bool(maximize), weight_decay_mode=weight_decay_mode, grad_scale=grad_scale,
       found_inf=found_inf, torch_tail=torch_fused_adamw_tail(), **extra)
    for (cp, cg), p, g, pc, gc in zip(copy_back, params, grads, work_p, work_g):
        if cp:
            p.copy_(pc)
        if cg:
            g.copy_(gc)

__all__ += ["masked_adamw_", "masked_adamw_chunk_offsets", "torch_fused_adamw_tail"]


# ----------------------------------------------------------------------------- compact gradients
def gather_masked(
    src: torch.Tensor,
    bits: Optional[torch.Tensor],
    chunk_offsets: Optional[torch.Tensor],
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Compact the selected entries of a dense gradient: ``out[k] = float(src.flat[e_k])`` (or
    ``+=`` with ``accumulate``) for the k-th selected element ``e_k`` of the mask, in flat order.

    Args:
        src: dense tensor (float32/bfloat16/float16, any shape; a non-contiguous one is read
            through a contiguous copy).
        bits: PackedMask bits of ``src`` (uint8[ceil(numel/8)]), or None for "every element".
        chunk_offsets: :func:`masked_adamw_chunk_offsets` of ``bits`` (None with ``bits=None``).
        out: float32[nnz] destination (contiguous); allocated when None (then ``accumulate``
            must be False).
        accumulate: add into ``out`` instead of overwriting it (gradient accumulation).

    Returns ``out``: float32[nnz], the layout of :func:`masked_adamw_` with ``compact_grads=True``.
    One pass over the mask bits and the selected elements of ``src``.
    """
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
    _check_float(src, "src")
    if (bits is None) != (chunk_offsets is None):
        raise ValueError("bits and chunk_offsets must both be given or both be None")
    n = src.numel()
    if bits is None:
        nnz = n
    else:
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1 \
                or bits.numel() != (n + 7) // 8:
            raise ValueError(f"bits must be uint8[{(n + 7) // 8}] for src of {n} elements")
        nch = (n + MASKED_ADAMW_CHUNK - 1) // MASKED_ADAMW_CHUNK
        if not isinstance(chunk_offsets, torch.Tensor) or chunk_offsets.dtype != torch.int64 \
                or chunk_offsets.numel() != nch + 1:
            raise ValueError(f"chunk_offsets must be int64[{nch + 1}] (masked_adamw_chunk_offsets of bits)")
        if bits.device != src.device or chunk_offsets.device != src.device:
            raise ValueError(f"bits and chunk_offsets must be on {src.device} like src")
        nnz = None if src.device.type == "cuda" and out is not None else int(chunk_offsets[-1])
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out=")
        out = torch.empty(nnz, dtype=torch.float32, device=src.device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or not out.is_contiguous():
            raise TypeError("out must be a contiguous float32 tensor")
        if out.device != src.device:
            raise ValueError(f"out is on {out.device} but src is on {src.device}")
        if nnz is not None and out.numel() != nnz:
            raise ValueError(f"out has {out.numel()} entries, the mask selects {nnz}")
    if bits is None:
        flat = src.detach().reshape(-1)
        if accumulate:
            out.add_(flat)
        else:
            out.copy_(flat)
        return out
    if n == 0:
        return out
    srcc = src.detach()
    srcc = srcc if srcc.is_contiguous() else srcc.contiguous()
    _impl("gather_masked_", src.device)(out, srcc, bits.contiguous(), chunk_offsets.contiguous(), bool(accumulate))
    return out


__all__ += ["gather_masked"]
