"""The axes of a sweep's fronts and table: which forget metric is plotted against which utility, in
which direction, on which scale.

``wagle sweep`` on a benchmark with a retain-only model uses :data:`FORGET_QUALITY` (the KS-test forget
quality, higher = better, log scale). A track without a retain model (``wagle demo --track smollm2``)
uses e.g. the forget answer probability or accuracy (lower = better, linear scale). The utility is
always higher = better; the thresholds are fractions of the original model's utility.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

__all__ = ["FrontAxes", "FORGET_QUALITY"]


@dataclass(frozen=True)
class FrontAxes:
    """A forget metric (``forget_key`` of each evaluation) and how to read it.

    Attributes:
        forget_key: the metric's key in an evaluation's dict.
        name / short: its name in table captions ("forget quality") and headers ("FQ").
        higher_is_better: True for forget quality; False for a probability or accuracy on the forget set.
        log: plot (and average seeds) in log10 (a metric spanning orders of magnitude), else linear.
        curve_key: prefix of the curve points' ``<curve_key>_mean`` / ``_std`` in ``results.json``.
        utility_name / utility_short: the utility's name in captions / headers.
        ylabel: the figure's y-axis label.
    """

    forget_key: str
    name: str
    short: str
    higher_is_better: bool
    log: bool
    curve_key: str
    utility_name: str = "model utility"
    utility_short: str = "MU"
    ylabel: str = ""

    def coord(self, value: float) -> float:
        """The plotted / seed-averaged coordinate of a value: log10 (floored at 1e-300) or the value."""
        return math.log10(max(float(value), 1e-300)) if self.log else float(value)

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values`` (max or min)."""
        return max(values) if self.higher_is_better else min(values)

    def rank(self, value: float) -> float:
        """A number to maximise: the value, or its negation for a lower-is-better metric."""
        return float(value) if self.higher_is_better else -float(value)


FORGET_QUALITY = FrontAxes(forget_key="forget_quality", name="forget quality", short="FQ", higher_is_better=True,
                           log=True, curve_key="log10_fq",
                           ylabel="forget quality (KS p-value vs retain model; log; higher = better)")
