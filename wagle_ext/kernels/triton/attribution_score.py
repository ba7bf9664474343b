"""Triton kernel of ``attribution_score`` (docs/kernels.md 4.1): fp32 scores and the int64[2049] key
histogram (``key >> 21``; NaN counter at 2048) in one pass, one launch per tensor.

Bit-exact with the reference and the C++/CUDA kernels: fp32 math in the same order, true division
``tl.math.div_rn`` (Triton's ``/`` on fp32 is an approximate division on GPUs), bf16 inputs
widened to fp32 by a bit shift, fp16 by ``.to(tl.float32)`` (both exact). The histogram is ``tl.histogram`` per program merged with one vector
``tl.atomic_add``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import block, blocks_per_program, lazy_jit
from ._radix import load_f32, signed_key

HIST_SIZE = 2049
KINDS = {"wagle": 0, "wagle_hessian": 1, "snip": 2, "gradient": 3, "magnitude": 4}


@lazy_jit
def _score_kernel(w_ptr, gf_ptr, gr_ptr, h_ptr, out_ptr, hist_ptr, n, gamma, eps,
                  KIND: tl.constexpr, W_BF16: tl.constexpr, GF_BF16: tl.constexpr,
                  GR_BF16: tl.constexpr, H_BF16: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors beyond 2^31 elements
    hist = tl.zeros((2048,), dtype=tl.int32)
    nans = tl.zeros((BLOCK,), dtype=tl.int32)
    for it in range(ITERS):  # ITERS consecutive blocks, one histogram flush
        offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        # bf16 -> fp32 by shifting the bits (exact, as in common/score_math.h; the interpreter's own
        # conversion mangles bf16 denormals). Inputs a kind does not read are never loaded.
        w = tl.zeros((BLOCK,), tl.float32)
        gf = tl.zeros((BLOCK,), tl.float32)
        gr = tl.zeros((BLOCK,), tl.float32)
        h = tl.zeros((BLOCK,), tl.float32)
        if KIND != 3:
            w = load_f32(w_ptr, offs, m, W_BF16)
        if KIND != 4:
            gf = load_f32(gf_ptr, offs, m, GF_BF16)
        if KIND == 0 or KIND == 1:
            gr = load_f32(gr_ptr, offs, m, GR_BF16)
        if KIND == 1:
            h = load_f32(h_ptr, offs, m, H_BF16)
        if KIND == 0:  # wagle: |(w - g_r / gamma) * g_f|
            s = tl.abs((w - tl.math.div_rn(gr, tl.zeros_like(gr) + gamma)) * gf)
        elif KIND == 1:  # wagle_hessian: |(w - g_r / (h + eps)) * g_f|
            s = tl.abs((w - tl.math.div_rn(gr, h + eps)) * gf)
        elif KIND == 2:  # snip: |w * g_f|
            s = tl.abs(w * gf)
        elif KIND == 3:  # gradient: |g_f|
            s = tl.abs(gf)
        else:  # magnitude: |w|
            s = tl.abs(w)
        tl.store(out_ptr + offs, s, mask=m)
        # Order-preserving key as a signed int32 (ks = key - 2^31): key >> 21 == (ks >> 21) + 1024.
        ks = signed_key(s)
        is_nan = s != s
        hist += tl.histogram((ks >> 21) + 1024, 2048, mask=m & ~is_nan)
        nans += (m & is_nan).to(tl.int32)
    tl.atomic_add(hist_ptr + tl.arange(0, 2048), hist.to(tl.int64))
    tl.atomic_add(hist_ptr + 2048, tl.sum(nans.to(tl.int64), axis=0))


@triton_op("wagle_triton::attribution_score", mutates_args=())
def _attribution_score_op(
    weight: torch.Tensor,
    grad_forget: Optional[torch.Tensor],
    grad_retain: Optional[torch.Tensor],
    hessian: Optional[torch.Tensor],
    kind: str,
    gamma: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    code = KINDS[kind]
    n = weight.numel()
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    hist = torch.zeros(HIST_SIZE, dtype=torch.int64, device=weight.device)
    if n == 0:
        return out, hist

    def arg(t: Optional[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        # Inputs the kind does not read are never loaded (constexpr branches): pass any pointer.
        # bf16 goes in as its int16 bits, widened in the kernel by a shift. Each input keeps its
        # own dtype (no rounding of a fp32 g_r to a bf16 g_f's dtype), as in the reference.
        if t is None:
            return out, False
        t = t.contiguous()
        return (t.view(torch.int16), True) if t.dtype == torch.bfloat16 else (t, False)

    (w_, w16), (gf_, gf16), (gr_, gr16), (h_, h16) = arg(weight), arg(grad_forget), arg(grad_retain), arg(hessian)
    bl, iters = block(4096), blocks_per_program(16)
    wrap_triton(_score_kernel.kernel())[(triton.cdiv(n, bl * iters),)](
        w_, gf_, gr_, h_, out, hist, n, float(gamma), float(eps),
        KIND=code, W_BF16=w16, GF_BF16=gf16, GR_BF16=gr16, H_BF16=h16, BLOCK=bl, ITERS=iters)
    return out, hist


def attribution_score(
    weight: torch.Tensor,
    grad_forget: Optional[torch.Tensor],
    grad_retain: Optional[torch.Tensor],
    hessian: Optional[torch.Tensor],
    kind: str,
    gamma: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``attribution_score``: same contract as ``kernels.reference.attribution_score``.

    Returns (fp32 scores shaped like ``weight``, int64[2049] histogram); mutates nothing.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {tuple(KINDS)}")
    needs = {"grad_forget": kind != "magnitude", "grad_retain": kind in ("wagle", "wagle_hessian"),
             "hessian": kind == "wagle_hessian"}
    for name, t in (("grad_forget", grad_forget), ("grad_retain", grad_retain), ("hessian", hessian)):
        if needs[name] and t is None:
            raise ValueError(f"attribution_score: kind {kind!r} needs {name}")
        if needs[name] and t.numel() != weight.numel():
            raise ValueError(f"attribution_score: {name} has {t.numel()} elements, weight has {weight.numel()}")
    return _attribution_score_op(
        weight,
        grad_forget if needs["grad_forget"] else None,
        grad_retain if needs["grad_retain"] else None,
        hessian if needs["hessian"] else None,
        kind, float(gamma), float(eps))
