"""DeepSpeed ZeRO: a config and the masked-gradient path (DeepSpeed's own optimizer, masks as hooks).

Why MaskedAdamW is not a ZeRO client optimizer: from stage 1 on, DeepSpeed flattens the parameters
of each group into one fp32 buffer, cuts it into per-rank partitions and hands the optimizer those
flat partitions in place of the parameters (``deepspeed/runtime/zero/stage_1_and_2.py``). A mask is
defined per parameter and its compact state by the parameter's element order; a partition boundary
falls anywhere inside a parameter, so the optimizer would have to re-derive every mask and
directory per partition. Stage 0 (no partitioning) keeps the parameters and can take MaskedAdamW as
it is.

The ZeRO path here instead keeps DeepSpeed's optimizer and makes it update only the selected
weights (:func:`mask_gradients_for_zero`):

* a parameter whose mask selects nothing gets ``requires_grad=False`` before
  ``deepspeed.initialize``: DeepSpeed leaves it out (no gradient, no state, bit-identical);
* every other masked parameter gets a tensor hook that multiplies its gradient by the mask before
  DeepSpeed sees it, so the moments of unselected elements stay exactly zero and their Adam update
  is ``0 / (sqrt(0) + eps) = 0``;
* decoupled weight decay cannot be restricted to elements, so a partly selected parameter goes to
  a group without weight decay (``exact=True``, the default: unselected weights bit-identical, the
  selected ones are not decayed either) or keeps its decay (``exact=False``: MaskedAdamW's
  ``weight_decay_mode="all"``, WAGLE's ``p.grad *= mask`` + AdamW -- frozen weights shrink by
  ``1 - lr*wd`` per step).

What is exact and what is not: the selected weights follow DeepSpeed's AdamW on the masked
gradient (torch AdamW arithmetic, the same update as MaskedAdamW to fp32 rounding; DeepSpeed's CPU
Adam and fused GPU kernels are different code); the gradient norm DeepSpeed clips is that of the
masked gradient (unselected entries are zero), as MaskedAdamW's. The memory saving of compact state
is lost: DeepSpeed keeps dense fp32 moments (and master weights) for every trainable parameter,
divided by the world size. Under ZeRO-3 the hook sees the whole gradient of the gathered
parameter before the reduce-scatter, so the whole-parameter masks apply unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..naming import is_adapter_param
from ..ops import PackedMask

__all__ = ["deepspeed_config", "mask_gradients_for_zero"]


def deepspeed_config(stage: int = 2, *, bf16: Any = "auto", offload_optimizer: bool = False,
                     gradient_clipping: Optional[float] = 1.0, lr: Any = "auto", weight_decay: Any = "auto",
                     betas: Any = "auto", eps: Any = "auto") -> dict:
    """A DeepSpeed config dict for the masked-gradient ZeRO path (DeepSpeed's AdamW).

    Args:
        stage: ZeRO stage, 0-3.
        bf16: enable bf16 (DeepSpeed keeps fp32 master weights of every trainable parameter);
            ``"auto"`` (default): as ``TrainingArguments(bf16=)`` says.
        offload_optimizer: ZeRO-Offload of the optimizer state to CPU (stages 1-3).
        gradient_clipping: max gradient norm (None/0: off); the norm is the masked gradient's.
        lr, weight_decay, betas, eps: AdamW hyperparameters; ``"auto"`` lets the HF Trainer /
            accelerate fill them from ``TrainingArguments``.

    Returns:
        dict with ``zero_optimization``, ``optimizer`` (AdamW), ``bf16``, batch sizes ``"auto"``;
        ``json.dump`` it for ``accelerate``'s ``deepspeed_config_file`` or ``TrainingArguments(deepspeed=)``.
    """
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1-3")
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": float(gradient_clipping) if gradient_clipping else 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "betas": betas,
                                                  "eps": eps, "torch_adam": True}},
        "bf16": {"enabled": bf16 if bf16 == "auto" else bool(bf16)},
        "zero_optimization": zero,
    }


def mask_gradients_for_zero(model: torch.nn.Module, masks: Mapping[str, Optional[PackedMask]], *,
                            weight_decay: float, missing: Optional[str] = None, exact: bool = True) -> tuple:
    """Prepare ``model`` for DeepSpeed's optimizer so that only masked weights move (see module doc).

    Args:
        model: the unwrapped model, before ``deepspeed.initialize`` / ``accelerator.prepare``.
        masks: ``{parameter name: whole-parameter PackedMask or None (dense)}`` or a
            :class:`~wagle_ext.masks.MaskSet` (its ``missing`` applies to uncovered parameters;
            PEFT adapter weights stay dense).
        weight_decay: the decay of the fully trained parameters (dense ones and, with
            ``exact=False``, the partly selected ones).
        missing: ``"frozen"`` / ``"dense"`` for trainable parameters without an entry; None: the
            MaskSet's, ``"dense"`` for a dict.
        exact: True: partly selected parameters get no weight decay (unselected weights stay
            bit-identical); False: they decay like dense ones (``weight_decay_mode="all"``).

    Returns:
        ``(param_groups, handles)``: groups for ``deepspeed.initialize(model_parameters=...)`` (or
        a client-side ``torch.optim.AdamW``), and the hook handles (``h.remove()`` to undo the
        masking; ``requires_grad`` of frozen parameters is not restored).
    """
    from ..masks import MaskSet

    if isinstance(masks, MaskSet):
        if missing is None:
            missing = masks.missing
        masks = masks.for_model(model)
    if missing is None:
        missing = "dense"
    if missing not in ("dense", "frozen"):
        raise ValueError(f"missing must be 'frozen' or 'dense', got {missing!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = [k for k in masks if k not in dict(named)]
    if unknown:
        raise KeyError(f"masks given for parameters that the model does not have (or that are frozen): {unknown[:5]}")
    decayed, partial, handles = [], [], []
    for name, p in named:
        m = masks.get(name)
        if m is None and name not in masks and missing == "frozen" and not is_adapter_param(name):
            m = PackedMask.full(p.shape, False)
        if m is None:
            decayed.append(p)
            continue
        if isinstance(m, torch.Tensor):
            m = PackedMask.from_bool(m)
        if m.shape != p.shape:
            raise ValueError(f"mask of {name!r} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
        if m.nnz == 0:
            p.requires_grad_(False)  # DeepSpeed leaves it out: no gradient, no state
            continue
        if m.nnz == m.numel:
            decayed.append(p)
            continue
        bits, shape = m.bits, m.shape

        def hook(grad: torch.Tensor, bits=bits, shape=shape) -> torch.Tensor:
            keep = PackedMask(bits.to(grad.device), shape).to_bool()  # unpacked per call: 1 B/elem transient
            return grad * keep

        handles.append(p.register_hook(hook))
        (partial if exact else decayed).append(p)
    groups = [{"params": decayed, "weight_decay": float(weight_decay)}]
    if partial:
        groups.append({"params": partial, "weight_decay": 0.0})
    return [g for g in groups if g["params"]], handles
