"""Saving a LoRA-unlearned model so that it reloads as the model that was trained (docs/lora.md,
section "Export").

FILA replaces each adapted base weight ``W`` by the residual ``W - s B A``. Saving only the adapter
and loading it onto the *original* base later computes ``W + s B' A'`` instead of ``W - s B A + s B'
A'``: a different model (LoKU's saving quirk). So the two exports here both carry the base weights
the adapters were trained on:

* :func:`save_merged`: one plain Hugging Face model folder, every adapter merged (``W_base + s B A``
  per layer, computed by PEFT's ``get_delta_weight``); loads with ``AutoModelForCausalLM``.
* :func:`save_adapter_with_base`: ``<path>/base`` (the current base weights: residuals after FILA)
  and ``<path>/adapter`` (the PEFT adapter); :func:`load_adapter_with_base` reloads the pair.

Neither changes the model in memory (no merge/unmerge round trip, which would not be bit-exact).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Optional

import torch

from ..naming import is_adapter_param
from .fila import FILA_MARK, lora_layers

__all__ = ["save_merged", "save_base", "save_adapter_with_base", "load_adapter_with_base", "base_state_dict"]

_PEFT_INFIXES = (".base_layer.", ".original_module.")


def _base_model(peft_model: torch.nn.Module) -> torch.nn.Module:
    if not (hasattr(peft_model, "get_base_model") and hasattr(peft_model, "peft_config")):
        raise TypeError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    return peft_model.get_base_model()


def _clean(key: str) -> str:
    for infix in _PEFT_INFIXES:
        key = key.replace(infix, ".")
    return key


@torch.no_grad()
def base_state_dict(peft_model: torch.nn.Module, *, merged: bool = False,
                    adapter_name: str = "default") -> "OrderedDict[str, torch.Tensor]":
    """The state dict of the model under the adapters, with the names of the unwrapped model: adapter
    weights dropped, ``.base_layer`` removed. ``merged=True``: each adapted weight is ``W + delta``
    (new tensors, in the weight's dtype); otherwise the tensors themselves (the residuals after FILA)."""
    base = _base_model(peft_model)
    sd = OrderedDict((_clean(k), v) for k, v in base.state_dict().items() if not is_adapter_param(k))
    if merged:
        for name, layer in lora_layers(base, adapter_name):
            if adapter_name in getattr(layer, "merged_adapters", ()):
                raise ValueError(f"{name}: the adapter is already merged into the base weight; unmerge it first")
            key = _clean(name + ".base_layer.weight")
            w = sd[key]
            delta = layer.get_delta_weight(adapter_name)  # scaled, in the weight's layout (fan_in_fan_out)
            sd[key] = (w.float() + delta.float()).to(w.dtype)
    return sd


def save_merged(peft_model: torch.nn.Module, path: str, *, tokenizer: Any = None,
                adapter_name: str = "default") -> str:
    """A Hugging Face model folder at ``path`` holding the merged weights (``W_base + s B A``): what the
    PEFT model computes, loadable with ``AutoModelForCausalLM.from_pretrained(path)``. Returns ``path``."""
    base = _base_model(peft_model)
    sd = base_state_dict(peft_model, merged=True, adapter_name=adapter_name)
    base.save_pretrained(path, state_dict=sd)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_base(peft_model: torch.nn.Module, path: str) -> str:
    """A Hugging Face model folder at ``path`` with the base weights under the adapters (FILA's
    residuals after :func:`~wagle_ext.lora.fila_init`), adapter weights left out. Returns ``path``."""
    _base_model(peft_model).save_pretrained(path, state_dict=base_state_dict(peft_model))
    return path


def save_adapter_with_base(peft_model: torch.nn.Module, path: str, *, tokenizer: Any = None) -> str:
    """``<path>/base`` (the base weights the adapters were trained on: FILA's residuals, or the original
    weights after a default init) and ``<path>/adapter`` (``peft_model.save_pretrained``). Returns
    ``path``; reload with :func:`load_adapter_with_base`."""
    save_base(peft_model, os.path.join(path, "base"))
    peft_model.save_pretrained(os.path.join(path, "adapter"))
    with open(os.path.join(path, "README.txt"), "w") as f:
        fila = bool(getattr(peft_model, FILA_MARK, None))
        f.write("base/: the base weights under the adapter" + (" (FILA residuals: NOT the original model's)"
                                                              if fila else "") +
                "\nadapter/: the PEFT LoRA adapter\nload both: wagle_ext.lora.load_adapter_with_base(<this folder>)\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, "base"))
    return path


def load_adapter_with_base(path: str, *, torch_dtype: Optional[torch.dtype] = None,
                           device: Optional[str] = None):
    """The PEFT model saved by :func:`save_adapter_with_base` (``path/base`` + ``path/adapter``) or by
    ``UnlearnTrainer.save_model`` of a FILA model (``path/base`` + the adapter in ``path``), in eval mode."""
    from transformers import AutoModelForCausalLM

    from .adapters import require_peft

    peft = require_peft()
    adapter = os.path.join(path, "adapter")
    if not os.path.isdir(adapter):
        adapter = path
    if not (os.path.isdir(os.path.join(path, "base")) and os.path.isfile(os.path.join(adapter, "adapter_config.json"))):
        raise FileNotFoundError(f"{path}: expected base/ and adapter/ (or adapter_config.json) as written by "
                                "save_adapter_with_base")
    kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
    base = AutoModelForCausalLM.from_pretrained(os.path.join(path, "base"), **kw)
    if device is not None:
        base = base.to(device)
    model = peft.PeftModel.from_pretrained(base, adapter)
    model.eval()
    return model
