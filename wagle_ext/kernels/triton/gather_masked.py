"""Triton kernel of ``gather_masked_`` (compact gradients): ``out[k] (+)= float(src[e_k])`` for the
k-th selected element ``e_k`` of a PackedMask, with the compact-slot addressing of
``masked_adamw_`` (docs/kernels.md 4.3).

One program per 4096-element directory chunk, walked in slices of ``BLOCK`` elements (1024 on a
GPU, the whole chunk in the interpreter, which costs ~0.5 ms per slice whatever its size): the
mask bits of a slice are unpacked per element and the compact slot of a selected element is
``dir[chunk] + (selected before the slice) + exclusive tl.cumsum(bits)``. A slice with no
selected element reads only its bits; otherwise ``src`` is read only where a bit is set.

Values: bf16 is widened by a 16-bit shift (exact; the interpreter has no bf16), fp16 by Triton's
exact conversion, and ``accumulate`` is one float32 add per element (as ``out.add_`` in the
reference), so the result is bit-identical to the reference.

A directory that disagrees with the bits never leads outside ``[dir[c], dir[c+1]) ∩ [0, nnz)``:
such chunks are counted in a device flag. The wrapper reads that flag (and checks
``chunk_offsets[-1] == out.numel()``) only for CPU tensors (the interpreter); on a GPU the op is
asynchronous, like the CUDA kernel (``wagle_ext.ops.gather_masked`` skips its own host read of
``chunk_offsets[-1]`` there too), so a wrong directory goes undetected but writes stay in bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _launch
from ._launch import interpreting, lazy_jit
from ._radix import load_f32

from ..reference import MASKED_ADAMW_CHUNK as CHUNK  # elements per directory entry
GPU_BLOCK = 1024  # docs/kernels.md 4.3
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@lazy_jit
def _gather_masked_kernel(out_ptr, src_ptr, bits_ptr, dir_ptr, err_ptr, n, nnz,
                          DTYPE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
                          CHUNK_: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors beyond 2^31 elements
    e0 = chunk * CHUNK_
    k0 = tl.load(dir_ptr + chunk)
    k_end = tl.load(dir_ptr + chunk + 1)
    lo = tl.maximum(k0, 0)
    hi = tl.minimum(k_end, nnz)
    k = k0
    for it in range(CHUNK_ // BLOCK):
        offs = e0 + it * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        byte = tl.load(bits_ptr + (offs >> 3), mask=valid, other=0).to(tl.int32)
        bit = (byte >> (offs & 7).to(tl.int32)) & 1
        cnt = tl.sum(bit, axis=0)
        if cnt > 0:
            slot = k + (tl.cumsum(bit, axis=0) - bit)  # exclusive lane prefix
            sel = (bit != 0) & (slot >= lo) & (slot < hi)
            x = load_f32(src_ptr, offs, sel, DTYPE == 1)
            if ACCUMULATE:
                x = tl.load(out_ptr + slot, mask=sel, other=0.0) + x
            tl.store(out_ptr + slot, x, mask=sel)
        k += cnt
    # The directory must account for exactly the chunk's selected elements.
    if (k != k_end) | (k0 < 0) | (k_end > nnz):
        tl.atomic_add(err_ptr, 1)


def _block() -> int:
    if _launch.FORCED_GEOMETRY is not None:  # tests: the GPU slice loop in the interpreter
        return min(_launch.FORCED_GEOMETRY[0], CHUNK)
    return CHUNK if interpreting() else GPU_BLOCK


@triton_op("wagle_triton::gather_masked_", mutates_args=("out",))
def _gather_masked_op(out: torch.Tensor, src: torch.Tensor, bits: torch.Tensor, chunk_offsets: torch.Tensor,
                      accumulate: bool) -> None:
    n = src.numel()
    nchunks = triton.cdiv(n, CHUNK)
    if nchunks == 0:
        return
    err = torch.zeros(1, dtype=torch.int32, device=src.device)
    wrap_triton(_gather_masked_kernel.kernel())[(nchunks,)](
        out, src.view(torch.int16) if src.dtype == torch.bfloat16 else src, bits, chunk_offsets, err, n,
        out.numel(), DTYPE=_DTYPE_CODE[src.dtype], ACCUMULATE=accumulate, BLOCK=_block(), CHUNK_=CHUNK)
    if src.device.type != "cuda":
        bad = int(err.item())
        if bad:
            raise ValueError(f"gather_masked_: chunk_offsets do not match bits (or the size of out) in {bad} "
                             "chunk(s); rebuild the directory from the mask")


def gather_masked_(out: torch.Tensor, src: torch.Tensor, bits: torch.Tensor, chunk_offsets: torch.Tensor,
                   accumulate: bool) -> None:
    """Triton ``gather_masked_``: same contract as ``kernels.reference.gather_masked_`` (schema:
    csrc/ops.cpp). ``out``: contiguous float32[nnz], mutated (overwritten, or added to with
    ``accumulate``); ``src``: contiguous float32/bfloat16/float16 tensor of n elements; ``bits``:
    uint8[ceil(n/8)] (bit j of byte i = element 8i+j); ``chunk_offsets``: int64[ceil(n/4096)+1],
    entry c = selected elements before element 4096*c, last = nnz.

    Raises ``ValueError`` on a directory that disagrees with the bits or with ``out.numel()`` for
    CPU tensors (interpreter); on a GPU that is not detected (no synchronisation), but nothing
    outside ``out`` is ever written.
    """
    if not isinstance(src, torch.Tensor) or src.dtype not in _DTYPE_CODE:
        raise TypeError(f"gather_masked_: src must be a float32, bfloat16 or float16 tensor, got "
                        f"{getattr(src, 'dtype', type(src).__name__)}")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or not out.is_contiguous():
        raise TypeError("gather_masked_: out must be a contiguous float32 tensor")
    if not src.is_contiguous():
        raise ValueError("gather_masked_: src must be contiguous")
    n = src.numel()
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != (n + 7) // 8:
        raise ValueError(f"gather_masked_: bits must be uint8[{(n + 7) // 8}] for src of {n} elements")
    nch = (n + CHUNK - 1) // CHUNK
    if not isinstance(chunk_offsets, torch.Tensor) or chunk_offsets.dtype != torch.int64 \
            or chunk_offsets.numel() != nch + 1:
        raise ValueError(f"gather_masked_: chunk_offsets must be int64[{nch + 1}] (masked_adamw_chunk_offsets of bits)")
    for name, t in (("out", out), ("bits", bits), ("chunk_offsets", chunk_offsets)):
        if t.device != src.device:
            raise ValueError(f"gather_masked_: {name} is on {t.device} but src is on {src.device}")
    if src.device.type != "cuda" and int(chunk_offsets[-1]) != out.numel():
        raise ValueError(f"gather_masked_: out has {out.numel()} entries but chunk_offsets[-1] = "
                         f"{int(chunk_offsets[-1])}")
    _gather_masked_op(out, src, bits.contiguous(), chunk_offsets.contiguous(), bool(accumulate))
