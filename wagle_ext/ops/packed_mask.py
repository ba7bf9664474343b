"""PackedMask: a 1-bit-per-weight boolean mask for one tensor -- the bit-array value type of the ops
layer (what :func:`wagle_ext.ops.select_topk_mask` returns and masked AdamW reads)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .bits import pack_bits, popcount_bits, unpack_bits

__all__ = ["PackedMask"]


class PackedMask:
    """A boolean mask over a tensor of ``shape``, stored as packed bits.

    Attributes
    ----------
    bits : torch.Tensor
        uint8[ceil(numel / 8)]; bit ``j`` of byte ``i`` is element ``8*i + j`` of the flattened
        tensor (little-endian bit order); padding bits are zero.
    shape : torch.Size
        Shape of the masked tensor.
    nnz : int
        Number of selected (True) elements.

    Memory: numel / 8 bytes, versus numel bytes for a ``torch.bool`` mask.
    """

    __slots__ = ("bits", "shape", "_nnz")

    def __init__(self, bits: torch.Tensor, shape: Union[torch.Size, Sequence[int]], nnz: Optional[int] = None):
        shape = torch.Size(shape)
        numel = shape.numel()
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1:
            raise TypeError("PackedMask.bits must be a 1-D torch.uint8 tensor")
        if bits.numel() != (numel + 7) // 8:
            raise ValueError(
                f"PackedMask: shape {tuple(shape)} needs {(numel + 7) // 8} bytes of bits, got {bits.numel()}")
        self.bits = bits
        self.shape = shape
        self._nnz = None if nnz is None else int(nnz)

    # ------------------------------------------------------------------ properties
    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nnz(self) -> int:
        if self._nnz is None:
            self._nnz = popcount_bits(self.bits, self.numel)
        return self._nnz

    @property
    def density(self) -> float:
        """Fraction of selected elements (0.0 for an empty tensor)."""
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def device(self) -> torch.device:
        return self.bits.device

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_bool(cls, mask: torch.Tensor) -> "PackedMask":
        """Pack a boolean (or 0/1 integer) tensor of any shape."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"PackedMask.from_bool expects a tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"PackedMask.from_bool expects a bool tensor, got {mask.dtype}")
            mask = mask != 0
        bits = pack_bits(mask)
        return cls(bits, mask.shape)

    @classmethod
    def full(cls, shape: Union[torch.Size, Sequence[int]], value: bool = True,
             device: Union[str, torch.device] = "cpu") -> "PackedMask":
        """All-True (or all-False) mask."""
        shape = torch.Size(shape)
        n = shape.numel()
        bits = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=device)
        if value and n:
            bits.fill_(0xFF)
            if n % 8:
                bits[-1] = (1 << (n % 8)) - 1
        return cls(bits, shape, n if value else 0)

    def to_bool(self) -> torch.Tensor:
        """bool tensor of ``shape``."""
        return unpack_bits(self.bits, self.numel).reshape(self.shape)

    def to(self, device: Union[str, torch.device]) -> "PackedMask":
        return PackedMask(self.bits.to(device), self.shape, self._nnz)

    # ------------------------------------------------------------------ dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedMask):
            return NotImplemented
        return self.shape == other.shape and torch.equal(self.bits.cpu(), other.bits.cpu())

    __hash__ = None  # mutable tensor payload

    def __repr__(self) -> str:
        return f"PackedMask(shape={tuple(self.shape)}, nnz={self.nnz}, density={self.density:.4g})"
