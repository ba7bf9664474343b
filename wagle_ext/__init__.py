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

__version__ = "0.1.0"

__all__ = [
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

# ---- attribution + masks (issue 5, branch `attribution`) ----
from .attribution import (  # noqa: E402
    accumulate_gradients,
    collect_input_norms,
    compute_scores,
    estimate_hessian_diagonal,
    score_model,
)
from .masks import MaskSet, build_mask, model_fingerprint, partition_names  # noqa: E402

__all__ += [
    "MaskSet",
    "accumulate_gradients",
    "build_mask",
    "collect_input_norms",
    "compute_scores",
    "estimate_hessian_diagonal",
    "model_fingerprint",
    "partition_names",
    "score_model",
]
# ---- end attribution + masks ----
