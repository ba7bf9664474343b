"""Re-scoring the mask during unlearning: every N steps, recompute the attribution scores on the
current model and replace the mask (a lever beyond the WAGLE paper, which scores once before
unlearning; docs/sweep.md "Levers").

Why it might matter: the score is computed at the original model. As unlearning moves the weights,
the gradients of the forget and retain losses change, and so do the weights that matter most; a
fixed mask keeps pushing on weights chosen for a model that no longer exists.

What it does at each re-scoring step (``on_step_end`` after the optimizer step, gradients zeroed):
the score of the mask's own kind, gamma and Hessian estimate (read from the mask's metadata, as
written by :func:`wagle_ext.masks.build_mask`) over the given forget/retain loaders, then the top
``ratio`` with the mask's scope, then :meth:`UnlearnTrainer.set_mask` (moments kept for weights
selected before and after, zero moments for newly selected ones, dropped weights freeze where they
are). Cost per re-scoring: one attribution pass (one forward+backward per forget and retain
example, :func:`wagle_ext.score_model`). Dense gradients only.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import transformers

__all__ = ["RescoreCallback"]


class RescoreCallback(transformers.TrainerCallback):
    """Re-score the trainer's mask every ``every`` optimizer steps.

    Args:
        every: re-score after steps ``every``, ``2 * every``, ... (not after the last step).
        forget_loader, retain_loader: batches for :func:`wagle_ext.score_model` (e.g. ``QACollator``
            batches of the forget and retain sets).
        kind, gamma, hessian, ratio, scope: the score and selection; None = the current mask's
            metadata (``score_kind``, ``gamma``, ``hessian``, ``ratio``, ``scope``).
        seed: seed of the ``random`` score kind (other kinds ignore it); None = the mask's metadata
            ``seed`` (then a random mask re-scores to itself), else 0.

    ``history``: one dict per re-scoring, ``{"step", "kept"}`` where ``kept`` is the fraction of the
    previous selection that the new mask keeps (:meth:`MaskSet.overlap`), plus ``"selected"``.
    Call :meth:`bind_trainer` before training (the CLI does).
    """

    def __init__(self, every: int, forget_loader: Iterable, retain_loader: Iterable, *, kind: Optional[str] = None,
                 gamma: Optional[float] = None, hessian: Optional[str] = None, ratio: Optional[float] = None,
                 scope: Optional[str] = None, seed: Optional[int] = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every, self.forget_loader, self.retain_loader = every, forget_loader, retain_loader
        self.kind, self.gamma, self.hessian, self.ratio, self.scope, self.seed = kind, gamma, hessian, ratio, scope, seed
        self.trainer: Any = None
        self.history: list = []

    def bind_trainer(self, trainer: Any) -> None:
        if getattr(trainer, "mask", None) is None:
            raise ValueError("RescoreCallback needs a trainer with a mask")
        if getattr(trainer, "grad_mode", "dense") != "dense":
            raise ValueError("RescoreCallback needs grad_mode='dense'")
        meta = trainer.mask.metadata
        self.kind = self.kind or meta.get("score_kind")
        if self.kind is None:
            raise ValueError("RescoreCallback: the mask's metadata has no score_kind; pass kind=...")
        if self.gamma is None:
            self.gamma = float(meta.get("gamma", 1e-6))
        if self.hessian is None and meta.get("hessian") not in (None, "constant"):
            self.hessian = meta["hessian"]
        self.ratio = self.ratio if self.ratio is not None else meta.get("ratio")
        self.scope = self.scope or meta.get("scope", "global")
        if self.seed is None:
            self.seed = int(meta.get("seed", 0))
        if self.ratio is None:
            raise ValueError("RescoreCallback: the mask's metadata has no ratio; pass ratio=...")
        self.trainer = trainer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.trainer is None or step % self.every or step >= state.max_steps:
            return
        from ..attribution import score_model
        from ..masks import build_mask

        old = self.trainer.mask
        model = self.trainer.model
        scores = score_model(model, self.forget_loader, self.retain_loader, kind=self.kind, gamma=self.gamma,
                             hessian=self.hessian, seed=self.seed, progress=False)
        new = build_mask(scores, self.ratio, scope=self.scope, model=model, missing=old.missing)
        del scores
        self.trainer.set_mask(new)
        self.history.append({"step": step, "kept": new.overlap(old)["fraction_of_self"],
                             "selected": new.total_selected})
