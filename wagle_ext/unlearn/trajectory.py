"""Evaluation along the unlearning trajectory: :class:`TrajectoryCallback` evaluates the model every
``every`` optimizer steps without stopping the run and appends ``{"step", "metrics", "seconds",
"train_seconds"}`` to ``trajectory.json``.

The metrics come from a function the caller passes in (``evaluate(model) -> {name: float}``): this
module is in the unlearning layer, below ``wagle_ext.eval`` (docs/layers.md), so it cannot import the
TOFU protocol itself. ``wagle unlearn --eval_every N`` and ``wagle sweep`` pass an evaluator built
from :func:`wagle_ext.eval.evaluate_tofu` (``wagle_ext.app.pipeline._trajectory_evaluator``).

Training is unaffected by the evaluations: each runs under ``torch.no_grad()`` inside
:func:`preserved_training_state`, which restores every module's train/eval flag and the RNG states
(Python ``random``, NumPy, torch CPU and every CUDA device) afterwards -- the data order of the next
epoch is drawn from torch's global generator, so an evaluator that consumed random numbers would
otherwise change the run. A run with evaluations gives bit-identical weights to one without
(``tests/test_trajectory.py``).

    cb = TrajectoryCallback(lambda m: my_metrics(m), every=10, path="out/trajectory.json")
    trainer.add_callback(cb); trainer.train(); cb.entries  # [{"step": 0, ...}, {"step": 10, ...}, ...]

Under DDP only the main process (``state.is_world_process_zero``) evaluates and writes; the other
ranks wait for it at their next collective. After ``resume_from_checkpoint`` the entries of an
existing ``trajectory.json`` up to the resumed step are kept and later ones replaced.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from typing import Callable, Iterator, Mapping, Optional

import torch
import transformers
from torch import nn

__all__ = ["TrajectoryCallback", "preserved_training_state", "read_trajectory", "TRAJECTORY_FILE"]

TRAJECTORY_FILE = "trajectory.json"

EvaluateFn = Callable[[nn.Module], Mapping[str, float]]


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Run the body under ``torch.no_grad()`` and restore afterwards (also on an exception) every
    module's ``training`` flag and the RNG states of Python, NumPy, torch (CPU) and all CUDA devices."""
    modes = [(m, m.training) for m in model.modules()]
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch
        np = None  # type: ignore[assignment]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def read_trajectory(path: str) -> list:
    """The entries of a ``trajectory.json`` (``[]`` when the file does not exist)."""
    if os.path.isdir(path):
        path = os.path.join(path, TRAJECTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return list(data["entries"] if isinstance(data, Mapping) else data)


class TrajectoryCallback(transformers.TrainerCallback):
    """Evaluate every ``every`` steps (and at step 0 with ``at_start``, after the last step with
    ``at_end``) with ``evaluate(model)``; entries go to :attr:`entries` and, when ``path`` is given,
    to that JSON file (rewritten atomically after every evaluation: ``{"every": N, "entries": [...]}``).

    Args:
        evaluate: ``model -> {metric: float}``; called under :func:`preserved_training_state`.
        every: evaluation interval in optimizer steps (>= 1).
        path: ``trajectory.json`` to write (a directory: the file inside it), or None.
        at_start: also evaluate before the first step (step 0; not on a resumed run).
        at_end: also evaluate after the last step when it is not a multiple of ``every``.
        log: called with one line per evaluation (e.g. the job's log), or None.
    """

    def __init__(self, evaluate: EvaluateFn, every: int, path: Optional[str] = None, *, at_start: bool = True,
                 at_end: bool = True, log: Optional[Callable[[str], None]] = None):
        if not callable(evaluate):
            raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if path is not None and os.path.isdir(path):
            path = os.path.join(path, TRAJECTORY_FILE)
        self.evaluate, self.every, self.path = evaluate, every, path
        self.at_start, self.at_end, self.log = at_start, at_end, log
        self.entries: list = []
        self._started = False
        self._t_train = 0.0
        self._t_mark: Optional[float] = None

    # -------------------------------------------------------------- the Trainer's events
    def on_train_begin(self, args, state, control, **kwargs):
        self._started = False  # the resumed step is only known at the first step (state loaded later)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self._started:
            self._started = True
            self._begin(state, model)
        self._t_mark = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._tick()
        step = state.global_step
        if step % self.every == 0 or (self.at_end and step == state.max_steps):
            self._record(state, model)

    # -------------------------------------------------------------- helpers
    def _begin(self, state, model) -> None:
        if self.path is not None and state.is_world_process_zero:
            kept = [e for e in read_trajectory(self.path) if e["step"] <= state.global_step]
            self.entries = kept
            if kept:
                self._t_train = float(kept[-1].get("train_seconds", 0.0))
        if self.at_start and state.global_step == 0 and not any(e["step"] == 0 for e in self.entries):
            self._record(state, model)

    def _tick(self) -> None:
        if self._t_mark is not None:
            self._t_train += time.perf_counter() - self._t_mark
            self._t_mark = None

    def _record(self, state, model) -> None:
        if model is None:
            raise RuntimeError("TrajectoryCallback needs the model (the Trainer passes it to callbacks)")
        if not state.is_world_process_zero:
            return
        if self.entries and self.entries[-1]["step"] == state.global_step:
            return
        t0 = time.perf_counter()
        with preserved_training_state(model):
            metrics = {k: float(v) for k, v in dict(self.evaluate(model)).items()}
        entry = {"step": int(state.global_step), "metrics": metrics, "seconds": time.perf_counter() - t0,
                 "train_seconds": self._t_train}
        self.entries.append(entry)
        self._write()
        if self.log is not None:
            shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in ("forget_quality", "model_utility",
                                                                   "model_utility_no_rouge", "forget_Q_A_Prob",
                                                                   "forget_truth_ratio") if k in metrics)
            self.log(f"[trajectory] step {entry['step']}: {shown}  ({entry['seconds']:.1f} s)")

    def _write(self) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"every": self.every, "entries": self.entries}, f, indent=2)
        os.replace(tmp, self.path)

