"""Shared Python validation: one source per contract.

Every rule that more than one layer enforces lives here once (the float dtypes a kernel takes, the
``ratio`` of a selection, a finite hyperparameter, the grad-mode rules of :class:`MaskedAdamW`), and
the layers call it instead of restating it. Imports nothing from ``wagle_ext``: the bottom layer.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "FLOAT_DTYPES",
    "GRAD_MODES",
    "WEIGHT_DECAY_MODES",
    "as_tensor_list",
    "check_float",
    "check_like",
    "check_ratio",
    "check_hyper",
    "check_grad_mode",
    "check_weight_decay_mode",
    "check_batch_size",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: MaskedAdamW gradient handling: ``p.grad`` read at ``step()`` or compacted in backward hooks.
GRAD_MODES = ("dense", "compact")
#: MaskedAdamW decoupled weight decay: selected weights only, every weight, or none.
WEIGHT_DECAY_MODES = ("masked", "all", "none")
#: ``rounding=`` choices of :class:`~wagle_ext.MaskedAdamW` (how master weights are written back).
ROUNDINGS = ("nearest", "stochastic")


def as_tensor_list(x: Any, name: str) -> list:
    """A tensor or a sequence of tensors as a list (a dict is refused: its order is the caller's)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        raise TypeError(f"{name} must be a sequence of tensors; for a dict pass list(d.values())")
    try:
        out = list(x)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(x).__name__}") from None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """``t`` is a kernel float tensor with ``ref``'s shape and device."""
    check_float(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_ratio(ratio: Any) -> None:
    """The fraction of weights selected for update: a finite number in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1) \
            or not math.isfinite(ratio):
        raise ValueError(f"ratio must be in (0, 1] (the fraction of weights selected for update), got {ratio!r}")


def check_hyper(name: str, value: Any, lo=None, lo_open=False, hi=None, hi_open=False) -> float:
    """A finite number (or one-element tensor) in the given range, as a float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def check_weight_decay_mode(weight_decay_mode: Any) -> None:
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")


def check_grad_mode(grad_mode: Any, step_in_backward: bool = False, weight_decay_mode: str = "masked") -> None:
    """The optimizer-level grad-mode rules (the trainer and the config add their own context):
    a known ``grad_mode``; ``step_in_backward`` only with compact gradients; compact gradients
    cannot carry ``weight_decay_mode="all"`` (frozen weights have no gradient to carry their decay)."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if step_in_backward and grad_mode != "compact":
        raise ValueError("step_in_backward=True needs grad_mode='compact'")
    if grad_mode == "compact" and weight_decay_mode == "all":
        raise ValueError("grad_mode='compact' does not support weight_decay_mode='all' (frozen weights have "
                         "no gradient to carry their decay); use grad_mode='dense'")


def check_master_weights(master_weights: Any, rounding: Any = "nearest", seed: Any = 0) -> None:
    """``MaskedAdamW``'s master-weight settings: ``master_weights`` None (auto: on for bf16/fp16
    parameters), True or False; ``rounding`` in :data:`ROUNDINGS` (stochastic needs master weights);
    ``seed`` an int in [0, 2^63)."""
    if master_weights not in (None, True, False):
        raise TypeError(f"master_weights must be None, True or False, got {master_weights!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "stochastic" and master_weights is False:
        raise ValueError("rounding='stochastic' writes back master weights: it needs master_weights=True (or None)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
