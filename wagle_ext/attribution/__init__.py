"""Weight attribution over Hugging Face causal LMs: gradients -> per-weight scores.

Pipeline (WAGLE, Jia et al. 2024; docs/algorithms.md 1.2-1.5, 4):

1. :func:`accumulate_gradients` sums per-example gradients of a loss (each sequence's token-mean
   CE, :func:`causal_lm_sequence_loss`, summed over the batch: any batch size gives the sums of batch
   size 1) over one pass of a dataloader, in fp32, model in eval mode.
2. :func:`compute_scores` turns weights and accumulated gradients into per-weight scores through the
   fused :func:`wagle_ext.attribution_scores` op (``wagle``, ``snip``, ``gradient``,
   ``magnitude``), or in PyTorch (``random``, ``wanda``).
3. :func:`wagle_ext.masks.build_mask` selects the top ``ratio`` of weights.

:func:`score_model` runs 1-2 end to end, optionally *streaming* (scores overwrite the forget-gradient
accumulator and the retain accumulator is freed tensor by tensor: peak memory = weights + 2 fp32
buffers instead of weights + 3).

Bounded memory: ``score_model(..., memory_budget="16GB")`` (or ``groups=``) scores consecutive
parameter groups in separate data passes and returns a :class:`GroupedScores`;
``build_mask(grouped, ratio)`` selects exactly with one group alive at a time (``grouped``).

Modules: ``gradients`` (stage 1, plus the Hessian-diagonal estimate and Wanda's input norms; its
docstring has the memory behaviour and the batch format), ``scores`` (stage 2 and :func:`score_model`)
and ``grouped`` (group planning, :class:`GroupedScores`).
"""
from .gradients import (GradientDict, LossFn, accumulate_gradients, causal_lm_loss,
                        causal_lm_sequence_loss, collect_input_norms,
                        decoder_linear_names, estimate_hessian_diagonal)
from .grouped import GroupedScores, accumulator_bytes_per_param, parse_bytes, plan_groups
from .scores import SCORE_KINDS, ScoreDict, _stable_seed, compute_scores, score_model, wagle_term_norms  # noqa: F401

__all__ = [
    "SCORE_KINDS",
    "GradientDict",
    "GroupedScores",
    "ScoreDict",
    "accumulate_gradients",
    "accumulator_bytes_per_param",
    "causal_lm_loss",
    "causal_lm_sequence_loss",
    "collect_input_norms",
    "compute_scores",
    "decoder_linear_names",
    "estimate_hessian_diagonal",
    "parse_bytes",
    "plan_groups",
    "score_model",
    "wagle_term_norms",
]
