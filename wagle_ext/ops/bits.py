"""Bit arrays (1 bit per element, little-endian bit order): pack, unpack, count.

The primitives of :class:`~wagle_ext.ops.packed_mask.PackedMask`; validated here, run on the back
end chosen for the device.
"""
from __future__ import annotations

import torch

from ._backends import _impl

__all__ = ["pack_bits", "unpack_bits", "popcount_bits"]


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
