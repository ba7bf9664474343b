"""wagle-ext: weight-attribution-guided LLM unlearning with fused kernels.

Public API (kernels): :func:`attribution_scores`, :func:`select_topk_mask`, :class:`PackedMask`,
:func:`backend_info`.
"""
from .ops import (
    attribution_scores,
    backend_info,
    pack_bits,
    popcount_bits,
    resolve_backend,
    score_histogram,
    select_topk_mask,
    unpack_bits,
)
from .packed_mask import PackedMask
from .optim import MaskedAdamW  # masked AdamW (owner: adamw)

__version__ = "0.1.0"

__all__ = [
    "MaskedAdamW",
    "PackedMask",
    "attribution_scores",
    "backend_info",
    "pack_bits",
    "popcount_bits",
    "resolve_backend",
    "score_histogram",
    "select_topk_mask",
    "unpack_bits",
    "__version__",
]
