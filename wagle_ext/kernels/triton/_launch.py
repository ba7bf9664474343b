"""Launch plumbing shared by the Triton kernels of wagle_ext (no kernels here).

Kernels are decorated with :func:`lazy_jit` instead of ``@triton.jit``: ``triton.jit`` decides at
decoration time between a compiled ``JITFunction`` and the CPU interpreter (``TRITON_INTERPRET=1``),
and this package may be imported (e.g. by ``wagle_ext.backend_info()``) before a test sets the
variable. ``lazy_jit`` decorates on first launch, once per mode.
"""
from __future__ import annotations

import os
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
        """The ``triton.jit`` kernel for the current mode (compiled or interpreted)."""
        mode = interpreting()
        k = self._by_mode.get(mode)
        if k is None:
            k = self._by_mode[mode] = triton.jit(self.fn)
        return k


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
