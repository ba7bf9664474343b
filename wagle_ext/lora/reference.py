"""The frozen reference of a LoRA model for NPO / DPO / KL terms, without a second copy of the base
weights (docs/lora.md, section "Reference model").

The reference must compute the model as it was when unlearning started. With PEFT's default init
(``lora_B = 0``) that is the base alone: disable the adapters. After FILA (or with an adapter that was
loaded, not freshly created) the adapters are not zero at the start, and the base alone is the
*residual* ``W - s B A``, a different model. :class:`InitialAdapterReference` therefore keeps a copy of
the starting adapter weights (adapter-sized, not model-sized) and, under ``no_grad`` with the live
adapters disabled, adds ``s * B0 (A0 x)`` to each adapted layer's base output through forward hooks
that exist only during the reference's own forward.
"""
from __future__ import annotations

import contextlib
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["InitialAdapterReference", "adapters_are_zero", "is_peft_model"]


def is_peft_model(model: nn.Module) -> bool:
    """A ``peft`` model (has ``disable_adapter`` and ``peft_config``)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _active_lora(peft_model: nn.Module) -> List[Tuple[nn.Module, list]]:
    """``[(LoRA layer, [(lora_A weight, lora_B weight, scaling)])]`` for the active adapters."""
    out = []
    for mod in peft_model.modules():
        la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not (isinstance(la, nn.ModuleDict) and isinstance(lb, nn.ModuleDict) and hasattr(mod, "get_base_layer")):
            continue
        active = getattr(mod, "active_adapters", None) or []
        terms = [(la[a].weight, lb[a].weight, float(mod.scaling[a])) for a in active if a in la and a in lb]
        if terms:
            out.append((mod, terms))
    return out


@torch.no_grad()
def adapters_are_zero(peft_model: nn.Module) -> bool:
    """True when every active LoRA adapter adds nothing (``lora_B == 0`` or ``lora_A == 0``): then the
    adapter-disabled model is the model itself."""
    return all(bool((a == 0).all()) or bool((b == 0).all()) for _, terms in _active_lora(peft_model)
               for a, b, _ in terms)


class InitialAdapterReference(nn.Module):
    """The PEFT model as it is now (its base plus a frozen copy of the current adapter weights),
    frozen: call it in place of the model for reference log-probabilities. Memory: one copy of the
    adapter weights. Not registered as a submodule of anything; called under ``torch.no_grad()``."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        if not is_peft_model(peft_model):
            raise TypeError(f"expected a peft model, got {type(peft_model).__name__}")
        self._peft = [peft_model]  # a list: not registered (no double parameters)
        self._terms = [(layer.get_base_layer(), [(a.detach().clone(), b.detach().clone(), s) for a, b, s in terms])
                       for layer, terms in _active_lora(peft_model)]

    def forward(self, *args, **kwargs):
        model = self._peft[0]
        handles = []

        def make_hook(terms):
            def hook(mod, inputs, output):
                x = inputs[0]
                for a, b, s in terms:
                    output = output + s * torch.nn.functional.linear(
                        torch.nn.functional.linear(x.to(a.dtype), a), b).to(output.dtype)
                return output
            return hook

        with contextlib.ExitStack() as stack, torch.no_grad():
            stack.enter_context(model.disable_adapter())
            for base, terms in self._terms:
                handles.append(base.register_forward_hook(make_hook(terms)))
            stack.callback(lambda: [h.remove() for h in handles])
            return model(*args, **kwargs)
