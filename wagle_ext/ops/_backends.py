"""Back-end choice for the wagle ops: which kernels this process has, and which one runs an op.

Back ends, in order of preference for a tensor's device (override with ``WAGLE_BACKEND``):

* ``cuda``      -- ``torch.ops.wagle`` compiled for CUDA (CUDA tensors, CUDA builds only)
* ``triton``    -- ``wagle_ext.kernels.triton`` (CUDA tensors; CPU tensors only when forced, under
  ``TRITON_INTERPRET=1``)
* ``cpp``       -- ``torch.ops.wagle`` CPU kernels from ``wagle_ext._C``
* ``reference`` -- ``wagle_ext.kernels.reference`` (pure PyTorch, always available)

A back end that lacks one op falls through to the next one for that op. Only the ops package
calls into this module: the layers above go through ``wagle_ext.ops`` (the one door).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Optional, Union

import torch

from ..kernels import reference

__all__ = ["BACKENDS", "HAS_CPP", "HIST_SIZE", "backend_info", "resolve_backend"]

HIST_SIZE = reference.HIST_SIZE
BACKENDS = ("cuda", "triton", "cpp", "reference")

# ----------------------------------------------------------------------------- extension loading
try:
    from .. import _C  # noqa: F401  (runs the TORCH_LIBRARY static initialisers)

    HAS_CPP = True
    _CPP_ERROR: Optional[str] = None
except ImportError as exc:  # pure-Python install (WAGLE_NO_EXT=1) or a failed build
    HAS_CPP = False
    _CPP_ERROR = str(exc)


# Ops registered once for every device (CompositeExplicitAutograd in csrc/ops.cpp) over a per-device
# kernel: a device has the op when it has that kernel.
_DEVICE_KERNEL_OF = {"attribution_score": "attribution_score_out"}


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if not HAS_CPP:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"wagle::{_DEVICE_KERNEL_OF.get(op, op)}", dispatch_key)
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _triton_module():
    try:
        from ..kernels import triton as triton_kernels

        return triton_kernels if triton_kernels.AVAILABLE else None
    except Exception:  # triton missing or broken: not an error, just not a back end
        return None


def _cpp_available(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return _has_kernel(op, key)


def _backend_has(backend: str, op: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpp":
        return device.type == "cpu" and _cpp_available(op, device)
    if backend == "cuda":
        return device.type == "cuda" and _cpp_available(op, device)
    if backend == "triton":
        mod = _triton_module()
        if mod is None or not hasattr(mod, op):
            return False
        # On CPU tensors Triton only runs in the interpreter, which is for tests: forced only.
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    raise AssertionError(backend)


_warned_fallback: set = set()


def resolve_backend(op: str, device: Union[torch.device, str]) -> str:
    """Name of the back end that runs ``op`` for tensors on ``device``.

    ``WAGLE_BACKEND=reference|cpp|triton|cuda`` forces one (a ``RuntimeError`` says so when it
    cannot run that op on that device).
    """
    device = torch.device(device)
    forced = os.environ.get("WAGLE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"WAGLE_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("WAGLE_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        if not _backend_has(forced, op, device):
            raise RuntimeError(
                f"WAGLE_BACKEND={forced} cannot run {op} on {device.type} tensors here "
                f"({backend_info()})")
        return forced
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpp", "reference")
    for name in order:
        if _backend_has(name, op, device):
            if name == "reference" and device.type == "cuda" and op not in _warned_fallback:
                _warned_fallback.add(op)
                warnings.warn(
                    f"wagle_ext: no CUDA or Triton kernel for {op}; using the pure-PyTorch "
                    "reference on the GPU (slow, memory-hungry).", RuntimeWarning, stacklevel=3)
            return name
    return "reference"


def backend_info() -> dict:
    """Which back ends are usable in this process, and what each device would use.

    Keys: ``cpp`` (bool), ``cpp_error`` (why the extension did not load, or None), ``cuda`` (CUDA
    kernels compiled in), ``triton`` (Triton importable), ``cpu_isa`` (SIMD path of the C++
    kernels), ``cpu`` / ``cuda_default`` (back end used for attribution_score on that device),
    ``forced`` (``WAGLE_BACKEND`` or None).
    """
    info = {
        "cpp": HAS_CPP,
        "cpp_error": _CPP_ERROR,
        "cuda": _has_kernel("attribution_score", "CUDA"),
        "triton": _triton_module() is not None,
        "cpu_isa": torch.ops.wagle.cpu_isa() if HAS_CPP else None,
        "forced": os.environ.get("WAGLE_BACKEND") or None,
    }
    cpu_order = ("cpp", "reference")
    info["cpu"] = next(b for b in cpu_order if _backend_has(b, "attribution_score", torch.device("cpu")))
    if info["cuda"]:
        info["cuda_default"] = "cuda"
    elif info["triton"]:
        info["cuda_default"] = "triton"
    else:
        info["cuda_default"] = "reference"
    return info


def _impl(op: str, device: torch.device) -> Callable:
    backend = resolve_backend(op, device)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.wagle, op)
    if backend == "triton":
        return getattr(_triton_module(), op)
    return getattr(reference, op)


def _backend_has_collect(device: torch.device) -> bool:
    # The fused mask+candidates pass is a CPU fast path; other back ends keep the histogram path
    # (a forced back end must run its own primitives, so only when cpp is the one chosen).
    return resolve_backend("topk_mask_bits", device) == "cpp" and _has_kernel("topk_mask_collect", "CPU")
