"""Unlearning objectives for Hugging Face causal LMs: the math on logits and the callables a trainer uses.

Two layers live here:

* **Pure functions on tensors** (no model): :func:`token_logprobs`, :func:`sequence_logprobs`,
  :func:`nll_loss`, :func:`npo_loss`, :func:`simnpo_loss`, :func:`dpo_loss`, :func:`wga_loss`,
  :func:`tnpo_loss`, :func:`ihl_loss`, :func:`kl_retain_loss`, :func:`activation_mse`. Tests check these
  against direct formulas.
* **Objective callables** (:class:`Objective` subclasses, built by :func:`get_objective`): each holds its
  hyperparameters as dataclass fields and computes ``loss = gamma * forget_term + alpha * retain_term``
  (the open-unlearning convention: ``gamma`` weighs the forget term, ``alpha`` the retain term).

Conventions (see ``docs/algorithms.md`` §1.7, §2.2, §3.1, §6):

* Labels follow Hugging Face: ``labels[b, t]`` is the target of position ``t`` and is predicted by the
  logits at ``t - 1``; ``-100`` marks ignored positions (prompt, padding). Every function here shifts
  internally, exactly as ``LlamaForCausalLM`` does for ``outputs.loss``.
* Log-softmax, CE and probabilities are computed in fp32 (fp64 inputs stay fp64) even for bf16/fp16
  logits (docs/pitfalls.md #10). The fused paths (:func:`token_logprobs`, :func:`ihl_loss`,
  :func:`kl_retain_loss`) work on row chunks of the answer positions only, keep the logits in their own
  dtype for backward and never materialise a full fp32 softmax copy; gradients come back in the logits'
  dtype.
* "Token mean" = mean over all valid (label != -100) tokens of the batch, which is what HF's
  ``outputs.loss`` and G-effect's ``[shift_labels != -100].mean()`` compute.

Long file: the two halves (losses ~500 lines, objectives ~400) would split into ``losses.py`` and
``objectives.py``; they stay together for now because the tests tune the fused paths' chunk size
module-wide (``monkeypatch.setattr(objectives, "_CHUNK_ELEMS", ...)``) and read the losses and the
objectives from one module. The split is one move once those tests patch ``unlearn.losses``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .data import IGNORE_INDEX

# Rows per chunk in the fused paths: chunk * vocab elements of fp32 scratch (~64 MiB at 32k vocab).
_CHUNK_ELEMS = 1 << 24


# ------------------------------------------------------------------------------------------------
# Label/position helpers
# ------------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32; fp64 stays fp64 (so gradcheck can run in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits_labels(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{name} and labels must be tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape [batch, seq, vocab], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {logits.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} to match {name}, "
                         f"got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")


def shifted_target_mask(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Targets and validity mask for the positions that predict the next token.

    Args:
        labels: ``[B, T]`` int token ids with ``-100`` at ignored positions.
    Returns:
        ``(targets, mask)``, both ``[B, T-1]``: ``targets[b, t] = labels[b, t+1]`` (with ``-100``
        replaced by 0 so it can index), ``mask`` = bool, True where the logits at ``t`` predict a valid
        label (HF's shift).
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return torch.where(mask, target, torch.zeros_like(target)).long(), mask


def _valid_rows(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flatten ``logits`` to ``[B*T, V]`` and list the rows that predict a valid (shifted) label."""
    _check_logits_labels(logits, labels)
    B, T, V = logits.shape
    targets, mask = shifted_target_mask(labels)
    logits2d = logits.reshape(B * T, V)
    if T == 0:
        rows = torch.zeros(0, dtype=torch.long, device=logits.device)
        return logits2d, rows, rows, mask
    bt = torch.nonzero(mask, as_tuple=False)  # [n, 2] in row-major order (matches masked_scatter)
    rows = bt[:, 0] * T + bt[:, 1]
    tgt = targets[mask]
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= V):
        raise ValueError(f"labels must be -100 or in [0, {V}) (vocab size of the logits), got values in "
                         f"[{int(tgt.min())}, {int(tgt.max())}]")
    return logits2d, rows, tgt, mask


def _chunks(n: int, vocab: int):
    step = max(1, _CHUNK_ELEMS // max(vocab, 1))
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _row_chunks(logits2d: Tensor, rows: Tensor, dtype: torch.dtype):
    """``(s, e, z)`` over chunks of the selected rows: ``z = logits2d[rows[s:e]]`` in ``dtype``
    (the fused paths' only copies of the logits: one chunk at a time)."""
    for s, e in _chunks(rows.numel(), logits2d.shape[1]):
        yield s, e, logits2d.index_select(0, rows[s:e]).to(dtype)


def _row_outputs(logits2d: Tensor, rows: Tensor) -> tuple[torch.dtype, Tensor, Tensor]:
    """Compute dtype and the per-row output and logsumexp buffers of a fused forward."""
    cdt = _compute_dtype(logits2d.dtype)
    n = rows.numel()
    return cdt, torch.empty(n, dtype=cdt, device=logits2d.device), torch.empty(n, dtype=cdt, device=logits2d.device)


# ------------------------------------------------------------------------------------------------
# Fused token log-probabilities
# ------------------------------------------------------------------------------------------------

class _TargetLogProb(torch.autograd.Function):
    """log softmax(z)[y] for selected rows; saves z (own dtype) and the row logsumexp only."""

    @staticmethod
    def forward(ctx, logits2d: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
        cdt, out, lse = _row_outputs(logits2d, rows)
        for s, e, z in _row_chunks(logits2d, rows, cdt):
            l = torch.logsumexp(z, dim=1)
            out[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - l
            lse[s:e] = l
        ctx.save_for_backward(logits2d, rows, targets, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits2d, rows, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits2d)
        for s, e, z in _row_chunks(logits2d, rows, lse.dtype):
            g = grad_out[s:e].to(lse.dtype)
            gz = torch.exp(z - lse[s:e, None]).mul_(-g[:, None])        # -g * p
            gz.scatter_add_(1, targets[s:e, None], g[:, None])           # + g * e_y
            grad.index_copy_(0, rows[s:e], gz.to(grad.dtype))
        return grad, None, None


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the (shifted) labels, computed in fp32.

    Args:
        logits: ``[B, T, V]`` float (fp32/bf16/fp16/fp64), as returned by a causal LM.
        labels: ``[B, T]`` int64/int32, ``-100`` at ignored positions (HF convention, unshifted).
    Returns:
        ``(logp, mask)``: ``logp`` ``[B, T-1]`` fp32 (fp64 for fp64 logits), ``log p(labels[:, t+1] |
        prefix)`` from ``logits[:, t]``, exactly 0 where ``mask`` is False; ``mask`` ``[B, T-1]`` bool.
        Differentiable w.r.t. ``logits``; the gradient ``g * (e_y - softmax(z))`` is computed chunk-wise
        and returned in the logits' dtype. Nothing is mutated.
    """
    logits2d, rows, tgt, mask = _valid_rows(logits, labels)
    lp = _TargetLogProb.apply(logits2d, rows, tgt)
    out = torch.zeros(mask.shape, dtype=lp.dtype, device=logits.device)
    return out.masked_scatter(mask, lp), mask


def sequence_logprobs(token_logp: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """Per-sequence log-likelihood from :func:`token_logprobs` output.

    Args:
        token_logp: ``[B, T-1]`` float, 0 at invalid positions. mask: ``[B, T-1]`` bool.
        reduction: ``"sum"`` (log p(y|x), the NPO/DPO convention) or ``"mean"`` (per-token mean; a
            sequence with no valid token counts 1 in the denominator and gives 0).
    Returns: ``[B]`` float.
    """
    s = (token_logp * mask).sum(-1)
    if reduction == "sum":
        return s
    if reduction == "mean":
        return s / mask.sum(-1).clamp_min(1).to(s.dtype)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over valid tokens of the whole batch (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp_min(1).to(x.dtype)


def nll_loss(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Token-mean negative log-likelihood over the batch, i.e. HF ``outputs.loss``. Scalar."""
    return -_token_mean(token_logp, mask)


# ------------------------------------------------------------------------------------------------
# Sequence-level preference losses
# ------------------------------------------------------------------------------------------------

def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def npo_loss(logp_seq: Tensor, ref_logp_seq: Tensor, beta: float) -> Tensor:
    """Negative Preference Optimization (Zhang et al. 2024), batch mean.

    ``L = -(2/beta) * mean_i logsigmoid(beta * (ref_logp_i - logp_i))``, i.e.
    ``-(2/beta) logsigmoid(beta * (NLL_theta - NLL_ref))``. Equals ``(2/beta) log 2`` at theta = ref.
    d L / d logp_i = (2/B) * sigmoid(beta * (logp_i - ref_logp_i)): NPO's adaptive weight
    ``2 pi^beta / (pi^beta + pi_ref^beta)`` per sequence.

    Args:
        logp_seq: ``[B]`` log p_theta(y|x), summed (NPO paper, open-unlearning) or token-mean (WAGLE)
            per sequence -- see :func:`sequence_logprobs`. ref_logp_seq: ``[B]`` same under the frozen
            reference (treated as a constant). beta: inverse temperature > 0.
    """
    _check_beta(beta)
    return -(2.0 / beta) * F.logsigmoid(beta * (ref_logp_seq.detach() - logp_seq)).mean()


def simnpo_loss(mean_logp_seq: Tensor, beta: float, delta: float = 0.0) -> Tensor:
    """SimNPO (Fan et al. 2024) as in open-unlearning ``simnpo.py``: reference-free, length-normalised.

    ``L = -(2/beta) * mean_i logsigmoid(beta * (NLL_i/|y_i| - delta))`` with ``mean_logp_seq = -NLL_i/|y_i|``.
    """
    _check_beta(beta)
    return -(2.0 / beta) * F.logsigmoid(beta * (-mean_logp_seq - delta)).mean()


def dpo_loss(win_logp: Tensor, win_ref_logp: Tensor, lose_logp: Tensor, lose_ref_logp: Tensor,
             beta: float) -> Tensor:
    """DPO for unlearning (open-unlearning ``compute_dpo_loss``): win = refusal/alternate, lose = forget.

    ``L = -(2/beta) * mean_i logsigmoid(beta * ((win - win_ref) - (lose - lose_ref)))`` on sequence-summed
    log-likelihoods ``[B]``. The reference terms are constants. Equals ``(2/beta) log 2`` at theta = ref.
    """
    _check_beta(beta)
    margin = (win_logp - win_ref_logp.detach()) - (lose_logp - lose_ref_logp.detach())
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


# ------------------------------------------------------------------------------------------------
# Token-weighted ascent losses (G-effect, Wang et al. ICLR 2025)
# ------------------------------------------------------------------------------------------------

def wga_loss(token_logp: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Weighted gradient ascent: ``-mean_t[sg(p_t)^beta * CE_t] = mean_t[sg(exp(beta*logp_t)) * logp_t]``.

    Token mean over the batch's valid tokens (G-effect ``wga``, open-unlearning ``compute_wga_loss``).
    ``beta >= 0`` (``beta = 0`` is plain GA).
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    w = torch.exp(beta * token_logp.detach())
    return _token_mean(w * token_logp, mask)


def tnpo_weights(token_logp: Tensor, ref_token_logp: Tensor, beta: float, weight_alpha: float = 0.0,
                 eps: float = 0.0) -> Tensor:
    """(W)TNPO token weights ``w = 2 p^(beta+alpha) / (p^beta + p_ref^beta + eps)``, computed in log space.

    ``log w = log 2 + alpha logp - logsumexp(0, beta (logp_ref - logp)[, log eps - beta logp])``, so the
    weight stays finite (and accurate) when ``p^beta`` underflows (docs/pitfalls.md #8). ``eps = 1e-5`` replicates the
    G-effect code exactly; ``eps = 0`` (default) gives TNPO = ``2 sigmoid(beta (logp - logp_ref))``.
    Returns a detached tensor of the input shape.
    """
    _check_beta(beta)
    if not (math.isfinite(weight_alpha) and weight_alpha >= 0):
        raise ValueError(f"weight_alpha must be a finite number >= 0, got {weight_alpha!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    lp, lpr = token_logp.detach(), ref_token_logp.detach()
    # Divide numerator and denominator by p^beta first: log w = log 2 + alpha logp
    #   - logsumexp(0, beta (logp_ref - logp)[, log eps - beta logp]); differences of log-probs are formed
    # before scaling, so no precision is lost to large |beta logp| (e.g. -800 in fp32).
    terms = [torch.zeros_like(lp), beta * (lpr - lp)]
    if eps > 0:
        terms.append(math.log(eps) - beta * lp)
    log_den = torch.logsumexp(torch.stack(terms, 0), dim=0)
    return torch.exp(math.log(2.0) + weight_alpha * lp - log_den)


def tnpo_loss(token_logp: Tensor, ref_token_logp: Tensor, mask: Tensor, beta: float,
              weight_alpha: float = 0.0, eps: float = 0.0) -> Tensor:
    """Token-wise NPO (``weight_alpha = 0``) / weighted TNPO: ``-mean_t[w_t * CE_t] = mean_t[w_t logp_t]``.

    Weights from :func:`tnpo_weights` (stop-gradient), token mean over the batch (G-effect ``tnpo``,
    ``wtnpo_{alpha}``). Shapes ``[B, T-1]``.
    """
    w = tnpo_weights(token_logp, ref_token_logp, beta, weight_alpha, eps)
    return _token_mean(w * token_logp, mask)


# ------------------------------------------------------------------------------------------------
# Inverted hinge loss (LoKU, Cha et al. ICLR 2025)
# ------------------------------------------------------------------------------------------------

class _InvertedHinge(torch.autograd.Function):
    """Per-row ``1 + p_y - max_{v != y} p_v`` from the logsumexp and one argmax; no softmax is kept."""

    @staticmethod
    def forward(ctx, logits2d: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
        cdt, out, lse = _row_outputs(logits2d, rows)
        other = torch.empty(rows.numel(), dtype=torch.long, device=logits2d.device)
        for s, e, z in _row_chunks(logits2d, rows, cdt):
            y = targets[s:e, None]
            l = torch.logsumexp(z, dim=1)
            # m = argmax_{v != y} z_v; ties go to the lowest index (torch.argmax returns the first max).
            m = z.scatter(1, y, float("-inf")).argmax(dim=1)
            p_y = torch.exp(z.gather(1, y).squeeze(1) - l)
            p_m = torch.exp(z.gather(1, m[:, None]).squeeze(1) - l)
            # LoKU clamps at 0, but 1 + p_y - p_m >= 2 p_y >= 0 always (p_m <= 1 - p_y): no clamp needed.
            out[s:e] = 1.0 + p_y - p_m
            lse[s:e], other[s:e] = l, m
        ctx.save_for_backward(logits2d, rows, targets, lse, other)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits2d, rows, targets, lse, other = ctx.saved_tensors
        grad = torch.zeros_like(logits2d)
        for s, e, z in _row_chunks(logits2d, rows, lse.dtype):
            g = grad_out[s:e].to(lse.dtype)[:, None]
            y, m = targets[s:e, None], other[s:e, None]
            p = torch.exp(z - lse[s:e, None])
            p_y, p_m = p.gather(1, y), p.gather(1, m)
            # d/dz [p_y - p_m] = p_y (e_y - p) - p_m (e_m - p) = (p_m - p_y) p + p_y e_y - p_m e_m
            gz = p.mul_(g * (p_m - p_y))
            gz.scatter_add_(1, y, g * p_y)
            gz.scatter_add_(1, m, -g * p_m)
            grad.index_copy_(0, rows[s:e], gz.to(grad.dtype))
        return grad, None, None


def ihl_token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token inverted hinge ``1 + p_y - max_{v != y} p_v`` (LoKU §3.1) at valid shifted positions.

    Args: logits ``[B, T, V]`` float; labels ``[B, T]`` (HF convention, ``-100`` ignored).
    Returns: ``(values [n] fp32, mask [B, T-1] bool)`` with ``n = mask.sum()`` in row-major order.
    Uses only the logsumexp and the best non-target logit per row; the gradient
    ``p_y (e_y - p) - p_m (e_m - p)`` is formed chunk-wise in backward (ties for ``m``: lowest index).
    """
    logits2d, rows, tgt, mask = _valid_rows(logits, labels)
    if logits.shape[-1] < 2:
        raise ValueError(f"IHL needs a vocabulary of at least 2 tokens, got {logits.shape[-1]}")
    return _InvertedHinge.apply(logits2d, rows, tgt), mask


def ihl_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Inverted hinge loss, token mean over the batch (LoKU code ``_hinge_loss_compute``). Scalar fp32."""
    vals, mask = ihl_token_losses(logits, labels)
    return vals.sum() / max(int(vals.numel()), 1)


# ------------------------------------------------------------------------------------------------
# KL retain regulariser
# ------------------------------------------------------------------------------------------------

class _RowKL(torch.autograd.Function):
    """Per-row KL(softmax(ref) || softmax(z)); gradient softmax(z) - softmax(ref), chunk-wise."""

    @staticmethod
    def forward(ctx, logits2d: Tensor, ref2d: Tensor, rows: Tensor) -> Tensor:
        cdt = _compute_dtype(logits2d.dtype)
        n, V = rows.numel(), logits2d.shape[1]
        out = torch.empty(n, dtype=cdt, device=logits2d.device)
        for s, e in _chunks(n, V):
            lt = torch.log_softmax(logits2d.index_select(0, rows[s:e]).to(cdt), dim=1)
            lr = torch.log_softmax(ref2d.index_select(0, rows[s:e]).to(cdt), dim=1)
            out[s:e] = (lr.exp() * (lr - lt)).sum(1)
        ctx.save_for_backward(logits2d, ref2d, rows)
        ctx.cdt = cdt
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits2d, ref2d, rows = ctx.saved_tensors
        grad = torch.zeros_like(logits2d)
        for s, e in _chunks(rows.numel(), logits2d.shape[1]):
            pt = torch.softmax(logits2d.index_select(0, rows[s:e]).to(ctx.cdt), dim=1)
            pr = torch.softmax(ref2d.index_select(0, rows[s:e]).to(ctx.cdt), dim=1)
            gz = (pt - pr).mul_(grad_out[s:e].to(ctx.cdt)[:, None])
            grad.index_copy_(0, rows[s:e], gz.to(grad.dtype))
        return grad, None, None


def kl_retain_loss(logits: Tensor, ref_logits: Tensor, labels: Optional[Tensor] = None, *,
                   all_positions: bool = False) -> Tensor:
    """KL(p_ref || p_theta) retain regulariser, fp32. Scalar.

    Args:
        logits: ``[B, T, V]`` current model. ref_logits: ``[B, T, V]`` frozen reference (constant, no
            gradient flows to it).
        labels: ``[B, T]`` (HF convention). Required unless ``all_positions``.
        all_positions: False (default): mean over the positions that predict a valid answer token
            (docs/pitfalls.md #11). True: replicate G-effect / LoKU / open-unlearning ``F.kl_div(...,
            reduction="batchmean", log_target=True)`` over all flattened ``B*T`` positions (prompt and
            padding included, no shift).
    """
    if not isinstance(ref_logits, Tensor) or ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, got "
                         f"{getattr(ref_logits, 'shape', type(ref_logits))}")
    ref_logits = ref_logits.detach()
    if all_positions:
        if logits.dim() != 3:
            raise ValueError(f"logits must have shape [batch, seq, vocab], got {tuple(logits.shape)}")
        B, T, V = logits.shape
        rows = torch.arange(B * T, device=logits.device)
        kl = _RowKL.apply(logits.reshape(B * T, V), ref_logits.reshape(B * T, V), rows)
        return kl.sum() / max(B * T, 1)
    if labels is None:
        raise ValueError("labels are required for the answer-position KL (or pass all_positions=True)")
    logits2d, rows, _, _ = _valid_rows(logits, labels)
    kl = _RowKL.apply(logits2d, ref_logits.reshape(logits2d.shape), rows)
    return kl.sum() / max(int(rows.numel()), 1)


# ------------------------------------------------------------------------------------------------
# RMU activations
# ------------------------------------------------------------------------------------------------

def activation_mse(activations: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked activation MSE as in open-unlearning ``RMU.compute_activation_loss``. Scalar fp32.

    ``mean_b [ sum_{t: mask} mean_d (a - target)^2 / max(1, #mask_b) ]``.
    Args: activations ``[B, T, D]``; target broadcastable to it (a control vector ``[D]`` or reference
    activations ``[B, T, D]``); mask ``[B, T]`` bool (answer tokens).
    """
    if activations.dim() != 3 or mask.shape != activations.shape[:2]:
        raise ValueError(f"activations must be [B, T, D] and mask [B, T], got {tuple(activations.shape)} "
                         f"and {tuple(mask.shape)}")
    cdt = _compute_dtype(activations.dtype)
    sq = (activations.to(cdt) - target.detach().to(cdt)).pow(2).mean(-1)
    per_seq = (sq * mask).sum(-1) / mask.sum(-1).clamp_min(1).to(cdt)
    return per_seq.mean()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a HF causal LM (Llama/Mistral/Qwen/Gemma: ``model.model.layers``;
    GPT-2/Falcon: ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``; OPT: ``model.decoder.layers``).
    Unwraps DDP (``.module``) and PEFT (``get_base_model()``)."""
    m = model
    if hasattr(m, "module") and isinstance(m.module, nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers",
                 "transformer.layers", "model.language_model.layers"):
        cur = m
        for attr in path.split("."):
            cur = getattr(cur, attr, None)
            if cur is None:
                break
        if isinstance(cur, nn.ModuleList) and len(cur) > 0:
            return cur
    raise ValueError(f"could not find the decoder layer list of {type(model).__name__}; expected one of "
                     "model.layers, transformer.h, gpt_neox.layers, model.decoder.layers")


class _StopForward(Exception):
    """Raised by the RMU hook to skip the layers (and the LM head) after the one it reads."""


def _forward_with_layer_output(model: nn.Module, seq: Mapping[str, Tensor], layer: int,
                               stop_early: bool = True) -> Tensor:
    """Run ``model`` on ``seq`` and return the hidden states output by decoder block ``layer``.

    With ``stop_early`` the forward is aborted right after that block (the later blocks and the
    ``[B, T, V]`` logits are never computed); the returned activations keep their autograd graph.
    """
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must index one of the model's {len(layers)} decoder layers, got {layer}")
    cache: list[Tensor] = []

    def hook(_module, _inputs, output):
        cache.append(output[0] if isinstance(output, (tuple, list)) else output)
        if stop_early:
            raise _StopForward

    handle = layers[layer].register_forward_hook(hook)
    try:
        model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"], use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if len(cache) != 1:
        raise RuntimeError(f"expected one output from decoder layer {layer}, got {len(cache)}")
    return cache[0]


# ------------------------------------------------------------------------------------------------
# Objective callables
# ------------------------------------------------------------------------------------------------

_SEQ_KEYS = ("input_ids", "attention_mask", "labels")


def _forward_logits(model: nn.Module, seq: Mapping[str, Tensor]) -> Tensor:
    # No labels: HF would otherwise compute (and keep) its own loss on top of ours.
    return model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"], use_cache=False).logits


def _ref_logits(ref_model: nn.Module, seq: Mapping[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return _forward_logits(ref_model, seq)


def _f(t: Tensor) -> float:
    return float(t.detach())


@dataclass
class Objective:
    """Base of every unlearning objective: ``loss = gamma * forget_term + alpha * retain_term``.

    Fields:
        gamma: forget-term weight (open-unlearning ``gamma``; 1.0 by default).
        alpha: retain-term weight (open-unlearning ``alpha``; WAGLE's ``gamma`` = 1.0 in all configs).
        retain: ``"nll"`` (token-mean CE on the retain batch), ``"kl"`` (KL(p_ref || p_theta), needs a
            reference) or ``"none"``.
        kl_all_positions: for ``retain="kl"``: False = answer positions only (default); True = all
            ``B*T`` positions, replicating G-effect/LoKU/open-unlearning.

    Call: ``loss, logs = objective(model, batch, ref_model=None)`` where ``batch`` holds ``"forget"``,
    ``"retain"`` (and ``"forget_refusal"``/``"forget_alternate"`` when :attr:`batch_keys` lists them),
    each a dict of ``input_ids``/``attention_mask``/``labels`` ``[B, T]``. ``logs`` holds python floats
    (``forget_loss``, ``retain_loss``, ``loss`` and objective-specific entries). When
    :attr:`needs_reference` is True the caller passes a frozen reference model (``eval()``,
    ``requires_grad_(False)``); it is only run under ``torch.no_grad()``. Nothing is mutated.
    """

    name: ClassVar[str] = ""
    retain_choices: ClassVar[tuple[str, ...]] = ("nll", "kl", "none")
    forget_needs_reference: ClassVar[bool] = False
    forget_keys: ClassVar[tuple[str, ...]] = ("forget",)

    gamma: float = 1.0
    alpha: float = 1.0
    retain: str = "nll"
    kl_all_positions: bool = False

    def __post_init__(self) -> None:
        for k in ("gamma", "alpha"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, got {v!r}")
        if not isinstance(self.retain, str) or self.retain.lower() not in self.retain_choices:
            raise ValueError(f"retain must be one of {self.retain_choices} for {type(self).__name__}, "
                             f"got {self.retain!r}")
        self.retain = self.retain.lower()
        self.validate()

    def validate(self) -> None:
        """Check objective-specific hyperparameters (overridden by subclasses)."""

    @property
    def needs_reference(self) -> bool:
        """True when a frozen reference model must be passed as ``ref_model``."""
        return self.forget_needs_reference or self.retain in ("kl", "activation")

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Sub-batches this objective reads (the dataset/collator must provide them)."""
        return self.forget_keys + (("retain",) if self.retain != "none" else ())

    # -- call ---------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: Mapping[str, Any], ref_model: Optional[nn.Module] = None,
                 backward: Optional[Callable[[Tensor], None]] = None) -> tuple[Tensor, dict[str, float]]:
        """``backward``: when given, each weighted term (``gamma * forget``, then ``alpha * retain``)
        is passed to it (e.g. ``Tensor.backward``) as soon as it is computed, and the returned loss
        is detached. Same gradient as one backward of the sum, but the forget pass's graph is freed
        before the retain pass runs, and -- the reason it exists -- autograd never holds the retain
        pass's gradient of every weight while it waits for the forget pass's contribution (a single
        backward through two forward passes keeps one dense gradient per parameter alive until both
        branches reach it, which defeats compact gradients)."""
        if self.needs_reference and ref_model is None:
            why = "its forget term" if self.forget_needs_reference else f"retain={self.retain!r}"
            raise ValueError(f"objective {self.name!r} needs a frozen reference model ({why}); pass "
                             "ref_model=<frozen copy of the initial model>")
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping of sub-batches, got {type(batch).__name__}")
        for key in self.batch_keys:
            seq = batch.get(key)
            if not isinstance(seq, Mapping) or any(k not in seq for k in _SEQ_KEYS):
                raise ValueError(f"objective {self.name!r} needs batch[{key!r}] with keys {_SEQ_KEYS}; got "
                                 f"{None if seq is None else sorted(seq)}")
        forget_loss, logs = self.forget_term(model, batch, ref_model)
        loss = self.gamma * forget_loss
        if backward is not None:
            backward(loss)
            loss = loss.detach()
        logs = {"forget_loss": _f(forget_loss), **logs}
        if self.retain != "none":
            retain_loss = self.retain_term(model, batch["retain"], ref_model)
            term = self.alpha * retain_loss
            if backward is not None:
                backward(term)
                term = term.detach()
            loss = loss + term
            logs["retain_loss"] = _f(retain_loss)
        logs["loss"] = _f(loss)
        return loss, logs

    def forget_term(self, model: nn.Module, batch: Mapping[str, Any],
                    ref_model: Optional[nn.Module]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def retain_term(self, model: nn.Module, retain: Mapping[str, Tensor],
                    ref_model: Optional[nn.Module]) -> Tensor:
        logits = _forward_logits(model, retain)
        if self.retain == "nll":
            return nll_loss(*token_logprobs(logits, retain["labels"]))
        if self.retain == "kl":
            return kl_retain_loss(logits, _ref_logits(ref_model, retain), retain["labels"],
                                  all_positions=self.kl_all_positions)
        raise ValueError(f"unknown retain term {self.retain!r}")


def _check_positive(obj: Objective, *names: str, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
            v >= 0 if allow_zero else v > 0)
        if not ok:
            raise ValueError(f"{n} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")


@dataclass
class GradientAscent(Objective):
    """GA: forget term ``-NLL(forget)`` (token mean, HF ``outputs.loss``); no retain term by default
    (WAGLE ``GA``, G-effect ``ga``, open-unlearning ``GradAscent``)."""

    name: ClassVar[str] = "ga"
    retain: str = "none"

    def forget_term(self, model, batch, ref_model):
        f = batch["forget"]
        return -nll_loss(*token_logprobs(_forward_logits(model, f), f["labels"])), {}


@dataclass
class GradDiff(GradientAscent):
    """GradDiff: ``gamma * (-NLL_f) + alpha * NLL_r`` (WAGLE ``GA_FT``; open-unlearning ``GradDiff``,
    defaults gamma = alpha = 1, retain NLL)."""

    name: ClassVar[str] = "graddiff"
    retain: str = "nll"


@dataclass
class NPO(Objective):
    """NPO: ``-(2/beta) mean_i logsigmoid(beta (NLL_i,theta - NLL_i,ref))`` (Zhang et al. 2024).

    Fields: ``beta`` (default 0.1: NPO paper / open-unlearning, and WAGLE's hard-coded value);
    ``reduction``: ``"seq_sum"`` (default; NPO paper, open-unlearning, G-effect: NLL summed per
    sequence) or ``"token_mean"`` (WAGLE ``NPO_FT``: token-mean CE; WAGLE runs batch size 1, where its
    batch-wide mean equals our per-sequence mean). Same beta, different temperature (docs/pitfalls.md #9).
    """

    name: ClassVar[str] = "npo"
    forget_needs_reference: ClassVar[bool] = True
    beta: float = 0.1
    reduction: str = "seq_sum"

    def validate(self):
        _check_positive(self, "beta")
        if self.reduction not in ("seq_sum", "token_mean"):
            raise ValueError(f"reduction must be 'seq_sum' or 'token_mean', got {self.reduction!r}")

    def forget_term(self, model, batch, ref_model):
        f = batch["forget"]
        red = "sum" if self.reduction == "seq_sum" else "mean"
        lp = sequence_logprobs(*token_logprobs(_forward_logits(model, f), f["labels"]), red)
        lp_ref = sequence_logprobs(*token_logprobs(_ref_logits(ref_model, f), f["labels"]), red)
        return npo_loss(lp, lp_ref, self.beta), {"forget_log_ratio": _f((lp - lp_ref).mean())}


@dataclass
class SimNPO(Objective):
    """SimNPO: ``-(2/beta) mean_i logsigmoid(beta (NLL_i/|y_i| - delta))``, no reference (Fan et al.
    2024; open-unlearning ``simnpo.py``). Defaults from the open-unlearning SimNPO config: beta = 4.5,
    delta = 0, gamma = 0.125, alpha = 1."""

    name: ClassVar[str] = "simnpo"
    gamma: float = 0.125
    beta: float = 4.5
    delta: float = 0.0

    def validate(self):
        _check_positive(self, "beta")
        if not math.isfinite(self.delta):
            raise ValueError(f"delta must be finite, got {self.delta!r}")

    def forget_term(self, model, batch, ref_model):
        f = batch["forget"]
        lp = sequence_logprobs(*token_logprobs(_forward_logits(model, f), f["labels"]), "mean")
        return simnpo_loss(lp, self.beta, self.delta), {}


@dataclass
class PO(Objective):
    """PO / IdkPO: NLL of a refusal answer to the forget question (WAGLE ``CL_FT``, G-effect ``idk``,
    open-unlearning ``IdkNLL``). Reads ``batch["forget_refusal"]``: proper question + refusal + eos
    sequences with their own attention mask (docs/pitfalls.md #13; WAGLE reused the original answer's mask)."""

    name: ClassVar[str] = "po"
    forget_keys: ClassVar[tuple[str, ...]] = ("forget_refusal",)

    def forget_term(self, model, batch, ref_model):
        f = batch["forget_refusal"]
        return nll_loss(*token_logprobs(_forward_logits(model, f), f["labels"])), {}


@dataclass
class DPO(Objective):
    """DPO for unlearning: win = refusal (``win="refusal"``, IdkDPO) or alternate answer
    (``win="alternate"``), lose = original forget answer; sequence-summed log-likelihoods
    (open-unlearning ``DPO`` / ``compute_dpo_loss``). ``beta`` default 0.1 (open-unlearning's IdkDPO
    experiments; its ``DPO`` class default is 1.0)."""

    name: ClassVar[str] = "dpo"
    forget_needs_reference: ClassVar[bool] = True
    beta: float = 0.1
    win: str = "refusal"

    def validate(self):
        _check_positive(self, "beta")
        if self.win not in ("refusal", "alternate"):
            raise ValueError(f"win must be 'refusal' or 'alternate', got {self.win!r}")

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("forget", f"forget_{self.win}") + (("retain",) if self.retain != "none" else ())

    def forget_term(self, model, batch, ref_model):
        lose, win = batch["forget"], batch[f"forget_{self.win}"]

        def seq_lp(m, seq, ref: bool):
            logits = _ref_logits(m, seq) if ref else _forward_logits(m, seq)
            return sequence_logprobs(*token_logprobs(logits, seq["labels"]), "sum")

        w, l = seq_lp(model, win, False), seq_lp(model, lose, False)
        wr, lr = seq_lp(ref_model, win, True), seq_lp(ref_model, lose, True)
        return dpo_loss(w, wr, l, lr, self.beta), {"win_log_ratio": _f((w - wr).mean()),
                                                   "lose_log_ratio": _f((l - lr).mean())}


@dataclass
class WGA(Objective):
    """Weighted gradient ascent ``-mean_t[sg(p_t)^beta CE_t]`` (G-effect ``wga``; open-unlearning
    ``WGA``). ``beta`` default 1.0 (open-unlearning config; the G-effect code defaults to 5)."""

    name: ClassVar[str] = "wga"
    beta: float = 1.0

    def validate(self):
        _check_positive(self, "beta", allow_zero=True)

    def forget_term(self, model, batch, ref_model):
        f = batch["forget"]
        lp, mask = token_logprobs(_forward_logits(model, f), f["labels"])
        return wga_loss(lp, mask, self.beta), {}


@dataclass
class TNPO(Objective):
    """Token-wise NPO ``-mean_t[w_t CE_t]``, ``w_t = sg(2 p_t^beta / (p_t^beta + p_ref,t^beta + eps))``
    (G-effect ``tnpo``, beta = 4). Weights in log space (:func:`tnpo_weights`); ``eps=1e-5`` replicates
    the original code, default 0 (the original eps is not negligible when both p^beta < 1e-5)."""

    name: ClassVar[str] = "tnpo"
    forget_needs_reference: ClassVar[bool] = True
    beta: float = 4.0
    eps: float = 0.0

    def _weight_alpha(self) -> float:
        return 0.0

    def validate(self):
        _check_positive(self, "beta")
        _check_positive(self, "eps", allow_zero=True)

    def forget_term(self, model, batch, ref_model):
        f = batch["forget"]
        lp, mask = token_logprobs(_forward_logits(model, f), f["labels"])
        lp_ref, _ = token_logprobs(_ref_logits(ref_model, f), f["labels"])
        loss = tnpo_loss(lp, lp_ref, mask, self.beta, self._weight_alpha(), self.eps)
        w = tnpo_weights(lp, lp_ref, self.beta, self._weight_alpha(), self.eps)
        return loss, {"forget_token_weight": _f(_token_mean(w, mask))}


@dataclass
class WTNPO(TNPO):
    """Weighted TNPO: ``w_t = sg(2 p_t^(beta+weight_alpha) / (p_t^beta + p_ref,t^beta + eps))`` (G-effect
    ``wtnpo_{alpha}``, beta = 4, alpha = 1.5). The G-effect ``alpha`` is called ``weight_alpha`` here
    because ``alpha`` is the retain weight."""

    name: ClassVar[str] = "wtnpo"
    weight_alpha: float = 1.5

    def _weight_alpha(self) -> float:
        return self.weight_alpha

    def validate(self):
        super().validate()
        _check_positive(self, "weight_alpha", allow_zero=True)


@dataclass
class IHL(Objective):
    """Inverted hinge loss ``mean_t[1 + p_y - max_{v != y} p_v]`` on the forget answers, plus retain NLL
    (LoKU ``IHL``: weight 1.0). Fused: only the logsumexp and best non-target logit per token."""

    name: ClassVar[str] = "ihl"

    def forget_term(self, model, batch, ref_model):
        f = batch["forget"]
        return ihl_loss(_forward_logits(model, f), f["labels"]), {}


@dataclass
class RMU(Objective):
    """Representation misdirection (Li et al. 2024, WMDP; open-unlearning ``RMU``).

    Forget term: MSE between decoder block ``layer``'s output and ``steering_coeff * u/||u||`` on answer
    tokens, ``u ~ U[0,1)^D`` drawn once from ``torch.Generator().manual_seed(seed)`` (the original's
    normalised control vector; G-effect's variant is unnormalised). Retain term ``"activation"``
    (default): MSE to the frozen reference's activations of the same block on retain answer tokens
    (open-unlearning ``EMBED_DIFF``); ``"nll"``/``"kl"``/``"none"`` also work.
    Defaults from the WMDP original for zephyr-7b: layer 7, steering_coeff 6.5, alpha 1200. The
    original trains only layers 5-7 ``mlp.down_proj``; restricting parameters is the trainer's job.
    ``stop_early`` (default True) aborts each forward after block ``layer`` (saves the later blocks and
    the LM head); set False for wrappers that must see a complete forward (e.g. DeepSpeed ZeRO-3
    parameter prefetch).
    """

    name: ClassVar[str] = "rmu"
    retain_choices: ClassVar[tuple[str, ...]] = ("activation", "nll", "kl", "none")
    alpha: float = 1200.0
    retain: str = "activation"
    layer: int = 7
    steering_coeff: float = 6.5
    seed: int = 0
    stop_early: bool = True
    _control: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self):
        _check_positive(self, "steering_coeff")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer must be an int, got {type(self.layer).__name__}")

    def control_vector(self, dim: int, device=None, dtype=torch.float32) -> Tensor:
        """``steering_coeff * u / ||u||`` with ``u ~ U[0,1)^dim`` from ``seed``; ``[dim]``, cached."""
        if dim not in self._control:
            u = torch.rand(dim, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
            self._control[dim] = (u / u.norm() * self.steering_coeff).float()
        return self._control[dim].to(device=device, dtype=dtype)

    def forget_term(self, model, batch, ref_model):
        f = batch["forget"]
        acts = _forward_with_layer_output(model, f, self.layer, self.stop_early)
        target = self.control_vector(acts.shape[-1], acts.device)
        return activation_mse(acts, target, f["labels"] != IGNORE_INDEX), {}

    def retain_term(self, model, retain, ref_model):
        if self.retain != "activation":
            return super().retain_term(model, retain, ref_model)
        acts = _forward_with_layer_output(model, retain, self.layer, self.stop_early)
        with torch.no_grad():
            ref_acts = _forward_with_layer_output(ref_model, retain, self.layer, self.stop_early)
        return activation_mse(acts, ref_acts, retain["labels"] != IGNORE_INDEX)


OBJECTIVES: dict[str, type[Objective]] = {
    "ga": GradientAscent, "graddiff": GradDiff, "npo": NPO, "simnpo": SimNPO, "po": PO, "idkpo": PO,
    "dpo": DPO, "wga": WGA, "tnpo": TNPO, "wtnpo": WTNPO, "ihl": IHL, "rmu": RMU,
}


def get_objective(name: str, **hparams: Any) -> Objective:
    """Build an objective by name (case-insensitive): ``ga``, ``graddiff``, ``npo``, ``simnpo``,
    ``po``/``idkpo``, ``dpo``, ``wga``, ``tnpo``, ``wtnpo``, ``ihl``, ``rmu``.

    ``hparams`` are the dataclass fields (``gamma``, ``alpha``, ``retain``, ``kl_all_positions`` and the
    objective's own). Raises ValueError for an unknown name (listing the valid ones), an unknown
    hyperparameter (naming it and the accepted ones) or a bad value.
    """
    if not isinstance(name, str):
        raise TypeError(f"objective name must be a str, got {type(name).__name__}")
    cls = OBJECTIVES.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(hparams) - valid)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for objective {name!r}; accepted: "
                         f"{sorted(valid)}")
    return cls(**hparams)
