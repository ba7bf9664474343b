"""Wrapping a causal LM in PEFT LoRA adapters, with the default or the FILA initialisation and on
all decoder linears or on a :class:`~wagle_ext.lora.targets.LoraPlacement` (docs/lora.md).
``peft`` is an optional dependency (``pip install wagle-ext[peft]``)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .fila import fila_init
from .fisher import FisherImportance, lora_target_modules
from .targets import LoraPlacement

__all__ = ["add_lora", "require_peft", "LORA_INITS"]

LORA_INITS = ("default", "fila")


def require_peft():
    """The ``peft`` module, or an ``ImportError`` that says how to install it."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a test dependency
        raise ImportError("LoRA unlearning needs peft: pip install 'wagle-ext[peft]'") from e
    return peft


def add_lora(
    model: torch.nn.Module,
    *,
    rank: int = 8,
    alpha: Optional[float] = None,
    targets: Union[None, str, Sequence[str], LoraPlacement] = None,
    init: str = "default",
    importances: Optional[FisherImportance] = None,
    dropout: float = 0.0,
    seed: int = 0,
):
    """``peft.get_peft_model(model, LoraConfig(...))`` with LoKU's settings, then the chosen init.

    Args:
        model: a Hugging Face causal LM (it is wrapped in place: PEFT injects its layers into it).
        rank: LoRA rank ``r`` (ignored for a :class:`LoraPlacement`, which carries its ranks).
        alpha: ``lora_alpha``; default ``2 * rank`` (LoKU), per module for a placement.
        targets: ``None`` / ``"all-linear"`` (every linear layer of the decoder blocks), module-name
            suffixes (``["q_proj", "v_proj"]``), or a :class:`LoraPlacement` (exact modules and ranks).
            ``lm_head`` is never adapted.
        init: ``"default"`` (PEFT's: ``lora_B = 0``) or ``"fila"`` (needs ``importances``).
        dropout: ``lora_dropout`` (LoKU: 0).
        seed: seeds PEFT's random ``lora_A`` and FILA's randomized SVD (the global RNG is restored).

    Returns:
        the ``peft.PeftModel``; only adapter weights require grad.
    """
    peft = require_peft()
    if init not in LORA_INITS:
        raise ValueError(f"init must be one of {', '.join(LORA_INITS)}, got {init!r}")
    if init == "fila" and importances is None:
        raise ValueError("init='fila' needs importances=wagle_ext.fisher_importance(model, forget_loader, "
                         "retain_loader)")
    if isinstance(targets, LoraPlacement):
        kw = targets.lora_config_kwargs(alpha_ratio=2.0 if alpha is None else alpha / rank)
    else:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        names = lora_target_modules(model, targets)
        kw = {"target_modules": list(names), "r": rank, "lora_alpha": 2.0 * rank if alpha is None else alpha}
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in lora_target_modules(model, None).values())
    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=dropout, bias="none",
                             fan_in_fan_out=fan_in_fan_out, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model, config)
    if init == "fila":
        fila_init(peft_model, importances, seed=seed)
    return peft_model
