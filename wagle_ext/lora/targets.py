"""Attribution-guided adapter placement: put LoRA adapters on the modules that hold the most WAGLE
attribution mass, under an exact budget of trainable parameters (docs/lora.md, section "Placement").

The *mass* of a module is the number of its weights that a WAGLE mask selects (a :class:`MaskSet`,
or a score dict from which the global top-``ratio`` mask is built first, :func:`build_mask`). A LoRA
adapter of rank ``r`` on a ``[out, in]`` weight trains ``r * (in + out)`` parameters (no bias).
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..masks import MaskSet, build_mask
from ..naming import LAYER_RE, normalize_param_name

__all__ = ["LoraPlacement", "select_lora_targets", "lora_param_count"]


def lora_param_count(shape, rank: int) -> int:
    """Trainable parameters of a rank-``rank`` LoRA adapter on a 2-D weight of ``shape``: ``rank *
    (shape[0] + shape[1])`` (the same for ``nn.Linear`` ``[out, in]`` and ``Conv1D`` ``[in, out]``)."""
    if len(shape) != 2:
        raise ValueError(f"LoRA adapts 2-D weights, got shape {tuple(shape)}")
    return int(rank) * (int(shape[0]) + int(shape[1]))


@dataclasses.dataclass
class LoraPlacement:
    """Where adapters go. ``ranks``: ``{module name (normalised, no .weight): rank}`` in decreasing mass
    order; ``mass``: every candidate module's mass (selected weights); ``trainable``: LoRA parameters of
    the placement (always ``<= budget``)."""

    ranks: Dict[str, int]
    mass: Dict[str, int]
    shapes: Dict[str, tuple]
    budget: int
    trainable: int
    proportional: bool

    @property
    def targets(self) -> List[str]:
        return list(self.ranks)

    def lora_config_kwargs(self, alpha_ratio: float = 2.0) -> dict:
        """Keyword arguments of ``peft.LoraConfig`` placing exactly these adapters: ``target_modules``
        (exact module names), ``r`` (the most common rank) and ``rank_pattern`` / ``alpha_pattern`` for the
        others; ``lora_alpha = alpha_ratio * rank`` per module (LoKU: 2)."""
        if not self.ranks:
            raise ValueError("the placement holds no module")
        counts: dict = {}
        for r in self.ranks.values():
            counts[r] = counts.get(r, 0) + 1
        r0 = max(counts, key=lambda r: (counts[r], r))
        # PEFT matches a pattern key k against a module name by re.match(rf"(.*\.)?({k})$"): escape it
        other = {re.escape(m): r for m, r in self.ranks.items() if r != r0}
        return {"target_modules": list(self.ranks), "r": r0, "lora_alpha": alpha_ratio * r0,
                "rank_pattern": other, "alpha_pattern": {k: alpha_ratio * r for k, r in other.items()}}


def _module_masses(scores_or_maskset, ratio: float, model: Optional[torch.nn.Module], modules=None):
    if isinstance(scores_or_maskset, MaskSet):
        mask = scores_or_maskset
    elif isinstance(scores_or_maskset, Mapping):
        if not scores_or_maskset:
            raise ValueError("the score dict is empty")
        mask = build_mask(scores_or_maskset, ratio, model=model)
    else:
        raise TypeError(f"scores_or_maskset must be a wagle_ext.MaskSet or a {{name: score tensor}} dict, "
                        f"got {type(scores_or_maskset).__name__}")
    allowed = None
    if model is not None:
        from .fisher import lora_target_modules

        allowed = {normalize_param_name(n + ".weight")[: -len(".weight")] for n in lora_target_modules(model, modules)}
    mass: "OrderedDict[str, int]" = OrderedDict()
    shapes: dict = {}
    for name, pm in mask.items():
        name = normalize_param_name(name)
        if not name.endswith(".weight") or len(pm.shape) != 2 or LAYER_RE.search(name) is None:
            continue
        mod = name[: -len(".weight")]
        if mod.split(".")[-1] == "lm_head" or (allowed is not None and mod not in allowed):
            continue
        mass[mod] = int(pm.nnz)
        shapes[mod] = tuple(int(d) for d in pm.shape)
    if not mass:
        raise ValueError("no decoder-layer 2-D weight among the mask's entries: nothing to place adapters on")
    return mass, shapes


def select_lora_targets(
    scores_or_maskset: Union[MaskSet, Mapping[str, torch.Tensor]],
    budget: int,
    *,
    rank: int = 8,
    proportional: bool = False,
    ratio: float = 0.1,
    model: Optional[torch.nn.Module] = None,
    modules: Optional[Sequence[str]] = None,
    min_rank: int = 1,
) -> LoraPlacement:
    """Choose the modules (and ranks) of LoRA adapters from WAGLE attribution, within ``budget``.

    Args:
        scores_or_maskset: a WAGLE :class:`MaskSet`, or ``{weight name: score}`` (the global top
            ``ratio`` is selected first). Only 2-D weights inside decoder layers are candidates
            (never embeddings or ``lm_head``); with ``model`` only its linear layers.
        budget: trainable LoRA parameters allowed (an int >= 1). The placement's count is ``<= budget``.
        rank: ``proportional=False``: every chosen module gets this rank; modules are taken in
            decreasing mass, skipping one that no longer fits, until none fits.
        proportional: ranks proportional to mass: module ``m`` gets ``floor(budget * mass_m / total
            mass / (in_m + out_m))``; modules below ``min_rank`` are dropped; leftover budget then
            raises ranks one at a time in decreasing mass while it fits.
        ratio: the selected fraction when scores are given.
        model: restrict candidates to this model's linear layers (recommended).
        modules: with ``model``: only these module names (``["q_proj", "v_proj"]``, as
            :func:`~wagle_ext.lora.lora_target_modules`).
        min_rank: smallest rank placed with ``proportional``.

    Returns:
        :class:`LoraPlacement`. Modules with zero mass are never chosen.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 (trainable parameters), got {budget!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    if modules is not None and model is None:
        raise ValueError("modules= needs model= (the module names are resolved on the model)")
    mass, shapes = _module_masses(scores_or_maskset, ratio, model, modules)
    order = sorted((m for m in mass if mass[m] > 0), key=lambda m: -mass[m])  # stable: ties in model order
    if not order:
        raise ValueError("every candidate module has zero attribution mass: nothing to rank")
    cost = {m: sum(shapes[m]) for m in order}  # parameters per unit of rank
    ranks: "OrderedDict[str, int]" = OrderedDict()
    left = budget
    if not proportional:
        for m in order:
            c = rank * cost[m]
            if c <= left:
                ranks[m] = rank
                left -= c
    else:
        total = sum(mass[m] for m in order)
        for m in order:
            r = (budget * mass[m]) // (total * cost[m])  # exact integer floor: sum r*cost <= budget
            r = min(r, min(shapes[m]))
            if r >= min_rank:
                ranks[m] = int(r)
                left -= r * cost[m]
        grown = True
        while grown:  # spend what the floors left, highest mass first
            grown = False
            for m in order:
                if m in ranks and cost[m] <= left and ranks[m] < min(shapes[m]):
                    ranks[m] += 1
                    left -= cost[m]
                    grown = True
        ranks = OrderedDict((m, ranks[m]) for m in order if m in ranks)
    if not ranks:
        cheapest = min(order, key=lambda m: cost[m])
        r = min_rank if proportional else rank
        raise ValueError(f"budget {budget} is below the cost of one adapter (rank {r} on {cheapest}: "
                         f"{r * cost[cheapest]} parameters)")
    trainable = sum(r * cost[m] for m, r in ranks.items())
    assert trainable <= budget
    return LoraPlacement(ranks=dict(ranks), mass=dict(mass), shapes=shapes, budget=budget, trainable=trainable,
                         proportional=bool(proportional))
