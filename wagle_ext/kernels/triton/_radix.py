"""Device helpers shared by the Triton kernels: the exact fp32 view of a loaded element and the
order-preserving radix key of a float score (docs/conventions.md "Keys"). Decorated with
``lazy_jit`` (see ``_launch.py``), so every kernel calls the same helper in both modes.
"""
from __future__ import annotations

import triton.language as tl

from ._launch import lazy_jit


@lazy_jit
def load_f32(ptr, offs, mask, BF16: tl.constexpr):
    """Elements ``ptr[offs]`` (0 where ``mask`` is false) as float32. bf16 storage is loaded as its
    int16 bits and widened by a 16-bit shift, which is exact (as ``bf16_bits_to_float`` in
    csrc/common/score_math.h; the interpreter's own bf16 conversion mangles denormals); fp32 and
    fp16 are loaded and converted as they are."""
    if BF16:
        x = (tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@lazy_jit
def signed_key(x):
    """The radix key of float32 ``x`` as signed int32 ``ks = key - 2^31``: -0.0 is canonicalised to
    +0.0, then ``ks = b ^ ((b >> 31) & 0x7FFFFFFF)`` of the float bits ``b``. It orders like the
    unsigned key (``float_key`` in csrc/common/score_math.h) in signed 32-bit arithmetic, with
    ``key >> s == (ks >> s) + 2^(31 - s)`` and the same low digits. NaN gets a key too: callers mask
    NaN out (``x != x``)."""
    b = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)
