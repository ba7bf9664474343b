"""Parameter names: wrapper-independent normalisation, model fingerprints, decoder-layer regexes.

Masks are keyed by parameter name and travel between a bare model and the same model wrapped by
DDP, ``torch.compile`` or PEFT; attribution seeds random scores by name and finds decoder-layer
linears by name. All of those agree on names through this module. Imports nothing from
``wagle_ext`` (bottom layer).
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch

__all__ = [
    "LAYER_RE",
    "normalize_param_name",
    "is_adapter_param",
    "model_param_shapes",
    "fingerprint_of",
    "model_fingerprint",
    "layer_of",
    "module_type_of",
]

# Wrapper prefixes that do not change which weight a name refers to: DDP/DataParallel ("module."),
# torch.compile ("_orig_mod."), PEFT ("base_model.model." around the HF model).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# PEFT moves a wrapped layer's own weight under ".base_layer" (LoRA) or ".original_module"
# (modules_to_save); the adapter weights themselves are not part of the base model.
_PEFT_INFIXES = (".base_layer.", ".original_module.")
_PEFT_ADAPTER = re.compile(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save|prompt_encoder|adapter_[A-Za-z_]+)(\.|$)")

#: ``<...>.layers.<i>.`` (and the ``layer``/``h``/``blocks``/``block`` spellings of other model
#: families): group 1 is the decoder-layer index.
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def normalize_param_name(name: str) -> str:
    """Canonical parameter name: strips DDP/``torch.compile``/PEFT wrapper prefixes (repeatedly)
    and PEFT's ``.base_layer``/``.original_module`` infixes, so that a mask built on a bare model
    applies to the wrapped one and vice versa.

    >>> normalize_param_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    if not isinstance(name, str):
        raise TypeError(f"parameter name must be a str, got {type(name).__name__}")
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                changed = True
    for infix in _PEFT_INFIXES:
        name = name.replace(infix, ".")
    return name


def is_adapter_param(name: str) -> bool:
    """A PEFT adapter weight (LoRA, prompt encoder, ...): not part of the base model."""
    return _PEFT_ADAPTER.search(name) is not None


def model_param_shapes(model: torch.nn.Module) -> "OrderedDict[str, torch.Size]":
    """normalised name -> shape for every base-model parameter (adapter weights skipped; tied
    weights once, as ``named_parameters`` reports them)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out: "OrderedDict[str, torch.Size]" = OrderedDict()
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            continue
        out[normalize_param_name(name)] = p.shape
    return out


def fingerprint_of(shapes: Mapping[str, Sequence[int]]) -> str:
    """Hash (hex, 32 chars) of ``{normalised name: shape}``, independent of the mapping's order."""
    h = hashlib.sha256()
    for name in sorted(shapes):
        h.update(f"{name}:{','.join(str(int(d)) for d in shapes[name])};".encode())
    return h.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash (hex, 32 chars) of the model's normalised parameter names and shapes.

    Independent of parameter values, dtype, device, ``requires_grad`` and wrapping (DDP, PEFT,
    ``torch.compile``); changes when a parameter is added, removed, renamed or reshaped (e.g. by
    ``resize_token_embeddings``).
    """
    return fingerprint_of(model_param_shapes(model))


def layer_of(name: str) -> Optional[int]:
    """Decoder-layer index of a parameter name, or None outside the decoder layers."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type_of(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; ``lm_head.weight`` -> ``lm_head``."""
    parts = normalize_param_name(name).split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        return parts[-2] if parts[-1] == "weight" else parts[-2] + ".bias"
    return parts[-1]
