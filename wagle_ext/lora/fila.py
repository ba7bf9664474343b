"""FILA: Fisher-weighted low-rank initialisation of LoRA adapters (LoKU, Cha et al. 2025; the
derivation and the choices made here are in docs/lora.md, section "FILA").

For an adapted weight ``W`` ``[out, in]`` with LoRA scaling ``s = alpha / r``::

    w      = sqrt(sum_j F_rel[:, j])                 row weights from the relative Fisher  [out]
    U S V' ~ diag(w) W                               rank-r randomized SVD (torch.svd_lowrank)
    A      = (V sqrt(S / s))'                        lora_A  [r, in]
    B      = diag(1 / (w + eps)) U sqrt(S / s)       lora_B  [out, r]
    W_res  = W - s B A                               the new base weight

so ``W_res + s B A = W``: the model computes the same function at initialisation, while the adapter
starts on the directions of ``W`` that matter most for the forget set relative to the retain set.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..naming import normalize_param_name
from .fisher import FisherImportance

__all__ = ["fila_init", "lora_layers", "FILA_MARK"]

#: Attribute set on a PEFT model whose base weights FILA replaced by residuals: exporting only the
#: adapter would then be wrong (:mod:`wagle_ext.lora.export` checks it).
FILA_MARK = "wagle_fila"


def lora_layers(peft_model: torch.nn.Module, adapter_name: str = "default") -> list:
    """``[(module name, LoRA layer)]`` of every PEFT LoRA layer carrying ``adapter_name``."""
    out = []
    for name, mod in peft_model.named_modules():
        la = getattr(mod, "lora_A", None)
        if isinstance(la, torch.nn.ModuleDict) and adapter_name in la and hasattr(mod, "get_base_layer"):
            out.append((name, mod))
    return out


@torch.no_grad()
def fila_init(
    peft_model: torch.nn.Module,
    importances: FisherImportance,
    *,
    rank: Optional[int] = None,
    alpha: Optional[float] = None,
    adapter_name: str = "default",
    eps: float = 1e-5,
    niter: int = 2,
    oversample: int = 0,
    seed: int = 0,
) -> dict:
    """Initialise every LoRA layer of ``peft_model`` by FILA, in place.

    Args:
        peft_model: a ``peft`` LoRA model (``get_peft_model``). The function each layer computes now
            (base + current adapter, normally zero) is what gets factored, so any ``init_lora_weights``
            works and a second call keeps the logits too. Plain LoRA only (not DoRA). Each layer uses its
            own rank and scaling (``rank_pattern`` / ``alpha_pattern`` allowed).
        importances: :func:`~wagle_ext.lora.fisher_importance` of the same model (before wrapping, or
            of the wrapped one); needs an entry for every adapted weight.
        rank, alpha: when given, every adapted layer must have this rank / this ``lora_alpha``
            (``ValueError`` otherwise): a check that the PEFT config is the one meant.
        eps: LoKU's 1e-5, both in the relative Fisher's denominator and in ``1 / (w + eps)``.
        niter: subspace iterations of ``torch.svd_lowrank`` (LoKU: 2, the default).
        oversample: extra columns of the randomized SVD (``q = r + oversample``), truncated to ``r``
            afterwards; LoKU: 0. More is closer to the exact rank-``r`` factorisation.
        seed: the randomized SVD's seed (the global RNG is left as it was).

    Effect: ``lora_A`` / ``lora_B`` set, the base weight replaced by the residual ``W - s B A`` (in the
    weight's dtype); ``peft_model.wagle_fila`` records it (so the export keeps the residual base).
    The forward pass is unchanged up to rounding (fp32: ~1e-6 relative).

    Returns:
        ``{module name: {"rank", "scaling", "row_weight_min", "row_weight_max", "eps_dominated"}}``;
        ``eps_dominated`` is the fraction of retain-Fisher entries below ``eps``, where the relative
        Fisher is about ``F_forget / eps``, i.e. the retain data no longer counts (docs/lora.md). The
        overall fraction is also kept in ``peft_model.wagle_fila``.
    """
    if not isinstance(importances, FisherImportance):
        raise TypeError(f"importances must be a FisherImportance (wagle_ext.fisher_importance), "
                        f"got {type(importances).__name__}")
    if not (isinstance(niter, int) and niter >= 0):
        raise ValueError(f"niter must be an int >= 0, got {niter!r}")
    if isinstance(oversample, bool) or not (isinstance(oversample, int) and oversample >= 0):
        raise ValueError(f"oversample must be an int >= 0, got {oversample!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    layers = lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"peft_model has no LoRA layer with adapter {adapter_name!r} (build it with "
                         "peft.get_peft_model(model, LoraConfig(...)) or wagle_ext.lora.add_lora)")
    plan = []
    for name, layer in layers:
        base = layer.get_base_layer()
        wname = normalize_param_name(name + ".weight")
        if wname.split(".")[-2] == "lm_head":
            raise ValueError(f"{name}: FILA does not initialise an adapter on lm_head (LoKU excludes it); "
                             "drop lm_head from target_modules")
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude is not None and adapter_name in magnitude:
            raise ValueError(f"{name}: DoRA adapters are not supported by FILA (use_dora=False)")
        if not isinstance(getattr(base, "weight", None), torch.Tensor) or base.weight.dim() != 2:
            raise ValueError(f"{name}: FILA needs a linear base layer with a 2-D weight, got {type(base).__name__}")
        if wname not in importances.forget or wname not in importances.retain:
            raise ValueError(f"no Fisher importance for {wname!r}: compute the importances with the same "
                             "target modules as the adapters (fisher_importance(..., modules=...))")
        r, s = int(layer.r[adapter_name]), float(layer.scaling[adapter_name])
        if rank is not None and r != rank:
            raise ValueError(f"{name}: adapter rank {r} != rank={rank}")
        if alpha is not None and abs(float(layer.lora_alpha[adapter_name]) - float(alpha)) > 1e-12:
            raise ValueError(f"{name}: adapter lora_alpha {layer.lora_alpha[adapter_name]} != alpha={alpha}")
        if s == 0:
            raise ValueError(f"{name}: LoRA scaling is 0 (lora_alpha=0): FILA divides by it")
        fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        shape = tuple(base.weight.shape)
        out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else shape
        if r > min(out_f, in_f):
            raise ValueError(f"{name}: rank {r} exceeds min(out, in) = {min(out_f, in_f)}")
        imp_shape = tuple(importances.forget[wname].shape)
        if imp_shape != shape:
            raise ValueError(f"{name}: importance shape {imp_shape} != weight shape {shape}")
        plan.append((name, layer, base, wname, r, s, fan_in_fan_out))

    report = {}
    n_small = n_all = 0
    cuda = sorted({b.weight.device.index or 0 for _, _, b, *_ in plan if b.weight.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # seeded randomized SVD, the caller's RNG state restored
        torch.manual_seed(seed)
        for name, layer, base, wname, r, s, t in plan:
            W = base.weight.float()
            F_rel = importances.relative(wname, eps).to(W.device)
            if t:  # GPT-2 Conv1D stores [in, out]: work in the [out, in] layout of nn.Linear
                W, F_rel = W.t(), F_rel.t()
            la, lb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            # The layer computes W + s B A with its current adapter (zero after PEFT's default init; not
            # after init_lora_weights=False or an earlier FILA): factor that, so the function is kept.
            W = W + s * (lb.float() @ la.float())
            w = F_rel.sum(dim=1).sqrt()                                   # [out]
            q = min(r + oversample, min(W.shape))
            U, S, V = torch.svd_lowrank(w[:, None] * W, q=q, niter=niter)
            U, S, V = U[:, :r], S[:r], V[:, :r]                            # [out,r], [r], [in,r]
            S = S / s
            A = (V * S.sqrt()).t()                                        # [r, in]
            B = (1.0 / (w + eps))[:, None] * (U * S.sqrt())               # [out, r]
            W_res = W - s * (B @ A)
            la.copy_(A.to(la.dtype))
            lb.copy_(B.to(lb.dtype))
            base.weight.copy_((W_res.t() if t else W_res).to(base.weight.dtype))
            small = int((importances.retain[wname] < eps).sum())
            report[name] = {"rank": r, "scaling": s, "row_weight_min": float(w.min()),
                            "row_weight_max": float(w.max()), "eps_dominated": small / F_rel.numel()}
            n_small, n_all = n_small + small, n_all + F_rel.numel()
    marks = dict(getattr(peft_model, FILA_MARK, None) or {})
    marks[adapter_name] = {"layers": len(report), "eps": eps, "niter": niter, "oversample": oversample, "seed": seed,
                           "eps_dominated": n_small / max(n_all, 1)}
    setattr(peft_model, FILA_MARK, marks)
    return report
