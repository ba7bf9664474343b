"""The G-effect probe (Wang et al., ICLR 2025): does an unlearning step forget, and what does it cost?

For an objective ``L`` and a risk ``R`` (the answer NLL of a forget or a retain batch), the G-effect is
the inner product of their gradients, ``e = <grad R, grad L> = sum over weights of grad R * grad L``.
A gradient-descent step of size ``lr`` on ``L`` changes ``R`` by about ``-lr * e``, so

* ``e_unlearn`` (``R`` = forget NLL) well below 0 means the step forgets (the forget NLL rises),
* ``e_retain`` (``R`` = retain NLL) below 0 means the step damages retained knowledge.

As in the paper, each gradient is an exponential moving average over the probed steps,
``g <- (1 - ema) * g + ema * g_new`` (paper: ``ema = 0.4``; the first probe initialises ``g``;
``ema=None`` switches it off, then every step's value is the plain inner product), and the values are
reported per group of weights: ``embed``, decoder-layer bands of ``layer_band`` layers
(``layers 0-9``, ``layers 10-19``, ...), ``lm_head`` and ``other`` (final norm and the rest). With a
:class:`~wagle_ext.masks.MaskSet` each group is also split into its **masked** (updated) and
**frozen** weights: it shows where a mask lets forgetting happen.

Gradients are taken with :func:`torch.autograd.grad`, never into ``.grad``: probing inside a training
run (:class:`GEffectCallback`) leaves the optimizer's gradients, compact-gradient hooks and RNG
(forked) untouched, so the training trajectory is bit-identical with or without the probe. Memory: one
fp32 copy of the objective gradient (three with the EMA on) of the parameters that require grad.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .._util import model_device, progress, to_device
from ..naming import layer_of, normalize_param_name
from ..unlearn.objectives import Objective, _forward_logits, get_objective, nll_loss, token_logprobs

__all__ = ["g_effect", "GEffectCallback", "weight_groups", "plot_g_effect", "PAPER_EMA"]

#: The paper's EMA weight of a new gradient (``g <- 0.6 g + 0.4 g_new``).
PAPER_EMA = 0.4


def weight_groups(model: nn.Module, layer_band: int = 10) -> dict[str, str]:
    """``{parameter name: group}``: ``embed`` (token/position embeddings), ``layers a-b`` (decoder layers
    in bands of ``layer_band``), ``lm_head``, ``other`` (final norm, anything else)."""
    if layer_band < 1:
        raise ValueError(f"layer_band must be >= 1, got {layer_band}")
    out = {}
    for name, _ in model.named_parameters():
        n = normalize_param_name(name)
        layer = layer_of(n)
        if layer is not None:
            lo = layer // layer_band * layer_band
            out[name] = f"layers {lo}-{lo + layer_band - 1}"
        elif "lm_head" in n or n.endswith("embed_out.weight"):
            out[name] = "lm_head"
        elif "embed" in n or n.split(".")[-2:-1] in (["wte"], ["wpe"]):
            out[name] = "embed"
        else:
            out[name] = "other"
    return out


def _nll(model: nn.Module, seq: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return nll_loss(*token_logprobs(_forward_logits(model, seq), seq["labels"]))


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list:
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None else g.detach().float()
            for g, p in zip(gs, params)]


class _Probe:
    """The state of one probe: named parameters, groups, masks, EMA gradients, records."""

    def __init__(self, model: nn.Module, objective: Objective, ref_model: Optional[nn.Module],
                 mask: Any, layer_band: int, ema: Optional[float]):
        if ema is not None and not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1] or None, got {ema}")
        self.model, self.objective, self.ref_model, self.ema = model, objective, ref_model, ema
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter that requires grad")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        groups = weight_groups(model, layer_band)
        self.group = [groups[n] for n in self.names]
        self.masks: Optional[list] = None
        if mask is not None:
            resolved = dict(mask.for_model(model))
            self.masks = []
            for n, p in named:
                m = resolved.get(normalize_param_name(n), resolved.get(n))
                if m is None:  # not covered: the MaskSet's ``missing`` decides
                    sel = torch.full(p.shape, mask.missing == "dense", dtype=torch.bool, device=p.device)
                else:
                    sel = m.to_bool().reshape(p.shape).to(p.device)
                self.masks.append(sel)
        self.g: dict = {}
        self.records: list = []

    def _smooth(self, key: str, new: list) -> list:
        if self.ema is None or key not in self.g:
            self.g[key] = new
        else:
            a = self.ema
            self.g[key] = [(1 - a) * old + a * g for old, g in zip(self.g[key], new)]
        return self.g[key]

    def step(self, batch: Mapping[str, Any], step: int) -> dict:
        model = self.model
        dev = model_device(model)
        batch = {k: (to_device(v, dev) if isinstance(v, Mapping) else v) for k, v in batch.items()}
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss, _ = self.objective(model, batch, ref_model=self.ref_model)
            g_l = self._smooth("objective", _grads(loss, self.params))
            g_f = self._smooth("forget", _grads(_nll(model, batch["forget"]), self.params))
            g_r = self._smooth("retain", _grads(_nll(model, batch["retain"]), self.params)) \
                if "retain" in batch else None
        rec: dict = {"step": step, "groups": {}}
        for key, g_risk in (("unlearn", g_f), ("retain", g_r)):
            if g_risk is None:
                continue
            total = 0.0
            for i, (gr, gl) in enumerate(zip(g_risk, g_l)):
                prod = gr * gl
                v = float(prod.sum(dtype=torch.float64))
                total += v
                entry = rec["groups"].setdefault(self.group[i], {})
                entry[f"e_{key}"] = entry.get(f"e_{key}", 0.0) + v
                if self.masks is not None:
                    sel = self.masks[i]
                    vm = float(prod[sel].sum(dtype=torch.float64))
                    entry[f"e_{key}_masked"] = entry.get(f"e_{key}_masked", 0.0) + vm
                    entry[f"e_{key}_frozen"] = entry.get(f"e_{key}_frozen", 0.0) + (v - vm)
            rec[f"e_{key}"] = total
        self.records.append(rec)
        return rec


def g_effect(model: Union[nn.Module, Sequence[str]], objective: Union[str, Objective],
             loader: Iterable[Mapping[str, Any]], *,
             ref_model: Optional[nn.Module] = None, mask: Any = None, max_batches: Optional[int] = None,
             ema: Optional[float] = PAPER_EMA, layer_band: int = 10, objective_kwargs: Optional[dict] = None,
             progress_bar: bool = False) -> dict:
    """G-effects of ``objective`` at the model's current weights, one record per batch of ``loader``.

    Args:
        model: a causal LM (its weights are not changed; train/eval mode is kept as it is), or the
            paper's probe over a run: a list of checkpoint folders (``from_pretrained``), probed in
            order, checkpoint ``i`` on batch ``i`` of ``loader`` (cycled), the EMA running across them.
        objective: an :class:`~wagle_ext.unlearn.objectives.Objective` or a name for
            :func:`~wagle_ext.unlearn.objectives.get_objective` (with ``objective_kwargs``).
        loader: batches as the unlearning trainer sees them (``ForgetRetainDataset`` + ``QACollator``):
            dicts with ``"forget"`` and ``"retain"`` sub-batches (``input_ids``/``attention_mask``/
            ``labels`` ``[B, T]``).
        ref_model: the frozen reference for objectives that need one (NPO, KL retain ...).
        mask: a MaskSet: every group value is also split into ``_masked`` and ``_frozen`` parts.
        max_batches: stop after this many batches.
        ema: EMA weight of a new gradient (paper 0.4), ``None`` = no smoothing.
        layer_band: decoder layers per group.
    Returns:
        ``{"records": [{"step": i, "e_unlearn": float, "e_retain": float, "groups": {group: {"e_unlearn",
        "e_retain", ["e_unlearn_masked", "e_unlearn_frozen", ...]}}}, ...], "ema": ema,
        "objective": name}``; values are sums over weights of products of gradients (units: loss^2).
    """
    if isinstance(objective, str):
        objective = get_objective(objective, **(objective_kwargs or {}))
    if objective.needs_reference and ref_model is None:
        raise ValueError(f"objective {objective.name!r} needs ref_model (a frozen copy of the initial model)")
    if isinstance(model, nn.Module):
        probe = _Probe(model, objective, ref_model, mask, layer_band, ema)
        for i, batch in enumerate(progress(loader, enabled=progress_bar, desc="g-effect")):
            if max_batches is not None and i >= max_batches:
                break
            probe.step(batch, i)
    else:
        probe = _probe_checkpoints(list(model), objective, loader, ref_model, mask, layer_band, ema, progress_bar)
    if not probe.records:
        raise ValueError("loader yielded no batch")
    return {"records": probe.records, "ema": ema, "objective": objective.name}


def _probe_checkpoints(paths: list, objective: Objective, loader, ref_model, mask, layer_band, ema, bar) -> _Probe:
    from transformers import AutoModelForCausalLM

    if not paths:
        raise ValueError("no checkpoint to probe")
    probe: Optional[_Probe] = None
    it = iter(loader)
    for i, path in enumerate(progress(paths, enabled=bar, desc="g-effect checkpoints")):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        m = AutoModelForCausalLM.from_pretrained(path)
        if probe is None:
            probe = _Probe(m, objective, ref_model, mask, layer_band, ema)
        else:  # same architecture: the EMA gradients line up parameter by parameter
            probe.model = m
            probe.params = [p for n, p in m.named_parameters() if p.requires_grad]
        step = int(path.rstrip("/").rsplit("-", 1)[-1]) if path.rstrip("/").rsplit("-", 1)[-1].isdigit() else i
        probe.step(batch, step)
    return probe  # type: ignore[return-value]


class GEffectCallback:
    """A ``transformers.TrainerCallback`` that records the G-effect every ``every`` optimizer steps
    of an :class:`~wagle_ext.unlearn.trainer.UnlearnTrainer` run, at the weights after that step, on
    the next batch of ``probe_loader`` (cycled). Costs one forward+backward per risk and one for the
    objective per probe; the run itself is unchanged (``torch.autograd.grad``, forked RNG).

    ``callback.result`` is the :func:`g_effect`-style dict; with ``path`` it is also written as JSON
    after every probe."""

    def __new__(cls, *args: Any, **kwargs: Any):
        import transformers

        class _GEffect(transformers.TrainerCallback):
            def __init__(self, objective, probe_loader, every: int = 10, ref_model=None, mask=None,
                         ema: Optional[float] = PAPER_EMA, layer_band: int = 10, path: Optional[str] = None):
                if every < 1:
                    raise ValueError(f"every must be >= 1, got {every}")
                self.objective = get_objective(objective) if isinstance(objective, str) else objective
                self.loader, self.every, self.ref_model, self.mask = probe_loader, every, ref_model, mask
                self.ema, self.layer_band, self.path = ema, layer_band, path
                self._probe = None
                self._it = None

            def bind_trainer(self, trainer) -> None:
                """Probe exactly what ``trainer`` optimises: its objective and reference model."""
                self.objective = trainer.objective
                if self.ref_model is None:
                    self.ref_model = trainer.ref_model

            def _next_batch(self):
                if self._it is None:
                    self._it = iter(self.loader)
                try:
                    return next(self._it)
                except StopIteration:
                    self._it = iter(self.loader)
                    return next(self._it)

            @property
            def result(self) -> dict:
                return {"records": [] if self._probe is None else self._probe.records, "ema": self.ema,
                        "objective": self.objective.name, "every": self.every}

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % self.every:
                    return
                if self._probe is None:
                    self._probe = _Probe(model, self.objective, self.ref_model, self.mask, self.layer_band,
                                         self.ema)
                self._probe.step(self._next_batch(), state.global_step)
                if self.path is not None and state.is_world_process_zero:
                    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                    with open(self.path, "w") as f:
                        json.dump(self.result, f, indent=2)

        return _GEffect(*args, **kwargs)


def plot_g_effect(results: Mapping[str, Mapping[str, Any]], path: str, title: str = "G-effect",
                  frozen: bool = False, symlog: bool = False) -> str:
    """Lines over steps, one panel per weight group, one line per run (``results``: label -> a
    :func:`g_effect` / :class:`GEffectCallback` result): ``e_unlearn`` solid, ``e_retain`` dashed.
    A run probed with a mask is drawn with its **masked** part (``e_*_masked``): only the masked
    weights move, so that part is the first-order effect of the run's steps, while the full-model
    value also counts weights that never change. ``frozen=True`` adds the frozen part (dotted: what
    the frozen weights' gradients point at, not a change that happens). ``symlog=True``: symmetric
    log y axes (runs whose values differ by orders of magnitude). Writes a PNG to ``path`` and
    returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list = []
    if not any(res["records"] for res in results.values()):
        raise ValueError("plot_g_effect: no G-effect records to plot")
    for res in results.values():
        for rec in res["records"]:
            for g in rec["groups"]:
                if g not in groups:
                    groups.append(g)
    order = sorted(groups, key=lambda g: (g != "embed", g == "lm_head", g == "other",
                                          int(g.split()[1].split("-")[0]) if g.startswith("layers") else 0))
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.0), squeeze=False, sharey=False)
    for ax, g in zip(axes[0], order):
        for j, (label, res) in enumerate(results.items()):
            recs = [r for r in res["records"] if g in r["groups"]]
            masked = any("e_unlearn_masked" in r["groups"][g] for r in recs)
            lines = [("", "-", "--")] if not masked else [("_masked", "-", "--")] + (
                [("_frozen", ":", ":")] if frozen else [])
            for suffix, solid, dashed in lines:
                for key, style in (("e_unlearn", solid), ("e_retain", dashed)):
                    ys = [r["groups"][g].get(key + suffix) for r in recs]
                    if any(y is not None for y in ys):
                        name = f"{label} {key[2:]}" + (f" ({suffix[1:]} weights)" if suffix else "")
                        ax.plot([r["step"] for r in recs], ys, style, color=f"C{j}", label=name,
                                alpha=0.5 if suffix == "_frozen" else 1.0)
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        if symlog:
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("<grad R, grad L>")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
