"""Masks of sharded parameters: the local piece of a whole-parameter mask under FSDP2 (DTensor).

``torch.distributed.fsdp.fully_shard`` (FSDP2) turns every parameter into a ``DTensor`` whose local
tensor is a block of rows: placement ``Shard(0)`` splits dim 0 as ``torch.chunk`` does (rank ``r``
of a mesh dimension of size ``W`` holds rows ``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / W)``;
trailing ranks may hold no row). Rows are contiguous in the flat element order, so the local shard
of a parameter is the flat element range ``[row0 * row_numel, row1 * row_numel)`` and its mask is
that range of the whole mask's bits. Consequences used by the optimizer:

* the global top-k mask is built once on whole tensors (before sharding, or loaded from a
  :class:`~wagle_ext.masks.MaskSet` file) and every rank cuts out its own range
  (:func:`shard_mask`), so the ranks' masks together are exactly the single-process mask;
* compact state in flat order of the selected elements is therefore, concatenated over ranks in
  rank order, exactly the single-process compact state (nothing selected is counted twice).

Supported placements: ``Replicate()`` and at most one ``Shard(0)`` (FSDP2's default, tested; HSDP's
``(Replicate(), Shard(0))`` is handled the same way but untested). Other placements (``Shard(1)``
from a ``shard_placement_fn``, ``Partial``) raise ``ValueError``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, NamedTuple, Optional

import torch

from ..ops import PackedMask, pack_bits, unpack_bits

__all__ = ["is_dtensor", "local_tensor", "ShardRange", "shard_range", "shard_mask", "shard_masks"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False when DTensor is unavailable)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (shares storage: writes reach the parameter), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # what DTensor.to_local() returns, without autograd


class ShardRange(NamedTuple):
    """Which part of a whole parameter this process holds.

    ``start``/``stop``: the flat element range (in the whole parameter's row-major order) of the
    local tensor; ``group``: the process group over which the parameter is sharded (None: not
    sharded, every process holds all of it)."""

    start: int
    stop: int
    group: Optional[Any]


def shard_range(param: torch.Tensor) -> ShardRange:
    """The flat element range of ``param`` held by this process (see :class:`ShardRange`).

    Plain tensors: the whole range. DTensors: computed from the placements with ``torch.chunk``
    semantics and checked against the local tensor's shape.

    Raises:
        ValueError: a placement other than ``Replicate()`` / one ``Shard(0)``, or a local shape
            that does not match ``torch.chunk`` semantics.
    """
    if not is_dtensor(param):
        return ShardRange(0, param.numel(), None)
    from torch.distributed.tensor import Replicate, Shard

    mesh = param.device_mesh
    shape = tuple(param.shape)
    rows = shape[0] if shape else 1
    row_numel = param.numel() // rows if rows else 0
    start_row, stop_row, group = 0, rows, None
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and placement.dim == 0 and group is None and shape:
            world = mesh.size(dim)
            rank = mesh.get_local_rank(dim)
            chunk = -(-rows // world) if rows else 0
            start_row = min(rank * chunk, rows)
            stop_row = min(start_row + chunk, rows)
            group = mesh.get_group(dim)
            continue
        raise ValueError(f"parameter with placements {param.placements}: masks support Replicate() and one "
                         "Shard(0) (FSDP2's default); shard dim 0 only (no shard_placement_fn) and no Partial")
    local = local_tensor(param)
    expected = (stop_row - start_row,) + shape[1:] if shape else ()
    if tuple(local.shape) != expected:
        raise ValueError(f"DTensor of shape {shape} with placements {param.placements} has a local tensor of "
                         f"shape {tuple(local.shape)}, expected {expected} (torch.chunk split of dim 0)")
    return ShardRange(start_row * row_numel, stop_row * row_numel, group)


def _slice_bits(mask: PackedMask, start: int, stop: int) -> torch.Tensor:
    """Bits of flat elements ``[start, stop)`` of ``mask``, repacked from element 0."""
    if start % 8 == 0:
        nbytes = (stop - start + 7) // 8
        bits = mask.bits[start // 8:start // 8 + nbytes].clone()
        if (stop - start) % 8:  # clear the bits past ``stop`` (padding bits are zero)
            bits[-1] &= (1 << ((stop - start) % 8)) - 1
        return bits
    lo, hi = start // 8, (stop + 7) // 8
    flags = unpack_bits(mask.bits[lo:hi].contiguous(), (hi - lo) * 8)[start - 8 * lo:stop - 8 * lo]
    return pack_bits(flags.contiguous())


def shard_mask(mask: PackedMask, param: torch.Tensor) -> PackedMask:
    """The local piece of a whole-parameter ``mask`` for ``param`` (a DTensor or a plain tensor).

    Args:
        mask: PackedMask of the whole parameter (shape ``param.shape``, the global shape).
        param: the parameter; for a DTensor the result has the shape of its local tensor.

    Returns:
        PackedMask over the local tensor (``mask`` itself for a plain tensor or a replicated DTensor).
    """
    if not isinstance(mask, PackedMask):
        raise TypeError(f"shard_mask expects a PackedMask, got {type(mask).__name__}")
    if mask.shape != param.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} for a parameter of shape {tuple(param.shape)}")
    rng = shard_range(param)
    local = local_tensor(param)
    if rng.group is None:
        return mask
    bits = _slice_bits(mask, rng.start, rng.stop)
    return PackedMask(bits.to(local.device), local.shape)


def shard_masks(masks: Mapping[str, Optional[PackedMask]], model: torch.nn.Module) -> "OrderedDict[str, Optional[PackedMask]]":
    """``{name: local PackedMask}`` for a model whose parameters may be FSDP2 DTensors.

    Args:
        masks: ``{model parameter name: whole-parameter PackedMask, bool tensor or None}`` (e.g.
            ``MaskSet.for_model(model)``).
        model: the (possibly ``fully_shard``-ed) module the names refer to.

    Returns:
        the same keys, each mask cut to the shard this process holds (None stays None).
    """
    params = dict(model.named_parameters())
    out: "OrderedDict[str, Optional[PackedMask]]" = OrderedDict()
    for name, m in masks.items():
        if name not in params:
            raise KeyError(f"mask given for {name!r}, which is not a parameter of the model")
        if m is None:
            out[name] = None
            continue
        if isinstance(m, torch.Tensor):
            m = PackedMask.from_bool(m)
        out[name] = shard_mask(m, params[name])
    return out
