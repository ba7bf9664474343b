"""Bounded-memory attribution: the scored parameters split into groups, each group's gradient
accumulators alive only during its own data passes (docs/algorithms.md 5.2).

:func:`plan_groups` cuts the parameters (in ``named_parameters()`` order) into consecutive groups
whose fp32 buffers fit a byte budget; :class:`GroupedScores` (what ``score_model(...,
memory_budget=)`` returns) runs the data passes of one group at a time -- every other parameter has
``requires_grad`` off, so backward neither computes nor keeps its gradient and stops below the
group's lowest layer -- and yields that group's :class:`ScoreDict`. ``build_mask(grouped, ratio)``
consumes the groups one by one with an exact streaming top-k, so the full score vector never exists.

Exactness: a parameter's accumulated gradient is computed by the same kernels on the same inputs
whether or not other parameters require gradients, and each group is scored by the same fused op
over the same accumulators, so the scores are bit-identical to the unbounded ``score_model`` (tested
on CPU); the selection is exact by construction (:mod:`wagle_ext.masks.streaming`).

Cost: ``len(groups)`` times the data passes of one unbounded run (forward over the whole model,
backward down to the group's lowest parameter); no disk.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch

from .gradients import _named_trainable

__all__ = ["GroupedScores", "accumulator_bytes_per_param", "parse_bytes", "plan_groups"]

logger = logging.getLogger("wagle_ext.attribution")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as ``"16GB"`` (10^9), ``"16GiB"`` (2^30), ``"512 MB"``,
    ``"1.5e9"``. Units (case-insensitive): B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB
    (powers of 1024). Must be > 0."""
    if isinstance(size, bool):
        raise TypeError("memory budget must be an int (bytes) or a string like '16GB', got a bool")
    if isinstance(size, int):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", size)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory budget {size!r}: expected a number with an optional unit "
                             "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '16GB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"memory budget must be an int (bytes) or a string like '16GB', got {type(size).__name__}")
    if n <= 0:
        raise ValueError(f"memory budget must be > 0 bytes, got {size!r}")
    return n


def accumulator_bytes_per_param(kind: str, hessian_estimated: bool = False) -> int:
    """fp32 bytes per scored weight that one group holds at its peak: ``wagle`` 8 (``g_r`` and
    ``g_f``; the scores overwrite ``g_f``), +4 when the Hessian diagonal is estimated; ``snip`` /
    ``gradient`` 4 (``g_f``); ``magnitude`` / ``random`` / ``wanda`` 4 (the scores)."""
    if kind == "wagle":
        return 12 if hessian_estimated else 8
    return 4


def plan_groups(
    model: torch.nn.Module,
    memory_budget: Union[int, str],
    *,
    kind: str = "wagle",
    hessian_estimated: bool = False,
    names: Optional[Sequence[str]] = None,
) -> List[List[str]]:
    """Consecutive groups of parameter names (``named_parameters()`` order, trainable ones, or
    ``names``) whose accumulators fit ``memory_budget`` bytes: each group's
    ``numel * accumulator_bytes_per_param(kind)`` <= budget, greedily (fewest groups for that order).

    The budget covers the attribution's per-weight fp32 buffers only: not the weights, the
    activations, the transient gradient of one parameter during backward, nor the selection state of
    ``build_mask`` (``wagle_ext.masks.streaming.selection_state_bytes``: numel/8 + 4 * selected).

    Raises:
        ValueError: one parameter alone needs more than the budget (the message names it and the
            smallest budget that works).
    """
    budget = parse_bytes(memory_budget)
    bpp = accumulator_bytes_per_param(kind, hessian_estimated)
    params = _named_trainable(model, names)
    if not params:
        raise ValueError("no parameter to score (none has requires_grad=True, or names= is empty)")
    biggest = max(params, key=lambda np_: np_[1].numel())
    if biggest[1].numel() * bpp > budget:
        need = biggest[1].numel() * bpp
        raise ValueError(f"memory budget {budget} B is smaller than the {bpp} B/weight accumulators of one "
                         f"parameter, {biggest[0]!r} ({biggest[1].numel()} weights: {need} B); a parameter is "
                         f"never split across groups, so the budget must be >= {need} B")
    groups: List[List[str]] = []
    cur: List[str] = []
    used = 0
    for n, p in params:
        b = p.numel() * bpp
        if cur and used + b > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += b
    groups.append(cur)
    return groups


class GroupedScores:
    """Scores of a model computed group by group (bounded memory); iterate to get one
    :class:`~wagle_ext.attribution.ScoreDict` per group, in parameter order.

    Pass it to :func:`wagle_ext.masks.build_mask` (global / per-tensor / per-row scope) to get the
    exact mask without ever holding all scores; :meth:`materialize` merges every group into one
    ScoreDict (4 B per weight) when that fits.

    Attributes:
        groups: ``list[list[str]]``, the parameter names of each group.
        shapes: ``OrderedDict[name, torch.Size]`` of every scored parameter, in order.
        info: the provenance of the scores, as ``ScoreDict.info`` of the unbounded run (complete after
            a full iteration: the WAGLE term norms need every group) plus ``"grouped"``: number of
            groups, budget, bytes per weight, data passes per group and in all.
        stats: after an iteration: ``seconds`` (total), ``group_seconds`` (list), ``data_passes``.

    Each iteration re-runs the data passes (``len(groups)`` x the passes of one unbounded run); a
    group's buffers are freed when the next group starts (drop your reference to the yielded dict).
    """

    def __init__(self, groups: List[List[str]], shapes: "OrderedDict[str, torch.Size]",
                 score_group: Callable[[int, List[str]], "OrderedDict"], finalize_info: Callable[[dict], None],
                 plan: dict):
        self.groups = groups
        self.shapes = shapes
        self._score_group = score_group
        self._finalize_info = finalize_info
        self.info: dict = {"grouped": dict(plan)}
        self.stats: dict = {}

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator["OrderedDict"]:
        t_all = time.perf_counter()
        group_seconds = []
        info: dict = {}
        for i, names in enumerate(self.groups):
            t0 = time.perf_counter()
            scores = self._score_group(i, names)
            group_seconds.append(time.perf_counter() - t0)
            if i == 0:
                info = dict(scores.info)
            yield scores
            del scores  # before the next group's accumulators are allocated
        self._finalize_info(info)
        info["grouped"] = self.info["grouped"]
        self.info = info
        self.stats = {"seconds": time.perf_counter() - t_all, "group_seconds": group_seconds,
                      "data_passes": self.info["grouped"]["data_passes"]}
        logger.info("grouped attribution: %d groups, %d data passes, %.1f s", len(self.groups),
                    self.stats["data_passes"], self.stats["seconds"])

    def materialize(self) -> "OrderedDict":
        """All groups merged into one ScoreDict (float32, 4 B per weight), equal to the unbounded
        ``score_model`` result (bit-identical scores, same ``.info`` plus ``"grouped"``)."""
        out = None
        for s in self:
            if out is None:
                out = type(s)(info={})
            out.update(s)
        assert out is not None
        out.info = dict(self.info)
        return out

    def __repr__(self) -> str:
        n = sum(math.prod(s) for s in self.shapes.values())
        return (f"GroupedScores({len(self.groups)} groups, {len(self.shapes)} tensors, {n} weights, "
                f"{self.info['grouped'].get('data_passes', '?')} data passes)")
