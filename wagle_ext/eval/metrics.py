"""TOFU metrics of a causal LM (Maini et al., 2024), as open-unlearning defines them; the protocol that
runs them over the TOFU sets is :mod:`wagle_ext.eval.tofu`.

Definitions follow open-unlearning (OU, ``src/evals/metrics/{memorization,privacy,utility,utils}.py``,
``src/evals/metrics/mia``, ``configs/eval/tofu_metrics``) formula for formula, epsilons included
(``tests/test_ou_parity.py`` re-implements OU's code and checks equality on identical per-item inputs);
see ``docs/algorithms.md`` section 1.10 and ``docs/tofu_eval.md``:

* **Probability** of an answer given its question, length-normalised: ``p̂ = exp(mean_t log p(a_t | q, a_<t))``
  over the answer label tokens (and the end-of-answer token(s) the collator appends), i.e.
  ``exp(-avg_loss)``. A multi-answer set (perturbed answers) aggregates as the per-item mean, then the mean.
* **Truth ratio** ``R = exp(-mean_k avg_loss_pert_k) / (exp(-avg_loss_ref) + 1e-10)`` (OU ``truth_ratio``:
  the perturbed *avg losses* are averaged first, i.e. a geometric mean of their probabilities), with the
  paraphrased answer as reference on forget/retain and the true answer on real-authors/world-facts (OU
  configs). Aggregates: forget ``mean(min(R, 1 / (R + 1e-10)))`` (``closer_to_1_better``), other sets
  ``mean(max(0, 1 - R))`` (``true_better``). The epsilons matter for a collapsed model (answer loss
  above ~17 nats/token, ``p̂ < 1e-7``): they are kept so forget quality equals OU's there too.
* **Normalised probability** (real authors, world facts): ``p̂_true / (p̂_true + Σ_k p̂_pert_k + 1e-10)``.
* **ROUGE-L recall** of a greedy generation (left padding, ``do_sample=False``, 200 new tokens by default as
  OU's ``generation/default.yaml``) against the true answer, ``rouge_score`` with the Porter stemmer.
* **Forget quality**: ``scipy.stats.ks_2samp(R_unlearned(forget), R_retain_model(forget)).pvalue`` (OU
  ``ks_test`` on the stored truth ratios).
* **Model utility**: ``scipy.stats.hmean`` of the retain-type components (OU ``hm_aggregate``; TOFU's 9:
  {retain ``Q_A_Prob``, ra/wf ``Q_A_Prob_normalised``} x {probability, ROUGE-L, truth ratio}).
* **Min-K% MIA AUC** forget vs holdout (Shi et al., 2023; OU ``mia_min_k``): per item the score is
  ``-mean`` (in float32, as OU) of the lowest ``max(1, int(n k))`` of the ``n`` answer-token log-probs
  *without the last label token* (OU ``tokenwise_logprobs`` drops the end-of-answer prediction), 0 when no
  token is left; AUC = ``roc_auc_score`` with forget = 0, holdout = 1 (1 when forget items are much more
  likely than holdout items, OU's convention).
* **privleak**: ``((1 - AUC) - (1 - AUC_ref)) / ((1 - AUC_ref) + 1e-10) * 100`` (OU ``privleak``,
  reference AUC 0.5 without a retain model).

Remaining deviations from OU (all in the per-item inputs, none in the formulas; sizes in
``docs/tofu_eval.md``): token log-probs are taken with ``log_softmax`` in float32 and summed in float64
(OU: cross-entropy in the model's dtype); ``p̂`` is ``exp`` in float64 (OU: float32); prompts are formatted
by :class:`~wagle_ext.unlearn.data.QACollator` (the training format), not OU's per-model template config;
ROUGE's reference is the answer string (OU: the answer decoded back from its tokens); the generation is
decoded up to the first end-of-sequence id (OU: decoded with special tokens skipped, then cut at the eos
string); per-item ratios accept a different number of perturbed answers per item (OU needs a rectangle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._checks import check_batch_size
from .._util import model_device, progress as progress_bar
from ..unlearn.data import IGNORE_INDEX, QACollator

__all__ = [
    "AnswerLogProbs",
    "answer_log_probs",
    "answer_probability",
    "truth_ratio",
    "truth_ratio_score",
    "normalised_probability",
    "greedy_generate",
    "rouge_l_recall",
    "forget_quality",
    "model_utility",
    "min_k_score",
    "min_k_scores",
    "min_k_prob_mia_auc",
    "privleak",
    "OU_EPS",
]

#: open-unlearning's epsilon in truth ratios, normalised probabilities and privleak (``+ 1e-10``).
OU_EPS = 1e-10


# ------------------------------------------------------------------------------------------------
# Answer log-probabilities
# ------------------------------------------------------------------------------------------------

def _check_strings(values: Sequence[str], name: str) -> None:
    if isinstance(values, str) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of str, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}")


@dataclass
class AnswerLogProbs:
    """Per-item answer log-likelihoods (natural log).

    Attributes:
        sum_log_prob: ``[N]`` float64, ``Σ_t log p(a_t | prompt, a_<t)`` over the answer tokens.
        num_tokens: ``[N]`` int64, number of answer tokens scored (after truncation to ``max_length``).
        token_log_probs: optional list of ``N`` float32 ``[num_tokens_i]`` tensors (per-token values).
    """

    sum_log_prob: Tensor
    num_tokens: Tensor
    token_log_probs: Optional[list[Tensor]] = None

    @property
    def mean_log_prob(self) -> Tensor:
        """``[N]`` float64: ``sum_log_prob / num_tokens`` (= ``-avg_loss`` of TOFU/OU)."""
        return self.sum_log_prob / self.num_tokens.to(torch.float64)


@torch.no_grad()
def answer_log_probs(model: Any, tokenizer: Any, questions: Sequence[str], answers: Sequence[str],
                     batch_size: int = 16, *, collator: Optional[QACollator] = None,
                     return_token_log_probs: bool = False, progress: bool = False,
                     desc: str = "log-probs") -> AnswerLogProbs:
    """Log-likelihood of each answer given its question, batched.

    Prompt and answer are formatted by ``collator`` (default ``QACollator(tokenizer)``: chat template when
    the tokenizer has one, answer + eos), exactly as in training. Batches are right-padded with an
    attention mask, so padding never changes a real token's logits (causal attention). Only the logits at
    answer positions are gathered and ``log_softmax`` is taken in float32, whatever the model dtype.

    Args:
        model: a causal LM: ``model(input_ids=[B,T] int64, attention_mask=[B,T] int64).logits`` -> ``[B,T,V]``.
        tokenizer: the model's tokenizer (used only through the collator).
        questions, answers: equal-length sequences of str.
        batch_size: items per forward pass.
        return_token_log_probs: also return the per-token log-probs (for Min-K%).
    Returns:
        :class:`AnswerLogProbs` on the CPU. The model is put in eval mode and restored afterwards.
    Raises:
        ValueError: an item has no answer token left after truncation (raise ``collator.max_length``).
    """
    _check_strings(questions, "questions")
    _check_strings(answers, "answers")
    if len(questions) != len(answers):
        raise ValueError(f"questions and answers differ in length: {len(questions)} vs {len(answers)}")
    check_batch_size(batch_size)
    collator = collator if collator is not None else QACollator(tokenizer)
    n = len(questions)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.int64)
    per_token: list[Optional[Tensor]] = [None] * n
    device = model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        starts = range(0, n, batch_size)
        for s in progress_bar(starts, enabled=progress, desc=desc, total=len(starts)):
            items = [{"question": q, "answer": a} for q, a in zip(questions[s:s + batch_size],
                                                                  answers[s:s + batch_size])]
            batch = collator.collate_items(items)
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            # Position t predicts token t+1; keep only positions whose target is an answer token.
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            sel = logits[:, :-1][keep.to(logits.device)].float().log_softmax(-1)
            tok_lp = sel.gather(-1, targets[keep].to(sel.device).unsqueeze(-1)).squeeze(-1).cpu()
            row_counts = keep.sum(1)
            for j, part in enumerate(torch.split(tok_lp, row_counts.tolist())):
                i = s + j
                if part.numel() == 0:
                    raise ValueError(f"item {i} has no answer token after truncation to "
                                     f"max_length={collator.max_length}; raise the collator's max_length")
                sums[i] = part.double().sum()
                counts[i] = part.numel()
                if return_token_log_probs:
                    per_token[i] = part.clone()
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return AnswerLogProbs(sums, counts, per_token if return_token_log_probs else None)  # type: ignore[arg-type]


def answer_probability(sum_log_prob: Union[Tensor, np.ndarray, Sequence[float]],
                       num_tokens: Union[Tensor, np.ndarray, Sequence[int]]) -> np.ndarray:
    """Length-normalised probability ``exp(sum_log_prob / num_tokens)`` (TOFU ``exp(-avg_loss)``).

    Shapes: both ``[N]`` (or broadcastable); returns float64 ``[N]``.
    """
    s = np.asarray(torch.as_tensor(sum_log_prob).double().cpu(), dtype=np.float64)
    c = np.asarray(torch.as_tensor(num_tokens).double().cpu(), dtype=np.float64)
    if np.any(c <= 0):
        raise ValueError("num_tokens must be > 0 for every item")
    return np.exp(s / c)


def _ragged_mean(rows: Sequence[Sequence[float]], name: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    for i, r in enumerate(rows):
        r = np.asarray(r, dtype=np.float64).reshape(-1)
        if r.size == 0:
            raise ValueError(f"{name}[{i}] is empty: every item needs at least one perturbed answer")
        out[i] = r.mean()
    return out


def truth_ratio(true_mean_log_prob: Union[Sequence[float], np.ndarray, Tensor],
                pert_mean_log_probs: Union[Sequence[Sequence[float]], np.ndarray, Tensor]) -> np.ndarray:
    """Per-item TOFU truth ratio ``R_i = p̂_pert,i / p̂_true,i``.

    Args:
        true_mean_log_prob: ``[N]`` mean per-token log-prob (``-avg_loss``) of the reference answer
            (paraphrased answer on forget/retain, true answer on real-authors/world-facts).
        pert_mean_log_probs: ``[N, K]`` (or ragged list of ``N`` lists) mean per-token log-probs of the
            perturbed answers.
    Returns:
        float64 ``[N]``: ``exp(mean_k pert[i,k]) / (exp(true[i]) + 1e-10)``, i.e. the geometric mean over
        perturbed answers of their length-normalised probabilities over the reference's length-normalised
        probability, with OU's epsilon (OU ``truth_ratio``: ``wrong_prob / (correct_prob + 1e-10)``). For a
        collapsed model (``p̂_true`` near or below 1e-10) the epsilon dominates, exactly as in OU.
    """
    t = np.asarray(torch.as_tensor(true_mean_log_prob).double().cpu() if isinstance(true_mean_log_prob, Tensor)
                   else true_mean_log_prob, dtype=np.float64).reshape(-1)
    if isinstance(pert_mean_log_probs, Tensor):
        pert_mean_log_probs = pert_mean_log_probs.double().cpu().numpy()
    if len(pert_mean_log_probs) != t.size:
        raise ValueError(f"pert_mean_log_probs has {len(pert_mean_log_probs)} rows, expected {t.size}")
    p = _ragged_mean(pert_mean_log_probs, "pert_mean_log_probs")
    # OU: exp(-mean_k avg_loss_k) / (exp(-avg_loss_true) + 1e-10); mean_k(-x) == -mean_k(x) exactly.
    return np.exp(p) / (np.exp(t) + OU_EPS)


def truth_ratio_score(ratios: Union[Sequence[float], np.ndarray], aggregator: str) -> float:
    """Aggregate per-item truth ratios (OU ``truth_ratio`` aggregators).

    ``"closer_to_1_better"`` (forget set): ``mean(min(R, 1 / (R + 1e-10)))``; ``"true_better"`` (retain,
    real authors, world facts): ``mean(max(0, 1 - R))`` (OU's formulas, epsilon included). Returns a float in
    [0, 1]; NaN for an empty input.
    """
    r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return float("nan")
    if np.any(r < 0) or np.any(np.isnan(r)):
        raise ValueError("truth ratios must be non-negative numbers")
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(r, 1.0 / (r + OU_EPS))))
    if aggregator == "true_better":
        return float(np.mean(np.maximum(0.0, 1.0 - r)))
    raise ValueError(f"aggregator must be 'closer_to_1_better' or 'true_better', got {aggregator!r}")


def normalised_probability(true_prob: Union[Sequence[float], np.ndarray],
                           pert_probs: Union[Sequence[Sequence[float]], np.ndarray]) -> np.ndarray:
    """``p̂_true / (p̂_true + Σ_k p̂_pert_k + 1e-10)`` per item (OU ``probability_w_options``,
    ``Q_A_Prob_normalised`` on the option sets).

    ``true_prob``: ``[N]`` length-normalised probabilities; ``pert_probs``: ``[N, K]`` or ragged. Float64 ``[N]``.
    """
    t = np.asarray(true_prob, dtype=np.float64).reshape(-1)
    if len(pert_probs) != t.size:
        raise ValueError(f"pert_probs has {len(pert_probs)} rows, expected {t.size}")
    w = np.array([float(np.sum(np.asarray(r, dtype=np.float64))) for r in pert_probs], dtype=np.float64)
    return t / (t + w + OU_EPS)


# ------------------------------------------------------------------------------------------------
# Generation and ROUGE
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, questions: Sequence[str], batch_size: int = 16,
                    max_new_tokens: int = 200, *, collator: Optional[QACollator] = None,
                    progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy answers to ``questions`` (``do_sample=False``, one beam), batched with LEFT padding.

    Prompts are formatted by ``collator`` (default ``QACollator(tokenizer)``), so they match training. The
    left-padded batch is built here from token ids with an attention mask (the tokenizer is never changed,
    so its ``padding_side`` is untouched); HF ``generate`` derives position ids from the mask, so a batched
    answer equals the one-by-one answer. Generation stops at the model's ``generation_config`` eos ids, the collator's
    ``stop_token_ids`` (the template's end-of-turn tokens) or the
    tokenizer's eos; the text is decoded up to the first eos, without special tokens, stripped.

    Args:
        model: a HF causal LM with ``generate``. Put in eval mode for the call and restored afterwards.
        questions: N str. batch_size: prompts per ``generate`` call. max_new_tokens: per answer.
    Returns:
        N generated answers (str), in the order of ``questions``.
    """
    _check_strings(questions, "questions")
    check_batch_size(batch_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    collator = collator if collator is not None else QACollator(tokenizer)
    prompts = []
    for q in questions:
        ids, n_prompt = collator.encode(q, "")
        prompts.append(ids[:n_prompt])
    eos_ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None)
    # + the template's end-of-turn tokens (ChatML's <|im_end|> when eos is <|endoftext|>): where training
    # ended every answer
    for e in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]) + [tokenizer.eos_token_id] + \
            list(collator.stop_token_ids):
        if e is not None and int(e) not in eos_ids:
            eos_ids.append(int(e))
    pad = collator.pad_token_id
    device = model_device(model)
    # Longest prompts first: less padding per batch; answers are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for s in progress_bar(starts, enabled=progress, desc=desc, total=len(starts)):
            idx = order[s:s + batch_size]
            T = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), T), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), T), dtype=torch.long)
            for b, i in enumerate(idx):
                p = prompts[i]
                input_ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
                attention_mask[b, T - len(p):] = 1
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos_ids or None)
            for b, i in enumerate(idx):
                new = gen[b, T:].tolist()
                for k, t in enumerate(new):
                    if t in eos_ids:
                        new = new[:k]
                        break
                out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out


def rouge_l_recall(generations: Sequence[str], answers: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference answer (TOFU ``rougeL_recall``).

    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``: lower-cased alphanumeric tokens,
    Porter-stemmed; recall = LCS(reference, generation) / len(reference tokens). Returns N floats in [0, 1].
    """
    _check_strings(generations, "generations")
    _check_strings(answers, "answers")
    if len(generations) != len(answers):
        raise ValueError(f"generations and answers differ in length: {len(generations)} vs {len(answers)}")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(a, g)["rougeL"].recall) for g, a in zip(generations, answers)]


# ------------------------------------------------------------------------------------------------
# Set-level statistics
# ------------------------------------------------------------------------------------------------

def _two_samples(x, y, empty_msg: str, nan_msg: str) -> tuple[np.ndarray, np.ndarray]:
    """Two non-empty, NaN-free float64 samples (flattened) for a two-sample statistic."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError(empty_msg.format(a.size, b.size))
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError(nan_msg)
    return a, b


def forget_quality(unlearned_truth_ratios: Union[Sequence[float], np.ndarray],
                   retain_truth_ratios: Union[Sequence[float], np.ndarray]) -> float:
    """TOFU forget quality: two-sample KS-test p-value between the per-item forget-set truth ratios of
    the unlearned model and of a model trained on the retain split only (``scipy.stats.ks_2samp``,
    default two-sided, ``method="auto"``). Invariant to ``R -> 1/R``. Returns a float in [0, 1]."""
    a, b = _two_samples(unlearned_truth_ratios, retain_truth_ratios,
                        "forget_quality needs non-empty samples, got sizes {} and {}", "truth ratios contain NaN")
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Union[Mapping[str, float], Sequence[float]]) -> float:
    """Harmonic mean of the utility components (OU ``hm_aggregate``: ``scipy.stats.hmean``; TOFU
    ``get_model_utility``): 0 when any component is 0. ``values``: a sequence of numbers >= 0 or a mapping
    name -> number (TOFU's 9: ``retain_Q_A_Prob``, ``retain_Q_A_ROUGE``, ``retain_Truth_Ratio``, and
    ``{ra,wf}_Q_A_Prob_normalised``, ``{ra,wf}_Q_A_ROUGE``, ``{ra,wf}_Truth_Ratio``)."""
    v = list(values.values()) if isinstance(values, Mapping) else list(values)
    if not v:
        raise ValueError("model_utility needs at least one value")
    arr = np.asarray(v, dtype=np.float64)
    if np.isnan(arr).any() or (arr < 0).any():
        raise ValueError(f"model_utility values must be non-negative numbers, got {v}")
    if (arr == 0).any():
        return 0.0
    from scipy.stats import hmean

    return float(hmean(arr))


def min_k_score(token_log_probs: Union[Tensor, Sequence[float]], k: float = 0.4) -> float:
    """Min-K% Prob score of one item's given token log-probs (Shi et al., 2023; OU
    ``MinKProbAttack.compute_score``): ``-mean`` of the lowest ``max(1, int(len * k))`` values, computed in
    float32 as OU (``sample_stats.float()``). Higher = less likely (non-member). 0 for an empty input. To score
    the tokens OU scores, pass the answer-token log-probs without the last one (:func:`min_k_scores`)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if isinstance(token_log_probs, Tensor):
        lp = token_log_probs.detach().float().cpu().numpy().reshape(-1)
    else:
        lp = np.asarray(token_log_probs, dtype=np.float32).reshape(-1)
    if lp.size == 0:
        return 0.0
    n = max(1, int(len(lp) * k))
    return float(-np.mean(np.sort(lp)[:n]))


def min_k_scores(token_log_probs: Sequence[Union[Tensor, Sequence[float]]], k: float = 0.4) -> list[float]:
    """OU ``mia_min_k`` per-item scores from each item's answer-token log-probs (all label tokens, as
    :func:`answer_log_probs` returns them): OU's ``tokenwise_logprobs`` keeps the label positions but the
    last (``[:-1]``, "ignore eos prediction"), so the final label token -- the end-of-answer token the
    collator appends -- is not scored; an item with a single label token scores 0."""
    return [min_k_score(t[:-1], k) for t in token_log_probs]


def min_k_prob_mia_auc(forget_scores: Union[Sequence[float], np.ndarray],
                       holdout_scores: Union[Sequence[float], np.ndarray]) -> float:
    """ROC AUC of Min-K% scores separating holdout (positive) from forget (negative) items.

    OU convention (``mia_auc``): labels forget = 0, holdout = 1, so AUC = 1 when forget items are much more
    likely (lower score) than holdout items, 0.5 when indistinguishable. Computed as the Mann-Whitney
    statistic ``U / (n_f n_h)`` with average ranks, i.e. ``P(s_h > s_f) + P(s_h = s_f) / 2`` (ties count half,
    as ``sklearn.metrics.roc_auc_score``).
    """
    f, h = _two_samples(forget_scores, holdout_scores,
                        "MIA AUC needs non-empty forget and holdout scores, got {} and {}", "MIA scores contain NaN")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([f, h]))  # average ranks for ties
    u = ranks[f.size:].sum() - h.size * (h.size + 1) / 2.0
    return float(u / (f.size * h.size))


def privleak(auc: float, reference_auc: float = 0.5) -> float:
    """OU ``privleak`` (MUSE): relative change, in percent, of ``1 - AUC`` against the retain model's
    ``1 - AUC_ref``: ``((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100``; ``reference_auc`` 0.5 (OU's
    ``ref_value``) without a retain model. 0 for an unlearned model as private as the retain model."""
    for name, v in (("auc", auc), ("reference_auc", reference_auc)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    score, ref = 1.0 - float(auc), 1.0 - float(reference_auc)
    return (score - ref) / (ref + OU_EPS) * 100
