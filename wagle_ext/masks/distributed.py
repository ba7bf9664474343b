"""Multi-process masks: splitting the parameters over ranks and gathering every rank's masks.

Selection itself is one ``process_group=`` argument of the radix select (``wagle_ext.ops``): only
int64 histograms cross processes. This module holds what comes before (:func:`partition_names`:
which rank scores which parameters) and after (:func:`all_gather_masks`: every rank gets the full
mask, bits broadcast rank by rank).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch

from ..ops import PackedMask

__all__ = ["partition_names", "world_size", "all_gather_masks"]


def partition_names(sizes: Sequence[tuple], world_size: int) -> list:
    """Split ``[(name, numel), ...]`` (in parameter order) into ``world_size`` contiguous blocks of
    roughly equal element count, for multi-process scoring: rank ``r`` scores block ``r`` and
    calls :func:`build_mask` with ``process_group=``; the global order is then rank-major, which
    equals the original parameter order (so ties break exactly as in one process).

    Returns ``list[list[str]]`` of length ``world_size`` (some blocks may be empty).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    sizes = [(str(n), int(c)) for n, c in sizes]
    total = sum(c for _, c in sizes)
    blocks: list = [[] for _ in range(world_size)]
    acc = 0
    for name, c in sizes:
        # Assign by the midpoint of the tensor's element range: contiguous and balanced.
        mid = acc + c / 2
        r = min(int(mid * world_size / total), world_size - 1) if total else 0
        blocks[r].append(name)
        acc += c
    return blocks


def _group(process_group):
    return None if process_group is True else process_group


def world_size(process_group) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group= given but torch.distributed is not initialised")
    return dist.get_world_size(_group(process_group))


def all_gather_masks(local: "OrderedDict[str, PackedMask]", process_group) -> "OrderedDict[str, PackedMask]":
    """Every process gets every process's masks, in rank-major order. Names/shapes travel as small
    objects; the bits as one flat uint8 tensor per rank (broadcast on the masks' device)."""
    import torch.distributed as dist

    group = _group(process_group)
    world = dist.get_world_size(group)
    device = next(iter(local.values())).device if local else torch.device("cpu")
    backend = dist.get_backend(group)
    if backend == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    info = [(n, tuple(m.shape), m._nnz) for n, m in local.items()]
    infos: list = [None] * world
    dist.all_gather_object(infos, info, group=group)
    seen: dict = {}
    for r, lst in enumerate(infos):
        for n, _, _ in lst:
            if n in seen:
                raise ValueError(f"parameter {n!r} is in the blocks of ranks {seen[n]} and {r}; "
                                 "each process must pass a disjoint block (see partition_names)")
            seen[n] = r
    out: "OrderedDict[str, PackedMask]" = OrderedDict()
    for r, lst in enumerate(infos):
        nbytes = [(math.prod(shape) + 7) // 8 for _, shape, _ in lst]
        if r == dist.get_rank(group):
            flat = (torch.cat([m.bits.reshape(-1) for m in local.values()]) if local
                    else torch.empty(0, dtype=torch.uint8)).to(device)
        else:
            flat = torch.empty(sum(nbytes), dtype=torch.uint8, device=device)
        if sum(nbytes):
            dist.broadcast(flat, src=dist.get_global_rank(group, r) if group is not None else r, group=group)
        off = 0
        for (n, shape, nnz), nb in zip(lst, nbytes):
            out[n] = PackedMask(flat[off:off + nb].clone(), shape, nnz)
            off += nb
    return out
