"""Pure-PyTorch reference of every wagle op: the executable specification.

Every other back end (C++ CPU, CUDA, Triton) is tested against these functions. They favour
clarity over speed and memory (selection concatenates and sorts); use them on small inputs.

Conventions shared by all back ends
-----------------------------------
* Scores are float32. Inputs may be float32, bfloat16 or float16; math is float32.
* The *key* of a float score is the order-preserving uint32 map ``float_key``: for non-NaN
  floats ``a < b  <=>  key(a) < key(b)``; ``-0.0`` is canonicalised to ``+0.0`` first.
* The *histogram* of a list of scores is int64[2049]: entries 0..2047 count keys by their top
  11 bits (``key >> 21``), entry 2048 counts NaN scores.
* A *bit array* holds ``ceil(numel / 8)`` uint8 bytes; bit ``j`` of byte ``i`` is element
  ``8 * i + j`` of the flattened tensor (little-endian bit order). Padding bits are zero.
* Global top-k: exactly ``k`` elements of the concatenation of all score tensors (global index =
  tensor order, then flat index) are selected; ties at the threshold go to the lowest global index.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

HIST_BITS = 11
HIST_BINS = 1 << HIST_BITS  # 2048
HIST_SIZE = HIST_BINS + 1  # + NaN counter
HIST_SHIFT = 32 - HIST_BITS

SCORE_KINDS = ("wagle", "wagle_hessian", "snip", "gradient", "magnitude")


# ----------------------------------------------------------------------------- scores
def attribution_score(
    weight: torch.Tensor,
    grad_forget: Optional[torch.Tensor],
    grad_retain: Optional[torch.Tensor],
    hessian: Optional[torch.Tensor],
    kind: str,
    gamma: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score of every element of ``weight`` (fp32, same shape) and the histogram of the scores.

    kind: ``wagle`` ``|(w - g_r/gamma) * g_f|``; ``wagle_hessian`` ``|(w - g_r/(h + eps)) * g_f|``;
    ``snip`` ``|w * g_f|``; ``gradient`` ``|g_f|``; ``magnitude`` ``|w|``.
    """
    f32 = torch.float32

    def full(x: float, like: torch.Tensor) -> torch.Tensor:
        # A float32 tensor (not a Python scalar): torch may divide by a scalar through its
        # reciprocal, which differs from true division in the last bit.
        return torch.full_like(like, x, dtype=f32)

    shape = weight.shape
    if kind == "wagle":
        gr = grad_retain.reshape(shape).to(f32)
        s = ((weight.to(f32) - gr / full(gamma, gr)) * grad_forget.reshape(shape).to(f32)).abs()
    elif kind == "wagle_hessian":
        gr = grad_retain.reshape(shape).to(f32)
        h = hessian.reshape(shape).to(f32)
        s = ((weight.to(f32) - gr / (h + full(eps, h))) * grad_forget.reshape(shape).to(f32)).abs()
    elif kind == "snip":
        s = (weight.to(f32) * grad_forget.reshape(shape).to(f32)).abs()
    elif kind == "gradient":
        s = grad_forget.reshape(shape).to(f32).abs()
    elif kind == "magnitude":
        s = weight.to(f32).abs()
    else:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
    s = s.contiguous()
    return s, score_histogram(s)


# ----------------------------------------------------------------------------- keys, histograms
def float_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 key of float scores, as int64 values in [0, 2^32)."""
    b = (x.reshape(-1).to(torch.float32) + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = (b & 0x80000000) != 0
    return torch.where(neg, b ^ 0xFFFFFFFF, b | 0x80000000)


def score_histogram(scores: torch.Tensor) -> torch.Tensor:
    """int64[2049]: counts of ``key >> 21`` for non-NaN scores, then the NaN count."""
    return radix_histogram([scores], 0, 0)


# ----------------------------------------------------------------------------- bit packing
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor (any shape) -> uint8[ceil(numel/8)], little-endian bit order."""
    flat = mask.reshape(-1).to(torch.uint8)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bit array -> bool[numel]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].to(torch.bool)


def popcount_bits(bits: torch.Tensor, numel: int) -> int:
    """Number of set bits among the first ``numel`` bits."""
    return int(unpack_bits(bits, numel).sum())


# ----------------------------------------------------------------------------- selection primitives
RADIX_LEVELS = ((0, 21, 11), (11, 10, 11), (22, 0, 10))  # (prefix_bits, digit shift, digit width)


def _digit_layout(prefix_bits: int) -> tuple[int, int]:
    for pb, shift, width in RADIX_LEVELS:
        if pb == prefix_bits:
            return shift, width
    raise ValueError(f"prefix_bits must be 0, 11 or 22, got {prefix_bits}")


def radix_histogram(scores: Sequence[torch.Tensor], prefix: int, prefix_bits: int) -> torch.Tensor:
    """int64[2049] digit histogram of the keys whose top ``prefix_bits`` bits equal ``prefix``.

    ``prefix_bits`` 0: digit ``key >> 21``; 11: ``(key >> 10) & 0x7FF``; 22: ``key & 0x3FF``.
    Entry 2048 counts NaN scores when ``prefix_bits == 0`` (NaNs never match a prefix).
    """
    shift, width = _digit_layout(prefix_bits)
    device = scores[0].device if len(scores) else torch.device("cpu")
    hist = torch.zeros(HIST_SIZE, dtype=torch.int64, device=device)
    for s in scores:
        flat = s.reshape(-1).to(torch.float32)
        nan = torch.isnan(flat)
        key = float_key(flat[~nan])
        if prefix_bits:
            key = key[(key >> (32 - prefix_bits)) == prefix]
        elif nan.any():
            hist[HIST_BINS] += int(nan.sum())
        digit = (key >> shift) & ((1 << width) - 1)
        hist[:HIST_BINS] += torch.bincount(digit, minlength=HIST_BINS)[:HIST_BINS]
    return hist


def count_key(scores: Sequence[torch.Tensor], key: int) -> torch.Tensor:
    """int64[len(scores)]: per tensor, how many elements have exactly this key (NaN never does)."""
    out = [int(((float_key(s) == key) & ~torch.isnan(s.reshape(-1).float())).sum()) if s.numel() else 0
           for s in scores]
    device = scores[0].device if len(scores) else torch.device("cpu")
    return torch.tensor(out, dtype=torch.int64, device=device)


def topk_mask_bits(
    scores: Sequence[torch.Tensor], threshold_key: int, largest: bool, ties_take: Sequence[int]
) -> list[torch.Tensor]:
    """Bit arrays selecting keys strictly better than ``threshold_key`` (greater when ``largest``,
    else smaller) plus the first ``ties_take[i]`` elements of tensor ``i`` (flat index order) whose
    key equals it; ``ties_take[i] == -1`` takes all ties. NaN scores are never selected."""
    out = []
    for s, take in zip(scores, ties_take):
        flat = s.reshape(-1).to(torch.float32)
        key = float_key(flat)
        nan = torch.isnan(flat)
        better = (key > threshold_key) if largest else (key < threshold_key)
        sel = better & ~nan
        eq = (key == threshold_key) & ~nan
        if take < 0:
            sel |= eq
        elif take > 0:
            idx = eq.nonzero().squeeze(1)[:take]
            sel[idx] = True
        out.append(pack_bits(sel))
    return out


def topk_mask_collect(
    scores: Sequence[torch.Tensor], prefix: int, prefix_bits: int, largest: bool
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bit arrays of the keys strictly better than every key of the bucket whose top
    ``prefix_bits`` bits equal ``prefix``, and that bucket's elements in global order as
    ``(keys, tensor index, flat index)`` int64 tensors. NaN is never selected nor a candidate."""
    if prefix_bits not in (11, 22):
        raise ValueError(f"prefix_bits must be 11 or 22, got {prefix_bits}")
    lo = prefix << (32 - prefix_bits)
    hi = lo | ((1 << (32 - prefix_bits)) - 1)
    bits = topk_mask_bits(scores, hi if largest else lo, largest, [0] * len(scores))
    keys, tens, flat = [], [], []
    for i, s in enumerate(scores):
        x = s.reshape(-1).to(torch.float32)
        key = float_key(x)
        idx = (((key >> (32 - prefix_bits)) == prefix) & ~torch.isnan(x)).nonzero().squeeze(1)
        keys.append(key[idx])
        tens.append(torch.full_like(idx, i))
        flat.append(idx)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    return bits, cat(keys), cat(tens), cat(flat)


# ----------------------------------------------------------------------------- end-to-end oracle
def select_topk_bits(scores: Sequence[torch.Tensor], k: int, largest: bool) -> list[torch.Tensor]:
    """Exact global top-k of the concatenated scores as one bit array per tensor, by a stable
    sort: the oracle every selection back end is tested against.

    Ties at the threshold go to the lowest global index (tensor order, then flat index).
    """
    sizes = [s.numel() for s in scores]
    n = sum(sizes)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    device = scores[0].device if scores else torch.device("cpu")
    flat = torch.cat([s.reshape(-1).to(torch.float32) for s in scores]) if scores else torch.zeros(0)
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN")
    key = float_key(flat)
    if not largest:
        key = 0xFFFFFFFF - key
    # Stable descending sort: equal keys keep ascending global index.
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    sel = torch.zeros(n, dtype=torch.bool, device=device)
    sel[order] = True
    return [pack_bits(part) for part in torch.split(sel, sizes)]


# ----------------------------------------------------------------------------- masked AdamW
import math  # noqa: E402

MASKED_ADAMW_CHUNK = 4096  # elements per chunk_offsets entry (kDirChunk in csrc/common/layout.h)
WEIGHT_DECAY_MODES = ("masked", "all", "none")


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 fma(a, b, c): the float64 product is exact, the float64 sum is
    rounded to odd (TwoSum error + sticky bit), so the final rounding to float32 is exact."""
    a, b, c = a.double(), b.double(), c.double()
    prod = a * b
    s = prod + c
    bb = s - prod
    err = (prod - (s - bb)) + (c - bb)
    even = (s.view(torch.int64) & 1) == 0
    fix = (err != 0) & even & torch.isfinite(s)
    if bool(fix.any()):
        toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
        s = torch.where(fix, torch.nextafter(s, toward), s)
    return s.float()


def _adamw_coeffs(lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, step: float) -> dict:
    """The float32 coefficients torch's fused CPU AdamW derives (in double) from one step count."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (double -> float rounding)
    return {"neg_step_size": f(-(lr / bc1)), "bc2_sqrt": f(math.sqrt(bc2)), "eps": f(eps),
            "decay": f(1.0 - lr * weight_decay), "w1": f(1.0 - beta1), "c2": f(1.0 - beta2), "b2": f(beta2)}


def masked_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    chunk_offsets: Sequence[torch.Tensor],
    step_offsets: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    weight_decay_mode: str,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    torch_tail: int = 8,
    compact_grads: bool = False,
    master_weights: Optional[Sequence[torch.Tensor]] = None,
    rounding_seeds: Optional[Sequence[int]] = None,
) -> None:
    """Spec of the ``wagle::masked_adamw_`` op (schema and layout: csrc/ops.cpp). Mutates params,
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs and (with grad_scale) the selected entries of grads.
    With ``compact_grads`` grads[i] is float32[nnz] (the selected elements' gradients in flat
    order, as :func:`gather_masked_` writes them) instead of a dense tensor like params[i].

    Per selected element, in float32, exactly as torch._fused_adamw_ on CPU:
    ``g = grad / scale``; ``g = -g`` if maximize; ``p = p * float(1 - lr*wd)``;
    ``m = fma(w1, g - m, m)`` (lerp, ``w1 = 1 - beta1``); ``v = fma(c2*g, g, v*b2)`` (the last
    ``numel % torch_tail`` elements: ``fma(v, b2, (c2*g)*g)``); ``den = sqrt(max(vmax, v) or v) /
    float(sqrt(bc2)) + eps``; ``p = p + (float(-lr/bc1) * m) / den``.

    ``master_weights`` (``masked_adamw_master_``, bf16/fp16 params): float32[nnz] per param, laid
    out like exp_avgs; the update above reads ``p`` from it and writes the result back to it, and
    the parameter element becomes ``round_to_nearest_even(result)``, or with ``rounding_seeds``
    (one int per param) :func:`stochastic_round` with the bits :func:`sr_bits` of
    ``(sr_key(seed, step), flat index)``.
    """
    rounding = 0
    if master_weights is not None and len(master_weights):
        rounding = 2 if rounding_seeds is not None and len(rounding_seeds) else 1
        if len(master_weights) != len(params):
            raise ValueError(f"masked_adamw_master_: master_weights has {len(master_weights)} entries, "
                             f"params has {len(params)}")
        if params and params[0].dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"masked_adamw_master_: master weights are for bfloat16/float16 params, "
                            f"got {params[0].dtype}")
    if rounding_seeds is not None and len(rounding_seeds) and rounding == 0:
        raise ValueError("masked_adamw_master_: rounding_seeds need master_weights")
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
    if found_inf is not None and float(found_inf) == 1.0:
        return
    scale = grad_scale.float().reshape(()) if grad_scale is not None else None
    wd = 0.0 if weight_decay_mode == "none" else weight_decay
    for i, p in enumerate(params):
        n = p.numel()
        pf = p.view(-1)
        gf = grads[i].view(-1)
        dense = mask_bits[i].numel() == 0
        sel = torch.ones(n, dtype=torch.bool) if dense else unpack_bits(mask_bits[i], n)
        idx = sel.nonzero().squeeze(1)
        step = float(state_steps[i].float())
        base = _adamw_coeffs(lr, beta1, beta2, wd, eps, step)
        if weight_decay_mode == "all" and wd != 0 and not dense:
            rest = (~sel).nonzero().squeeze(1)
            pf[rest] = (pf[rest].float() * base["decay"]).to(p.dtype)
        if idx.numel() == 0:
            continue
        if step_offsets[i].numel():
            bad = int(((step_offsets[i] < 0) | (step_offsets[i].double() >= step)).sum())
            if bad:
                raise ValueError(f"masked_adamw_: {bad} step_offsets[{i}] entries are outside [0, step) (step {step})")
            steps = step - step_offsets[i].double()
            uniq, inv = torch.unique(steps, return_inverse=True)
            per = [_adamw_coeffs(lr, beta1, beta2, wd, eps, float(s)) for s in uniq.tolist()]
            co = {k: torch.stack([c[k] for c in per])[inv] for k in base}
        else:
            co = base
        g = gf.float() if compact_grads else gf[idx].float()
        if scale is not None:
            g = g / scale.expand_as(g).contiguous()  # true division (a 0-d divisor is a reciprocal multiply)
            if compact_grads:
                gf.copy_(g)
            else:
                gf[idx] = g.to(grads[i].dtype)
        if maximize:
            g = -g
        if rounding:
            mw = master_weights[i]
            if mw.dtype != torch.float32 or mw.numel() != idx.numel():
                raise ValueError(f"masked_adamw_master_: master_weights[{i}] must be float32 with {idx.numel()} "
                                 f"entries, got {mw.dtype}[{mw.numel()}]")
            p1 = mw * co["decay"]
        else:
            p1 = pf[idx].float() * co["decay"]
        m, v = exp_avgs[i], exp_avg_sqs[i]
        w1 = co["w1"]
        if float(base["w1"].abs()) < 0.5:
            m_new = _fma32(w1, g - m, m)
        else:
            m_new = _fma32(w1 - 1.0, g - m, g)
        tail = torch.zeros(idx.numel(), dtype=torch.bool)
        if torch_tail > 0:
            tail = idx >= n - n % torch_tail
        v_vec = _fma32(co["c2"] * g, g, v * co["b2"])
        v_tail = _fma32(v, co["b2"], (co["c2"] * g) * g)
        v_new = torch.where(tail, v_tail, v_vec)
        vd = v_new
        if amsgrad:
            vd = torch.maximum(max_exp_avg_sqs[i], v_new)
            max_exp_avg_sqs[i].copy_(vd)
        # Correctly rounded float32 sqrt (via float64, exact for sqrt); torch.sqrt on CPU float32
        # is not always correctly rounded, the fused kernel's _mm512_sqrt_ps is.
        den = torch.sqrt(vd.double()).float() / co["bc2_sqrt"].expand_as(vd).contiguous() + co["eps"]
        p_new = p1 + (co["neg_step_size"] * m_new) / den
        m.copy_(m_new)
        v.copy_(v_new)
        if rounding == 2:
            master_weights[i].copy_(p_new)
            r = sr_bits(sr_key(int(rounding_seeds[i]), int(step)), idx)
            pf[idx] = stochastic_round(p_new, p.dtype, r)
        else:
            if rounding:
                master_weights[i].copy_(p_new)
            pf[idx] = p_new.to(p.dtype)


def masked_adamw_master_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits,
                         chunk_offsets, step_offsets, master_weights, *, rounding_seeds=(), **kw) -> None:
    """Spec of ``wagle::masked_adamw_master_``: :func:`masked_adamw_` with compact fp32 master
    weights (an empty ``master_weights`` list: plain masked_adamw_)."""
    masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets,
                  step_offsets, master_weights=list(master_weights), rounding_seeds=list(rounding_seeds), **kw)


# ----------------------------------------------------------------------------- stochastic rounding
# csrc/common/rounding_math.h, in int64 arithmetic on values below 2^32 (no overflow anywhere).
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): two partial products below 2^48."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (rounding_math.h hash32) of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sr_key(seed: int, step: int) -> int:
    """The stochastic-rounding key of one tensor at one step (uint64 as a Python int)."""
    return _mix64((seed + 0x9E3779B97F4A7C15 * step) & _M64)


def sr_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) of the elements at flat ``index`` (int64 >= 0) under ``key``."""
    index = index.to(torch.int64)
    r = _hash32((index & _M32) ^ (key & _M32))
    return _hash32(r ^ (index >> 32) ^ (key >> 32))


def _half_of_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b = b & 0xFFFF
    return torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(dtype)


def _half_from_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _half_of_bits(b, dtype).float()


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of float32 ``x`` to ``dtype`` (bfloat16/float16) with random bits ``r``
    (int64 in [0, 2^32), one per element): the lower neighbour of |x| or the upper one, the upper with
    probability ``ceil(frac * 2^24) / 2^24`` where ``frac`` is |x|'s position between them (exactly
    ``frac`` for bf16 values and fp16 normal values); exact values, NaN and values that overflow
    under round-to-nearest-even round as that does (rounding_math.h)."""
    n = x.to(dtype)  # round to nearest even (c10's conversion)
    nb = n.view(torch.int16).to(torch.int64) & 0xFFFF
    if dtype == torch.bfloat16:  # c10's scalar conversion (and the kernels'): NaN -> 0x7FC0
        nb = torch.where(x != x, 0x7FC0, nb)
    ax, an = x.abs(), n.float().abs()
    inf = 0x7C00 if dtype == torch.float16 else 0x7F80
    keep = (x != x) | (an == ax) | ((nb & 0x7FFF) == inf)
    up = an < ax
    lo = torch.where(up, nb, nb - 1)
    hi = torch.where(up, nb + 1, nb)
    flo = _half_from_bits(lo, dtype).abs()
    fhi = _half_from_bits(hi, dtype).abs()
    frac = (ax - flo) / (fhi - flo)
    u = (r >> 8).to(torch.float32) * 5.9604644775390625e-8
    out = torch.where(keep, nb, torch.where(u < frac, hi, lo))
    return _half_of_bits(out, dtype)


def masked_adamw_chunk_offsets(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """int64[ceil(numel/4096)+1] directory of a bit array: entry c = number of set bits before
    element 4096*c; the last entry is nnz."""
    sel = unpack_bits(bits, numel)
    nchunks = (numel + MASKED_ADAMW_CHUNK - 1) // MASKED_ADAMW_CHUNK
    counts = torch.zeros(nchunks * MASKED_ADAMW_CHUNK, dtype=torch.int64)
    counts[:numel] = sel.long()
    out = torch.zeros(nchunks + 1, dtype=torch.int64)
    out[1:] = counts.view(nchunks, MASKED_ADAMW_CHUNK).sum(1).cumsum(0)
    return out


def gather_masked_(out: torch.Tensor, src: torch.Tensor, bits: torch.Tensor, chunk_offsets: torch.Tensor,
                   accumulate: bool) -> None:
    """Spec of ``wagle::gather_masked_``: ``out[k] (+)= float(src.flat[e_k])`` for the k-th selected
    element ``e_k`` of the bit mask, in flat order. ``out``: float32[nnz]; ``src``: n elements;
    ``chunk_offsets`` is only checked (``[-1] == nnz``)."""
    n = src.numel()
    sel = unpack_bits(bits, n)
    vals = src.reshape(-1)[sel].float()
    if vals.numel() != out.numel() or int(chunk_offsets[-1]) != vals.numel():
        raise ValueError(f"gather_masked_: the mask selects {vals.numel()} elements, out has {out.numel()} "
                         f"and chunk_offsets[-1] = {int(chunk_offsets[-1])}")
    if accumulate:
        out.add_(vals)
    else:
        out.copy_(vals)
