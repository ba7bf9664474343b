"""Losses whose gradients attribution accumulates: :func:`causal_lm_sequence_loss` (the default: a
sum of per-sequence token-mean cross-entropies, so gradients sum per example whatever the batch
size) and :func:`causal_lm_loss` (HF ``outputs.loss``, the token mean over the whole batch), plus
the batch helpers (left-padding positions, splitting a batch into its sequences).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from .._util import model_device, to_device

__all__ = ["causal_lm_loss", "causal_lm_sequence_loss"]

_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


# ----------------------------------------------------------------------------- losses
def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean next-token cross-entropy over ALL label tokens of the batch: HF ``outputs.loss``
    (WAGLE's ``ce_mean``; labels ``-100`` are ignored). Works for any ``AutoModelForCausalLM``.
    Equal to the default :func:`causal_lm_sequence_loss` for batches of one; for larger batches it
    weights sequences by their answer length and divides by the batch's token count, so the
    accumulated gradient depends on the batch size (pass ``loss_fn=causal_lm_loss`` for that, e.g.
    to reproduce scores made before the default changed).

    ``batch``: dict with ``input_ids`` [B, T] int64, ``attention_mask`` [B, T], ``labels`` [B, T]
    (other keys are ignored). Tensors are moved to the model's device. Returns a scalar.

    The same loss gives ``g_f`` on forget answers, ``g_r`` on retain answers and, on refusal-target
    batches, the PO forget gradient (WAGLE ``snip_advanced_CL``).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        raise ValueError("causal_lm_loss needs a dict batch with 'input_ids' and 'labels' "
                         "(and usually 'attention_mask'); pass batch_key= for paired loaders "
                         "or a custom loss_fn(model, batch)")
    inputs = to_device({k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch}, model_device(model))
    return model(**inputs, use_cache=False).loss


def _padding_position_ids(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Positions each token would have in its sequence alone (``cumsum(mask) - 1``), or ``None``
    when every row's tokens already start at position 0 (no padding, or right padding only): then
    the model's default ``arange`` positions are those of a batch of one."""
    if attention_mask.dim() != 2:
        return None
    am = attention_mask.to(torch.long)
    pos = am.cumsum(-1) - 1
    arange = torch.arange(am.shape[1], device=am.device).expand_as(am)
    valid = am.bool()
    if bool((pos[valid] == arange[valid]).all()):
        return None
    return pos.clamp_(min=0)


def _model_inputs(model: torch.nn.Module, batch: Mapping[str, Any], keys: Sequence[str]) -> dict:
    inputs = to_device({k: batch[k] for k in keys if k in batch}, model_device(model))
    am = inputs.get("attention_mask")
    if isinstance(am, torch.Tensor) and "position_ids" not in inputs:
        pos = _padding_position_ids(am)
        if pos is not None:
            inputs["position_ids"] = pos
    return inputs


def causal_lm_sequence_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the batch's sequences of each sequence's token-mean next-token cross-entropy: the
    default attribution loss. For one sequence it is HF ``outputs.loss`` (token mean over its label
    tokens); for B sequences it is the sum of the B losses a batch of one gives for each, so its
    gradient is the SUM of the per-example gradients and accumulated gradients do not depend on the
    batch size (to fp32 rounding).

    ``batch``: dict with ``input_ids`` [B, T] int64, ``labels`` [B, T] (``-100`` ignored: prompt and
    padding), usually ``attention_mask`` [B, T] (0 on padding). Right padding is what the package's
    collators make; left padding gets ``position_ids = cumsum(attention_mask) - 1`` so every token
    sits at the position it has unpadded (as in a batch of one). Logits are upcast to float32 for the
    cross-entropy (as HF), only at label positions. Returns a scalar (sum over sequences, nats).

    Raises:
        ValueError: a sequence with no label token (its token mean is undefined: a batch of one
            gives NaN), or a batch without ``input_ids`` / ``labels``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        raise ValueError("causal_lm_sequence_loss needs a dict batch with 'input_ids' and 'labels' "
                         "(and usually 'attention_mask'); pass batch_key= for paired loaders "
                         "or a custom loss_fn(model, batch)")
    inputs = _model_inputs(model, batch, [k for k in _MODEL_INPUT_KEYS if k != "labels"])
    labels = batch["labels"]
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError("labels must be a [batch, tokens] tensor")
    logits = model(**inputs, use_cache=False).logits
    labels = labels.to(logits.device)
    target = labels[:, 1:]
    valid = target != -100
    counts = valid.sum(1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequence(s) {empty[:8]} of the batch have no label token (labels all -100 after "
                         "the shift): their token-mean loss is undefined (a batch of one gives NaN); fix the data")
    rows = valid.nonzero()[:, 0]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][valid].float(), target[valid], reduction="none")
    per_seq = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce)
    return (per_seq / counts.to(ce.dtype)).sum()


def _num_sequences(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 1


def _split_sequences(batch: Any) -> list:
    """One batch per sequence (tensors with the batch dimension sliced, positions outside the span of
    ``attention_mask == 1`` trimmed); a batch of one or a non-dict batch is returned as ``[batch]``."""
    n = _num_sequences(batch)
    if n <= 1:
        return [batch]
    ids = batch["input_ids"]
    T = ids.shape[1]
    am = batch.get("attention_mask")
    out = []
    for b in range(n):
        lo, hi = 0, T
        if isinstance(am, torch.Tensor) and tuple(am.shape) == tuple(ids.shape):
            nz = am[b].nonzero().flatten()
            if nz.numel():
                lo, hi = int(nz[0]), int(nz[-1]) + 1
        row = {}
        for key, v in batch.items():
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                v = v[b:b + 1]
                if v.dim() >= 2 and v.shape[1] == T:
                    v = v[:, lo:hi]
            row[key] = v
        out.append(row)
    return out
