"""Masked AdamW and compact gradients: argument validation and dispatch of ``wagle::masked_adamw_``
and ``wagle::gather_masked_``, and the chunk directory both read (docs/kernels.md section 5).

The arithmetic lives in the kernels (csrc/common/adamw_math.h; ``kernels/reference.py`` is the
spec); this module checks the lists a caller passes and picks the back end.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from .._checks import as_tensor_list, check_float, check_hyper, check_weight_decay_mode
from ..kernels import reference
from ._backends import _impl, resolve_backend

__all__ = [
    "MASKED_ADAMW_CHUNK",
    "gather_masked",
    "gather_masked_prevalidated_",
    "masked_adamw_",
    "masked_adamw_chunk_offsets",
    "masked_adamw_prevalidated_",
    "torch_fused_adamw_tail",
]

MASKED_ADAMW_CHUNK = reference.MASKED_ADAMW_CHUNK


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


# (bits, directory) pairs on a GPU already checked against each other: id(directory) ->
# (weakref(directory), weakref(bits), versions and data pointers of both, nnz). Reading a device
# directory is a synchronisation, so each pair is checked once (MaskedAdamW passes the same tensors
# every step) and again only after an in-place change (version counter) or a new storage.
_CHECKED_DIRS: dict = {}


def _stamp(t: torch.Tensor):
    try:
        return (t._version, t.data_ptr(), t.numel())
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def _directory_nnz(bits: torch.Tensor, d: torch.Tensor, numel: int, name: str) -> int:
    """nnz of a mask's directory, after checking the directory against the bits when they live on a
    GPU: dir[0] == 0, every chunk's count equal to its bits' popcount (padding bits beyond ``numel``
    not counted, as the kernels never read them), hence dir[-1] == nnz. Raises ValueError before any
    kernel runs, like the CPU op; cached per (bits, directory). On the CPU the op checks the values
    itself (host memory), so only dir[-1] is read here."""
    if d.device.type == "cpu":
        return int(d[-1])
    key = id(d)
    sd, sb = _stamp(d), _stamp(bits)
    e = _CHECKED_DIRS.get(key)
    if e is not None and sd is not None and sb is not None and e[0]() is d and e[1]() is bits \
            and e[2] == sd and e[3] == sb:
        return e[4]
    b = bits
    if numel % 8 and b.numel():
        b = bits.clone()
        b[-1:] &= (1 << (numel % 8)) - 1
    want = masked_adamw_chunk_offsets(b, numel)
    if not torch.equal(want, d):
        raise ValueError(f"{name} do not match the mask bits (dir[0] must be 0 and each entry the number of "
                         "selected elements before its chunk: rebuild it with masked_adamw_chunk_offsets)")
    nnz = int(want[-1])
    if sd is not None and sb is not None:
        _CHECKED_DIRS[key] = (weakref.ref(d, lambda _r, k=key: _CHECKED_DIRS.pop(k, None)), weakref.ref(bits),
                              sd, sb, nnz)
    return nnz


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
    master_weights: Optional[Sequence[torch.Tensor]] = None,
    rounding_seeds: Optional[Sequence[int]] = None,
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
        master_weights: compact fp32 master weights (``wagle::masked_adamw_master_``), one
            contiguous float32 tensor per param laid out like ``exp_avgs``, for bfloat16/float16
            params: the update runs on them in fp32 and each selected parameter element is written
            as the rounding of its master value. None or empty: no master copy.
        rounding_seeds: with ``master_weights``, one int in [0, 2^63) per param: stochastic
            rounding keyed by (seed, the param's step, flat index) (csrc/common/rounding_math.h);
            None: round to nearest even.

    Mutates params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and, with ``grad_scale``, grads.
    Arithmetic: identical to ``torch._fused_adamw_`` on CPU (see csrc/common/adamw_math.h).
    """
    params = as_tensor_list(params, "params")
    grads = as_tensor_list(grads, "grads")
    n = len(params)
    exp_avgs = as_tensor_list(exp_avgs, "exp_avgs")
    exp_avg_sqs = as_tensor_list(exp_avg_sqs, "exp_avg_sqs")
    max_exp_avg_sqs = as_tensor_list(max_exp_avg_sqs, "max_exp_avg_sqs")
    state_steps = as_tensor_list(state_steps, "state_steps")
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
    master = [] if master_weights is None else as_tensor_list(master_weights, "master_weights")
    seeds = [] if rounding_seeds is None else [int(x) for x in rounding_seeds]
    if master and len(master) != n:
        raise ValueError(f"master_weights has {len(master)} entries but params has {n}")
    if seeds and (not master or len(seeds) != n):
        raise ValueError(f"rounding_seeds needs master_weights and one seed per param ({n}), got {len(seeds)}")
    if any(not 0 <= x < 2 ** 63 for x in seeds):
        raise ValueError("rounding_seeds must be ints in [0, 2^63)")
    lr = check_hyper("lr", lr, lo=0.0)
    beta1 = check_hyper("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    beta2 = check_hyper("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    weight_decay = check_hyper("weight_decay", weight_decay, lo=0.0)
    eps = check_hyper("eps", eps, lo=0.0)
    check_weight_decay_mode(weight_decay_mode)
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if master and dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"master_weights are for bfloat16/float16 params (an fp32 param is its own master), got {dtype}")
    empty_u8 = torch.empty(0, dtype=torch.uint8, device=device)
    empty_i64 = torch.empty(0, dtype=torch.int64, device=device)
    empty_i32 = torch.empty(0, dtype=torch.int32, device=device)
    work_p, work_g, copy_back = [], [], []
    bits_l, dir_l, offs_l = [], [], []
    # On a GPU the directory is checked against the bits here, once per (bits, directory) pair
    # (_directory_nnz, cached), so a bad directory raises before any kernel touches the state.
    for i, (p, g) in enumerate(zip(params, grads)):
        check_float(p, f"params[{i}]")
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
            if d.device != device or b.device != device:
                raise ValueError(f"mask_bits[{i}] and chunk_offsets[{i}] must be on {device}")
            nnz = _directory_nnz(b, d, numel, f"chunk_offsets[{i}]")
        for name, st in (("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])) + (
                (("max_exp_avg_sqs", max_exp_avg_sqs[i]),) if amsgrad else ()) + (
                (("master_weights", master[i]),) if master else ()):
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
    for i, mw in enumerate(master):
        if mw.device != device:
            raise ValueError(f"master_weights[{i}] must be on {device}")
    extra = {"compact_grads": True} if compact_grads else {}
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=bool(amsgrad),
                 maximize=bool(maximize), weight_decay_mode=weight_decay_mode, grad_scale=grad_scale,
                 found_inf=found_inf, torch_tail=torch_fused_adamw_tail(), **extra)
    if master:
        _impl("masked_adamw_master_", device)(work_p, work_g, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                              list(state_steps), bits_l, dir_l, offs_l, master,
                                              rounding_seeds=seeds, **hyper)
    else:
        _impl("masked_adamw_", device)(work_p, work_g, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, list(state_steps),
                                       bits_l, dir_l, offs_l, **hyper)
    for (cp, cg), p, g, pc, gc in zip(copy_back, params, grads, work_p, work_g):
        if cp:
            p.copy_(pc)
        if cg:
            g.copy_(gc)



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
    check_float(src, "src")
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
        nnz = _directory_nnz(bits, chunk_offsets, n, "chunk_offsets")
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


# ----------------------------------------------------------------------------- prevalidated fast paths
def masked_adamw_prevalidated_(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, max_exp_avg_sqs: list,
                               state_steps: list, mask_bits: list, chunk_offsets: list, step_offsets: list,
                               *, compact_grads: bool = False, master_weights: Optional[list] = None,
                               rounding_seeds: Optional[list] = None, **hyper) -> None:
    """:func:`masked_adamw_` for a caller that built the lists itself from validated masks and
    state (:class:`~wagle_ext.MaskedAdamW`): on the C++ CPU back end with contiguous tensors the
    Python checks are skipped (the C++ op still checks sizes and dtypes), which matters at low
    density where the kernel itself takes a few ms; otherwise this is :func:`masked_adamw_`.
    ``mask_bits``/``chunk_offsets``/``step_offsets`` entries may be None (dense / no offsets);
    ``master_weights``/``rounding_seeds``: as :func:`masked_adamw_` (None or empty: none)."""
    device = params[0].device if params else torch.device("cpu")
    op = "masked_adamw_master_" if master_weights else "masked_adamw_"
    if (params and resolve_backend(op, device) == "cpp"
            and all(p.is_contiguous() and g.is_contiguous() for p, g in zip(params, grads))):
        e8 = torch.empty(0, dtype=torch.uint8, device=device)
        e64 = torch.empty(0, dtype=torch.int64, device=device)
        e32 = torch.empty(0, dtype=torch.int32, device=device)
        args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                [e8 if b is None else b for b in mask_bits], [e64 if d is None else d for d in chunk_offsets],
                [e32 if o is None else o for o in step_offsets])
        if master_weights:
            torch.ops.wagle.masked_adamw_master_(*args, master_weights, torch_tail=torch_fused_adamw_tail(),
                                                 compact_grads=compact_grads, rounding_seeds=rounding_seeds or [],
                                                 **hyper)
        else:
            torch.ops.wagle.masked_adamw_(*args, torch_tail=torch_fused_adamw_tail(), compact_grads=compact_grads,
                                          **hyper)
    else:
        masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits,
                      chunk_offsets, step_offsets, compact_grads=compact_grads, master_weights=master_weights,
                      rounding_seeds=rounding_seeds, **hyper)


def gather_masked_prevalidated_(out: torch.Tensor, src: torch.Tensor, bits: torch.Tensor,
                                chunk_offsets: torch.Tensor, accumulate: bool) -> None:
    """:func:`gather_masked` into ``out`` for a caller whose shapes were validated at set-up
    (:class:`~wagle_ext.MaskedAdamW`'s compact-gradient hooks): a contiguous ``src`` on the C++
    CPU back end goes straight to the kernel, anything else through :func:`gather_masked`."""
    if src.is_contiguous() and resolve_backend("gather_masked_", src.device) == "cpp":
        torch.ops.wagle.gather_masked_(out, src, bits, chunk_offsets, accumulate)
    else:
        gather_masked(src, bits, chunk_offsets, out=out, accumulate=accumulate)
