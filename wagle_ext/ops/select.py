"""Exact top-k selection by MSD radix select on the float keys, over many tensors and, with a
process group, many processes: the algorithm behind :func:`wagle_ext.ops.select_topk_mask`.

Inputs are validated by the caller (``wagle_ext.ops``); every primitive (histogram, key count,
mask pass) runs through the back end chosen for the device. Returns plain uint8 bit arrays
(the caller wraps them as masks).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels import reference
from ._backends import HIST_SIZE, _backend_has_collect, _impl

__all__ = ["select_bits", "collect_and_resolve", "selection_device"]


def select_bits(scores: list, k: int, largest: bool, hist: Optional[torch.Tensor], process_group,
                collect: Optional[Callable] = None) -> list:
    """Exact top-k bit arrays by MSD radix select on the float keys (docs/kernels.md 4.2):
    11 + 11 + 10 bit digit histograms, stopping as soon as the boundary bucket is taken whole, then
    one mask pass. Ties at an exact threshold key go to the lowest global index: per-tensor tie
    counts give each tensor its quota, in tensor order (rank-major across processes).

    ``collect``: the small-boundary-bucket fast path (:func:`collect_and_resolve`, chosen by the
    caller), used on one process when the back end has the fused ``topk_mask_collect`` pass."""
    # A rank may hold no tensors (multi-process); it still joins every collective.
    device = selection_device(scores, process_group)

    def op(name: str) -> Callable:
        # The dispatcher cannot route an empty tensor list: the reference handles it (no work).
        return _impl(name, device) if scores else getattr(reference, name)

    radix_histogram = lambda *a: op("radix_histogram")(*a).to(device)  # noqa: E731
    dist = None
    if process_group is not None:
        import torch.distributed as dist

    def reduce_(t: torch.Tensor) -> torch.Tensor:
        if dist is not None:
            dist.all_reduce(t, group=None if process_group is True else process_group)
        return t

    n_local = sum(s.numel() for s in scores)
    n_total = int(reduce_(torch.tensor([n_local], dtype=torch.int64, device=device)).item()) if dist else n_local
    if not 0 <= k <= n_total:
        raise ValueError(f"k must be in [0, {n_total}], got {k}")
    if hist is None:
        hist = radix_histogram(scores, 0, 0)
    else:
        hist = hist.to(device=device, copy=True)
        if int(hist.sum()) != n_local:
            raise ValueError(f"histogram counts {int(hist.sum())} scores but the scores have {n_local} elements")
    hist = reduce_(hist)
    if int(hist[HIST_SIZE - 1]) > 0:
        raise ValueError(f"scores contain {int(hist[HIST_SIZE - 1])} NaN values; NaN scores cannot be ranked")
    if k == 0 or k == n_total:
        fill = 0xFF if k else 0
        out = []
        for s in scores:
            b = torch.full(((s.numel() + 7) // 8,), fill, dtype=torch.uint8, device=device)
            if fill and s.numel() % 8:
                b[-1] = (1 << (s.numel() % 8)) - 1
            out.append(b)
        return out

    need = k
    prefix = 0
    prefix_bits = 0
    threshold = None
    for pb, shift, width in reference.RADIX_LEVELS:
        assert pb == prefix_bits
        h = hist[: 1 << width].cpu()
        order = h.flip(0) if largest else h
        cum = order.cumsum(0)
        pos = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)).item())
        above = int(cum[pos - 1]) if pos > 0 else 0
        digit = (len(order) - 1 - pos) if largest else pos
        count = int(h[digit])
        need -= above
        prefix = (prefix << width) | digit
        prefix_bits += width
        if count == need or prefix_bits == 32:
            # Whole bucket taken, or an exact key: threshold = the bucket's worst key.
            lo = prefix << (32 - prefix_bits)
            hi = lo | ((1 << (32 - prefix_bits)) - 1)
            threshold = lo if largest else hi
            exact_split = count != need
            break
        if (collect is not None and dist is None and scores and count <= max(1 << 16, n_total >> 9)
                and _backend_has_collect(device)):
            # Small boundary bucket: one pass writes the mask and returns the bucket's elements,
            # resolved here exactly (instead of another histogram pass plus a mask pass).
            return collect(scores, prefix, prefix_bits, largest, need)
        hist = reduce_(radix_histogram(scores, prefix, prefix_bits))
    assert threshold is not None
    if exact_split:
        counts = op("count_key")(scores, threshold).cpu()
        before = 0
        if dist is not None:
            world = dist.get_world_size(None if process_group is True else process_group)
            mine = counts.sum().reshape(1).to(device)
            gathered = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine, group=None if process_group is True else process_group)
            rank = dist.get_rank(None if process_group is True else process_group)
            before = int(sum(int(g.item()) for g in gathered[:rank]))
        remaining = max(need - before, 0)
        ties_take = []
        for c in counts.tolist():
            take = min(remaining, c)
            ties_take.append(take)
            remaining -= take
    else:
        ties_take = [-1] * len(scores)
    return op("topk_mask_bits")(scores, int(threshold), largest, ties_take)


def collect_and_resolve(scores: list, prefix: int, prefix_bits: int, largest: bool, need: int) -> list:
    """Mask pass + boundary-bucket candidates (``wagle::topk_mask_collect``), then the ``need``
    best candidates -- threshold by ``kthvalue``, ties to the lowest global index (candidates arrive
    in global order) -- set in the bit arrays. O(candidates), no sort."""
    bits, keys, tens, flat = _impl("topk_mask_collect", scores[0].device)(scores, prefix, prefix_bits, largest)
    c = keys.numel()
    thr = torch.kthvalue(keys, c - need + 1 if largest else need).values
    better = keys > thr if largest else keys < thr
    ties = keys == thr
    take = need - int(better.sum())
    chosen = better | (ties & (ties.cumsum(0) <= take))
    tens, flat = tens[chosen], flat[chosen]
    byte = flat >> 3
    val = (1 << (flat & 7)).to(torch.uint8)
    # Candidates are in tensor order, so each tensor's picks are one contiguous run.
    uniq, counts = torch.unique_consecutive(tens, return_counts=True)
    for t, b, v in zip(uniq.tolist(), byte.split(counts.tolist()), val.split(counts.tolist())):
        bits[t].index_add_(0, b, v)  # candidate bits are clear and distinct: adding sets them
    return list(bits)


def selection_device(scores: list, process_group) -> torch.device:
    """Device of the scores; for a rank without tensors, the device its collectives run on."""
    if scores:
        return scores[0].device
    if process_group is not None:
        import torch.distributed as dist

        group = None if process_group is True else process_group
        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
