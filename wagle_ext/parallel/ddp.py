"""Compact gradients under DDP: compact each gradient bucket before its all-reduce.

Why a communication hook: ``MaskedAdamW(grad_mode="compact")`` compacts a gradient in a
post-accumulate-grad hook, which under DDP runs on the *local* gradient, before DDP's all-reduce.
DDP instead calls a registered communication hook once per bucket, after every gradient of the
bucket is accumulated and before anything is sent (``DistributedDataParallel.register_comm_hook``).
:func:`register_compact_ddp_hook` installs one that

1. gathers the selected entries of every gradient of the bucket into one float32 vector (the mask's
   compact layout, the same ``gather_masked`` the single-process hook uses; a parameter without a
   mask contributes its whole gradient),
2. divides it by the world size and all-reduces it (sum), as DDP's default hook does to the whole
   bucket -- so the all-reduce carries ``nnz`` values instead of ``numel``,
3. stores the reduced pieces as the optimizer's compact gradients (adding to what an earlier
   backward of the same step left there) and zeroes the bucket, so ``p.grad`` holds zeros, never a
   gradient that was not reduced.

Exactness: each selected entry goes through the same operations as in dense DDP (divide by the
world size, sum over ranks), so for fp32 gradients and two ranks the compact gradients equal the
masked entries of dense DDP's reduced gradients bit for bit (``a + b`` is commutative); with more
ranks the summation order of the all-reduce may differ with the vector length (fp32 rounding).
bf16/fp16 gradients are compacted to fp32 before the all-reduce, so they are summed in fp32 where
dense DDP sums them in their own dtype. Gradient accumulation
with ``no_sync()`` works as in DDP: the gradient accumulates locally in ``p.grad`` and the hook
compacts the sum at the synchronising backward.

Memory: DDP's buckets are dense, so the gradient memory is DDP's (the saving of compact mode under
DDP is the all-reduce volume, not the buffers). Create the optimizer *before* wrapping the model in
DDP: it sets ``requires_grad=False`` on parameters whose mask selects nothing, and DDP must not
expect gradients for them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops
from ..optim import MaskedAdamW

__all__ = ["register_compact_ddp_hook"]


class _HookState:
    """What the hook needs: the optimizer and the process group (kept by DDP with the hook)."""

    def __init__(self, opt: MaskedAdamW, group: Optional[Any]):
        self.opt = opt
        self.group = group


def _compact_allreduce_hook(state: _HookState, bucket):  # returns Future[Tensor]; DDP rejects a string annotation
    import torch.distributed as dist

    opt = state.opt
    world = dist.get_world_size(state.group)
    pieces, owners = [], []
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        if p not in opt._masks:
            raise RuntimeError("the DDP model has a parameter that the MaskedAdamW of register_compact_ddp_hook "
                               "does not hold: build the optimizer over every trainable parameter of the model")
        mask = opt.mask_of(p)
        if mask is None:
            piece = g.detach().reshape(-1).to(torch.float32, copy=True)
        else:
            nnz = opt._nnz(p)
            if nnz == 0:
                continue
            piece = torch.empty(nnz, dtype=torch.float32, device=g.device)
            # masks were validated by the optimizer; g has p's shape (a view of DDP's bucket)
            ops.gather_masked_prevalidated_(piece, g.detach(), mask.bits, opt._directory(p), False)
        pieces.append(piece)
        owners.append(p)
    buffer = bucket.buffer()
    flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float32, device=buffer.device)
    flat.div_(world)
    fut = dist.all_reduce(flat, group=state.group, async_op=True).get_future()

    def store(f: torch.futures.Future) -> torch.Tensor:
        reduced = f.value()[0]
        off = 0
        for p, piece in zip(owners, pieces):
            view = reduced[off:off + piece.numel()]
            off += piece.numel()
            buf = opt._cgrads.get(p)
            if p in opt._cgrad_ready:
                buf.add_(view)
            elif buf is not None and buf.shape == view.shape:
                buf.copy_(view)
            else:
                opt._cgrads[p] = view.clone()
            opt._cgrad_ready.add(p)
        buffer.zero_()
        return buffer

    return fut.then(store)


def register_compact_ddp_hook(ddp_model: torch.nn.Module, optimizer: MaskedAdamW,
                              process_group: Optional[Any] = None) -> None:
    """Make ``optimizer`` (``grad_mode="compact"``) receive all-reduced compact gradients under DDP.

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` wrapping the model whose
            parameters ``optimizer`` holds (built before the wrap; see the module docstring).
        optimizer: a :class:`~wagle_ext.optim.MaskedAdamW` with ``grad_mode="compact"``
            (``step_in_backward`` is not supported: the update needs the reduced gradient).
        process_group: DDP's process group (None: the default group).

    Call once, before the first backward. The optimizer's own post-accumulate-grad hooks stop
    compacting (they would see unreduced gradients); ``step()``, ``clip_grad_norm_`` and
    ``zero_grad`` work on the reduced compact gradients as in one process.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    if not isinstance(optimizer, MaskedAdamW):
        raise TypeError(f"optimizer must be a MaskedAdamW, got {type(optimizer).__name__}")
    if optimizer.grad_mode != "compact":
        raise ValueError("register_compact_ddp_hook needs MaskedAdamW(grad_mode='compact'); dense mode works under "
                         "DDP as it is")
    if optimizer.step_in_backward:
        raise ValueError("step_in_backward=True updates inside the backward, before DDP has reduced the gradient: "
                         "not supported under DDP")
    held = set(optimizer._all_params())
    stray = [n for n, p in ddp_model.module.named_parameters() if p.requires_grad and p not in held]
    if stray:
        raise ValueError(f"parameters of the DDP model that the optimizer does not hold: {stray[:5]}")
    optimizer._reduced_externally = True
    ddp_model.register_comm_hook(_HookState(optimizer, process_group), _compact_allreduce_hook)
