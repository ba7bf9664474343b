"""Figures (matplotlib, Agg back end: files only, no display), kept out of the data modules.

:func:`plot_mask_density` draws a :class:`~wagle_ext.MaskSet`'s layer-sensitivity view (used by
``MaskSet.plot``); :func:`plot_tradeoff` draws the demo's forget-quality / model-utility plane (used
by ``wagle demo``); :func:`plot_fronts` draws ``wagle sweep``'s trade-off curves. All take plain data (duck-typed objects and dicts) and import nothing from
``wagle_ext``: matplotlib is an optional dependency, loaded on the first figure.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

__all__ = ["plot_mask_density", "plot_tradeoff", "plot_fronts"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_mask_density(mask_set: Any, path: Union[str, os.PathLike], *, title: Optional[str] = None) -> None:
    """Write a PNG of the selection density of ``mask_set`` (anything with ``stats()``, ``density``,
    ``metadata``, ``total_selected`` and ``numel``, i.e. a :class:`~wagle_ext.MaskSet`): a heatmap of
    density per decoder layer (x) and module type (y), a bar panel for the parameters outside the
    decoder layers (embeddings, final norm, lm_head) and a line of the per-layer density with the
    overall density as a reference -- WAGLE's layer-sensitivity view."""
    plt = _pyplot()
    import numpy as np

    st = mask_set.stats()
    layers = sorted(int(k) for k in st["per_layer_module"] if k != "other")
    types = []
    for k in [str(i) for i in layers]:
        for t in st["per_layer_module"][k]:
            if t not in types:
                types.append(t)
    other = st["per_layer_module"].get("other", {})

    fig = plt.figure(figsize=(max(8.0, 0.35 * len(layers) + 5), 3.2 + 0.32 * max(len(types), 4)))
    gs = fig.add_gridspec(2, 2, width_ratios=[max(len(layers), 1), max(len(other), 1) * 0.9 + 1.5],
                          height_ratios=[max(len(types), 1), 3.5], hspace=0.45, wspace=0.7)
    ax_h = fig.add_subplot(gs[0, 0])
    grid = np.full((len(types), len(layers)), np.nan)
    for j, li in enumerate(layers):
        for i, t in enumerate(types):
            v = st["per_layer_module"][str(li)].get(t)
            if v is not None:
                grid[i, j] = v
    im = ax_h.imshow(grid if grid.size else np.zeros((1, 1)), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                     interpolation="nearest")
    ax_h.set_yticks(range(len(types)))
    ax_h.set_yticklabels(types, fontsize=8)
    step = max(1, len(layers) // 24)
    ax_h.set_xticks(range(0, len(layers), step))
    ax_h.set_xticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
    ax_h.set_xlabel("decoder layer")
    ax_h.set_title("selected fraction per layer and module type", fontsize=10)
    if len(layers) <= 16 and len(types) <= 12:  # small enough to print every cell's value
        for i in range(len(types)):
            for j in range(len(layers)):
                if not np.isnan(grid[i, j]):
                    ax_h.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                              color="white" if grid[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax_h, fraction=0.04, pad=0.02, label="density")

    ax_o = fig.add_subplot(gs[0, 1])
    if other:
        names = list(other)
        vals = [other[n] for n in names]
        ax_o.barh(range(len(names)), vals, color="tab:gray")
        for i, v in enumerate(vals):
            ax_o.text(min(v + 0.02, 0.8), i, f"{v:.2f}", va="center", fontsize=8)
        ax_o.set_yticks(range(len(names)))
        ax_o.set_yticklabels(names, fontsize=8)
        ax_o.invert_yaxis()
    ax_o.set_xlim(0, 1)
    ax_o.set_xlabel("density")
    ax_o.set_title("outside decoder layers", fontsize=10)

    ax_l = fig.add_subplot(gs[1, :])
    dens = [st["per_layer"][str(li)]["density"] for li in layers]
    ax_l.plot(layers, dens, marker="o", ms=3, label="per-layer density")
    ax_l.axhline(mask_set.density, color="tab:red", ls="--", lw=1, label=f"overall {mask_set.density:.3f}")
    ax_l.set_xlabel("decoder layer")
    ax_l.set_ylabel("density")
    ax_l.set_ylim(0, 1.02)
    ax_l.legend(fontsize=8, loc="best")
    ax_l.grid(alpha=0.3)
    meta = mask_set.metadata
    fig.suptitle(title or (f"MaskSet: kind={meta.get('score_kind', '?')}, ratio={meta.get('ratio', '?')}, "
                           f"scope={meta.get('scope', '?')}, {mask_set.total_selected:,}/{mask_set.numel:,} selected"),
                 fontsize=11)
    fig.savefig(os.fspath(path), dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_tradeoff(rows: Sequence[dict], references: Sequence[dict], path: str, title: str) -> None:
    """Write a PNG of the demo's forget-quality (log) vs model-utility scatter: one colour per
    objective, one marker per mask kind, ``references`` (the original and the retain model) in grey."""
    plt = _pyplot()

    markers = {"dense": "o", "random": "s", "magnitude": "^", "wagle": "*", "snip": "D", "gradient": "v",
               "wanda": "P", "lora": "h", "lora+fila": "H", "lora+wagle": "X"}
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    colors = {o: plt.get_cmap("tab10")(i) for i, o in enumerate(objectives)}
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for r in rows:
        ax.scatter(r["model_utility"], max(r["forget_quality"], 1e-30), marker=markers.get(r["mask"], "x"),
                   color=colors[r["objective"]], s=160 if r["mask"] == "wagle" else 70, edgecolors="black",
                   linewidths=0.6, zorder=3)
    for ref, m in zip(references, ("X", "D")):
        if ref.get("forget_quality") is None:
            continue
        ax.scatter(ref["model_utility"], max(ref["forget_quality"], 1e-30), marker=m, color="lightgray",
                   edgecolors="black", s=90, zorder=2)
        ax.annotate(ref["mask"], (ref["model_utility"], max(ref["forget_quality"], 1e-30)),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker="o", color=colors[o], label=o) for o in objectives]
    handles += [Line2D([], [], linestyle="", marker=markers.get(m, "x"), color="gray", label=f"mask: {m}")
                for m in dict.fromkeys(r["mask"] for r in rows)]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher = better)")
    ax.set_ylabel("forget quality, KS p-value vs retain model (log; higher = better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fronts(panels: dict, path: str, *, title: str, references: Sequence[dict] = (),
                thresholds: Sequence[float] = (), target_utility: Sequence[float] = (),
                xlabel: str = "model utility (higher = better)", ylabel: Optional[str] = None,
                log_y: bool = True, floor_decades: Optional[float] = 3.0) -> None:
    """Write a PNG of forget quality (log) vs model utility, one panel per objective.

    ``panels``: ``{objective: {"curves": [...], "fronts": {method: [(x, log10 y), ...]}, "overall":
    [(x, log10 y), ...]}}``; a curve is one setting's trajectory (``method``, ``label``, ``x``, ``xerr``,
    ``log10_y``, ``log10_yerr``: the means over seeds at each evaluated step and their spread). Each
    method has one colour (its settings one line style each, thin, with error bars); its Pareto front is
    the thick line; points on the front of all methods are ringed in black. ``references``: ``{"name",
    "x", "log10_y"}`` in grey; ``target_utility`` x ``thresholds``: vertical dotted lines (e.g. 95% / 90%
    of the original model's utility). ``log_y=False``: a linear forget metric (``ylabel``, e.g. a forget
    answer probability): curves, fronts and references carry ``y`` / ``yerr`` (the values) instead of
    ``log10_y`` / ``log10_yerr``. ``floor_decades`` (log axis): the y axis starts that many decades
    below the lowest reference (collapsed runs' p-values of 1e-30 would otherwise squeeze the region
    that matters; None = no cut)."""
    plt = _pyplot()
    yk = "log10_y" if log_y else "y"

    def val(v: float) -> float:
        return 10 ** v if log_y else v

    names = list(panels)
    methods = list(dict.fromkeys(c["method"] for p in panels.values() for c in p["curves"]))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(names), figsize=(7.2 * len(names), 5.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        panel = panels[name]
        seen: dict = {}
        for c in panel["curves"]:
            k = seen.setdefault(c["method"], [])
            k.append(c["label"])
            ls = styles[(len(k) - 1) % len(styles)]
            y = [val(v) for v in c[yk]]
            lo = [val(v) - val(v - e) for v, e in zip(c[yk], c[yk + "err"])]
            hi = [val(v + e) - val(v) for v, e in zip(c[yk], c[yk + "err"])]
            ax.errorbar(c["x"], y, xerr=c["xerr"], yerr=[lo, hi], color=colors[c["method"]], ls=ls, lw=0.9,
                        marker="o", ms=3, alpha=0.55, elinewidth=0.6, capsize=1.5)
        for m, pts in panel["fronts"].items():
            if pts:
                ax.plot([p[0] for p in pts], [val(p[1]) for p in pts], color=colors[m], lw=2.6, alpha=0.95,
                        drawstyle="steps-pre" if len(pts) > 1 else "default", marker="D", ms=5)
        ov = panel.get("overall", [])
        if ov:
            ax.scatter([p[0] for p in ov], [val(p[1]) for p in ov], s=110, facecolors="none", edgecolors="black",
                       linewidths=1.4, zorder=5)
        for ref, marker in zip(references, ("X", "P", "X", "P")):
            ax.scatter([ref["x"]], [val(ref[yk])], marker=marker, color="lightgray", edgecolors="black",
                       s=90, zorder=4)
            ax.annotate(ref["name"], (ref["x"], val(ref[yk])), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
        for t in target_utility:
            for thr in thresholds:
                ax.axvline(thr * t, color="gray", ls=":", lw=0.9)
                ax.annotate(f"{thr:.0%}", (thr * t, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                            ha="right", va="top", color="gray", rotation=90)
        if log_y:
            ax.set_yscale("log")
            if ax.get_ylim()[1] > 3.0:  # a p-value is <= 1; log-space error bars can reach past it
                ax.set_ylim(top=3.0)
            if floor_decades is not None and references:
                floor = 10 ** (min(r["log10_y"] for r in references) - floor_decades)
                if ax.get_ylim()[0] < floor:
                    ax.set_ylim(bottom=floor)
                    ax.annotate(f"axis cut at {floor:.1e}", (0.01, 0.01), xycoords="axes fraction", fontsize=7,
                                color="gray")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel or "forget quality (KS p-value vs retain model; log; higher = better)")
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        # one entry per method (a legend entry per setting does not fit once a grid has a few dozen)
        from matplotlib.lines import Line2D

        handles = [Line2D([0], [0], color=colors[m], lw=2.6, marker="D", ms=5, label=m) for m in seen]
        if ov:
            handles.append(Line2D([0], [0], ls="none", marker="o", ms=10, mfc="none", mec="black",
                                  label="front of all methods"))
        styled = max((len(v) for v in seen.values()), default=0)
        ax.legend(handles=handles, fontsize=7, loc="best", title_fontsize=7,
                  title=f"thick: a method's front; thin: its {styled} setting(s) (ratio, lr), mean over seeds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
