"""Fisher importances of the linear layers that will carry LoRA adapters: the first step of FILA
(LoKU, Cha et al. 2025; the design is in docs/lora.md, section "Importances").

For every target weight ``W`` and separately for the forget and the retain loader::

    F = sum_b n_b * (dL_b/dW)^2 / sum_b n_b

where ``L_b`` is the token-mean cross-entropy of batch ``b`` over its ``n_b`` label tokens (the
denominator of that mean). This is an empirical Fisher at *batch* granularity, token-count weighted:
what LoKU computes, so it depends on the loader's batch size (unlike :func:`estimate_hessian_diagonal`,
which squares per-example gradients). The pass is :func:`~wagle_ext.attribution.accumulate_gradients`
(``square=True, granularity="batch", step_weight=<label tokens>``): fp32 accumulators filled in
backward hooks, one data pass per loader, the model never copied.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import OrderedDict
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..attribution import accumulate_gradients, causal_lm_loss
from ..naming import LAYER_RE, normalize_param_name

__all__ = ["FisherImportance", "fisher_importance", "lora_target_modules", "label_token_count", "LLAMA_TARGETS",
           "PHI_TARGETS", "GPT2_TARGETS"]

#: Target module names of LoKU's ``LoRA.targets=all`` (Llama family), of its Phi runs, and GPT-2's.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


def _is_conv1d(mod: torch.nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear layer whose weight is stored [in, out].
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "weight")


def _is_target_type(mod: torch.nn.Module) -> bool:
    return isinstance(mod, torch.nn.Linear) or _is_conv1d(mod)


def lora_target_modules(model: torch.nn.Module,
                        modules: Union[None, str, Sequence[str]] = None) -> "OrderedDict[str, torch.nn.Module]":
    """``{module name: module}`` of the layers that adapters (and importances) cover, in model order.

    ``modules``: ``None`` / ``"all-linear"`` = every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside the
    decoder layers (``...layers.<i>.``, ``h.<i>``); or a list of module-name suffixes (``["q_proj",
    "v_proj"]``, PEFT's ``target_modules`` rule: a name equal to the entry or ending in ``"." +
    entry``). ``lm_head`` and embeddings are never targets. Names are the model's own (a PEFT model's
    carry its ``base_model.model.`` prefix; PEFT's LoRA wrappers themselves are skipped, their
    ``base_layer`` is the target)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(modules, str) and modules != "all-linear":
        modules = [modules]
    if modules is not None and not isinstance(modules, str):
        modules = list(modules)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"modules must be 'all-linear' or a non-empty list of module names, got {modules!r}")
    out: "OrderedDict[str, torch.nn.Module]" = OrderedDict()
    for name, mod in model.named_modules():
        if not _is_target_type(mod):
            continue
        clean = normalize_param_name(name + ".weight")[: -len(".weight")]
        if clean.split(".")[-1] == "lm_head" or LAYER_RE.search(clean + ".") is None:
            continue
        if modules is None or modules == "all-linear":
            pass
        elif not any(clean == m or clean.endswith("." + m) for m in modules):
            continue
        if ".lora_" in name:  # PEFT's adapter Linear layers are not targets
            continue
        out[name] = mod
    if not out:
        raise ValueError(f"no nn.Linear / Conv1D module of {type(model).__name__} inside the decoder layers matches "
                         f"modules={modules!r}")
    return out


def label_token_count(batch: Mapping[str, Any]) -> int:
    """Label tokens a batch's token-mean cross-entropy averages over: ``labels[:, 1:] != -100`` (the
    shifted labels, as HF's causal-LM loss)."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError("Fisher importances need dict batches with 'labels' [batch, tokens] (-100 = ignored)")
    return int((labels[:, 1:] != -100).sum())


@dataclasses.dataclass
class FisherImportance:
    """Fisher importances of the target weights.

    ``forget`` / ``retain``: ``{normalised weight name: float32 tensor}`` shaped like each weight as
    stored (``[out, in]`` for ``nn.Linear``, ``[in, out]`` for GPT-2 ``Conv1D``), already divided by
    the token counts (``forget_tokens`` / ``retain_tokens``). ``info``: batches, tokens, loader keys."""

    forget: Dict[str, torch.Tensor]
    retain: Dict[str, torch.Tensor]
    forget_tokens: int
    retain_tokens: int
    info: dict = dataclasses.field(default_factory=dict)

    def relative(self, name: str, eps: float = 1e-5) -> torch.Tensor:
        """LoKU's relative Fisher of one weight: ``F_forget / (eps + F_retain)``, float32."""
        name = normalize_param_name(name)
        if name not in self.forget or name not in self.retain:
            raise KeyError(f"no importance for {name!r} (have {len(self.forget)} weights, e.g. "
                           f"{next(iter(self.forget), None)!r})")
        return self.forget[name] / (eps + self.retain[name])

    def save(self, path: str) -> None:
        """safetensors: ``forget/<name>`` and ``retain/<name>`` tensors, counts and info in the metadata."""
        from safetensors.torch import save_file

        tensors = {f"forget/{n}": t.detach().float().cpu().contiguous() for n, t in self.forget.items()}
        tensors.update({f"retain/{n}": t.detach().float().cpu().contiguous() for n, t in self.retain.items()})
        meta = {"format": "wagle_ext.fisher_importance", "forget_tokens": str(self.forget_tokens),
                "retain_tokens": str(self.retain_tokens), "order": json.dumps(list(self.forget)),
                "info": json.dumps(self.info, default=str)}
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "FisherImportance":
        """Read a file written by :meth:`save`; ``ValueError`` naming the file if it is not one."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("format") != "wagle_ext.fisher_importance":
                    raise ValueError("not a Fisher-importance file (no format tag)")
                order = json.loads(meta["order"])
                forget = OrderedDict((n, f.get_tensor(f"forget/{n}")) for n in order)
                retain = OrderedDict((n, f.get_tensor(f"retain/{n}")) for n in order)
                return cls(forget, retain, int(meta["forget_tokens"]), int(meta["retain_tokens"]),
                           json.loads(meta.get("info", "{}")))
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors errors, missing keys, bad JSON
            raise ValueError(f"{path}: not a readable Fisher-importance file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None


def fisher_importance(
    model: torch.nn.Module,
    forget_loader: Iterable,
    retain_loader: Iterable,
    *,
    modules: Union[None, str, Sequence[str]] = None,
    forget_key: Optional[str] = None,
    retain_key: Optional[str] = None,
    max_batches: Optional[int] = None,
    eval_mode: bool = True,
    progress: bool = True,
) -> FisherImportance:
    """Token-weighted empirical Fisher of every target weight on the forget and the retain data.

    One pass over each loader (forget first). Per batch ``b``: backward of the batch's token-mean
    cross-entropy ``L_b`` (HF ``outputs.loss``), accumulate ``n_b * grad^2`` in fp32, where ``n_b`` =
    :func:`label_token_count`; the result is divided by ``sum_b n_b``. So it is LoKU's importance
    (docs/lora.md), which depends on the batch size of the loaders (LoKU used 4).

    Args:
        model: a causal LM (plain, or a PEFT model: then the adapters are disabled for the pass and the
            importances are those of the base weights). Weights are not changed; every ``.grad`` is
            left ``None``; ``requires_grad`` flags are restored.
        forget_loader, retain_loader: batches (dicts with ``input_ids``, ``attention_mask``, ``labels``;
            ``-100`` = not a label). The same paired loader may serve both with ``forget_key="forget",
            retain_key="retain"``.
        modules: which layers (:func:`lora_target_modules`): ``None`` = every linear layer of the
            decoder blocks, or names such as :data:`LLAMA_TARGETS`. ``lm_head`` is never included.
        max_batches: stop each pass after this many batches.
        eval_mode: ``True`` (default) runs without dropout (deterministic; Llama has none anyway);
            ``False`` keeps the model's mode (LoKU ran in train mode).
        progress: progress lines (:func:`wagle_ext._util.progress`).

    Returns:
        :class:`FisherImportance` keyed by normalised weight names (``model.layers.0.mlp.up_proj.weight``).
    """
    targets = lora_target_modules(model, modules)
    params = {n: p for n, p in model.named_parameters()}
    names = []
    for mname in targets:
        # a PEFT-wrapped layer keeps its own weight under .base_layer
        key = f"{mname}.base_layer.weight" if f"{mname}.base_layer.weight" in params else f"{mname}.weight"
        if key not in params:
            raise ValueError(f"module {mname!r} has no weight parameter")
        names.append(key)
    # Importances need gradients of the target weights even where they are frozen (a PEFT base).
    flags = {n: params[n].requires_grad for n in names}
    out: dict = {}
    with contextlib.ExitStack() as stack:
        if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
            stack.enter_context(model.disable_adapter())  # the base model's importances
        stack.callback(lambda: [params[n].requires_grad_(rg) for n, rg in flags.items()])
        for n in names:
            params[n].requires_grad_(True)
        for which, loader, key in (("forget", forget_loader, forget_key), ("retain", retain_loader, retain_key)):
            out[which] = accumulate_gradients(
                model, loader, causal_lm_loss, reduction="mean", square=True, granularity="batch",
                step_weight=label_token_count, batch_key=key, names=names, max_batches=max_batches,
                eval_mode=eval_mode, progress=progress, desc=f"fisher importance ({which})")
    f, r = out["forget"], out["retain"]
    info = {"modules": modules if modules is None or isinstance(modules, str) else list(modules),
            "forget_batches": f.info["num_batches"], "retain_batches": r.info["num_batches"],
            "granularity": "batch", "weighting": "label tokens"}
    return FisherImportance(
        forget=OrderedDict((normalize_param_name(n), t) for n, t in f.items()),
        retain=OrderedDict((normalize_param_name(n), t) for n, t in r.items()),
        forget_tokens=int(f.info["total_weight"]), retain_tokens=int(r.info["total_weight"]), info=info)
