"""Triton back end of the wagle ops: the same functions, names and signatures as
``wagle_ext.kernels.reference`` (``wagle_ext.ops`` looks them up by name), each registered as a
``torch.library.triton_op`` (namespace ``wagle_triton``) so ``torch.compile`` can trace them.

Used for CUDA tensors when the CUDA kernels are not compiled in; on CPU tensors only when forced
(``WAGLE_BACKEND=triton``) under the interpreter (``TRITON_INTERPRET=1``), which is how the tests
check them on machines without a GPU. ``AVAILABLE`` is False when triton cannot be imported.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401

    from .attribution_score import attribution_score
    from .bits import pack_bits, popcount_bits, unpack_bits
    from .gather_masked import gather_masked_
    from .masked_adamw import masked_adamw_, masked_adamw_master_
    from .select_topk import count_key, radix_histogram, topk_mask_bits

    AVAILABLE = True
    IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: not an error, just not a back end
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["AVAILABLE", "IMPORT_ERROR", "attribution_score", "radix_histogram", "count_key",
           "topk_mask_bits", "pack_bits", "unpack_bits", "popcount_bits",
           "masked_adamw_", "masked_adamw_master_", "gather_masked_"]
