"""Exact global top-k over score tensors that arrive group by group, in bounded memory:
:class:`StreamingTopK`, the selection behind ``build_mask`` of grouped scores (bounded-memory
attribution, docs/algorithms.md 5.2).

Order: the tensors' global order is the order in which they are pushed (then flat index), and the
selection is the first ``k`` elements of the total order (score descending, global index ascending)
-- exactly :func:`wagle_ext.ops.select_topk_mask` over all tensors at once (ties to the lowest
index), so the masks are bit-identical.

Why pruning is exact: an element that has ``k`` elements before it in that order among the elements
seen so far also has them among all elements, so it can never be selected. After every push the
candidates are pruned to the top ``k`` of everything seen (one :func:`select_topk_mask` over the
candidates plus the new tensors), and after the last push the candidates ARE the top ``k``.

Memory: per tensor seen, a bit array of its candidate positions (1 bit per weight: the mask itself)
and the candidates' scores in flat order (score dtype, at most ``k`` in all); transiently, one
pushed group's selection bits and compacted scores. Time: one radix select over at most
``k + group elements`` per push.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch

from .._checks import FLOAT_DTYPES
from ..ops import PackedMask, select_topk_mask

__all__ = ["StreamingTopK", "selection_state_bytes"]


def selection_state_bytes(numel: int, ratio: float, score_bytes: int = 4) -> int:
    """Upper bound (bytes) of the memory a :class:`StreamingTopK` keeps between pushes for ``numel``
    scores and ``k = int(numel * ratio)``: candidate bits (numel / 8) + candidate scores
    (``score_bytes * k``). A push adds, transiently, the group's selection bits and its compacted
    selected scores (at most ``score_bytes * min(k, group numel)``)."""
    return (int(numel) + 7) // 8 + score_bytes * int(int(numel) * float(ratio))


class StreamingTopK:
    """Exact global top-``k`` of score tensors pushed in groups; :meth:`finish` returns the masks.

    Args:
        k: number of elements to select over everything that will be pushed (>= 0).

    Usage::

        sel = StreamingTopK(k)
        for group in groups:                  # e.g. the ScoreDicts of score_model(memory_budget=)
            sel.push(list(group.items()))     # the group's scores can be freed afterwards
        masks = sel.finish()                  # {name: PackedMask}, same bits as select_topk_mask

    Pushed tensors are read, never modified, and not kept (candidates are copied).
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        self.k = k
        self._names: list = []
        self._shapes: list = []
        self._pos: list = []   # uint8 bits over each tensor: candidate positions
        self._keys: list = []  # 1-D candidate scores, in flat order
        self._count = 0        # candidates kept (== min(k, elements seen))
        self._seen = 0
        self._finished = False
        self.pushes = 0

    @property
    def seen(self) -> int:
        """Elements pushed so far."""
        return self._seen

    @property
    def candidates(self) -> int:
        """Candidates kept now (``min(k, seen)``)."""
        return self._count

    def state_bytes(self) -> int:
        """Bytes held between pushes (candidate bits + candidate scores)."""
        return sum(p.numel() for p in self._pos) + sum(t.numel() * t.element_size() for t in self._keys)

    def push(self, items: Sequence[Tuple[str, torch.Tensor]]) -> None:
        """Add the next tensors in global order: ``[(name, scores), ...]`` (float32 / bfloat16 /
        float16, any shapes, no NaN, one device)."""
        if self._finished:
            raise RuntimeError("StreamingTopK.push after finish()")
        new = []
        for name, s in items:
            if not isinstance(s, torch.Tensor) or s.dtype not in FLOAT_DTYPES:
                raise TypeError(f"scores[{name!r}] must be a float32/bfloat16/float16 tensor")
            if name in self._names or any(name == n for n, _, _ in new):
                raise ValueError(f"{name!r} pushed twice")
            new.append((name, s.shape, s.detach().reshape(-1)))
        if not new:
            return
        self.pushes += 1
        total = self._count + sum(f.numel() for _, _, f in new)
        if total <= self.k:
            # Everything seen so far is still a candidate.
            for name, shape, flat in new:
                if flat.numel() and bool(torch.isnan(flat).any()):
                    raise ValueError(f"scores[{name!r}] contain NaN values; NaN scores cannot be ranked")
                self._append(name, shape, PackedMask.full(shape, True, device=flat.device).bits, flat.clone())
            self._count = total
        else:
            # Prune to the top k of (candidates, in global order) + (new tensors): one radix select.
            lists = self._keys + [f for _, _, f in new]
            nonempty = [i for i, t in enumerate(lists) if t.numel()]
            picked = select_topk_mask([lists[i] for i in nonempty], k=self.k)
            sel: list = [None] * len(lists)
            for i, pm in zip(nonempty, picked):
                sel[i] = pm
            n_old = len(self._keys)
            for i in range(n_old):
                if sel[i] is None or sel[i].nnz == lists[i].numel():
                    continue  # empty, or every candidate stays
                keep = sel[i].to_bool()
                pos = PackedMask(self._pos[i], self._shapes[i]).to_bool().reshape(-1)
                pos.masked_scatter_(pos.clone(), keep)  # candidate positions, in order <- keep flags
                self._pos[i] = PackedMask.from_bool(pos).bits
                self._keys[i] = self._keys[i][keep]
                del keep, pos
            for j, (name, shape, flat) in enumerate(new):
                pm = sel[n_old + j]
                if pm is None:
                    self._append(name, shape, PackedMask.full(shape, False, device=flat.device).bits, flat[:0].clone())
                else:
                    self._append(name, shape, pm.bits, flat[pm.to_bool()])
            self._count = self.k
        self._seen += sum(f.numel() for _, _, f in new)

    def _append(self, name, shape, pos_bits, keys) -> None:
        self._names.append(name)
        self._shapes.append(torch.Size(shape))
        self._pos.append(pos_bits)
        self._keys.append(keys)

    def finish(self) -> "OrderedDict[str, PackedMask]":
        """The masks ``{name: PackedMask}`` in push order: exactly ``k`` bits set in all.

        Raises:
            ValueError: fewer than ``k`` elements were pushed.
        """
        if self._seen < self.k:
            raise ValueError(f"k = {self.k} but only {self._seen} elements were pushed")
        self._finished = True
        out: "OrderedDict[str, PackedMask]" = OrderedDict()
        for name, shape, bits, keys in zip(self._names, self._shapes, self._pos, self._keys):
            out[name] = PackedMask(bits, shape, keys.numel())
        self._keys = []
        return out
