"""wagle-ext: weight-attribution-guided LLM unlearning with fused kernels.

Pipeline (data flows one way): model + data -> gradients (:func:`accumulate_gradients`) -> scores
(:func:`compute_scores` / :func:`attribution_scores`) -> mask (:func:`build_mask` /
:func:`select_topk_mask` -> :class:`MaskSet` of :class:`PackedMask`) -> optimizer
(:class:`MaskedAdamW`) -> trainer (:class:`UnlearnTrainer` with an :class:`Objective`).
"""
# kernels
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

# attribution and masks
from .attribution import (
    accumulate_gradients,
    collect_input_norms,
    compute_scores,
    estimate_hessian_diagonal,
    score_model,
)
from .masks import MaskSet, build_mask, model_fingerprint, partition_names

# optimizer, objectives and data
from .optim import MaskedAdamW
from .memory import memory_report
from .data import REFUSAL_ANSWERS, ForgetRetainDataset, QACollator
from .objectives import OBJECTIVES, Objective, get_objective

# evaluation
from .evaluation import evaluate_tofu, forget_quality, model_utility, truth_ratio
from .tofu_data import load_qa_split, load_tofu_eval_sets

__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer imports transformers: load it on first use, not at `import wagle_ext`.
    if name in ("UnlearnTrainer", "frozen_reference"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'wagle_ext' has no attribute {name!r}")


__all__ = [
    # kernels
    "PackedMask",
    "attribution_scores",
    "backend_info",
    "pack_bits",
    "popcount_bits",
    "resolve_backend",
    "score_histogram",
    "select_topk_mask",
    "unpack_bits",
    # attribution and masks
    "MaskSet",
    "accumulate_gradients",
    "build_mask",
    "collect_input_norms",
    "compute_scores",
    "estimate_hessian_diagonal",
    "model_fingerprint",
    "partition_names",
    "score_model",
    # optimizer, objectives and data
    "MaskedAdamW",
    "memory_report",
    "OBJECTIVES",
    "Objective",
    "REFUSAL_ANSWERS",
    "ForgetRetainDataset",
    "QACollator",
    "get_objective",
    # training (lazy: imports transformers)
    "UnlearnTrainer",
    "frozen_reference",
    # evaluation
    "evaluate_tofu",
    "forget_quality",
    "load_qa_split",
    "load_tofu_eval_sets",
    "model_utility",
    "truth_ratio",
    "__version__",
]
