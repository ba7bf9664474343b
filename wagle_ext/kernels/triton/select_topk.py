"""Triton kernels of the selection primitives (``radix_histogram``, ``count_key``,
``topk_mask_bits``; contract in csrc/ops.cpp and kernels/reference.py). The exact-k orchestration
is ``_select_bits`` in wagle_ext/ops.py, so exact primitives give masks bit-identical to the CPU op.

Keys are handled as signed int32 ``ks = key - 2^31`` (``_radix.signed_key``), which orders like the
unsigned key and keeps every kernel in 32-bit signed arithmetic: ``key >> s == (ks >> s) + 2^(31-s)``
and the low digits are the same bits.
One launch per tensor (the interpreter cannot load pointers from a table); a mask pass with a
tie quota adds a tie-count launch and a ``torch.cumsum``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import block, blocks_per_program, lazy_jit
from ._radix import load_f32, signed_key

HIST_SIZE = 2049
_LEVELS = {0: (21, 11), 11: (10, 11), 22: (0, 10)}  # prefix_bits -> (digit shift, digit width)


@lazy_jit
def _radix_histogram_kernel(s_ptr, hist_ptr, n, prefix_s, PREFIX_BITS: tl.constexpr,
                            BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    hist = tl.zeros((2048,), dtype=tl.int32)
    nans = tl.zeros((BLOCK,), dtype=tl.int32)
    for it in range(ITERS):  # ITERS consecutive blocks, one histogram flush
        offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = load_f32(s_ptr, offs, m, BF16)
        is_nan = x != x
        ks = signed_key(x)
        valid = m & ~is_nan
        if PREFIX_BITS == 0:
            digit = (ks >> 21) + 1024
            nans += (m & is_nan).to(tl.int32)
        elif PREFIX_BITS == 11:
            valid = valid & ((ks >> 21) == prefix_s)
            digit = (ks >> 10) & 0x7FF
        else:
            valid = valid & ((ks >> 10) == prefix_s)
            digit = ks & 0x3FF
        hist += tl.histogram(digit, 2048, mask=valid)
    tl.atomic_add(hist_ptr + tl.arange(0, 2048), hist.to(tl.int64))
    if PREFIX_BITS == 0:
        tl.atomic_add(hist_ptr + 2048, tl.sum(nans.to(tl.int64), axis=0))


@lazy_jit
def _count_key_kernel(s_ptr, count_ptr, n, key_s, PER_PROGRAM: tl.constexpr, BF16: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The number of keys equal to ``key_s``: added to ``count_ptr[0]``, or with PER_PROGRAM stored at
    ``count_ptr[pid]`` for program pid's block (the tie counts of a mask pass with a quota)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = load_f32(s_ptr, offs, m, BF16)
    eq = m & (x == x) & (signed_key(x) == key_s)
    c = tl.sum(eq.to(tl.int64), axis=0)
    if PER_PROGRAM:
        tl.store(count_ptr + pid, c)
    else:
        tl.atomic_add(count_ptr, c)


@lazy_jit
def _mask_kernel(s_ptr, bits_ptr, ties_before_ptr, n, nbytes, thr_s, take,
                 LARGEST: tl.constexpr, TIES: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """One bit per element, 8 per byte (reshape + shift + sum). TIES: 0 none, 1 all, 2 the first
    `take` ties in flat-index order (rank = ties in earlier blocks + cumsum within the block)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = load_f32(s_ptr, offs, m, BF16)
    valid = m & (x == x)
    ks = signed_key(x)
    if LARGEST:
        sel = valid & (ks > thr_s)
    else:
        sel = valid & (ks < thr_s)
    eq = valid & (ks == thr_s)
    if TIES == 1:
        sel = sel | eq
    elif TIES == 2:
        eq_i = eq.to(tl.int64)
        rank = tl.load(ties_before_ptr + pid) + tl.cumsum(eq_i, axis=0) - eq_i
        sel = sel | (eq & (rank < take))
    bit = tl.reshape(sel.to(tl.int32), (BLOCK // 8, 8))
    byte = tl.sum(bit << tl.arange(0, 8)[None, :], axis=1)
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(bits_ptr + boffs, byte.to(tl.uint8), mask=boffs < nbytes)


def _as_loadable(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Contiguous scores as the kernels load them: bf16 as its int16 bits (converted in-kernel by
    a shift, exactly like common/score_math.h), other dtypes as they are."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    return t, False


def _signed(key: int) -> int:
    """Unsigned 32-bit key -> the signed int32 form the kernels compare against."""
    return key - (1 << 31)


@triton_op("wagle_triton::radix_histogram", mutates_args=())
def _radix_histogram_op(scores: list[torch.Tensor], prefix: int, prefix_bits: int) -> torch.Tensor:
    hist = torch.zeros(HIST_SIZE, dtype=torch.int64, device=scores[0].device)
    # Prefix of the unsigned key's top bits, shifted into the signed form: key >> s - 2^(31-s).
    prefix_s = prefix - (1 << (prefix_bits - 1)) if prefix_bits else 0
    bl, iters = block(4096), blocks_per_program(16)
    for t in scores:  # one launch per tensor
        n = t.numel()
        if n:
            s, bf16 = _as_loadable(t)
            wrap_triton(_radix_histogram_kernel.kernel())[(triton.cdiv(n, bl * iters),)](
                s, hist, n, prefix_s, PREFIX_BITS=prefix_bits, BF16=bf16, BLOCK=bl, ITERS=iters)
    return hist


def radix_histogram(scores: Sequence[torch.Tensor], prefix: int, prefix_bits: int) -> torch.Tensor:
    """int64[2049] digit histogram of the keys whose top ``prefix_bits`` bits equal ``prefix``
    (``kernels.reference.radix_histogram``); entry 2048 counts NaNs when ``prefix_bits == 0``."""
    if prefix_bits not in _LEVELS:
        raise ValueError(f"prefix_bits must be 0, 11 or 22, got {prefix_bits}")
    if not 0 <= prefix < (1 << prefix_bits if prefix_bits else 1):
        raise ValueError(f"prefix {prefix} does not fit in {prefix_bits} bits")
    scores = list(scores)
    if not scores:
        return torch.zeros(HIST_SIZE, dtype=torch.int64)
    return _radix_histogram_op(scores, int(prefix), int(prefix_bits))


@triton_op("wagle_triton::count_key", mutates_args=())
def _count_key_op(scores: list[torch.Tensor], key: int) -> torch.Tensor:
    counts = torch.zeros(len(scores), dtype=torch.int64, device=scores[0].device)
    bl = block(4096)
    for i, t in enumerate(scores):
        n = t.numel()
        if n:
            s, bf16 = _as_loadable(t)
            wrap_triton(_count_key_kernel.kernel())[(triton.cdiv(n, bl),)](
                s, counts[i:], n, _signed(key), PER_PROGRAM=False, BF16=bf16, BLOCK=bl)
    return counts


def count_key(scores: Sequence[torch.Tensor], key: int) -> torch.Tensor:
    """int64[len(scores)]: per tensor, how many elements have exactly this key (NaN never does)."""
    if not 0 <= key < (1 << 32):
        raise ValueError(f"key must be a uint32 key in [0, 2^32), got {key}")
    scores = list(scores)
    if not scores:
        return torch.zeros(0, dtype=torch.int64)
    return _count_key_op(scores, int(key))


@triton_op("wagle_triton::topk_mask_bits", mutates_args=())
def _topk_mask_bits_op(scores: list[torch.Tensor], threshold_key: int, largest: bool,
                       ties_take: list[int]) -> list[torch.Tensor]:
    out = []
    thr_s = _signed(threshold_key)
    bl = block(4096)
    for t, take in zip(scores, ties_take):
        n = t.numel()
        nbytes = (n + 7) // 8
        bits = torch.empty(nbytes, dtype=torch.uint8, device=t.device)
        out.append(bits)
        if n == 0:
            continue
        s, bf16 = _as_loadable(t)
        programs = triton.cdiv(n, bl)
        if take > 0:
            ties = torch.empty(programs, dtype=torch.int64, device=t.device)
            wrap_triton(_count_key_kernel.kernel())[(programs,)](s, ties, n, thr_s, PER_PROGRAM=True, BF16=bf16,
                                                                  BLOCK=bl)
            ties_before = torch.cumsum(ties, 0) - ties  # exclusive prefix: ties in earlier blocks
            mode = 2
        else:
            ties_before = bits  # unused pointer
            mode = 1 if take < 0 else 0
        wrap_triton(_mask_kernel.kernel())[(programs,)](
            s, bits, ties_before, n, nbytes, thr_s, max(int(take), 0),
            LARGEST=bool(largest), TIES=mode, BF16=bf16, BLOCK=bl)
    return out


def topk_mask_bits(scores: Sequence[torch.Tensor], threshold_key: int, largest: bool,
                   ties_take: Sequence[int]) -> list[torch.Tensor]:
    """One uint8 bit array per tensor (``kernels.reference.topk_mask_bits``): keys strictly better
    than ``threshold_key`` plus the first ``ties_take[i]`` ties in flat-index order (-1: all)."""
    scores = list(scores)
    ties_take = [int(x) for x in ties_take]
    if len(ties_take) != len(scores):
        raise ValueError(f"ties_take has {len(ties_take)} entries but scores has {len(scores)}")
    if not 0 <= threshold_key < (1 << 32):
        raise ValueError(f"threshold_key must be a uint32 key in [0, 2^32), got {threshold_key}")
    if not scores:
        return []
    return _topk_mask_bits_op(scores, int(threshold_key), bool(largest), ties_take)
