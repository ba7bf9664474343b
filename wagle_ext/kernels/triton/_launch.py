"""Launch plumbing shared by the Triton kernels of wagle_ext (no kernels here).

Kernels are decorated with :func:`lazy_jit` instead of ``@triton.jit``: ``triton.jit`` decides at
decoration time between a compiled ``JITFunction`` and the CPU interpreter (``TRITON_INTERPRET=1``),
and this package may be imported (e.g. by ``wagle_ext.backend_info()``) before a test sets the
variable. ``lazy_jit`` decorates on first launch, once per mode.

Device helpers (functions called from kernels, e.g. ``_radix.signed_key``) are ``lazy_jit`` too: a
kernel's jitted function sees every lazy helper it names as that helper's jitted function for the
same mode (a compiled kernel can only call ``JITFunction``s, an interpreted one only interpreted
functions), so one helper serves every kernel in both modes.
"""
from __future__ import annotations

import functools
import os
import types
from typing import Callable

import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class _LazyKernel:
    def __init__(self, fn: Callable):
        self.fn = fn
        self._by_mode: dict = {}

    def kernel(self):
        """The ``triton.jit`` function for the current mode (compiled or interpreted)."""
        mode = interpreting()
        k = self._by_mode.get(mode)
        if k is None:
            k = self._by_mode[mode] = triton.jit(self._resolved())
        return k

    def _resolved(self) -> Callable:
        """``fn`` with every lazy helper it names replaced by that helper's jitted function (a copy of
        the function over a copy of its module globals; ``fn`` itself when it names none)."""
        glb = self.fn.__globals__
        helpers = {n: glb[n] for n in self.fn.__code__.co_names if isinstance(glb.get(n), _LazyKernel)}
        if not helpers:
            return self.fn
        env = dict(glb)
        env.update({n: h.kernel() for n, h in helpers.items()})
        fn = types.FunctionType(self.fn.__code__, env, self.fn.__name__, self.fn.__defaults__, self.fn.__closure__)
        fn.__kwdefaults__ = self.fn.__kwdefaults__
        return functools.update_wrapper(fn, self.fn, updated=())


def lazy_jit(fn: Callable) -> _LazyKernel:
    return _LazyKernel(fn)


# Tests set this to (block, blocks_per_program) to run the GPU launch geometry (small blocks, many
# programs, multi-block histogram loops) in the interpreter. None: the defaults below.
FORCED_GEOMETRY = None


def block(gpu_block: int) -> int:
    """Elements per program: ``gpu_block`` on a GPU; 16384 in the interpreter, which costs about
    0.5 ms per program whatever its size (docs/pitfalls.md K17), so fewer, larger programs are faster."""
    if FORCED_GEOMETRY is not None:
        return FORCED_GEOMETRY[0]
    return 16384 if interpreting() else gpu_block


def blocks_per_program(gpu_blocks: int) -> int:
    """Blocks each histogram program walks before flushing its 2048-bin histogram with one vector
    atomic: ``gpu_blocks`` on a GPU (one flush per 16 x 4096 elements instead of per 4096), 1 in
    the interpreter (whose blocks are already large)."""
    if FORCED_GEOMETRY is not None:
        return FORCED_GEOMETRY[1]
    return 1 if interpreting() else gpu_blocks
