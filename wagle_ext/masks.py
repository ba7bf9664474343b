"""Weight masks as artifacts: exact top-k selection over named score tensors, and :class:`MaskSet`.

A mask marks the weights **selected for update** (WAGLE convention: ``ratio`` is the fraction of
weights that train, i.e. density = 1 - sparsity; WAGLE ``generate_mask.py::get_mask``, README
"tofu_0.8.pt ... 80% weights are selected"). Masks are keyed by parameter name and stored one bit
per weight (:class:`~wagle_ext.PackedMask`), in safetensors files with provenance metadata.

Layering: this module knows about named tensors and ``nn.Module.named_parameters()`` only; it never
imports the attribution (gradients/scores), optimizer or trainer code.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from .packed_mask import PackedMask

__all__ = [
    "MaskSet",
    "build_mask",
    "model_fingerprint",
    "normalize_param_name",
    "partition_names",
    "select_per_row",
    "MASK_FORMAT",
    "MASK_FORMAT_VERSION",
]

MASK_FORMAT = "wagle_ext.MaskSet"
MASK_FORMAT_VERSION = 1
SCOPES = ("global", "per_tensor", "per_row")
_META_KEY = "wagle_ext"

PatternArg = Union[None, str, Sequence[str]]

# ----------------------------------------------------------------------------- names

# Wrapper prefixes that do not change which weight a name refers to: DDP/DataParallel ("module."),
# torch.compile ("_orig_mod."), PEFT ("base_model.model." around the HF model).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# PEFT moves a wrapped layer's own weight under ".base_layer" (LoRA) or ".original_module"
# (modules_to_save); the adapter weights themselves are not part of the base model.
_PEFT_INFIXES = (".base_layer.", ".original_module.")
_PEFT_ADAPTER = re.compile(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save|prompt_encoder|adapter_[A-Za-z_]+)(\.|$)")


def normalize_param_name(name: str) -> str:
    """Canonical parameter name: strips DDP/``torch.compile``/PEFT wrapper prefixes (repeatedly)
    and PEFT's ``.base_layer``/``.original_module`` infixes, so that a mask built on a bare model
    applies to the wrapped one and vice versa.

    >>> normalize_param_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    if not isinstance(name, str):
        raise TypeError(f"parameter name must be a str, got {type(name).__name__}")
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                changed = True
    for infix in _PEFT_INFIXES:
        name = name.replace(infix, ".")
    return name


def _is_adapter_param(name: str) -> bool:
    return _PEFT_ADAPTER.search(name) is not None


def _model_param_shapes(model: torch.nn.Module) -> "OrderedDict[str, torch.Size]":
    """normalised name -> shape for every base-model parameter (adapter weights skipped; tied
    weights once, as ``named_parameters`` reports them)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out: "OrderedDict[str, torch.Size]" = OrderedDict()
    for name, p in model.named_parameters():
        if _is_adapter_param(name):
            continue
        out[normalize_param_name(name)] = p.shape
    return out


def _fingerprint_of(shapes: Mapping[str, Sequence[int]]) -> str:
    h = hashlib.sha256()
    for name in sorted(shapes):
        h.update(f"{name}:{','.join(str(int(d)) for d in shapes[name])};".encode())
    return h.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash (hex, 32 chars) of the model's normalised parameter names and shapes.

    Independent of parameter values, dtype, device, ``requires_grad`` and wrapping (DDP, PEFT,
    ``torch.compile``); changes when a parameter is added, removed, renamed or reshaped (e.g. by
    ``resize_token_embeddings``).
    """
    return _fingerprint_of(_model_param_shapes(model))


def _compile_patterns(patterns: PatternArg, arg: str) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for i, p in enumerate(patterns):
        if not isinstance(p, str):
            raise TypeError(f"{arg}[{i}] must be a str (a regular expression), got {type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{arg}[{i}] = {p!r} is not a valid regular expression: {exc}") from None
    return out


def _matches(name: str, pats: list) -> bool:
    return any(p.search(name) for p in pats)


def partition_names(sizes: Sequence[tuple], world_size: int) -> list:
    """Split ``[(name, numel), ...]`` (in parameter order) into ``world_size`` contiguous blocks of
    roughly equal element count, for multi-process scoring: rank ``r`` scores block ``r`` and
    calls :func:`build_mask` with ``process_group=``; the global order is then rank-major, which
    equals the original parameter order (so ties break exactly as in one process).

    Returns ``list[list[str]]`` of length ``world_size`` (some blocks may be empty).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    sizes = [(str(n), int(c)) for n, c in sizes]
    total = sum(c for _, c in sizes)
    blocks: list = [[] for _ in range(world_size)]
    acc = 0
    for name, c in sizes:
        # Assign by the midpoint of the tensor's element range: contiguous and balanced.
        mid = acc + c / 2
        r = min(int(mid * world_size / total), world_size - 1) if total else 0
        blocks[r].append(name)
        acc += c
    return blocks


# ----------------------------------------------------------------------------- per-row selection
def select_per_row(scores: torch.Tensor, ratio: float, *, chunk_elements: int = 1 << 22) -> PackedMask:
    """Exact per-row top-k: in every row of a 2-D ``scores`` tensor select ``int(cols * ratio)``
    elements with the largest scores (Wanda's per-output-row rule, WAGLE ``generate_mask.py::wanda``).

    Ties go to the lowest column index (a stable descending sort per row). A 1-D tensor is one row;
    a tensor with more than two dimensions is viewed as ``[shape[0], -1]``. Memory: the sort runs on
    blocks of rows of about ``chunk_elements`` elements (int64 indices, 8 bytes per element), so
    peak extra memory is ~12 bytes x ``chunk_elements`` regardless of the tensor size.

    Args:
        scores: float tensor (float32/bfloat16/float16), no NaNs.
        ratio: fraction of each row to select, in (0, 1].
    Returns:
        :class:`PackedMask` shaped like ``scores`` on its device.
    """
    _check_ratio(ratio)
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError("scores must be a floating-point tensor")
    shape = scores.shape
    if scores.numel() == 0:
        return PackedMask.full(shape, False, device=scores.device)
    rows2d = scores.reshape(1, -1) if scores.dim() <= 1 else scores.reshape(shape[0], -1)
    n_rows, n_cols = rows2d.shape
    k = int(n_cols * ratio)
    sel = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=scores.device)
    if k and n_rows:
        if torch.isnan(rows2d).any():
            raise ValueError("scores contain NaN values; NaN scores cannot be ranked")
        step = max(1, chunk_elements // max(n_cols, 1))
        for r0 in range(0, n_rows, step):
            block = rows2d[r0:r0 + step].to(torch.float32)
            # +0.0 canonicalises -0.0 so that it ties with +0.0 (the kernels' key convention).
            idx = torch.sort(block + 0.0, dim=1, descending=True, stable=True).indices[:, :k]
            sel[r0:r0 + step].scatter_(1, idx, True)
    return PackedMask(PackedMask.from_bool(sel).bits, shape, k * n_rows)


def _check_ratio(ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a number in (0, 1] (fraction of weights selected for update), got {ratio!r}")


# ----------------------------------------------------------------------------- build_mask
def build_mask(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    *,
    scope: str = "global",
    include: PatternArg = None,
    exclude: PatternArg = None,
    excluded: str = "frozen",
    missing: str = "dense",
    model: Optional[torch.nn.Module] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    process_group=None,
    gather: bool = True,
) -> "MaskSet":
    """Select the top ``ratio`` of weights by score, exactly and deterministically.

    Args:
        scores: ``{parameter name: float scores}`` (any shapes, one device, no NaNs), in
            parameter order; larger = more important = selected first. Typically from
            :func:`wagle_ext.attribution.compute_scores`; its ``.info`` (score kind, gamma, model
            fingerprint, ...) is copied into the mask metadata when present.
        ratio: fraction of the **included** weights selected for update, in (0, 1]. The count is
            exactly ``int(N * ratio)`` with N = all included elements (``"global"``), each
            tensor's elements (``"per_tensor"``) or each row's columns (``"per_row"``).
        scope: ``"global"`` (one threshold over all included tensors, WAGLE), ``"per_tensor"``
            (SNIP ``layer_wise=True``), or ``"per_row"`` (Wanda: per output row of 2-D weights).
        include: regular expression(s) (``re.search`` on the parameter name); when given only
            matching parameters take part in the selection.
        exclude: regular expression(s); matching parameters never take part, e.g.
            ``exclude=["embed_tokens", "norm", "lm_head"]``.
        excluded: what the mask says for parameters in ``scores`` left out by include/exclude:
            ``"frozen"`` (all-False entry: never updated), ``"dense"`` (all-True entry: updated
            densely, WAGLE's Wanda convention), or ``"absent"`` (no entry; consumers apply
            :attr:`MaskSet.missing`).
        missing: how consumers treat model parameters with no entry at all (not in ``scores``, or
            ``excluded="absent"``): ``"dense"`` (default; e.g. embeddings/norms/lm_head under the
            Wanda baseline) or ``"frozen"``. Stored as :attr:`MaskSet.missing`.
        model: when given, its :func:`model_fingerprint` is recorded (otherwise one from
            ``scores.info``, else none) and the names are checked against it.
        metadata: extra JSON-serialisable provenance stored with the mask.
        process_group: multi-process global selection (``True`` = default ``torch.distributed``
            group, or a group). Each process passes ITS OWN contiguous block of the parameters (see
            :func:`partition_names`; global order is rank-major) and ``ratio`` refers to the total
            over all processes. Only int64 histograms (a few KB per radix level) cross processes,
            never scores. The result equals the one-process mask.
        gather: with ``process_group``, all-gather the bits so every process returns the full
            :class:`MaskSet` (ratio/8 bytes per weight cross processes); ``False`` returns each
            process's own block only.

    Ties at the threshold go to the lowest index (parameter order, then flat index; per row: the
    lowest column), so masks are identical across runs, back ends and process counts.

    Returns:
        :class:`MaskSet` on the scores' device. Nothing is mutated.
    """
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping name -> tensor, got {type(scores).__name__}")
    _check_ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if excluded not in ("frozen", "dense", "absent"):
        raise ValueError(f"excluded must be 'frozen', 'dense' or 'absent', got {excluded!r}")
    if missing not in ("dense", "frozen"):
        raise ValueError(f"missing must be 'dense' or 'frozen', got {missing!r}")
    inc = _compile_patterns(include, "include")
    exc = _compile_patterns(exclude, "exclude")
    for name, s in scores.items():
        if not isinstance(name, str):
            raise TypeError(f"scores keys must be parameter names (str), got {type(name).__name__}")
        if not isinstance(s, torch.Tensor) or s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"scores[{name!r}] must be a float32/bfloat16/float16 tensor")

    names = list(scores.keys())
    selected_names = [n for n in names if (not inc or _matches(n, inc)) and not _matches(n, exc)]
    if not selected_names and process_group is None:
        raise ValueError(
            f"no parameter left to select from: include={include!r}, exclude={exclude!r} matched "
            f"none/all of {len(names)} names (first: {names[:3]})")

    from . import ops

    masks: dict = {}
    if scope == "global":
        tensors = [scores[n] for n in selected_names]
        if process_group is not None and not tensors:
            # This process holds no block: it still takes part in the collective histogram
            # reductions, with one empty tensor (select_topk_mask needs a tensor to learn the device).
            dev = next(iter(scores.values())).device if scores else torch.device("cpu")
            ops.select_topk_mask([torch.empty(0, device=dev)], ratio=ratio, scope="global",
                                 process_group=process_group)
        else:
            for n, pm in zip(selected_names, ops.select_topk_mask(
                    tensors, ratio=ratio, scope="global", process_group=process_group)):
                masks[n] = pm
    elif scope == "per_tensor":
        for n, pm in zip(selected_names, ops.select_topk_mask(
                [scores[n] for n in selected_names], ratio=ratio, scope="per_tensor")):
            masks[n] = pm
    else:
        for n in selected_names:
            masks[n] = select_per_row(scores[n], ratio)

    ordered: "OrderedDict[str, PackedMask]" = OrderedDict()
    for n in names:
        if n in masks:
            ordered[n] = masks[n]
        elif excluded != "absent":
            ordered[n] = PackedMask.full(scores[n].shape, excluded == "dense", device=scores[n].device)

    info = dict(getattr(scores, "info", None) or {})
    meta: dict = {k: v for k, v in info.items() if _jsonable(v)}
    meta.update({
        "ratio": float(ratio),
        "scope": scope,
        "include": _pattern_list(include),
        "exclude": _pattern_list(exclude),
        "excluded": excluded,
    })
    if metadata:
        for k, v in metadata.items():
            if not _jsonable(v):
                raise TypeError(f"metadata[{k!r}] must be JSON-serialisable, got {type(v).__name__}")
            meta[k] = v
    fingerprint = model_fingerprint(model) if model is not None else info.get("model_fingerprint")
    meta.pop("model_fingerprint", None)

    if process_group is not None:
        meta["world_size"] = _world_size(process_group)
        if gather:
            ordered = _all_gather_masks(ordered, process_group)
    result = MaskSet(ordered, metadata=meta, fingerprint=fingerprint, missing=missing)
    if model is not None and (process_group is None or gather):
        result.check_compatible(model, strict=False)
    return result


def _pattern_list(p: PatternArg) -> list:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _group(process_group):
    return None if process_group is True else process_group


def _world_size(process_group) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group= given but torch.distributed is not initialised")
    return dist.get_world_size(_group(process_group))


def _all_gather_masks(local: "OrderedDict[str, PackedMask]", process_group) -> "OrderedDict[str, PackedMask]":
    """Every process gets every process's masks, in rank-major order. Names/shapes travel as small
    objects; the bits as one flat uint8 tensor per rank (broadcast on the masks' device)."""
    import torch.distributed as dist

    group = _group(process_group)
    world = dist.get_world_size(group)
    device = next(iter(local.values())).device if local else torch.device("cpu")
    backend = dist.get_backend(group)
    if backend == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    info = [(n, tuple(m.shape), m._nnz) for n, m in local.items()]
    infos: list = [None] * world
    dist.all_gather_object(infos, info, group=group)
    seen: dict = {}
    for r, lst in enumerate(infos):
        for n, _, _ in lst:
            if n in seen:
                raise ValueError(f"parameter {n!r} is in the blocks of ranks {seen[n]} and {r}; "
                                 "each process must pass a disjoint block (see partition_names)")
            seen[n] = r
    out: "OrderedDict[str, PackedMask]" = OrderedDict()
    for r, lst in enumerate(infos):
        nbytes = [(math.prod(shape) + 7) // 8 for _, shape, _ in lst]
        if r == dist.get_rank(group):
            flat = (torch.cat([m.bits.reshape(-1) for m in local.values()]) if local
                    else torch.empty(0, dtype=torch.uint8)).to(device)
        else:
            flat = torch.empty(sum(nbytes), dtype=torch.uint8, device=device)
        if sum(nbytes):
            dist.broadcast(flat, src=dist.get_global_rank(group, r) if group is not None else r, group=group)
        off = 0
        for (n, shape, nnz), nb in zip(lst, nbytes):
            out[n] = PackedMask(flat[off:off + nb].clone(), shape, nnz)
            off += nb
    return out


# ----------------------------------------------------------------------------- MaskSet
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def _layer_of(name: str) -> Optional[int]:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _module_type_of(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; ``lm_head.weight`` -> ``lm_head``."""
    parts = normalize_param_name(name).split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        return parts[-2] if parts[-1] == "weight" else parts[-2] + ".bias"
    return parts[-1]


class MaskSet(Mapping):
    """An ordered mapping ``parameter name -> PackedMask`` (True = selected for update), with
    provenance metadata and a model fingerprint.

    Mapping access accepts wrapped names too (``"module.model.layers.0..."``): lookups normalise
    names with :func:`normalize_param_name`. Model parameters without an entry are treated as
    :attr:`missing` (``"dense"``: updated normally, the Wanda baseline's convention for embeddings,
    norms and lm_head; or ``"frozen"``).

    Attributes:
        metadata: JSON-serialisable dict (score kind, gamma, ratio, scope, ...).
        fingerprint: :func:`model_fingerprint` of the model the mask was built for, or None.
        missing: ``"dense"`` or ``"frozen"``.
    """

    def __init__(self, masks: Mapping[str, PackedMask], *, metadata: Optional[Mapping[str, Any]] = None,
                 fingerprint: Optional[str] = None, missing: str = "dense"):
        if missing not in ("dense", "frozen"):
            raise ValueError(f"missing must be 'dense' or 'frozen', got {missing!r}")
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
        return list(self._masks) == list(other._masks) and all(
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
        shapes = _model_param_shapes(model)
        missing = [n for n in self._masks if n not in shapes]
        wrong = [(n, tuple(self._masks[n].shape), tuple(shapes[n])) for n in self._masks
                 if n in shapes and shapes[n] != self._masks[n].shape]
        problems = []
        if missing:
            problems.append(f"{len(missing)} masked parameter(s) not in the model, e.g. {missing[:3]}")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatch(es) (name, mask shape, model shape), e.g. {wrong[:3]}")
        if strict and self.fingerprint is not None:
            fp = _fingerprint_of(shapes)
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
            if _is_adapter_param(name):
                continue
            key = normalize_param_name(name)
            if key in self._masks:
                m = self._masks[key]
                out[name] = m if m.device == p.device else m.to(p.device)
        return out

    # ------------------------------------------------------------------ save / load
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write a safetensors file: one uint8 bit array per parameter (1 bit per weight) plus
        metadata (``__metadata__``): format/version, library version, parameter names (in order)
        and shapes, selected counts, fingerprint, ``missing`` and :attr:`metadata` (score kind,
        gamma, ratio, scope, ...). Readable by any safetensors loader."""
        from safetensors.torch import save_file

        from . import __version__

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
            "metadata": self.metadata,
        }
        flat = {_META_KEY: json.dumps(header)}
        # A few flat keys, readable with `safetensors` metadata tools without parsing JSON.
        for k in ("score_kind", "gamma", "ratio", "scope"):
            if k in self.metadata:
                flat[k] = str(self.metadata[k])
        flat["fingerprint"] = str(self.fingerprint)
        flat["format"] = MASK_FORMAT
        save_file(tensors, os.fspath(path), metadata=flat)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, model: Optional[torch.nn.Module] = None,
             device: Union[str, torch.device] = "cpu", strict: bool = True) -> "MaskSet":
        """Read a file written by :meth:`save`; with ``model``, also :meth:`check_compatible`
        (a clear ``ValueError`` when the mask was built for a different model)."""
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            if _META_KEY not in raw:
                raise ValueError(f"{path} is not a wagle_ext MaskSet file (no {_META_KEY!r} metadata)")
            header = json.loads(raw[_META_KEY])
            if header.get("format") != MASK_FORMAT or int(header.get("format_version", 0)) > MASK_FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported mask format {header.get('format')!r} "
                                 f"version {header.get('format_version')!r}")
            masks = OrderedDict()
            for name, shape, nnz in zip(header["names"], header["shapes"], header["nnz"]):
                bits = f.get_tensor(name)
                masks[name] = PackedMask(bits.to(device), shape, nnz)
        ms = cls(masks, metadata=header.get("metadata") or {}, fingerprint=header.get("fingerprint"),
                 missing=header.get("missing", "dense"))
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
            layer = _layer_of(n)
            mtype = _module_type_of(n)
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

    def plot(self, path: Union[str, os.PathLike], *, title: Optional[str] = None) -> None:
        """Write a PNG of the selection density: a heatmap of density per decoder layer (x) and
        module type (y), and a line of the per-layer density with the overall density as a
        reference; non-layer parameters (embeddings, final norm, lm_head) appear in a bar panel.
        This is WAGLE's layer-sensitivity view. Needs matplotlib (Agg back end; no display)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        st = self.stats()
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
        ax_l.axhline(self.density, color="tab:red", ls="--", lw=1, label=f"overall {self.density:.3f}")
        ax_l.set_xlabel("decoder layer")
        ax_l.set_ylabel("density")
        ax_l.set_ylim(0, 1.02)
        ax_l.legend(fontsize=8, loc="best")
        ax_l.grid(alpha=0.3)
        meta = self.metadata
        fig.suptitle(title or (f"MaskSet: kind={meta.get('score_kind', '?')}, ratio={meta.get('ratio', '?')}, "
                               f"scope={meta.get('scope', '?')}, {self.total_selected:,}/{self.numel:,} selected"),
                     fontsize=11)
        fig.savefig(os.fspath(path), dpi=110, bbox_inches="tight")
        plt.close(fig)
