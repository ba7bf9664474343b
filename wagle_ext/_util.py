"""Loop plumbing shared by the layers that run a model over data (attribution, evaluation): the
model's device, moving a batch there, and an optional progress bar. Imports nothing from
``wagle_ext`` (bottom layer)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch

__all__ = ["model_device", "progress", "to_device"]


def model_device(model: Any) -> torch.device:
    """Device of ``model``: its ``device`` attribute when it has one (Hugging Face models), else
    its first parameter's, else CPU."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters() if hasattr(model, "parameters") else ():
        return p.device
    return torch.device("cpu")


def to_device(batch: Mapping, device: torch.device) -> dict:
    """The batch dict with every tensor moved to ``device`` (non-blocking); other values as they are."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: Optional[int] = None) -> Iterable:
    """``iterable`` behind a tqdm bar when ``enabled`` (and tqdm imports), else ``iterable`` itself."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but do not fail a run over a progress bar
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)
