"""wagle-ext: weight-attribution-guided LLM unlearning with fused kernels.

Layers (data flows one way, and no module imports a layer above its own; see docs/layers.md):
``ops`` (kernels) -> ``attribution`` -> ``masks`` -> ``optim`` / ``memory`` -> ``unlearn`` -> ``eval``
-> ``app``, over the foundation modules ``_checks``, ``naming``, ``plotting``, ``_util``.

Pipeline: model + data -> gradients (:func:`accumulate_gradients`) -> scores
(:func:`compute_scores` / :func:`attribution_scores`) -> mask (:func:`build_mask` /
:func:`select_topk_mask` -> :class:`MaskSet` of :class:`PackedMask`) -> optimizer
(:class:`MaskedAdamW`) -> trainer (:class:`UnlearnTrainer` with an :class:`Objective`). Or, with
LoRA adapters instead of a mask: :func:`fisher_importance` -> :func:`add_lora` (``init="fila"``, on all
linears or on :func:`select_lora_targets`) -> the same trainer (``wagle_ext.lora``, docs/lora.md).
"""
from . import _compat
from ._version import __version__

_compat.install()  # old module paths (wagle_ext.trainer, wagle_ext.cli, ...) keep importing

# kernels and masks
from .ops import (
    attribution_scores,
    backend_info,
    pack_bits,
    popcount_bits,
    resolve_backend,
    score_histogram,
    unpack_bits,
)
from .masks import (MaskSet, PackedMask, build_mask, format_trainable_report, model_fingerprint, partition_names,
                    select_topk_mask, trainable_report)

# attribution
from .attribution import (
    accumulate_gradients,
    collect_input_norms,
    compute_scores,
    estimate_hessian_diagonal,
    score_model,
)

# parameter-efficient unlearning (LoRA through peft, imported only when used)
from .lora import FisherImportance, LoraPlacement, add_lora, fila_init, fisher_importance, select_lora_targets

# optimizer, objectives and data
from .optim import MaskedAdamW
from .memory import memory_report
from .unlearn.data import REFUSAL_ANSWERS, ForgetRetainDataset, QACollator, refusal_targets
from .unlearn.objectives import OBJECTIVES, Objective, get_objective

# evaluation
from .eval import (evaluate_tofu, find_tofu_eval_sets, forget_quality, load_qa_split, load_tofu_eval_sets, model_utility,
                   privleak, truth_ratio)


def __getattr__(name: str):
    # The trainer imports transformers: load it on first use, not at `import wagle_ext`.
    if name in ("UnlearnTrainer", "frozen_reference"):
        from .unlearn import trainer

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
    "trainable_report",
    "format_trainable_report",
    "collect_input_norms",
    "compute_scores",
    "estimate_hessian_diagonal",
    "model_fingerprint",
    "partition_names",
    "score_model",
    # LoRA / FILA
    "FisherImportance",
    "LoraPlacement",
    "add_lora",
    "fila_init",
    "fisher_importance",
    "select_lora_targets",
    # optimizer, objectives and data
    "MaskedAdamW",
    "memory_report",
    "OBJECTIVES",
    "Objective",
    "REFUSAL_ANSWERS",
    "ForgetRetainDataset",
    "QACollator",
    "refusal_targets",
    "get_objective",
    # training (lazy: imports transformers)
    "UnlearnTrainer",
    "frozen_reference",
    # evaluation
    "evaluate_tofu",
    "find_tofu_eval_sets",
    "forget_quality",
    "privleak",
    "load_qa_split",
    "load_tofu_eval_sets",
    "model_utility",
    "truth_ratio",
    "__version__",
]
