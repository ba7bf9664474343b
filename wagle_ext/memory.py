"""Memory accounting of an unlearning run: what the weights, gradients, optimizer state and masks
hold right now, next to what dense AdamW would hold for the same trainable parameters.

Counts tensor storage only (``numel * element_size`` of each distinct tensor), not activations,
allocator caches or the Python process; peak process memory is measured by ``bench/bench_memory.py``.
Under FSDP2 (DTensor parameters) everything is this process's: its shards, its optimizer state.
"""
from __future__ import annotations

from typing import Optional

import torch

from .masks.sharding import local_tensor

__all__ = ["memory_report", "format_memory_report"]


def _nbytes(t: torch.Tensor) -> int:
    t = local_tensor(t)  # FSDP2: this process's shard
    return t.numel() * t.element_size()


def _numel(t: torch.Tensor) -> int:
    return local_tensor(t).numel()


def memory_report(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Bytes held by ``model`` and ``optimizer``, by kind.

    Returns a dict of ints (bytes, except the ``*_params`` counts):
        ``weights``: every distinct parameter of the model (tied weights counted once);
        ``gradients``: ``p.grad`` tensors alive now, plus the compact gradient buffers of a
        :class:`~wagle_ext.MaskedAdamW` in ``grad_mode="compact"``;
        ``optimizer_state``: tensors in ``optimizer.state`` (MaskedAdamW: the compact moments,
        compact fp32 master weights and step offsets; torch AdamW: dense ``exp_avg``/``exp_avg_sq``);
        ``master_weights``: the fp32 master copies among them (MaskedAdamW: 4 B per selected
        element of a bf16/fp16 parameter; 0 for other optimizers), already in ``optimizer_state``;
        ``masks``: MaskedAdamW's mask bits and chunk directories (0 for other optimizers);
        ``total``: the sum of the four;
        ``trainable_params`` / ``frozen_params``: parameter counts by ``requires_grad``;
        ``dense_adamw``: what weights + dense gradients (parameter dtype) + two fp32 moments per
        trainable weight + an fp32 master copy of each bf16/fp16 trainable weight would take
        (16 B/param for fp32 weights, 16 B/param for bf16 weights in mixed precision) -- the
        footprint of plain ``torch.optim.AdamW`` with ``p.grad *= mask`` (and fp32 master weights).
    """
    seen = set()
    weights = grads = trainable = frozen = trainable_bytes = low_precision = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += _nbytes(p)
        if p.requires_grad:
            trainable += _numel(p)
            trainable_bytes += _nbytes(p)
            low_precision += _numel(p) if p.dtype in (torch.bfloat16, torch.float16) else 0
        else:
            frozen += _numel(p)
        if p.grad is not None:
            grads += _nbytes(p.grad)
    from .optim import MaskedAdamW

    opt_state = masks = master = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    opt_state += _nbytes(v)
        if isinstance(optimizer, MaskedAdamW):
            sb = optimizer.state_bytes()
            masks = sb["masks"] + sb["directory"]
            master = sb["master_weights"]
            grads += optimizer.compact_grad_bytes()
            # Parameters the optimizer froze (all-zero mask) count as trainable for the dense baseline.
            for p in optimizer._frozen:
                trainable += _numel(p)
                frozen -= _numel(p)
                trainable_bytes += _nbytes(p)
                low_precision += _numel(p) if p.dtype in (torch.bfloat16, torch.float16) else 0
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer_state": opt_state,
        "masks": masks,
        "master_weights": master,
        "total": weights + grads + opt_state + masks,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "dense_adamw": weights + trainable_bytes + 8 * trainable + 4 * low_precision,
    }


def format_memory_report(report: dict) -> str:
    """One line: ``weights 1.90 GB, gradients 0.02 GB, ...`` (GB = 1e9 bytes)."""
    keys = ("weights", "gradients", "optimizer_state", "master_weights", "masks", "total", "dense_adamw")
    return ", ".join(f"{k} {report[k] / 1e9:.3f} GB" for k in keys)
