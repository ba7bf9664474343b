"""Triton kernels of the bit-array ops (``pack_bits``, ``unpack_bits``, ``popcount_bits``).
Bit j of byte i is element 8*i + j (little-endian bit order); padding bits are zero."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._launch import block, lazy_jit


@lazy_jit
def _pack_kernel(mask_ptr, bits_ptr, n, nbytes, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(mask_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    bit = tl.reshape(v, (BLOCK // 8, 8))
    byte = tl.sum(bit << tl.arange(0, 8)[None, :], axis=1)
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(bits_ptr + boffs, byte.to(tl.uint8), mask=boffs < nbytes)


@lazy_jit
def _unpack_kernel(bits_ptr, mask_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    byte = tl.load(bits_ptr + (offs >> 3), mask=m, other=0).to(tl.int32)
    bit = (byte >> (offs & 7).to(tl.int32)) & 1
    tl.store(mask_ptr + offs, bit.to(tl.uint8), mask=m)


@lazy_jit
def _popcount_kernel(bits_ptr, count_ptr, n, nbytes, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    boffs = pid * BLOCK + tl.arange(0, BLOCK)
    byte = tl.load(bits_ptr + boffs, mask=boffs < nbytes, other=0).to(tl.int32)
    j = tl.arange(0, 8)
    bit = (byte[:, None] >> j[None, :]) & 1
    valid = (boffs[:, None] * 8 + j[None, :]) < n  # only the first n bits count
    tl.atomic_add(count_ptr, tl.sum(tl.sum(tl.where(valid, bit, 0), axis=1), axis=0).to(tl.int64))


@triton_op("wagle_triton::pack_bits", mutates_args=())
def _pack_bits_op(mask: torch.Tensor) -> torch.Tensor:
    n = mask.numel()
    nbytes = (n + 7) // 8
    bits = torch.empty(nbytes, dtype=torch.uint8, device=mask.device)
    if n:
        bl = block(8192)
        wrap_triton(_pack_kernel.kernel())[(triton.cdiv(n, bl),)](
            mask.contiguous().view(torch.uint8), bits, n, nbytes, BLOCK=bl)
    return bits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor (any shape) -> uint8[ceil(numel/8)], little-endian bit order."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {mask.dtype}")
    return _pack_bits_op(mask)


@triton_op("wagle_triton::unpack_bits", mutates_args=())
def _unpack_bits_op(bits: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.bool, device=bits.device)
    if numel:
        bl = block(8192)
        wrap_triton(_unpack_kernel.kernel())[(triton.cdiv(numel, bl),)](
            bits.contiguous(), out.view(torch.uint8), numel, BLOCK=bl)
    return out


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bit array -> bool[numel]."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8 bits, got {bits.dtype}")
    if numel < 0 or bits.numel() * 8 < numel:
        raise ValueError(f"{bits.numel()} bytes cannot hold {numel} bits")
    return _unpack_bits_op(bits, int(numel))


@triton_op("wagle_triton::popcount_bits", mutates_args=())
def _popcount_bits_op(bits: torch.Tensor, numel: int) -> torch.Tensor:
    count = torch.zeros(1, dtype=torch.int64, device=bits.device)
    nbytes = (numel + 7) // 8
    if numel:
        bl = block(4096)
        wrap_triton(_popcount_kernel.kernel())[(triton.cdiv(nbytes, bl),)](
            bits.contiguous(), count, numel, nbytes, BLOCK=bl)
    return count


def popcount_bits(bits: torch.Tensor, numel: int) -> int:
    """Number of set bits among the first ``numel`` bits (synchronises: returns a Python int)."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"popcount_bits expects uint8 bits, got {bits.dtype}")
    if numel < 0 or bits.numel() * 8 < numel:
        raise ValueError(f"{bits.numel()} bytes cannot hold {numel} bits")
    return int(_popcount_bits_op(bits, int(numel)).item())
