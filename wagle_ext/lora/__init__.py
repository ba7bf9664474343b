"""Parameter-efficient unlearning with LoRA adapters (through ``peft``, an optional dependency):
LoKU's Fisher importances and FILA initialisation, attribution-guided adapter placement, and exports
that survive FILA's modified base weights. Design note: docs/lora.md.

* :func:`fisher_importance` (``fisher``): token-weighted empirical Fisher of the target linears on the
  forget and retain data, through the attribution layer's gradient accumulation.
* :func:`fila_init` (``fila``): Fisher-weighted low-rank init of ``lora_A``/``lora_B`` with the base
  weight replaced by the residual (same logits at init).
* :func:`select_lora_targets` (``targets``): modules ranked by WAGLE mask mass, within an exact
  trainable-parameter budget.
* :class:`InitialAdapterReference` (``reference``): the frozen reference (NPO, KL) of a LoRA model whose
  adapters start non-zero, without a copy of the base weights.
* :func:`add_lora` (``adapters``): the PEFT model, default or FILA init, all linears or a placement.
* :func:`save_merged`, :func:`save_adapter_with_base`, :func:`save_base`, :func:`load_adapter_with_base` (``export``).

Layer: rank 5 (beside ``optim``): it imports ``attribution`` and ``masks``; the trainer (``unlearn``)
imports its reference model and FILA mark, the ``wagle`` jobs (``app``) the rest.
"""
from .adapters import LORA_INITS, add_lora
from .export import base_state_dict, load_adapter_with_base, save_adapter_with_base, save_base, save_merged
from .fila import FILA_MARK, fila_init, lora_layers
from .reference import InitialAdapterReference, adapters_are_zero
from .fisher import (GPT2_TARGETS, LLAMA_TARGETS, PHI_TARGETS, FisherImportance, fisher_importance, label_token_count,
                     lora_target_modules)
from .targets import LoraPlacement, lora_param_count, select_lora_targets

__all__ = [
    "FILA_MARK",
    "FisherImportance",
    "GPT2_TARGETS",
    "InitialAdapterReference",
    "LLAMA_TARGETS",
    "LORA_INITS",
    "LoraPlacement",
    "PHI_TARGETS",
    "adapters_are_zero",
    "add_lora",
    "base_state_dict",
    "fila_init",
    "fisher_importance",
    "label_token_count",
    "load_adapter_with_base",
    "lora_layers",
    "lora_param_count",
    "lora_target_modules",
    "save_adapter_with_base",
    "save_base",
    "save_merged",
    "select_lora_targets",
]
