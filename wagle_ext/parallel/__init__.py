"""MaskedAdamW beyond one process: FSDP2 checkpoints, compact gradients under DDP, DeepSpeed configs.

The optimizer itself handles FSDP2 parameters (DTensors): it updates each rank's local shard with
that shard's piece of the whole-parameter mask (:mod:`wagle_ext.masks.sharding`). This package holds
what sits around it:

* ``checkpoint``: :func:`sharded_state_dict` / :func:`load_sharded_state_dict`, the optimizer state in
  a form ``torch.distributed.checkpoint`` (DCP) can save at one world size and load at another;
* ``ddp``: :func:`register_compact_ddp_hook`, a DDP communication hook that compacts each gradient
  bucket to the selected entries *before* the all-reduce, so ``grad_mode="compact"`` works under
  DDP and the all-reduce carries ``nnz`` instead of ``numel`` values;
* ``deepspeed``: :func:`deepspeed_config`, a ZeRO config for the documented DeepSpeed path (masked
  gradients + frozen parameters with DeepSpeed's own optimizer), and why MaskedAdamW itself is not
  a ZeRO client optimizer.

Layer: beside ``optim`` (rank 5): imports ``optim``, ``masks`` and ``ops``; ``optim`` does not import it.
"""
from .checkpoint import load_sharded_state_dict, sharded_state_dict
from .ddp import register_compact_ddp_hook
from .deepspeed import deepspeed_config, mask_gradients_for_zero

__all__ = ["sharded_state_dict", "load_sharded_state_dict", "register_compact_ddp_hook", "deepspeed_config",
           "mask_gradients_for_zero"]
