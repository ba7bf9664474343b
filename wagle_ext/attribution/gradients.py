"""Gradients of a loss over a dataloader, per weight: the first stage of attribution (WAGLE,
Jia et al. 2024; docs/algorithms.md 1.2-1.5, 4), plus the Hessian-diagonal estimate and the Wanda
input norms that some score kinds use.

Memory of gradient accumulation: every parameter gets a ``register_post_accumulate_grad_hook`` that
adds its ``.grad`` into the fp32 accumulator **during** backward and frees ``.grad`` at once, so the
full set of per-step gradients never exists next to the accumulators (WAGLE's loop keeps both: the
bf16 ``.grad`` of every parameter plus its accumulators). For an fp32 model the first batch's
gradient tensor itself becomes the accumulator (no copy).

Batch format: a dict with ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt and
padding), as produced by the package's collators; paired loaders (``{"forget": {...}, "retain":
{...}}``) are read with ``batch_key=``. Any ``loss_fn(model, batch) -> scalar tensor`` may replace the
default loss.

Batch-size invariance (docs/algorithms.md 5): the default loss, :func:`causal_lm_sequence_loss`, is
the SUM over the batch's sequences of each sequence's token-mean cross-entropy -- exactly the loss a
batch of one computes (HF ``outputs.loss`` of that sequence alone), padding excluded and left padding
given the positions it would have unpadded. Its gradient is therefore the sum of the per-example
gradients, and a pass with batches of 8 accumulates the same ``g_f`` / ``g_r`` as a pass with batches
of 1 (to fp32 rounding), at the cost of one forward+backward per batch. Accumulations that are not
linear in the gradient (``square=True``: Fisher diagonal; ``reduction="ema"``) need per-example
gradients: there each batch is split into its sequences (padding trimmed) and run one by one, which
is exact and costs what a batch-1 loader costs.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from .._util import progress as progress_bar
from ..naming import LAYER_RE
from .losses import _model_inputs, _num_sequences, _split_sequences, causal_lm_loss, causal_lm_sequence_loss

__all__ = [
    "GradientDict",
    "LossFn",
    "accumulate_gradients",
    "causal_lm_loss",
    "causal_lm_sequence_loss",
    "collect_input_norms",
    "decoder_linear_names",
    "estimate_hessian_diagonal",
]

logger = logging.getLogger("wagle_ext.attribution")

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class GradientDict(OrderedDict):
    """``{parameter name: accumulated gradient}`` with ``.info`` (reduction, number of batches,
    square, dtype), so later stages can record how the gradients were made."""

    info: dict

    def __init__(self, *args, info: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.info = dict(info or {})


# ----------------------------------------------------------------------------- gradient accumulation
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
    granularity: str = "example",
    step_weight: Optional[Callable[[Any], float]] = None,
) -> GradientDict:
    """One pass over ``dataloader``, accumulating gradients of ``loss_fn`` per parameter.

    With the default loss (:func:`causal_lm_sequence_loss`, a sum of per-sequence losses) the
    result is the sum of per-EXAMPLE gradients whatever the batch size; ``square=True`` and
    ``reduction="ema"`` split every batch into its sequences (module docstring).

    Args:
        model: any ``nn.Module`` (e.g. an ``AutoModelForCausalLM``), any parameter dtype/device.
            It is put in eval mode (no dropout, as WAGLE's ``snip_advanced``) and restored to its
            previous mode afterwards. Parameter values are not changed; every ``.grad`` is left
            ``None`` (existing ``.grad`` are discarded).
        dataloader: iterable of batches (dicts, see :func:`causal_lm_sequence_loss`).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default :func:`causal_lm_sequence_loss`. For
            batch-size invariance a custom loss must be a SUM of per-sequence losses;
            :func:`causal_lm_loss` (HF's token mean over the whole batch) reproduces the old default.
        reduction: ``"sum"`` (WAGLE and SalUn: the sum over examples), ``"mean"`` (sum / number of
            examples, i.e. sequences: ``input_ids.shape[0]`` summed over batches), or ``"ema"``:
            ``a <- beta * a + (1 - beta) * g`` per example from ``a = 0``, no bias correction
            (WAGLE's ``hessian()`` EMA of squared retain gradients with ``square=True``).
        dtype: accumulator dtype (float32 by default; WAGLE summed in the bf16 model dtype, see
            docs/pitfalls.md #4). Gradients are upcast per parameter as they arrive.
        square: accumulate ``g * g`` (elementwise) instead of ``g``: an empirical Fisher diagonal
            of per-example gradients (batches are split into sequences).
        beta: EMA decay for ``reduction="ema"``.
        batch_key: when given, the loss sees ``batch[batch_key]`` (paired loaders).
        names: restrict to these parameter names (default: every parameter with ``requires_grad``).
        max_batches: stop after this many batches.
        eval_mode: put the model in eval mode for the pass (WAGLE; docs/pitfalls.md #19). ``False`` keeps
            its current mode: HF gradient checkpointing only runs in train mode, so a model with
            activation (gradient) checkpointing enabled and left in train mode scores with less activation
            memory (Llama-family models have no dropout, so the gradients are the same).
        progress: show a tqdm progress bar.
        granularity: what one backward sees when the accumulation is not linear in the gradient
            (``square`` or ``"ema"``): ``"example"`` (default; batches split into their sequences, so
            the result does not depend on the batch size) or ``"batch"`` (one backward per batch of
            the loader as given: squares of batch gradients, LoKU's FILA importances, docs/lora.md).
        step_weight: ``step_weight(batch) -> float``: each step's contribution (``g`` or ``g * g``)
            is multiplied by it (LoKU: the batch's label-token count); ``reduction="mean"`` then
            divides by the sum of the weights instead of the number of examples. Not with ``"ema"``.

    Returns:
        :class:`GradientDict` ``{name: tensor}`` shaped like each parameter, ``dtype``, on the
        parameter's device, in ``named_parameters()`` order; parameters that received no gradient
        get zeros. ``.info``: reduction, num_batches, num_examples, square, dtype, beta; also
        ``granularity`` when it is ``"batch"`` and ``total_weight`` with ``step_weight``.

    Raises:
        ValueError: a non-finite loss, a sequence without label tokens, no batches.

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
    if granularity not in ("example", "batch"):
        raise ValueError(f"granularity must be 'example' or 'batch', got {granularity!r}")
    if step_weight is not None and (reduction == "ema" or not callable(step_weight)):
        raise ValueError("step_weight must be a callable batch -> float, and is not used with reduction='ema'")
    if loss_fn is None:
        loss_fn = causal_lm_sequence_loss
    per_example = (square or reduction == "ema") and granularity == "example"
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
    weight = [1.0]  # the current step's step_weight (1 without one)

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            g = p.grad
            p.grad = None  # free the step's gradient now: only the accumulator stays alive
            if g is None:
                return
            touched.add(name)
            a = acc.get(name)
            w = weight[0]
            if square:
                g32 = g.to(dtype)
                sq = g32 * g32  # a transient of one parameter's size
                if w != 1.0:
                    sq.mul_(w)
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
                    acc[name] = first.mul_(1 - beta) if ema else (first.mul_(w) if w != 1.0 else first)
                elif ema:
                    a.mul_(beta).add_(g, alpha=1 - beta)
                else:
                    a.add_(g, alpha=w) if w != 1.0 else a.add_(g)
        return hook

    was_training = model.training
    handles = []
    frozen_state = [p.requires_grad for p in frozen]
    n_batches = 0
    n_examples = 0
    total_weight = 0.0
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
        for batch in progress_bar(dataloader, enabled=progress, desc=desc, total=total):
            if max_batches is not None and n_batches >= max_batches:
                break
            if batch_key is not None:
                if not isinstance(batch, Mapping) or batch_key not in batch:
                    raise ValueError(f"batch has no key {batch_key!r} (batch_key=)")
                batch = batch[batch_key]
            for step in (_split_sequences(batch) if per_example else (batch,)):
                touched.clear()
                if step_weight is not None:
                    weight[0] = float(step_weight(step))
                    if not weight[0] >= 0.0:
                        raise ValueError(f"step_weight returned {weight[0]!r} at batch {n_batches}; weights must "
                                         "be >= 0")
                    total_weight += weight[0]
                loss = loss_fn(model, step)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                     + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
                if not torch.isfinite(loss.detach()):
                    raise ValueError(f"loss is {loss.item()} at batch {n_batches} (a sequence whose labels are all "
                                     "-100 gives NaN token-mean CE); fix the data or the loss_fn")
                loss.backward()
                if ema:
                    for name, _ in params:  # parameters without a gradient this step still decay
                        if name not in touched and name in acc:
                            acc[name].mul_(beta)
            n_batches += 1
            n_examples += _num_sequences(batch)
    finally:
        for h in handles:
            h.remove()
        for p, rg in zip(frozen, frozen_state):
            p.requires_grad_(rg)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("dataloader yielded no batches")

    out = GradientDict(info={"reduction": reduction, "num_batches": n_batches, "num_examples": n_examples,
                             "square": bool(square),
                             "dtype": str(dtype).replace("torch.", ""), **({"beta": beta} if ema else {}),
                             **({"granularity": granularity} if granularity != "example" else {}),
                             **({"total_weight": total_weight} if step_weight is not None else {})})
    if reduction == "mean" and step_weight is not None and total_weight <= 0.0:
        raise ValueError("reduction='mean' with step_weight: the weights sum to 0 (nothing to average)")
    for name, p in params:
        a = acc.pop(name, None)
        if a is None:
            a = torch.zeros(p.shape, dtype=dtype, device=p.device)
        elif reduction == "mean":
            a.div_(total_weight if step_weight is not None else n_examples)
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

    ``method="fisher"``: the empirical Fisher diagonal, the mean over examples of squared per-example
    retain gradients (FILA/LoKU-style). ``method="ema"``: an EMA of squared per-example retain
    gradients (``h <- beta*h + (1-beta)*g^2``) over ``passes`` passes (WAGLE ``hessian()``: beta =
    0.95, 10 passes). Both split batches into sequences (one forward+backward per example), so they
    do not depend on the loader's batch size. Extra ``kwargs`` go to :func:`accumulate_gradients`. fp32, param shapes.
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
        n = e.info["num_examples"]  # one EMA step per example
        total_batches += e.info["num_batches"]
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
        if isinstance(mod, torch.nn.Linear) and LAYER_RE.search(mname + "."):
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
    norm is ``sqrt(scaler_j)``. With ``exclude_padding`` (default) the sum runs over the real tokens
    of every sequence, so the norms do not depend on the batch size (to fp32 rounding); left-padded
    rows get the positions they have unpadded. The normalisation is common to a whole row, so per-row selection does
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
    try:
        model.eval()
        for batch in progress_bar(dataloader, enabled=progress, desc="wanda calibration"):
            if max_batches is not None and n_batches >= max_batches:
                break
            if batch_key is not None:
                batch = batch[batch_key]
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError("calibration batches must be dicts with 'input_ids'")
            am = batch.get("attention_mask")
            state["mask"] = am if (exclude_padding and am is not None) else None
            inputs = _model_inputs(model, batch, ("input_ids", "attention_mask", "position_ids"))
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
