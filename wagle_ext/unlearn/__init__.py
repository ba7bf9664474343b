"""Unlearning: forget/retain data, objectives (losses), and the masked trainer.

Modules: ``data`` (ForgetRetainDataset, QACollator), ``objectives`` (the losses and the objectives
that combine them), ``trainer`` (UnlearnTrainer, a ``transformers.Trainer``; imported on first use,
since it imports transformers), ``_hf_shim`` (the only code that touches ``transformers.Trainer``
internals).
"""
from .data import IGNORE_INDEX, REFUSAL_ANSWERS, ForgetRetainDataset, QACollator, refusal_targets
from .objectives import OBJECTIVES, Objective, get_objective

__all__ = ["IGNORE_INDEX", "OBJECTIVES", "REFUSAL_ANSWERS", "ForgetRetainDataset", "Objective", "QACollator",
           "get_objective", "refusal_targets"]
