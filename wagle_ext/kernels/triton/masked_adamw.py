"""Triton kernel of ``masked_adamw_`` (docs/kernels.md 4.3): AdamW on the elements selected by a
PackedMask, with compact fp32 state addressed through the per-chunk offset directory.

One program per 4096-element directory chunk, walked in ``BLOCK=1024`` slices: the mask bits of a
slice are unpacked per element, the compact slot of a selected element is
``dir[chunk] + (selected before the slice) + exclusive tl.cumsum(bits)``, and m/v/vmax are gathered
with ``tl.load(m_ptr + slot, mask=bit)`` (indexed loads, which the interpreter runs). A slice with
no selected element loads nothing but its bits (and, with ``weight_decay_mode="all"``, p).

Arithmetic: the same float32 operations, in the same order, as the CPU op and the reference
(common/adamw_math.h): true division ``tl.math.div_rn`` and IEEE square root ``tl.sqrt_rn`` (``/``
and ``tl.sqrt`` are approximate on GPUs), explicit ``tl.fma`` where torch's CPU kernel fuses, and
the kernel is compiled with ``enable_fp_fusion=False`` so no other multiply-add is contracted
(p * decay must be rounded before the final add). Coefficients (bias corrections in double, as
torch) are computed on the host in Python (``math.pow`` is the C library's pow, as in the C++ op);
per-element step counts use a host table of (-lr/bc1, sqrt(bc2)) per step. bf16 is widened by a
bit shift and narrowed with c10's round-to-nearest-even bit formula (NaN -> 0x7FC0), fp16 with
Triton's conversions (exact / round-to-nearest-even).

The interpreter's ``tl.fma`` is ``a*b + c`` with two roundings; under ``TRITON_INTERPRET=1`` the
kernel therefore emulates a correctly rounded fma in float64 (exact product, round-to-odd sum,
as ``reference._fma32``), which is what the GPU's fma instruction computes.

Compact gradients (``compact_grads=True``, written by ``gather_masked_``): g is float32 and read
(and, with grad_scale, written back) at the element's compact slot, like m/v, instead of at its
dense offset; the rest of the arithmetic is unchanged (bf16/fp16 grads are widened exactly, so a
compact fp32 copy of them gives the same update).

Master weights (``masked_adamw_master_``, bf16/fp16 params): the fp32 value of a selected element
is read from and written to ``mw[slot]`` (compact, like m/v) and the parameter is only written,
rounded to nearest even or, with a seed, stochastically (csrc/common/rounding_math.h: the same
lowbias32 hash, computed in int64 on values below 2^32 so that no product overflows, and the same
neighbour choice).

One launch per tensor (the interpreter cannot load pointers from memory, so there is no
tensor-list metadata here; the CUDA op of csrc/cuda/masked_adamw.cu launches once per list).
A directory that disagrees with the bits, or a step offset outside ``[0, step)``, is counted in
a device flag; the wrapper reads it once per call (one synchronisation) and raises ``ValueError``.
Out-of-range slots are never read or written.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import interpreting, lazy_jit
from ._radix import load_f32

from ..reference import MASKED_ADAMW_CHUNK as CHUNK  # elements per directory entry
from ..reference import sr_key
GPU_BLOCK = 1024  # docs/kernels.md 4.3
WEIGHT_DECAY_MODES = ("masked", "all", "none")
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@lazy_jit
def _lo32(x):
    """x mod 2^32 for int64 x >= 0 (no 32-bit literal: those are unsigned in Triton)."""
    return x - ((x >> 32) << 32)


@lazy_jit
def _hash32(x):
    """lowbias32 (rounding_math.h hash32) of int64 values in [0, 2^32): each multiply by a 32-bit
    constant as two partial products below 2^48, reduced mod 2^32."""
    x = x ^ (x >> 16)
    x = _lo32(x * 0x352D + (((x * 0x7FEB) & 0xFFFF) << 16))
    x = x ^ (x >> 15)
    x = _lo32(x * 0xA68B + (((x * 0x846C) & 0xFFFF) << 16))
    return x ^ (x >> 16)


@lazy_jit
def _half_bits_f32(b, FP16: tl.constexpr):
    """float32 value of 16-bit patterns ``b`` (int64 in [0, 2^16)) of bf16 / fp16."""
    bs = tl.where(b >= 0x8000, b - 0x10000, b).to(tl.int32)
    if FP16:
        x = bs.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x = (bs << 16).to(tl.float32, bitcast=True)
    return x


@lazy_jit
def _stochastic_round_bits(x, nb, r, FP16: tl.constexpr):
    """rounding_math.h stochastic_round_bits: x float32, nb its round-to-nearest-even 16-bit
    pattern (int64), r its random bits (int64 < 2^32); returns the chosen pattern (int64)."""
    ax = tl.abs(x)
    an = tl.abs(_half_bits_f32(nb, FP16))
    if FP16:
        inf = 0x7C00
    else:
        inf = 0x7F80
    keep = (x != x) | (an == ax) | ((nb & 0x7FFF) == inf)
    up = an < ax
    lo = tl.where(up, nb, nb - 1) & 0xFFFF
    hi = tl.where(up, nb + 1, nb) & 0xFFFF
    flo = tl.abs(_half_bits_f32(lo, FP16))
    fhi = tl.abs(_half_bits_f32(hi, FP16))
    frac = tl.math.div_rn(ax - flo, fhi - flo)
    u = (r >> 8).to(tl.float32) * 5.9604644775390625e-8  # r24 / 2^24, exact
    return tl.where(keep, nb, tl.where(u < frac, hi, lo))


@lazy_jit
def _masked_adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, bits_ptr, dir_ptr, offs_ptr, table_ptr,
                         scale_ptr, found_ptr, err_ptr, mw_ptr, n, nnz, tail_start, step_i, table_len,
                         nss, bc2s, eps, decay, w1, w1m1, c2, b2, key_lo, key_hi,
                         DTYPE: tl.constexpr, DENSE: tl.constexpr, AMSGRAD: tl.constexpr,
                         MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                         HAS_OFFS: tl.constexpr, DECAY_ALL: tl.constexpr, LERP_SMALL: tl.constexpr,
                         EMU_FMA: tl.constexpr, COMPACT_G: tl.constexpr, HAS_MW: tl.constexpr,
                         SR: tl.constexpr, BLOCK: tl.constexpr, CHUNK_: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors beyond 2^31 elements
    skip = 0
    if HAS_FOUND:
        # torch's fused kernels: `if (found_inf_ptr && *found_inf_ptr == 1) return;`
        skip = (tl.load(found_ptr).to(tl.float32) == 1.0).to(tl.int32)
    if skip == 0:
        e0 = chunk * CHUNK_
        if DENSE:
            k0 = e0
            k_end = tl.minimum(e0 + CHUNK_, n)
        else:
            k0 = tl.load(dir_ptr + chunk)
            k_end = tl.load(dir_ptr + chunk + 1)
        # A corrupt directory never leads outside [0, nnz): slots are bounded, the chunk flagged.
        lo = tl.maximum(k0, 0)
        hi = tl.minimum(k_end, nnz)
        k = k0
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(tl.float32)
        bad_offs = tl.sum(tl.zeros((BLOCK,), tl.int32), axis=0)
        for it in range(CHUNK_ // BLOCK):
            offs = e0 + it * BLOCK + tl.arange(0, BLOCK)
            valid = offs < n
            if DENSE:
                bit = valid.to(tl.int32)
            else:
                byte = tl.load(bits_ptr + (offs >> 3), mask=valid, other=0).to(tl.int32)
                bit = (byte >> (offs & 7).to(tl.int32)) & 1
            cnt = tl.sum(bit, axis=0)
            slot = k + (tl.cumsum(bit, axis=0) - bit)  # exclusive lane prefix
            sel = (bit != 0) & (slot >= lo) & (slot < hi)
            act = cnt
            pmask = sel
            if DECAY_ALL:
                act = cnt + 1  # every slice: unselected weights decay too
                pmask = sel | valid
            if act > 0:
                # ---- load p, g (bf16 widened by a shift: exact); compact g: float32 at the slot.
                # Master weights: the selected elements' fp32 values come from mw at the slot.
                if HAS_MW:
                    p = tl.load(mw_ptr + slot, mask=sel, other=0.0)
                    if DECAY_ALL:
                        p = tl.where(sel, p, load_f32(p_ptr, offs, valid & (bit == 0), DTYPE == 1))
                else:
                    p = load_f32(p_ptr, offs, pmask, DTYPE == 1)
                if COMPACT_G:
                    g = tl.load(g_ptr + slot, mask=sel, other=0.0)
                else:
                    g = load_f32(g_ptr, offs, sel, DTYPE == 1)
                if HAS_SCALE:
                    g = tl.math.div_rn(g, tl.zeros_like(g) + scale)
                    if COMPACT_G:
                        tl.store(g_ptr + slot, g, mask=sel)
                    elif DTYPE == 1:
                        gb = g.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
                        gb = (gb + (((gb >> 16) & 1) + 0x7FFF)) >> 16
                        gb = tl.where(g != g, 0x7FC0, gb)
                        tl.store(g_ptr + offs, gb.to(tl.int16), mask=sel)
                    elif DTYPE == 2:
                        tl.store(g_ptr + offs, g.to(tl.float16), mask=sel)
                    else:
                        tl.store(g_ptr + offs, g, mask=sel)
                if MAXIMIZE:
                    g = -g
                p1 = p * decay  # rounded on its own (no contraction: enable_fp_fusion=False)
                # ---- coefficients: tensor-wide, or per element from the step table
                # tl.full keeps the sign of nss = -(lr/bc1) = -0.0 at lr = 0; zeros_like(g) + nss
                # would give +0.0 and flip the sign of +-0 weights against the reference.
                e_nss = tl.full(g.shape, nss, tl.float32)
                e_bc2s = tl.zeros_like(g) + bc2s
                if HAS_OFFS:
                    off = tl.load(offs_ptr + slot, mask=sel, other=0).to(tl.int64)
                    s_i = step_i - off
                    ok = (s_i >= 1) & (s_i < table_len)
                    bad_offs += tl.sum((sel & ~ok).to(tl.int32), axis=0)
                    s_i = tl.where(ok, s_i, 1)
                    e_nss = tl.load(table_ptr + 2 * s_i, mask=sel, other=0.0)
                    e_bc2s = tl.load(table_ptr + 2 * s_i + 1, mask=sel, other=1.0)
                m = tl.load(m_ptr + slot, mask=sel, other=0.0)
                v = tl.load(v_ptr + slot, mask=sel, other=0.0)
                # ---- m = lerp(m, g, w1) in torch's fmadd form; v in the vector- or tail-region form
                d = g - m
                if LERP_SMALL:
                    fa = tl.zeros_like(g) + w1
                    fc = m
                else:
                    fa = tl.zeros_like(g) + w1m1
                    fc = g
                tail = offs >= tail_start
                c2g = c2 * g
                va = tl.where(tail, v, c2g)
                vb = tl.where(tail, tl.zeros_like(g) + b2, g)
                vc = tl.where(tail, c2g * g, v * b2)
                if EMU_FMA:
                    # Interpreter only: correctly rounded fma via float64 (exact product, sum rounded
                    # to odd by TwoSum + sticky bit, then one rounding to float32), = reference._fma32.
                    pr = fa.to(tl.float64) * d.to(tl.float64)
                    cc = fc.to(tl.float64)
                    s = pr + cc
                    bb = s - pr
                    er = (pr - (s - bb)) + (cc - bb)
                    sb = s.to(tl.int64, bitcast=True)
                    fix = (er != 0) & ((sb & 1) == 0) & (tl.abs(s) < float("inf"))
                    sb = tl.where(fix, sb + tl.where((er > 0) == (s > 0), 1, -1), sb)
                    m_new = sb.to(tl.float64, bitcast=True).to(tl.float32)
                    pr = va.to(tl.float64) * vb.to(tl.float64)
                    cc = vc.to(tl.float64)
                    s = pr + cc
                    bb = s - pr
                    er = (pr - (s - bb)) + (cc - bb)
                    sb = s.to(tl.int64, bitcast=True)
                    fix = (er != 0) & ((sb & 1) == 0) & (tl.abs(s) < float("inf"))
                    sb = tl.where(fix, sb + tl.where((er > 0) == (s > 0), 1, -1), sb)
                    v_new = sb.to(tl.float64, bitcast=True).to(tl.float32)
                else:
                    m_new = tl.fma(fa, d, fc)
                    v_new = tl.fma(va, vb, vc)
                vd = v_new
                if AMSGRAD:
                    vx = tl.load(vmax_ptr + slot, mask=sel, other=0.0)
                    vd = tl.where(vx > v_new, vx, v_new)  # C: vmax > v ? vmax : v
                    tl.store(vmax_ptr + slot, vd, mask=sel)
                den = tl.math.div_rn(tl.sqrt_rn(vd), e_bc2s) + eps
                p_new = p1 + tl.math.div_rn(e_nss * m_new, den)
                tl.store(m_ptr + slot, m_new, mask=sel)
                tl.store(v_ptr + slot, v_new, mask=sel)
                if HAS_MW:
                    tl.store(mw_ptr + slot, p_new, mask=sel)
                # ---- p: selected -> p_new; weight_decay_mode="all" -> unselected p * decay
                p_out = tl.where(sel, p_new, p1)
                wmask = sel
                if DECAY_ALL:
                    wmask = sel | (valid & (bit == 0))
                if SR:
                    # counter-based random bits of (key, flat index), then the neighbour choice
                    r = _hash32(_lo32(offs) ^ key_lo)
                    r = _hash32(r ^ (offs >> 32) ^ key_hi)
                if DTYPE == 1:
                    pb = p_out.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
                    pb = (pb + (((pb >> 16) & 1) + 0x7FFF)) >> 16
                    pb = tl.where(p_out != p_out, 0x7FC0, pb)
                    if SR:
                        pb = tl.where(sel, _stochastic_round_bits(p_out, pb, r, False), pb)
                    pb = tl.where(pb >= 0x8000, pb - 0x10000, pb)
                    tl.store(p_ptr + offs, pb.to(tl.int16), mask=wmask)
                elif DTYPE == 2:
                    if SR:
                        hb = p_out.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
                        hb = tl.where(sel, _stochastic_round_bits(p_out, hb, r, True), hb)
                        hb = tl.where(hb >= 0x8000, hb - 0x10000, hb)
                        tl.store(p_ptr + offs, hb.to(tl.int16).to(tl.float16, bitcast=True), mask=wmask)
                    else:
                        tl.store(p_ptr + offs, p_out.to(tl.float16), mask=wmask)
                else:
                    tl.store(p_ptr + offs, p_out, mask=wmask)
            k += cnt
        # The directory must account for exactly the chunk's selected elements.
        if not DENSE:
            if (k != k_end) | (k0 < 0) | (k_end > nnz):
                tl.atomic_add(err_ptr, 1)
        if HAS_OFFS:
            if bad_offs != 0:
                tl.atomic_add(err_ptr + 1, bad_offs)


def _f32(x: float) -> float:
    """x rounded to float32 (round to nearest even, as C's (float) of a double)."""
    return torch.tensor(x, dtype=torch.float64).to(torch.float32).item()


def _step_coeffs(lr: float, beta1: float, beta2: float, step: float) -> tuple:
    """(float(-(lr/bc1)), float(sqrt(bc2))) for one step, in double like torch / adamw_coeffs()."""
    bc1 = 1.0 - math.pow(beta1, step)
    bc2 = 1.0 - math.pow(beta2, step)
    nss = -(lr / bc1) if bc1 != 0.0 else (-math.inf if lr > 0 else math.nan)
    return _f32(nss), _f32(math.sqrt(bc2))


def _int16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@triton_op("wagle_triton::masked_adamw_", mutates_args=(
    "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_weights"))
def _masked_adamw_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[float],
    mask_bits: list[torch.Tensor], chunk_offsets: list[torch.Tensor], step_offsets: list[torch.Tensor],
    lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool,
    maximize: bool, weight_decay_mode: str, grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor], torch_tail: int, compact_grads: bool,
    master_weights: list[torch.Tensor], rounding_seeds: list[int],
) -> None:
    if not params:
        return
    has_mw = bool(master_weights)
    sr = has_mw and bool(rounding_seeds)
    device = params[0].device
    wd = 0.0 if weight_decay_mode == "none" else weight_decay
    decay = _f32(1.0 - lr * wd)
    w1 = _f32(1.0 - beta1)
    w1m1 = _f32(w1 - 1.0)  # exact in float32 (Sterbenz / small w1), as the C++ `c.w1 - 1.0f`
    lerp_small = abs(w1) < 0.5
    c2, b2, eps32 = _f32(1.0 - beta2), _f32(beta2), _f32(eps)
    err = torch.zeros(2, dtype=torch.int32, device=device)
    tables: dict = {}
    bl = GPU_BLOCK
    for i, p in enumerate(params):
        n = p.numel()
        dense = mask_bits[i].numel() == 0
        nnz = exp_avgs[i].numel()
        decay_all = weight_decay_mode == "all" and decay != 1.0 and not dense
        if n == 0 or (nnz == 0 and not decay_all):
            continue
        step = steps[i]
        nss, bc2s = _step_coeffs(lr, beta1, beta2, step)
        has_offs = step_offsets[i].numel() > 0
        table = err  # any tensor: not read without offsets
        table_len = 0
        if has_offs:
            if step != math.floor(step) or step < 1:
                raise ValueError(f"masked_adamw_: per-element step offsets need an integral step >= 1, "
                                 f"got {step} for params[{i}]")
            smax = int(step)
            table = tables.get(smax)
            if table is None:
                rows = [(0.0, 0.0)] + [_step_coeffs(lr, beta1, beta2, float(s)) for s in range(1, smax + 1)]
                table = tables[smax] = torch.tensor(rows, dtype=torch.float32).view(-1).to(device)
            table_len = smax + 1
        tail_start = n - n % torch_tail if torch_tail > 0 else n
        key = sr_key(int(rounding_seeds[i]), int(step)) if sr else 0
        wrap_triton(_masked_adamw_kernel.kernel())[(triton.cdiv(n, CHUNK),)](
            _int16(params[i]), _int16(grads[i]), exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else exp_avgs[i],
            mask_bits[i] if not dense else err, chunk_offsets[i] if not dense else err,
            step_offsets[i] if has_offs else err, table,
            grad_scale if grad_scale is not None else err, found_inf if found_inf is not None else err,
            err, master_weights[i] if has_mw else exp_avgs[i],
            n, nnz, tail_start, int(step) if has_offs else 0, table_len,
            nss, bc2s, eps32, decay, w1, w1m1, c2, b2, key & 0xFFFFFFFF, key >> 32,
            DTYPE=_DTYPE_CODE[p.dtype], DENSE=dense, AMSGRAD=amsgrad, MAXIMIZE=maximize,
            HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None, HAS_OFFS=has_offs,
            DECAY_ALL=decay_all, LERP_SMALL=lerp_small, EMU_FMA=interpreting(), COMPACT_G=compact_grads,
            HAS_MW=has_mw, SR=sr, BLOCK=bl, CHUNK_=CHUNK,
            enable_fp_fusion=False)
    bad_dir, bad_offs = err.tolist()  # one synchronisation per call
    if bad_dir:
        raise ValueError(f"masked_adamw_: chunk_offsets do not match mask_bits (or the size of exp_avgs) in {bad_dir} chunk(s) (rebuild "
                         "the directory from the mask); the state may be partially updated")
    if bad_offs:
        raise ValueError(f"masked_adamw_: {bad_offs} step_offsets are outside [0, step); the state may be "
                         "partially updated")


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
    """Triton ``masked_adamw_``: same contract as ``kernels.reference.masked_adamw_`` (layout:
    csrc/ops.cpp). params/grads contiguous fp32/bf16/fp16 (one dtype per call); m/v/vmax contiguous
    fp32 with one entry per selected element; empty ``mask_bits``/``chunk_offsets`` = dense param;
    empty ``step_offsets`` = tensor-wide step; state_steps already incremented (read on the host:
    keep them on the CPU, as MaskedAdamW does, to avoid a synchronisation per tensor).

    With ``compact_grads`` grads[i] is a contiguous float32[nnz] tensor (the selected elements'
    gradients in flat order, as ``gather_masked_`` writes them; float32[numel] for a dense param),
    read and (with grad_scale) written at the compact slot like exp_avg, whatever the params' dtype.

    Mutates params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and, with ``grad_scale``, the selected
    entries of grads (every entry of compact grads). ``found_inf == 1`` (read on the device) skips
    everything.

    ``master_weights`` / ``rounding_seeds``: as ``kernels.reference.masked_adamw_`` (bf16/fp16 params;
    contiguous float32 per param laid out like exp_avgs; seeds select stochastic rounding).
    """
    master_weights = list(master_weights) if master_weights is not None else []
    rounding_seeds = [int(x) for x in rounding_seeds] if rounding_seeds is not None else []
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
    nt = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps), ("mask_bits", mask_bits),
                      ("chunk_offsets", chunk_offsets), ("step_offsets", step_offsets)):
        if len(lst) != nt:
            raise ValueError(f"masked_adamw_: {name} has {len(lst)} entries, params has {nt}")
    if len(max_exp_avg_sqs) != (nt if amsgrad else 0):
        raise ValueError("masked_adamw_: max_exp_avg_sqs must have one tensor per param with amsgrad and be "
                         "empty without")
    if nt == 0:
        return
    dtype = params[0].dtype
    if dtype not in _DTYPE_CODE:
        raise TypeError(f"masked_adamw_: params must be float32, bfloat16 or float16, got {dtype}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != dtype:
            raise TypeError(f"masked_adamw_: params[{i}] is {p.dtype} but params[0] is {dtype} (one call per dtype)")
        if compact_grads:
            if g.dtype != torch.float32:
                raise TypeError(f"masked_adamw_: grads[{i}] must be float32 with compact_grads=True, got {g.dtype}")
            if not (p.is_contiguous() and g.is_contiguous()) or g.numel() != exp_avgs[i].numel():
                raise ValueError(f"masked_adamw_: params[{i}] must be contiguous and grads[{i}] a contiguous tensor "
                                 f"with one entry per selected element ({exp_avgs[i].numel()}, as exp_avgs[{i}]) "
                                 f"with compact_grads=True, got {g.numel()}")
        elif g.dtype != dtype:
            raise TypeError(f"masked_adamw_: params[{i}] and grads[{i}] must both be {dtype} (one call per dtype)")
        elif not (p.is_contiguous() and g.is_contiguous()) or g.numel() != p.numel():
            raise ValueError(f"masked_adamw_: params[{i}] and grads[{i}] must be contiguous with equal numel")
        n = p.numel()
        dense = mask_bits[i].numel() == 0 and chunk_offsets[i].numel() == 0
        if not dense:
            if mask_bits[i].dtype != torch.uint8 or mask_bits[i].numel() != (n + 7) // 8:
                raise ValueError(f"masked_adamw_: mask_bits[{i}] must be uint8[{(n + 7) // 8}]")
            if chunk_offsets[i].dtype != torch.int64 or chunk_offsets[i].numel() != (n + CHUNK - 1) // CHUNK + 1:
                raise ValueError(f"masked_adamw_: chunk_offsets[{i}] must be int64[{(n + CHUNK - 1) // CHUNK + 1}]")
        nnz = exp_avgs[i].numel()
        if dense and nnz != n:
            raise ValueError(f"masked_adamw_: exp_avgs[{i}] must have {n} entries for a dense param")
        for name, t in (("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])) + (
                (("max_exp_avg_sqs", max_exp_avg_sqs[i]),) if amsgrad else ()):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != nnz:
                raise ValueError(f"masked_adamw_: {name}[{i}] must be a contiguous float32 tensor with {nnz} entries")
        o = step_offsets[i]
        if o.numel() and (o.dtype != torch.int32 or o.numel() != nnz or not o.is_contiguous()):
            raise ValueError(f"masked_adamw_: step_offsets[{i}] must be a contiguous int32[{nnz}] tensor or empty")
    if master_weights:
        if len(master_weights) != nt:
            raise ValueError(f"masked_adamw_master_: master_weights has {len(master_weights)} entries, params has {nt}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"masked_adamw_master_: master weights are for bfloat16/float16 params, got {dtype}")
        for i, mw in enumerate(master_weights):
            if mw.dtype != torch.float32 or not mw.is_contiguous() or mw.numel() != exp_avgs[i].numel():
                raise ValueError(f"masked_adamw_master_: master_weights[{i}] must be a contiguous float32 tensor "
                                 f"with {exp_avgs[i].numel()} entries")
    if rounding_seeds and (not master_weights or len(rounding_seeds) != nt):
        raise ValueError("masked_adamw_master_: rounding_seeds need master_weights and one seed per param")
    if torch_tail < 0:
        raise ValueError("masked_adamw_: torch_tail must be >= 0")
    # torch: `double step = state_step.item<float>()`; one host read per distinct tensor.
    steps = [float(s.reshape(()).to(torch.float32).item()) for s in state_steps]
    _masked_adamw_op(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
                     steps, [b.contiguous() for b in mask_bits], [d.contiguous() for d in chunk_offsets],
                     [o.contiguous() for o in step_offsets], float(lr), float(beta1), float(beta2),
                     float(weight_decay), float(eps), bool(amsgrad), bool(maximize), weight_decay_mode,
                     grad_scale, found_inf, int(torch_tail), bool(compact_grads), master_weights, rounding_seeds)


def masked_adamw_master_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits,
                         chunk_offsets, step_offsets, master_weights, *, rounding_seeds=(), **kw) -> None:
    """Triton ``masked_adamw_master_``: :func:`masked_adamw_` with compact fp32 master weights."""
    masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_bits, chunk_offsets,
                  step_offsets, master_weights=master_weights, rounding_seeds=rounding_seeds, **kw)
