"""Weight attribution over Hugging Face causal LMs: gradients -> per-weight scores.

Pipeline (WAGLE, Jia et al. 2024; algorithms.md 1.2-1.5, 4):

1. :func:`accumulate_gradients` sums per-batch gradients of a loss (token-mean CE, HF
   ``outputs.loss``) over one pass of a dataloader, in fp32, model in eval mode.
2. :func:`compute_scores` turns weights and accumulated gradients into per-weight scores through the
   fused :func:`wagle_ext.attribution_scores` op (``wagle``, ``snip``, ``gradient``,
   ``magnitude``), or in PyTorch (``random``, ``wanda``).
3. :func:`wagle_ext.masks.build_mask` selects the top ``ratio`` of weights.

:func:`score_model` runs 1-2 end to end, optionally *streaming* (scores overwrite the forget-gradient
accumulator and the retain accumulator is freed tensor by tensor: peak memory = weights + 2 fp32
buffers instead of weights + 3).

Memory of gradient accumulation: every parameter gets a ``register_post_accumulate_grad_hook`` that
adds its ``.grad`` into the fp32 accumulator **during** backward and frees ``.grad`` at once, so the
full set of per-step gradients never exists next to the accumulators (WAGLE's loop keeps both: the
bf16 ``.grad`` of every parameter plus its accumulators). For an fp32 model the first batch's
gradient tensor itself becomes the accumulator (no copy).

Batch format: a dict with ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt and
padding), as produced by the package's collators; paired loaders (``{"forget": {...}, "retain":
{...}}``) are read with ``batch_key=``. Any ``loss_fn(model, batch) -> scalar tensor`` may replace the
default loss.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from .masks import _LAYER_RE, model_fingerprint, normalize_param_name

__all__ = [
    "SCORE_KINDS",
    "GradientDict",
    "ScoreDict",
    "accumulate_gradients",
    "causal_lm_loss",
    "collect_input_norms",
    "compute_scores",
    "decoder_linear_names",
    "estimate_hessian_diagonal",
    "score_model",
    "wagle_term_norms",
]

logger = logging.getLogger("wagle_ext.attribution")

SCORE_KINDS = ("wagle", "snip", "gradient", "magnitude", "random", "wanda")
_OP_KINDS = ("wagle", "snip", "gradient", "magnitude")
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class GradientDict(OrderedDict):
    """``{parameter name: accumulated gradient}`` with ``.info`` (reduction, number of batches,
    square, dtype), so later stages can record how the gradients were made."""

    info: dict

    def __init__(self, *args, info: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.info = dict(info or {})


class ScoreDict(OrderedDict):
    """``{parameter name: float32 scores}`` with ``.info`` (score kind, gamma, hessian, model
    fingerprint, term norms, ...), copied by :func:`wagle_ext.masks.build_mask` into the mask
    metadata."""

    info: dict

    def __init__(self, *args, info: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.info = dict(info or {})


# ----------------------------------------------------------------------------- losses
def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean next-token cross-entropy over the label tokens of the batch: HF ``outputs.loss``
    (WAGLE's ``ce_mean``; labels ``-100`` are ignored). Works for any ``AutoModelForCausalLM``.

    ``batch``: dict with ``input_ids`` [B, T] int64, ``attention_mask`` [B, T], ``labels`` [B, T]
    (other keys are ignored). Tensors are moved to the model's device. Returns a scalar.

    The same loss gives ``g_f`` on forget answers, ``g_r`` on retain answers and, on refusal-target
    batches, the PO forget gradient (WAGLE ``snip_advanced_CL``).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        raise ValueError("causal_lm_loss needs a dict batch with 'input_ids' and 'labels' "
                         "(and usually 'attention_mask'); pass batch_key= for paired loaders "
                         "or a custom loss_fn(model, batch)")
    inputs = _to_device({k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch}, _model_device(model))
    return model(**inputs, use_cache=False).loss


# ----------------------------------------------------------------------------- gradient accumulation
def _progress(iterable: Iterable, enabled: bool, desc: str, total: Optional[int]):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but do not fail scoring over a progress bar
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _named_trainable(model: torch.nn.Module, names: Optional[Sequence[str]]) -> list:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if names is not None:
        wanted = set(names)
        unknown = wanted - {n for n, _ in params}
        if unknown:
            raise ValueError(f"names not among the model's trainable parameters: {sorted(unknown)[:5]}")
        params = [(n, p) for n, p in params if n in wanted]
    return params


def accumulate_gradients(
    model: torch.nn.Module,
    dataloader: Iterable,
    loss_fn: Optional[LossFn] = None,
    *,
    reduction: str = "sum",
    dtype: torch.dtype = torch.float32,
    square: bool = False,
    beta: float = 0.95,
    batch_key: Optional[str] = None,
    names: Optional[Sequence[str]] = None,
    max_batches: Optional[int] = None,
    eval_mode: bool = True,
    progress: bool = True,
    desc: str = "gradients",
) -> GradientDict:
    """One pass over ``dataloader``, accumulating per-batch gradients of ``loss_fn`` per parameter.

    Args:
        model: any ``nn.Module`` (e.g. an ``AutoModelForCausalLM``), any parameter dtype/device.
            It is put in eval mode (no dropout, as WAGLE's ``snip_advanced``) and restored to its
            previous mode afterwards. Parameter values are not changed; every ``.grad`` is left
            ``None`` (existing ``.grad`` are discarded).
        dataloader: iterable of batches (dicts, see :func:`causal_lm_loss`).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default :func:`causal_lm_loss`.
        reduction: ``"sum"`` (WAGLE and SalUn: the sum over batches), ``"mean"`` (sum / number of
            batches), or ``"ema"``: ``a <- beta * a + (1 - beta) * g`` per batch from ``a = 0``,
            no bias correction (WAGLE's ``hessian()`` EMA of squared retain gradients with
            ``square=True``).
        dtype: accumulator dtype (float32 by default; WAGLE summed in the bf16 model dtype, see
            algorithms.md pitfall 4). Gradients are upcast per parameter as they arrive.
        square: accumulate ``g * g`` (elementwise) instead of ``g``: an empirical Fisher diagonal
            at batch granularity.
        beta: EMA decay for ``reduction="ema"``.
        batch_key: when given, the loss sees ``batch[batch_key]`` (paired loaders).
        names: restrict to these parameter names (default: every parameter with ``requires_grad``).
        max_batches: stop after this many batches.
        eval_mode: put the model in eval mode for the pass (WAGLE; pitfall 19). ``False`` keeps
            its current mode: HF gradient checkpointing only runs in train mode, so a model with
            activation (gradient) checkpointing enabled and left in train mode scores with less activation
            memory (Llama-family models have no dropout, so the gradients are the same).
        progress: show a tqdm progress bar.

    Returns:
        :class:`GradientDict` ``{name: tensor}`` shaped like each parameter, ``dtype``, on the
        parameter's device, in ``named_parameters()`` order; parameters that received no gradient
        get zeros. ``.info``: reduction, num_batches, square, dtype, beta.

    Raises:
        ValueError: a non-finite loss (e.g. a batch with no label tokens gives NaN), no batches.

    Memory: the accumulators (one per parameter) plus the step's activations and, transiently, one
    parameter's gradient; the model's full ``.grad`` set is never materialised next to them
    (post-accumulate-grad hooks).

    Data parallelism is not handled here: pass the unwrapped module (not a DDP/FSDP wrapper, whose
    own gradient hooks expect ``.grad`` to stay), give each process its data shard, and sum the
    accumulators across processes yourself (``dist.all_reduce`` per tensor) if needed.
    """
    if reduction not in ("sum", "mean", "ema"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'ema', got {reduction!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if reduction == "ema" and not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must be in [0, 1) for reduction='ema', got {beta!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    if loss_fn is None:
        loss_fn = causal_lm_loss
    params = _named_trainable(model, names)
    if not params:
        raise ValueError("model has no parameter with requires_grad=True to accumulate gradients for")
    if names is not None:
        # Only the requested parameters need gradients; freeze the rest for the pass.
        wanted = {n for n, _ in params}
        frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in wanted]
    else:
        frozen = []

    acc: dict = {}
    touched: set = set()
    ema = reduction == "ema"

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            g = p.grad
            p.grad = None  # free the step's gradient now: only the accumulator stays alive
            if g is None:
                return
            touched.add(name)
            a = acc.get(name)
            if square:
                g32 = g.to(dtype)
                sq = g32 * g32  # a transient of one parameter's size
                if a is None:
                    acc[name] = sq.mul_(1 - beta) if ema else sq
                elif ema:
                    a.mul_(beta).add_(sq, alpha=1 - beta)
                else:
                    a.add_(sq)
            else:
                if a is None:
                    # Steal the step's gradient as the accumulator (no copy) when dtypes match.
                    first = g.to(dtype).contiguous()
                    acc[name] = first.mul_(1 - beta) if ema else first
                elif ema:
                    a.mul_(beta).add_(g, alpha=1 - beta)
                else:
                    a.add_(g)
        return hook

    was_training = model.training
    handles = []
    frozen_state = [p.requires_grad for p in frozen]
    n_batches = 0
    try:
        if eval_mode:
            model.eval()
        model.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(False)
        for name, p in params:
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))
        total = None
        try:
            total = len(dataloader)  # type: ignore[arg-type]
            if max_batches is not None:
                total = min(total, max_batches)
        except TypeError:
            pass
        for batch in _progress(dataloader, progress, desc, total):
            if max_batches is not None and n_batches >= max_batches:
                break
            if batch_key is not None:
                if not isinstance(batch, Mapping) or batch_key not in batch:
                    raise ValueError(f"batch has no key {batch_key!r} (batch_key=)")
                batch = batch[batch_key]
            touched.clear()
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                 + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
            if not torch.isfinite(loss.detach()):
                raise ValueError(f"loss is {loss.item()} at batch {n_batches} (a batch whose labels are all "
                                 "-100 gives NaN token-mean CE); fix the data or the loss_fn")
            loss.backward()
            if ema:
                for name, _ in params:  # parameters without a gradient this batch still decay
                    if name not in touched and name in acc:
                        acc[name].mul_(beta)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, rg in zip(frozen, frozen_state):
            p.requires_grad_(rg)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("dataloader yielded no batches")

    out = GradientDict(info={"reduction": reduction, "num_batches": n_batches, "square": bool(square),
                             "dtype": str(dtype).replace("torch.", ""), **({"beta": beta} if ema else {})})
    for name, p in params:
        a = acc.pop(name, None)
        if a is None:
            a = torch.zeros(p.shape, dtype=dtype, device=p.device)
        elif reduction == "mean":
            a.div_(n_batches)
        out[name] = a.view(p.shape)
    return out


def estimate_hessian_diagonal(
    model: torch.nn.Module,
    retain_loader: Iterable,
    loss_fn: Optional[LossFn] = None,
    *,
    method: str = "fisher",
    beta: float = 0.95,
    passes: int = 1,
    **kwargs,
) -> GradientDict:
    """Diagonal estimate of the retain-loss Hessian, for ``compute_scores(..., hessian=h)``.

    ``method="fisher"``: the empirical Fisher diagonal, the mean over batches of squared retain
    gradients (FILA/LoKU-style, batch granularity). ``method="ema"``: an EMA of squared retain
    gradients (``h <- beta*h + (1-beta)*g^2``) over ``passes`` passes (WAGLE ``hessian()``: beta =
    0.95, 10 passes). Extra ``kwargs`` go to :func:`accumulate_gradients`. fp32, param shapes.
    """
    if method not in ("fisher", "ema"):
        raise ValueError(f"method must be 'fisher' or 'ema', got {method!r}")
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, got {passes!r}")
    if method == "fisher":
        if passes != 1:
            raise ValueError("passes is only used by method='ema'")
        h = accumulate_gradients(model, retain_loader, loss_fn, reduction="mean", square=True,
                                 desc="fisher diagonal", **kwargs)
        h.info["hessian_method"] = "fisher"
        return h
    h = None
    total_batches = 0
    for _ in range(passes):
        # Each pass is an EMA continuing from the previous state: state after the pass =
        # beta^n * previous + this pass's EMA-from-zero.
        e = accumulate_gradients(model, retain_loader, loss_fn, reduction="ema", square=True, beta=beta,
                                 desc="EMA of squared retain gradients", **kwargs)
        n = e.info["num_batches"]
        total_batches += n
        if h is None:
            h = e
        else:
            for k in h:
                h[k].mul_(beta ** n).add_(e[k])
    assert h is not None
    h.info.update({"hessian_method": "ema", "passes": passes, "num_batches": total_batches})
    return h


# ----------------------------------------------------------------------------- wanda calibration
def decoder_linear_names(model: torch.nn.Module) -> list:
    """Weight names of the ``nn.Linear`` modules inside decoder layers (``...layers.<i>.`` /
    ``h.<i>`` / ``blocks.<i>``), WAGLE's Wanda scope: no embeddings, norms or lm_head."""
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and _LAYER_RE.search(mname + "."):
            out.append(f"{mname}.weight")
    return out


@torch.no_grad()
def collect_input_norms(
    model: torch.nn.Module,
    dataloader: Iterable,
    *,
    names: Optional[Sequence[str]] = None,
    batch_key: Optional[str] = None,
    exclude_padding: bool = True,
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> "OrderedDict[str, torch.Tensor]":
    """Wanda's input-feature norms ``||X_j||_2`` for ``nn.Linear`` layers, from forward hooks.

    For each module, ``scaler_j = sum over calibration tokens of x_j^2 / number of sequences`` (the
    running mean in WAGLE/Wanda ``WrappedGPT.add_batch``, computed as one fp32 sum) and the returned
    norm is ``sqrt(scaler_j)``. The normalisation is common to a whole row, so per-row selection does
    not depend on it.

    Args:
        model: causal LM; run in eval mode under ``no_grad`` (mode restored afterwards).
        dataloader: calibration batches (WAGLE: 128 forget samples); dicts with ``input_ids`` and
            ``attention_mask``.
        names: weight names of the Linear modules (default :func:`decoder_linear_names`).
        exclude_padding: skip positions with ``attention_mask == 0`` (default). ``False`` counts
            every position, as WAGLE did with its padded-to-512 inputs.
        max_batches: stop after this many batches.

    Returns:
        ``{weight name: float32 [in_features]}`` on each weight's device.
    """
    if names is None:
        names = decoder_linear_names(model)
    modules = dict(model.named_modules())
    targets = []
    for n in names:
        mname = n[: -len(".weight")] if n.endswith(".weight") else n
        mod = modules.get(mname)
        if not isinstance(mod, torch.nn.Linear):
            raise ValueError(f"{n!r} is not the weight of an nn.Linear module of this model")
        targets.append((n, mod))
    if not targets:
        raise ValueError("no nn.Linear module to calibrate (names= is empty)")
    sums = {n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for n, m in targets}
    state: dict = {"mask": None}

    def make_hook(name: str):
        def hook(mod, args):
            x = args[0]
            m = state["mask"]
            x = x.to(torch.float32)
            if m is not None and x.dim() == 3 and tuple(m.shape) == tuple(x.shape[:2]):
                x = x[m.to(device=x.device, dtype=torch.bool)]
            sums[name] += x.reshape(-1, x.shape[-1]).square().sum(0)
        return hook

    was_training = model.training
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets]
    n_seq = 0
    n_batches = 0
    device = _model_device(model)
    try:
        model.eval()
        for batch in _progress(dataloader, progress, "wanda calibration", None):
            if max_batches is not None and n_batches >= max_batches:
                break
            if batch_key is not None:
                batch = batch[batch_key]
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError("calibration batches must be dicts with 'input_ids'")
            am = batch.get("attention_mask")
            state["mask"] = am if (exclude_padding and am is not None) else None
            inputs = _to_device({k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}, device)
            model(**inputs, use_cache=False)
            n_seq += int(batch["input_ids"].shape[0]) if batch["input_ids"].dim() > 1 else 1
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration dataloader yielded no batches")
    return OrderedDict((n, (s / n_seq).sqrt_()) for n, s in sums.items())


# ----------------------------------------------------------------------------- scores
def _stable_seed(seed: int, name: str) -> int:
    # Normalised name: a DDP/PEFT-wrapped model draws the same values as the bare one.
    h = hashlib.sha256(f"{int(seed)}:{normalize_param_name(name)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _random_scores(shape: torch.Size, seed: int, name: str, device: torch.device) -> torch.Tensor:
    # One CPU generator per tensor, seeded by (seed, name): the same values whichever subset of
    # parameters a process scores (multi-process blocks) and whatever the device.
    gen = torch.Generator().manual_seed(_stable_seed(seed, name))
    return torch.rand(shape, generator=gen, dtype=torch.float32).to(device)


def wagle_term_norms(
    weights: Sequence[torch.Tensor],
    grads_retain: Sequence[torch.Tensor],
    *,
    gamma: float = 1e-6,
    hessian: Optional[Sequence[torch.Tensor]] = None,
    eps: float = 1e-8,
) -> dict:
    """Sizes of the two terms of WAGLE's bracket ``w - g_r / gamma`` (algorithms.md 1.2 "scale
    warning"): ``weight_norm`` = ||w||_2, ``retain_term_norm`` = ||g_r / gamma||_2 (or
    ``||g_r / (h + eps)||``), their ratio, ``frac_weight_dominant`` = fraction of elements with
    ``|w| > |g_r / gamma|``, and ``dominant`` (``"weight"`` or ``"retain_gradient"``). Reads only."""
    w2 = 0.0
    r2 = 0.0
    n_w = 0
    n = 0
    chunk = 1 << 20  # bounded temporaries (~12 MB): this runs next to full-model accumulators
    for i, (w, g) in enumerate(zip(weights, grads_retain)):
        wflat = w.detach().reshape(-1)
        gflat = g.reshape(-1)
        hflat = hessian[i].reshape(-1) if hessian is not None else None
        for lo in range(0, wflat.numel(), chunk):
            wf = wflat[lo:lo + chunk].to(torch.float32)
            gf = gflat[lo:lo + chunk].to(torch.float32)
            if hflat is not None:
                r = gf / (hflat[lo:lo + chunk].to(torch.float32) + eps)
            else:
                r = gf / gamma
            w2 += float(wf.double().square().sum())
            r2 += float(r.double().square().sum())
            n_w += int((wf.abs() > r.abs()).sum())
        n += wflat.numel()
    wn, rn = math.sqrt(float(w2)), math.sqrt(float(r2))
    return {
        "weight_norm": wn,
        "retain_term_norm": rn,
        "retain_over_weight": (rn / wn) if wn > 0 else math.inf,
        "frac_weight_dominant": (n_w / n) if n else 0.0,
        "dominant": "weight" if wn >= rn else "retain_gradient",
    }


def compute_scores(
    model: torch.nn.Module,
    g_f: Optional[Mapping[str, torch.Tensor]] = None,
    g_r: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    kind: str,
    gamma: float = 1e-6,
    hessian: Optional[Mapping[str, torch.Tensor]] = None,
    eps: float = 1e-8,
    seed: int = 0,
    input_norms: Optional[Mapping[str, torch.Tensor]] = None,
    names: Optional[Sequence[str]] = None,
    inplace: bool = False,
    log_terms: bool = True,
) -> ScoreDict:
    """Per-weight attribution scores (float32, larger = more important = selected first).

    Kinds (algorithms.md 1.2, 1.5, 4):

    * ``wagle``: ``|(w - g_r / gamma) * g_f|`` (WAGLE ``snip_advanced``); with ``hessian=h`` (a
      diagonal estimate, :func:`estimate_hessian_diagonal`) ``|(w - g_r / (h + eps)) * g_f|``.
    * ``snip``: ``|w * g_f|``;  ``gradient``: ``|g_f|`` (SalUn);  ``magnitude``: ``|w|``.
    * ``random``: U(0, 1), from a CPU generator seeded by ``(seed, normalised parameter name)``.
    * ``wanda``: ``|W_ij| * ||X_j||_2`` with ``input_norms`` from :func:`collect_input_norms`;
      scores only the Linear weights in ``input_norms`` (select per row:
      ``build_mask(scores, ratio, scope="per_row")``).

    The first four run through :func:`wagle_ext.attribution_scores` (fused C++/CUDA/Triton kernel).

    Args:
        model: its ``named_parameters()`` give ``w`` (values read, never written).
        g_f, g_r: accumulated forget/retain gradients ``{name: tensor}`` (any float dtype), e.g. from
            :func:`accumulate_gradients`. ``g_f`` fixes which parameters are scored.
        gamma: WAGLE's constant Hessian diagonal (``unlearn.mu``, 1e-6 in the released configs);
            it is paired with SUMMED gradients there (algorithms.md pitfall 6).
        hessian: ``{name: diagonal estimate}``; replaces ``gamma``.
        seed: for ``random``.
        names: score only these parameters (e.g. this process's block, see
            :func:`wagle_ext.masks.partition_names`); default: the keys of ``g_f`` / ``input_norms``,
            or every parameter with ``requires_grad`` (``magnitude``, ``random``).
        inplace: write scores over the ``g_f`` tensors (must be contiguous float32) and delete each
            ``g_r`` / ``hessian`` entry from those dicts once its tensor is scored, so peak memory
            stays at the inputs' size. **Mutates** ``g_f``, ``g_r`` and ``hessian``.
        log_terms: for ``wagle``, log (INFO, logger ``wagle_ext.attribution``) and record in
            ``.info["terms"]`` which term of ``w - g_r/gamma`` dominates (:func:`wagle_term_norms`);
            with WAGLE's defaults the weight term is usually negligible.

    Returns:
        :class:`ScoreDict` ``{name: float32 tensor shaped like the parameter}`` on each parameter's
        device, in parameter order; ``.info`` holds the provenance for the mask metadata.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = OrderedDict(model.named_parameters())
    if kind in ("wagle", "snip", "gradient") and g_f is None:
        raise ValueError(f"kind={kind!r} needs g_f (accumulated forget gradients)")
    if kind == "wagle" and g_r is None:
        raise ValueError("kind='wagle' needs g_r (accumulated retain gradients); use kind='snip' for |w * g_f|")
    if kind == "wanda" and input_norms is None:
        raise ValueError("kind='wanda' needs input_norms= (from collect_input_norms(model, calibration_loader))")
    if hessian is not None and kind != "wagle":
        raise ValueError(f"hessian is only used by kind='wagle', got kind={kind!r}")
    if kind == "wagle" and hessian is None and not (
            isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if inplace and kind not in ("wagle", "snip", "gradient"):
        raise ValueError(f"inplace=True writes over g_f; kind={kind!r} does not read g_f")

    if names is None:
        if kind == "wanda":
            names = list(input_norms.keys())  # type: ignore[union-attr]
        elif g_f is not None and kind != "magnitude":
            names = list(g_f.keys())
        else:
            names = [n for n, p in params.items() if p.requires_grad]
    names = list(names)
    for n in names:
        if n not in params:
            raise ValueError(f"{n!r} is not a parameter of the model")
        for d, dname in ((g_f if kind in ("wagle", "snip", "gradient") else None, "g_f"),
                         (g_r if kind == "wagle" else None, "g_r"), (hessian, "hessian"),
                         (input_norms if kind == "wanda" else None, "input_norms")):
            if d is not None and n not in d:
                raise ValueError(f"{dname} has no entry for parameter {n!r}")

    info: dict = {"score_kind": kind, "model_fingerprint": model_fingerprint(model)}
    if kind == "wagle":
        if hessian is None:
            info.update({"gamma": float(gamma), "hessian": "constant"})
        else:
            info.update({"hessian": getattr(hessian, "info", {}).get("hessian_method", "diagonal"), "eps": float(eps)})
    if kind == "random":
        info["seed"] = int(seed)
    for d, key in ((g_f, "forget_grad"), (g_r, "retain_grad"), (hessian, "hessian_info")):
        if d is not None and getattr(d, "info", None) and kind in ("wagle", "snip", "gradient"):
            if key != "retain_grad" or kind == "wagle":
                info[key] = dict(d.info)

    if kind == "wagle" and log_terms:
        terms = wagle_term_norms([params[n] for n in names], [g_r[n] for n in names], gamma=gamma,  # type: ignore[index]
                                 hessian=None if hessian is None else [hessian[n] for n in names], eps=eps)
        info["terms"] = terms
        denom = "||g_r||/gamma" if hessian is None else "||g_r/(h+eps)||"
        logger.info("wagle score terms: ||w|| = %.4g, %s = %.4g (ratio %.3g); |w| > |retain term| for %.3g%% "
                    "of weights; dominant: %s", terms["weight_norm"], denom, terms["retain_term_norm"],
                    terms["retain_over_weight"], 100 * terms["frac_weight_dominant"], terms["dominant"])

    from .ops import attribution_scores

    out = ScoreDict(info=info)
    for n in names:
        w = params[n].detach()
        if kind == "random":
            out[n] = _random_scores(w.shape, seed, n, w.device)
            continue
        if kind == "wanda":
            norm = input_norms[n].to(device=w.device, dtype=torch.float32)  # type: ignore[index]
            if w.dim() != 2 or norm.shape != (w.shape[1],):
                raise ValueError(f"input_norms[{n!r}] has shape {tuple(norm.shape)}; expected ({w.shape[1]},) "
                                 f"for a weight of shape {tuple(w.shape)}")
            out[n] = w.to(torch.float32).abs() * norm.unsqueeze(0)
            continue
        gf = g_f[n] if (g_f is not None and kind != "magnitude") else None
        gr = g_r[n] if kind == "wagle" else None  # type: ignore[index]
        h = hessian[n] if hessian is not None else None
        o = None
        if inplace:
            if gf.dtype != torch.float32 or not gf.is_contiguous():
                raise ValueError(f"inplace=True needs contiguous float32 g_f; g_f[{n!r}] is {gf.dtype}"
                                 + ("" if gf.is_contiguous() else ", non-contiguous"))
            o = [gf.view(-1)]
        s = attribution_scores([w], None if gf is None else [gf], None if gr is None else [gr], kind=kind,
                               gamma=float(gamma), hessian=None if h is None else [h], eps=eps, out=o)[0]
        out[n] = s.view(w.shape)
        if inplace:
            # The scores now live in g_f's storage; free what this tensor needed.
            if g_r is not None and kind == "wagle":
                del g_r[n]  # type: ignore[attr-defined]
            if hessian is not None:
                del hessian[n]  # type: ignore[attr-defined]
    return out


# ----------------------------------------------------------------------------- end to end
def score_model(
    model: torch.nn.Module,
    forget_loader: Optional[Iterable] = None,
    retain_loader: Optional[Iterable] = None,
    *,
    kind: str = "wagle",
    gamma: float = 1e-6,
    hessian: Union[None, str, Mapping[str, torch.Tensor]] = None,
    reduction: str = "sum",
    stream: bool = True,
    forget_loss_fn: Optional[LossFn] = None,
    retain_loss_fn: Optional[LossFn] = None,
    forget_key: Optional[str] = None,
    retain_key: Optional[str] = None,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> ScoreDict:
    """Gradients and scores in one call (WAGLE ``snip_advanced`` and its baselines).

    Order (as WAGLE): one pass over ``retain_loader`` for ``g_r`` (``kind="wagle"``), then one pass
    over ``forget_loader`` for ``g_f``. For ``wanda`` the forget loader is the calibration set.

    Args:
        hessian: ``None`` (constant ``gamma``), ``"fisher"`` or ``"ema"`` (estimated from the retain
            loader first, :func:`estimate_hessian_diagonal`), or precomputed ``{name: tensor}``.
        stream: ``True``: scores are written over the ``g_f`` accumulator and ``g_r`` is freed tensor
            by tensor, so peak memory is weights + ``g_r`` + ``g_f`` (one accumulator + one
            gradient buffer). ``False``: ``g_f``/``g_r`` stay alive next to a fresh score buffer
            (weights + 3 buffers). Scores are identical.
        forget_loss_fn / retain_loss_fn: default :func:`causal_lm_loss` (for PO pass the
            refusal-target batches as the forget loader, WAGLE ``snip_advanced_CL``).
        forget_key / retain_key: ``batch_key`` for paired loaders.
        Other arguments as in :func:`accumulate_gradients` and :func:`compute_scores`.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    acc_kw = dict(reduction=reduction, max_batches=max_batches, progress=progress, names=names)
    if kind in ("magnitude", "random"):
        return compute_scores(model, kind=kind, seed=seed, names=names)
    if forget_loader is None:
        raise ValueError(f"kind={kind!r} needs forget_loader")
    if kind == "wanda":
        norms = collect_input_norms(model, forget_loader, batch_key=forget_key, max_batches=max_batches,
                                    progress=progress, names=None if names is None else
                                    [n for n in decoder_linear_names(model) if n in set(names)])
        return compute_scores(model, kind="wanda", input_norms=norms)
    h = None
    if kind == "wagle":
        if retain_loader is None:
            raise ValueError("kind='wagle' needs retain_loader")
        if isinstance(hessian, str):
            h = estimate_hessian_diagonal(model, retain_loader, retain_loss_fn, method=hessian,
                                          batch_key=retain_key, max_batches=max_batches, progress=progress,
                                          names=names)
        elif hessian is not None:
            h = hessian
        g_r = accumulate_gradients(model, retain_loader, retain_loss_fn, batch_key=retain_key,
                                   desc="retain gradients", **acc_kw)
    elif hessian is not None:
        raise ValueError(f"hessian is only used by kind='wagle', got kind={kind!r}")
    else:
        g_r = None
    g_f = accumulate_gradients(model, forget_loader, forget_loss_fn, batch_key=forget_key,
                               desc="forget gradients", **acc_kw)
    if stream and isinstance(h, Mapping) and not isinstance(hessian, str):
        h = OrderedDict(h)  # never delete entries from the caller's dict
        h_info = getattr(hessian, "info", None)
        if h_info:
            h = GradientDict(h, info=h_info)
    scores = compute_scores(model, g_f, g_r, kind=kind, gamma=gamma, hessian=h, inplace=stream)
    del g_f, g_r, h
    return scores
