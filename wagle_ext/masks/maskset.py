""":class:`MaskSet`: the mask artifact -- ``{parameter name: PackedMask}`` with provenance metadata,
a model fingerprint, model binding, statistics and safetensors I/O.

Masks are keyed by normalised parameter name (:mod:`wagle_ext.naming`) and stored one bit per
weight, in safetensors files with provenance metadata.

Long file: one class, the artifact users hold; its I/O (format, checksum, header parsing), model
binding, statistics and overlap are methods of it, with the trainable report beside it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from .._version import __version__
from ..naming import (fingerprint_of, is_adapter_param, layer_of, model_param_shapes, module_type_of,
                      normalize_param_name)
from ..plotting import plot_mask_density
from ..ops import PackedMask

__all__ = ["MaskSet", "MASK_FORMAT", "MASK_FORMAT_VERSION", "SCOPES", "MISSING_MODES", "trainable_report",
           "format_trainable_report"]

MASK_FORMAT = "wagle_ext.MaskSet"
# 1: no checksum, ``missing`` always stored (default was "dense").
# 2: ``checksum`` (sha256 of names, shapes, counts, missing, fingerprint and bits), verified on load.
MASK_FORMAT_VERSION = 2
SCOPES = ("global", "per_tensor", "per_row")
MISSING_MODES = ("frozen", "dense")
_META_KEY = "wagle_ext"
_warned_unchecked: set = set()  # files without a checksum already warned about (once per path)


def _check_missing(missing: Any) -> str:
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be 'frozen' or 'dense', got {missing!r}")
    return missing


class MaskSet(Mapping):
    """An ordered mapping ``parameter name -> PackedMask`` (True = selected for update), with
    provenance metadata and a model fingerprint.

    Mapping access accepts wrapped names too (``"module.model.layers.0..."``): lookups normalise
    names with :func:`normalize_param_name`. Model parameters without an entry are treated as
    :attr:`missing`: ``"frozen"`` (default: never updated -- a mask freezes what it does not cover)
    or ``"dense"`` (updated normally, the Wanda baseline's convention for embeddings, norms and
    lm_head). PEFT adapter weights are outside any mask (trained as the adapter says).

    Attributes:
        metadata: JSON-serialisable dict (score kind, gamma, ratio, scope, ...).
        fingerprint: :func:`model_fingerprint` of the model the mask was built for, or None.
        missing: ``"frozen"`` or ``"dense"`` (validated on assignment).
    """

    def __init__(self, masks: Mapping[str, PackedMask], *, metadata: Optional[Mapping[str, Any]] = None,
                 fingerprint: Optional[str] = None, missing: str = "frozen"):
        _check_missing(missing)
        self._masks: "OrderedDict[str, PackedMask]" = OrderedDict()
        for name, m in masks.items():
            if not isinstance(m, PackedMask):
                raise TypeError(f"masks[{name!r}] must be a PackedMask, got {type(m).__name__} "
                                "(use MaskSet.from_bool_dict for bool tensors)")
            key = normalize_param_name(name)
            if key in self._masks:
                raise ValueError(f"two masks normalise to the same parameter name {key!r}")
            self._masks[key] = m
        self.metadata: dict = dict(metadata or {})
        self.fingerprint = fingerprint
        self.missing = missing

    @property
    def missing(self) -> str:
        """How parameters without an entry are treated: ``"frozen"`` or ``"dense"``."""
        return self._missing

    @missing.setter
    def missing(self, value: str) -> None:
        self._missing = _check_missing(value)

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> PackedMask:
        return self._masks[normalize_param_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_param_name(name) in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def names(self) -> list:
        """Normalised parameter names, in parameter order."""
        return list(self._masks)

    def get_bool(self, name: str) -> torch.Tensor:
        """The mask of one parameter as a bool tensor of its shape."""
        return self[name].to_bool()

    # ------------------------------------------------------------------ counts
    @property
    def numel(self) -> int:
        """Total number of masked elements (selected or not)."""
        return sum(m.numel for m in self._masks.values())

    @property
    def total_selected(self) -> int:
        """Number of weights selected for update, over all entries."""
        return sum(m.nnz for m in self._masks.values())

    @property
    def density(self) -> float:
        """``total_selected / numel`` (0.0 when empty)."""
        n = self.numel
        return self.total_selected / n if n else 0.0

    @property
    def device(self) -> Optional[torch.device]:
        for m in self._masks.values():
            return m.device
        return None

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._masks.values())

    # ------------------------------------------------------------------ conversions
    def to(self, device: Union[str, torch.device]) -> "MaskSet":
        """A copy with every bit array on ``device`` (metadata shared by value)."""
        return MaskSet(OrderedDict((n, m.to(device)) for n, m in self._masks.items()),
                       metadata=dict(self.metadata), fingerprint=self.fingerprint, missing=self.missing)

    @classmethod
    def from_bool_dict(cls, masks: Mapping[str, torch.Tensor], **kwargs) -> "MaskSet":
        """From ``{name: bool (or 0/1) tensor}``, e.g. a WAGLE release ``torch.load("tofu_0.8.pt")``.
        ``kwargs`` go to the constructor (``metadata``, ``fingerprint``, ``missing``)."""
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping name -> bool tensor, got {type(masks).__name__}")
        return cls(OrderedDict((n, PackedMask.from_bool(t)) for n, t in masks.items()), **kwargs)

    def to_bool_dict(self, device: Optional[Union[str, torch.device]] = None) -> "OrderedDict[str, torch.Tensor]":
        """``{name: bool tensor}`` (1 byte per weight: 8x the packed size), WAGLE's format."""
        out = OrderedDict()
        for n, m in self._masks.items():
            out[n] = (m.to(device) if device is not None else m).to_bool()
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskSet):
            return NotImplemented
        return self.missing == other.missing and list(self._masks) == list(other._masks) and all(
            self._masks[n] == other._masks[n] for n in self._masks)

    __hash__ = None

    def __repr__(self) -> str:
        kind = self.metadata.get("score_kind", "?")
        return (f"MaskSet({len(self)} tensors, {self.total_selected}/{self.numel} selected "
                f"(density {self.density:.4g}), score_kind={kind}, scope={self.metadata.get('scope', '?')})")

    # ------------------------------------------------------------------ model binding
    def check_compatible(self, model: torch.nn.Module, *, strict: bool = True) -> None:
        """Raise ``ValueError`` unless every mask names a parameter of ``model`` with the same
        shape (names normalised for ``module.``/PEFT/``torch.compile`` wrappers); with ``strict``
        also unless the model's :func:`model_fingerprint` equals the recorded one (when recorded).
        """
        shapes = model_param_shapes(model)
        missing = [n for n in self._masks if n not in shapes]
        wrong = [(n, tuple(self._masks[n].shape), tuple(shapes[n])) for n in self._masks
                 if n in shapes and shapes[n] != self._masks[n].shape]
        problems = []
        if missing:
            problems.append(f"{len(missing)} masked parameter(s) not in the model, e.g. {missing[:3]}")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatch(es) (name, mask shape, model shape), e.g. {wrong[:3]}")
        if strict and self.fingerprint is not None:
            fp = fingerprint_of(shapes)
            if fp != self.fingerprint:
                extra = [n for n in shapes if n not in self._masks]
                problems.append(
                    f"model fingerprint {fp} != mask fingerprint {self.fingerprint} (the model's parameter "
                    f"names/shapes differ from the model the mask was built for; {len(extra)} model "
                    f"parameter(s) have no mask entry, e.g. {extra[:3]})")
        if problems:
            raise ValueError("MaskSet does not fit this model: " + "; ".join(problems)
                             + ". Rebuild the mask for this model, or pass strict=False to check masked names only.")

    def for_model(self, model: torch.nn.Module, *, strict: bool = True) -> "OrderedDict[str, PackedMask]":
        """``{model's own parameter name: PackedMask}`` for the parameters that have a mask, on
        each parameter's device, after :meth:`check_compatible`. Parameters without an entry are
        left out (treat them as :attr:`missing`)."""
        self.check_compatible(model, strict=strict)
        out = OrderedDict()
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                continue
            key = normalize_param_name(name)
            if key in self._masks:
                m = self._masks[key]
                out[name] = m if m.device == p.device else m.to(p.device)
        return out

    # ------------------------------------------------------------------ coverage
    def coverage(self, model: torch.nn.Module) -> dict:
        """What training ``model`` with this mask updates: :func:`trainable_report` ``(model, self)``."""
        return trainable_report(model, self)

    # ------------------------------------------------------------------ save / load
    def checksum(self) -> str:
        """``"sha256:<hex>"`` of the parameter names, shapes, selected counts, :attr:`missing`,
        fingerprint and the bits (in entry order); stored by :meth:`save`, verified by :meth:`load`."""
        return _checksum(list(self._masks), [list(m.shape) for m in self._masks.values()],
                         [m.nnz for m in self._masks.values()], self.missing, self.fingerprint,
                         [m.bits for m in self._masks.values()])

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write a safetensors file: one uint8 bit array per parameter (1 bit per weight) plus
        metadata (``__metadata__``): format/version, library version, parameter names (in order)
        and shapes, selected counts, fingerprint, ``missing``, a ``checksum`` (:meth:`checksum`)
        and :attr:`metadata` (score kind, gamma, ratio, scope, ...). Readable by any safetensors
        loader."""
        from safetensors.torch import save_file

        tensors = {n: m.bits.detach().to("cpu").contiguous() for n, m in self._masks.items()}
        header = {
            "format": MASK_FORMAT,
            "format_version": MASK_FORMAT_VERSION,
            "library_version": __version__,
            "names": list(self._masks),
            "shapes": [list(m.shape) for m in self._masks.values()],
            "nnz": [m.nnz for m in self._masks.values()],
            "fingerprint": self.fingerprint,
            "missing": self.missing,
            "checksum": _checksum(list(self._masks), [list(m.shape) for m in self._masks.values()],
                                  [m.nnz for m in self._masks.values()], self.missing, self.fingerprint,
                                  list(tensors.values())),
            "metadata": self.metadata,
        }
        flat = {_META_KEY: json.dumps(header)}
        # A few flat keys, readable with `safetensors` metadata tools without parsing JSON.
        for k in ("score_kind", "gamma", "ratio", "scope"):
            if k in self.metadata:
                flat[k] = str(self.metadata[k])
        flat["fingerprint"] = str(self.fingerprint)
        flat["format"] = MASK_FORMAT
        flat["checksum"] = header["checksum"]
        save_file(tensors, os.fspath(path), metadata=flat)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, model: Optional[torch.nn.Module] = None,
             device: Union[str, torch.device] = "cpu", strict: bool = True,
             missing: Optional[str] = None) -> "MaskSet":
        """Read a file written by :meth:`save` and verify its checksum; with ``model``, also
        :meth:`check_compatible` (a clear ``ValueError`` when the mask was built for a different model).

        ``missing``: None (default) = as stored in the file; ``"frozen"``/``"dense"`` overrides it
        (e.g. for a file written before version 2, whose stored ``"dense"`` was the old default).

        Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` naming the file
        for anything that is not an intact MaskSet file (not safetensors, truncated, checksum
        mismatch, header without the required fields, unsupported version). A file written before
        checksums existed (format version 1) loads with a one-time ``UserWarning``.
        """
        from safetensors import safe_open

        if missing is not None:
            _check_missing(missing)
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"mask file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: not a MaskSet file (not a regular file)")

        def bad(reason: str) -> ValueError:
            return ValueError(f"{path}: {' '.join(str(reason).split())}")

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                raw = f.metadata() or {}
                keys = set(f.keys())
                header = _parse_header(raw, path)
                masks = OrderedDict()
                bits_list = []
                for name, shape, nnz in zip(header["names"], header["shapes"], header["nnz"]):
                    if name not in keys:
                        raise bad(f"corrupt MaskSet file: no bit array for {name!r}")
                    bits = f.get_tensor(name)
                    numel = math.prod(shape)
                    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
                        raise bad(f"corrupt MaskSet file: bit array of {name!r} is {bits.dtype} "
                                  f"{tuple(bits.shape)}, expected uint8 ({(numel + 7) // 8},)")
                    bits_list.append(bits)
                    masks[name] = PackedMask(bits.to(device), shape, nnz)
        except ValueError as exc:
            if str(exc).startswith(f"{path}:"):
                raise
            raise bad(f"not a readable MaskSet file ({exc})") from None
        except Exception as exc:  # SafetensorError, OSError, ...: never a raw traceback without the file
            raise bad(f"not a readable MaskSet file (truncated, or not safetensors): {type(exc).__name__}: {exc}") from None
        stored = header.get("checksum")
        if stored is None:
            if path not in _warned_unchecked:
                _warned_unchecked.add(path)
                warnings.warn(f"{path}: MaskSet file without a checksum (written by wagle_ext "
                              f"{header.get('library_version')!s}, format version {header.get('format_version')}); "
                              f"its bits are not verified. It stores missing={header.get('missing', 'frozen')!r}; "
                              "re-save it with MaskSet.save to add a checksum", UserWarning, stacklevel=2)
        else:
            actual = _checksum(header["names"], header["shapes"], header["nnz"], header.get("missing", "frozen"),
                               header.get("fingerprint"), bits_list)
            if actual != stored:
                raise bad("checksum mismatch: the file is corrupt or was modified after saving "
                          f"(stored {stored[:19]}..., computed {actual[:19]}...)")
        try:
            ms = cls(masks, metadata=header.get("metadata") or {}, fingerprint=header.get("fingerprint"),
                     missing=missing if missing is not None else header.get("missing", "frozen"))
        except (TypeError, ValueError) as exc:
            raise bad(f"invalid MaskSet header ({exc})") from None
        ms.metadata.setdefault("library_version", header.get("library_version"))
        if model is not None:
            ms.check_compatible(model, strict=strict)
        return ms

    # ------------------------------------------------------------------ statistics and plot
    def stats(self) -> dict:
        """Selection statistics (plain dicts, JSON-serialisable).

        Keys: ``total`` ({numel, selected, density}); ``per_parameter`` (name -> {numel, selected,
        density, layer, module_type}); ``per_layer`` (decoder layer index as str, or ``"other"``
        for embeddings/final norm/lm_head -> {numel, selected, density}); ``per_module_type``
        (e.g. ``q_proj`` -> ...); ``per_layer_module`` (layer -> module type -> density).
        """
        def agg() -> dict:
            return {"numel": 0, "selected": 0}

        per_param: dict = OrderedDict()
        per_layer: dict = OrderedDict()
        per_type: dict = OrderedDict()
        per_lm: dict = OrderedDict()
        for n, m in self._masks.items():
            layer = layer_of(n)
            mtype = module_type_of(n)
            numel, nnz = m.numel, m.nnz
            per_param[n] = {"numel": numel, "selected": nnz, "density": nnz / numel if numel else 0.0,
                            "layer": layer, "module_type": mtype}
            lk = str(layer) if layer is not None else "other"
            for d, key in ((per_layer, lk), (per_type, mtype)):
                a = d.setdefault(key, agg())
                a["numel"] += numel
                a["selected"] += nnz
            a = per_lm.setdefault(lk, OrderedDict()).setdefault(mtype, agg())
            a["numel"] += numel
            a["selected"] += nnz

        def finish(d: dict) -> dict:
            for v in d.values():
                v["density"] = v["selected"] / v["numel"] if v["numel"] else 0.0
            return d

        finish(per_layer)
        finish(per_type)
        layer_module = OrderedDict(
            (lk, OrderedDict((t, (a["selected"] / a["numel"] if a["numel"] else 0.0)) for t, a in d.items()))
            for lk, d in per_lm.items())
        return {
            "total": {"numel": self.numel, "selected": self.total_selected, "density": self.density},
            "per_parameter": per_param,
            "per_layer": per_layer,
            "per_module_type": per_type,
            "per_layer_module": layer_module,
        }

    def overlap(self, other: "MaskSet") -> dict:
        """How much of this mask ``other`` also selects, over the tensors both cover (same shapes
        required): ``selected_self``, ``selected_other``, ``intersection`` (weights both select),
        ``jaccard`` = intersection / union, ``fraction_of_self`` = intersection / selected_self, and
        ``expected_random`` = the intersection fraction an independent random mask of other's
        density would give (``selected_other / numel``), the baseline to read the overlap against."""
        if not isinstance(other, MaskSet):
            raise TypeError(f"overlap needs a MaskSet, got {type(other).__name__}")
        common = [n for n in self._masks if n in other._masks]
        if not common:
            raise ValueError("overlap: the two masks share no tensor name")
        inter = sel_a = sel_b = numel = 0
        for n in common:
            a, b = self._masks[n], other._masks[n]
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"overlap: {n} has shape {tuple(a.shape)} here and {tuple(b.shape)} in other")
            both = PackedMask(a.bits.to(b.device) & b.bits, a.shape)
            inter += both.nnz
            sel_a += a.nnz
            sel_b += b.nnz
            numel += a.numel
        union = sel_a + sel_b - inter
        return {"numel": numel, "selected_self": sel_a, "selected_other": sel_b, "intersection": inter,
                "jaccard": inter / union if union else 0.0,
                "fraction_of_self": inter / sel_a if sel_a else 0.0,
                "expected_random": sel_b / numel if numel else 0.0}

    def plot(self, path: Union[str, os.PathLike], *, title: Optional[str] = None) -> None:
        """Write a PNG of the selection density: a heatmap of density per decoder layer (x) and
        module type (y), and a line of the per-layer density with the overall density as a
        reference; non-layer parameters (embeddings, final norm, lm_head) appear in a bar panel.
        This is WAGLE's layer-sensitivity view (:func:`wagle_ext.plotting.plot_mask_density`).
        Needs matplotlib (Agg back end; no display)."""
        plot_mask_density(self, path, title=title)


# ---------------------------------------------------------------------- file helpers
def _checksum(names, shapes, nnz, missing, fingerprint, bits) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"names": list(names), "shapes": [list(s) for s in shapes], "nnz": [int(n) for n in nnz],
                         "missing": missing, "fingerprint": fingerprint}, sort_keys=True).encode())
    for b in bits:
        data = b.detach().to("cpu").contiguous().numpy().tobytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def _parse_header(raw: Mapping[str, str], path: str) -> dict:
    """The validated JSON header of a MaskSet file (one-line ``ValueError`` naming ``path`` otherwise)."""
    if _META_KEY not in raw:
        raise ValueError(f"{path}: not a wagle_ext MaskSet file (no {_META_KEY!r} metadata)")
    try:
        header = json.loads(raw[_META_KEY])
    except ValueError:
        raise ValueError(f"{path}: corrupt MaskSet header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt MaskSet header (not a JSON object)")
    version = header.get("format_version")
    if header.get("format") != MASK_FORMAT or not isinstance(version, int) or not 1 <= version <= MASK_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported mask format {header.get('format')!r} version {version!r} "
                         f"(this wagle_ext {__version__} reads {MASK_FORMAT!r} versions 1-{MASK_FORMAT_VERSION})")
    lacking = [k for k in ("names", "shapes", "nnz") if not isinstance(header.get(k), list)]
    if version >= 2 and not isinstance(header.get("checksum"), str):
        lacking.append("checksum")
    if version >= 2 and header.get("missing") not in MISSING_MODES:
        lacking.append("missing")
    if lacking:
        raise ValueError(f"{path}: corrupt MaskSet header: missing or invalid field(s) {lacking}")
    names, shapes, nnz = header["names"], header["shapes"], header["nnz"]
    if not len(names) == len(shapes) == len(nnz):
        raise ValueError(f"{path}: corrupt MaskSet header: {len(names)} names, {len(shapes)} shapes, {len(nnz)} counts")
    for n, sh, k in zip(names, shapes, nnz):
        ok = (isinstance(n, str) and isinstance(sh, list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sh)
              and isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= math.prod(sh))
        if not ok:
            raise ValueError(f"{path}: corrupt MaskSet header: bad entry name={n!r} shape={sh!r} nnz={k!r}")
    return header


# ---------------------------------------------------------------------- coverage
def trainable_report(model: torch.nn.Module, mask: Optional["MaskSet"] = None) -> dict:
    """What training ``model`` with ``mask`` (None = dense) actually updates, counted in weights
    over ``model.named_parameters()`` (tied weights once).

    Returns a JSON-serialisable dict: ``total`` (all parameters), ``updated`` (weights an optimizer
    step may change: selected masked weights + dense parameters), ``frozen`` (``total - updated``),
    ``density`` (``updated / total``), ``missing`` (the mask's :attr:`MaskSet.missing`, or None),
    and per category ``{"tensors": int, "numel": int}`` (+ ``"selected"`` for ``masked``):

    * ``masked``: parameters with a mask entry (``selected`` of ``numel`` weights update);
    * ``dense_missing``: trainable parameters with no entry, updated because ``missing="dense"``
      (with ``mask=None``: every trainable parameter);
    * ``frozen_missing``: trainable parameters with no entry, frozen because ``missing="frozen"``;
    * ``adapter``: trainable PEFT adapter weights (outside any mask: updated densely);
    * ``not_trainable``: parameters with ``requires_grad=False`` (never updated).

    A masked parameter with ``requires_grad=False`` counts as ``not_trainable``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mask is not None and not isinstance(mask, MaskSet):
        raise TypeError(f"mask must be a MaskSet or None, got {type(mask).__name__}")
    cats = {k: {"tensors": 0, "numel": 0} for k in
            ("masked", "dense_missing", "frozen_missing", "adapter", "not_trainable")}
    cats["masked"]["selected"] = 0
    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if not p.requires_grad:
            key = "not_trainable"
        elif is_adapter_param(name):
            key = "adapter"
        elif mask is None:
            key = "dense_missing"
        elif name in mask:
            key = "masked"
            cats[key]["selected"] += mask[name].nnz
        else:
            key = "dense_missing" if mask.missing == "dense" else "frozen_missing"
        cats[key]["tensors"] += 1
        cats[key]["numel"] += n
    updated = cats["masked"]["selected"] + cats["dense_missing"]["numel"] + cats["adapter"]["numel"]
    return {"total": total, "updated": updated, "frozen": total - updated,
            "density": updated / total if total else 0.0,
            "missing": None if mask is None else mask.missing, **cats}


def format_trainable_report(report: Mapping[str, Any]) -> str:
    """One line for logs: ``trainable N of M weights (density D): masked A in T tensors, dense
    (missing='dense') B, frozen C`` (+ adapter weights when there are any)."""
    m = report["masked"]
    missing = report.get("missing")
    parts = [f"masked {m['selected']} in {m['tensors']} tensors",
             f"dense (missing={missing!r}) {report['dense_missing']['numel']}" if missing is not None
             else f"dense (no mask) {report['dense_missing']['numel']}"]
    if report["adapter"]["numel"]:
        parts.append(f"adapter {report['adapter']['numel']}")
    parts.append(f"frozen {report['frozen']}")
    return (f"trainable {report['updated']} of {report['total']} weights (density {report['density']:.4g}): "
            + ", ".join(parts))
