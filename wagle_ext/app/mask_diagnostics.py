"""What a mask selects, and why: the diagnostics ``wagle sweep`` records for every mask it builds.

For each mask: its density per **layer type** (embedding, attention, MLP, norm, lm_head, other) and
per decoder layer, with each type's *share* of the selected weights; for WAGLE masks, which term of
the score's bracket ``w - g_r / gamma`` dominates (:func:`wagle_ext.attribution.wagle_term_norms`,
recorded by ``score_model`` in ``scores.info["terms"]``); and between every two masks of the same
ratio, their overlap (:meth:`wagle_ext.MaskSet.overlap`) against what two independent masks of those
densities would share. docs/sweep.md explains how to read them.
"""
from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional

from ..masks import MaskSet
from ..naming import normalize_param_name

__all__ = ["LAYER_TYPES", "layer_type_of", "mask_diagnostics", "format_mask_diagnostics"]

#: Layer types, in report order.
LAYER_TYPES = ("embed", "attention", "mlp", "norm", "lm_head", "other")
_PATTERNS = (  # first match wins; names are normalised (no "module." / PEFT prefixes)
    ("lm_head", re.compile(r"(^|\.)lm_head\.|(^|\.)embed_out\.")),
    ("embed", re.compile(r"embed_tokens|(^|\.)wte\.|(^|\.)wpe\.|embed_positions|word_embeddings")),
    ("norm", re.compile(r"norm|(^|\.)ln_\w*\.|layernorm", re.IGNORECASE)),
    ("attention", re.compile(r"attn|attention|(^|\.)(q|k|v|o)_proj\.|query_key_value|(^|\.)dense\.")),
    ("mlp", re.compile(r"mlp|(^|\.)(gate|up|down)_proj\.|(^|\.)(fc1|fc2|c_fc|w1|w2|w3)\.")),
)


def layer_type_of(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``attention``; one of :data:`LAYER_TYPES`."""
    n = normalize_param_name(name)
    for kind, pat in _PATTERNS:
        if pat.search(n):
            return kind
    return "other"


def _composition(mask: MaskSet) -> dict:
    """:meth:`MaskSet.stats`, regrouped by layer type, with each group's share of the selection."""
    st = mask.stats()
    per_type: "OrderedDict[str, dict]" = OrderedDict((t, {"numel": 0, "selected": 0}) for t in LAYER_TYPES)
    for name, p in st["per_parameter"].items():
        a = per_type[layer_type_of(name)]
        a["numel"] += p["numel"]
        a["selected"] += p["selected"]
    per_layer = OrderedDict((k, dict(v)) for k, v in st["per_layer"].items())  # "other": outside the layers
    total = st["total"]["selected"]
    for d in (per_type, per_layer):
        for a in d.values():
            a["density"] = a["selected"] / a["numel"] if a["numel"] else 0.0
            a["share"] = a["selected"] / total if total else 0.0
    return {"density": st["total"]["density"], "selected": total, "numel": st["total"]["numel"],
            "per_type": OrderedDict((k, v) for k, v in per_type.items() if v["numel"]),
            "per_layer": per_layer}


def mask_diagnostics(masks: Mapping[str, MaskSet], ratios: Optional[Mapping[str, float]] = None,
                     terms: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict:
    """Diagnostics of named masks (JSON-serialisable).

    Args:
        masks: label -> MaskSet (e.g. ``"wagle(gamma=1e-06) @0.1"``).
        ratios: label -> the ratio it was built at; overlaps are computed between masks of equal
            ratio (all pairs when None).
        terms: label -> ``scores.info["terms"]`` of a WAGLE score (``weight_norm``,
            ``retain_term_norm``, ``frac_weight_dominant``, ``dominant``, ...).

    Returns ``{"masks": {label: {density, selected, numel, per_type, per_layer[, terms]}},
    "overlaps": [{a, b, jaccard, fraction_of_a, expected_random, lift}]}``; ``lift`` =
    fraction_of_a / expected_random (1 = no more overlap than chance).
    """
    out: dict = {"masks": OrderedDict(), "overlaps": []}
    for label, mask in masks.items():
        d = _composition(mask)
        if terms and label in terms:
            d["terms"] = dict(terms[label])
        out["masks"][label] = d
    for a, b in itertools.combinations(list(masks), 2):
        if ratios is not None and ratios.get(a) != ratios.get(b):
            continue
        o = masks[a].overlap(masks[b])
        out["overlaps"].append({"a": a, "b": b, "jaccard": o["jaccard"], "fraction_of_a": o["fraction_of_self"],
                                "expected_random": o["expected_random"],
                                "lift": o["fraction_of_self"] / o["expected_random"] if o["expected_random"] else None})
    return out


def format_mask_diagnostics(diag: Mapping[str, Any]) -> str:
    """Plain-text lines: per mask the share of its selection per layer type (and the dominant WAGLE
    term), then the overlaps."""
    lines = []
    for label, d in diag["masks"].items():
        shares = ", ".join(f"{t} {v['share']:.0%} (density {v['density']:.3f})" for t, v in d["per_type"].items())
        lines.append(f"{label}: {shares}")
        t = d.get("terms")
        if t:
            lines.append(f"    score terms: ||w|| {t['weight_norm']:.3g}, retain term {t['retain_term_norm']:.3g} "
                         f"(ratio {t['retain_over_weight']:.3g}); |w| larger for {t['frac_weight_dominant']:.1%} of "
                         f"weights; dominant: {t['dominant']}")
    for o in diag["overlaps"]:
        lift = f"{o['lift']:.2f}x chance" if o["lift"] is not None else "-"
        lines.append(f"overlap {o['a']} / {o['b']}: jaccard {o['jaccard']:.3f}, {o['fraction_of_a']:.1%} of the first "
                     f"also in the second ({lift})")
    return "\n".join(lines)
