"""TOFU-protocol evaluation of a causal LM (Maini et al., 2024), in open-unlearning's output format.

Definitions follow the official TOFU code (locuslab/tofu ``utils.py``/``aggregate_eval_stat.py``) and
open-unlearning (OU, ``src/evals/metrics/{memorization,privacy,utility}.py``, ``configs/eval/tofu_metrics``),
see ``docs/algorithms.md`` section 1.10:

* **Probability** of an answer given its question, length-normalised: ``p̂ = exp(mean_t log p(a_t | q, a_<t))``
  over the answer tokens (and the end-of-answer token(s) the collator appends), i.e. ``exp(-avg_loss)``.
* **Truth ratio** ``R = p̂_pert / p̂_true`` where ``p̂_pert = exp(mean_k mean_t log p(pert_k))`` is the
  geometric mean over the perturbed answers of their length-normalised probabilities (OU and TOFU's
  ``get_forget_quality``: the perturbed *avg losses* are averaged first), and ``p̂_true`` uses the
  paraphrased answer on forget/retain and the true answer on real-authors/world-facts (OU configs).
  Aggregates: forget ``mean(min(R, 1/R))`` (``closer_to_1_better``), other sets ``mean(max(0, 1 - R))``
  (``true_better``).
* **ROUGE-L recall** of a greedy generation (left padding, ``do_sample=False``) against the true answer,
  ``rouge_score`` with the Porter stemmer.
* **Forget quality**: ``scipy.stats.ks_2samp(R_unlearned(forget), R_retain_model(forget)).pvalue``.
* **Model utility**: harmonic mean of {probability, ROUGE-L, truth ratio} over the retain-type sets
  (probability is ``p̂`` on ``retain`` and ``p̂_true / (p̂_true + Σ_k p̂_pert_k)`` on the option sets).
* **Min-K% MIA AUC** forget vs holdout (Shi et al., 2023; OU ``mia_min_k``): per item the score is
  ``-mean`` of the lowest ``k`` fraction of answer-token log-probs; AUC is 1 when forget items are much
  more likely than holdout items (OU's label convention).

:func:`evaluate_tofu` runs the suite and writes ``TOFU_EVAL.json`` (per metric ``agg_value`` and
``value_by_index``) and ``TOFU_SUMMARY.json`` (metric -> ``agg_value``) with OU's metric names, so an
OU retain-model ``TOFU_EVAL.json`` (``retain_logs_path``) can be used for forget quality and vice versa.

Documented deviation (numerically tiny): truth ratios are computed in log space, ``R = exp(lp_pert - lp_true)``,
as TOFU's ``get_forget_quality`` does, instead of OU's ``p_pert / (p_true + 1e-10)``; the two differ only when
``p̂_true`` approaches 1e-10 (heavily unlearned models), where OU's epsilon biases ``R`` towards 0.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .data import IGNORE_INDEX, QACollator

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
    "min_k_prob_mia_auc",
    "load_retain_eval",
    "evaluate_tofu",
    "TOFU_SET_PREFIXES",
]

#: Metric-name prefix of each TOFU set (OU ``configs/eval/tofu_metrics``). Sets named ``retain*`` use the
#: ``retain`` prefix; any other set uses its own name.
TOFU_SET_PREFIXES = {"real_authors": "ra", "world_facts": "wf"}

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------------------------
# Model plumbing
# ------------------------------------------------------------------------------------------------

def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters() if hasattr(model, "parameters") else ():
        return p.device
    return torch.device("cpu")


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


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
    _check_batch_size(batch_size)
    collator = collator if collator is not None else QACollator(tokenizer)
    n = len(questions)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.int64)
    per_token: list[Optional[Tensor]] = [None] * n
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        starts = range(0, n, batch_size)
        for s in _progress(starts, len(starts), desc, progress):
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
        float64 ``[N]``: ``exp(mean_k pert[i,k] - true[i])``, i.e. the geometric mean over perturbed answers of
        their length-normalised probabilities, divided by the reference's length-normalised probability.
        Computed in log space (TOFU ``get_forget_quality``); OU's ``p_pert / (p_true + 1e-10)`` agrees
        to ~1e-10 / p_true relative.
    """
    t = np.asarray(torch.as_tensor(true_mean_log_prob).double().cpu() if isinstance(true_mean_log_prob, Tensor)
                   else true_mean_log_prob, dtype=np.float64).reshape(-1)
    if isinstance(pert_mean_log_probs, Tensor):
        pert_mean_log_probs = pert_mean_log_probs.double().cpu().numpy()
    if len(pert_mean_log_probs) != t.size:
        raise ValueError(f"pert_mean_log_probs has {len(pert_mean_log_probs)} rows, expected {t.size}")
    p = _ragged_mean(pert_mean_log_probs, "pert_mean_log_probs")
    return np.exp(p - t)


def truth_ratio_score(ratios: Union[Sequence[float], np.ndarray], aggregator: str) -> float:
    """Aggregate per-item truth ratios (OU ``truth_ratio`` aggregators).

    ``"closer_to_1_better"`` (forget set): ``mean(min(R, 1/R))``; ``"true_better"`` (retain, real authors,
    world facts): ``mean(max(0, 1 - R))``. Returns a float in [0, 1]; NaN for an empty input.
    """
    r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return float("nan")
    if np.any(r < 0) or np.any(np.isnan(r)):
        raise ValueError("truth ratios must be non-negative numbers")
    if aggregator == "closer_to_1_better":
        with np.errstate(divide="ignore"):
            return float(np.mean(np.minimum(r, 1.0 / r)))
    if aggregator == "true_better":
        return float(np.mean(np.maximum(0.0, 1.0 - r)))
    raise ValueError(f"aggregator must be 'closer_to_1_better' or 'true_better', got {aggregator!r}")


def normalised_probability(true_prob: Union[Sequence[float], np.ndarray],
                           pert_probs: Union[Sequence[Sequence[float]], np.ndarray]) -> np.ndarray:
    """``p̂_true / (p̂_true + Σ_k p̂_pert_k)`` per item (TOFU/OU ``Q_A_Prob_normalised`` on the option sets).

    ``true_prob``: ``[N]`` length-normalised probabilities; ``pert_probs``: ``[N, K]`` or ragged. Float64 ``[N]``.
    """
    t = np.asarray(true_prob, dtype=np.float64).reshape(-1)
    if len(pert_probs) != t.size:
        raise ValueError(f"pert_probs has {len(pert_probs)} rows, expected {t.size}")
    w = np.array([float(np.sum(np.asarray(r, dtype=np.float64))) for r in pert_probs], dtype=np.float64)
    return t / (t + w)


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
    answer equals the one-by-one answer. Generation stops at the model's ``generation_config`` eos ids or the
    tokenizer's eos; the text is decoded up to the first eos, without special tokens, stripped.

    Args:
        model: a HF causal LM with ``generate``. Put in eval mode for the call and restored afterwards.
        questions: N str. batch_size: prompts per ``generate`` call. max_new_tokens: per answer.
    Returns:
        N generated answers (str), in the order of ``questions``.
    """
    _check_strings(questions, "questions")
    _check_batch_size(batch_size)
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
    for e in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]) + [tokenizer.eos_token_id]:
        if e is not None and int(e) not in eos_ids:
            eos_ids.append(int(e))
    pad = collator.pad_token_id
    device = _model_device(model)
    # Longest prompts first: less padding per batch; answers are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for s in _progress(starts, len(starts), desc, progress):
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

def forget_quality(unlearned_truth_ratios: Union[Sequence[float], np.ndarray],
                   retain_truth_ratios: Union[Sequence[float], np.ndarray]) -> float:
    """TOFU forget quality: two-sample KS-test p-value between the per-item forget-set truth ratios of
    the unlearned model and of a model trained on the retain split only (``scipy.stats.ks_2samp``,
    default two-sided, ``method="auto"``). Invariant to ``R -> 1/R``. Returns a float in [0, 1]."""
    a = np.asarray(unlearned_truth_ratios, dtype=np.float64).reshape(-1)
    b = np.asarray(retain_truth_ratios, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"forget_quality needs non-empty samples, got sizes {a.size} and {b.size}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("truth ratios contain NaN")
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Union[Mapping[str, float], Sequence[float]]) -> float:
    """Harmonic mean of the utility components (TOFU ``get_model_utility``, OU ``hm_aggregate``): 0 when
    any component is 0. ``values``: a sequence of numbers >= 0 or a mapping name -> number."""
    v = list(values.values()) if isinstance(values, Mapping) else list(values)
    if not v:
        raise ValueError("model_utility needs at least one value")
    arr = np.asarray(v, dtype=np.float64)
    if np.isnan(arr).any() or (arr < 0).any():
        raise ValueError(f"model_utility values must be non-negative numbers, got {v}")
    if (arr == 0).any():
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


def min_k_score(token_log_probs: Union[Tensor, Sequence[float]], k: float = 0.4) -> float:
    """Min-K% Prob score of one item (Shi et al., 2023; OU ``MinKProbAttack``): ``-mean`` of the lowest
    ``max(1, int(len * k))`` token log-probs. Higher = less likely (non-member). 0 for an empty input."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    lp = np.sort(np.asarray(torch.as_tensor(token_log_probs).double().cpu() if isinstance(token_log_probs, Tensor)
                            else token_log_probs, dtype=np.float64).reshape(-1))
    if lp.size == 0:
        return 0.0
    n = max(1, int(lp.size * k))
    return float(-np.mean(lp[:n]))


def min_k_prob_mia_auc(forget_scores: Union[Sequence[float], np.ndarray],
                       holdout_scores: Union[Sequence[float], np.ndarray]) -> float:
    """ROC AUC of Min-K% scores separating holdout (positive) from forget (negative) items.

    OU convention (``mia_auc``): labels forget = 0, holdout = 1, so AUC = 1 when forget items are much more
    likely (lower score) than holdout items, 0.5 when indistinguishable. Computed as the Mann-Whitney
    statistic ``U / (n_f n_h)`` with average ranks, i.e. ``P(s_h > s_f) + P(s_h = s_f) / 2`` (ties count half,
    as ``sklearn.metrics.roc_auc_score``).
    """
    f = np.asarray(forget_scores, dtype=np.float64).reshape(-1)
    h = np.asarray(holdout_scores, dtype=np.float64).reshape(-1)
    if f.size == 0 or h.size == 0:
        raise ValueError(f"MIA AUC needs non-empty forget and holdout scores, got {f.size} and {h.size}")
    if np.isnan(f).any() or np.isnan(h).any():
        raise ValueError("MIA scores contain NaN")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([f, h]))  # average ranks for ties
    u = ranks[f.size:].sum() - h.size * (h.size + 1) / 2.0
    return float(u / (f.size * h.size))


# ------------------------------------------------------------------------------------------------
# Retain-model reference logs
# ------------------------------------------------------------------------------------------------

def load_retain_eval(source: Union[Mapping[str, Any], PathLike]) -> dict[str, Any]:
    """Reference statistics of a retain-only model from its saved evaluation.

    ``source``: a dict, a JSON file, or a directory holding ``TOFU_EVAL.json``, in OU format
    (``{"forget_truth_ratio": {"value_by_index": {i: {"score": R}}}, "mia_min_k": {"agg_value": auc}, ...}``,
    as written by :func:`evaluate_tofu` or OU's ``retain_logs_path`` files) or legacy TOFU
    ``eval_log_forget.json`` format (``avg_paraphrased_loss`` and ``average_perturb_loss`` per index).
    Returns ``{"forget_truth_ratios": float64 [N], "mia_auc": float or None}``.
    """
    if not isinstance(source, Mapping):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "TOFU_EVAL.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"retain-model evaluation not found: {path}")
        with open(path) as f:
            logs = json.load(f)
        where = path
    else:
        logs, where = source, "retain_model_eval"
    if "forget_truth_ratio" in logs:
        vbi = logs["forget_truth_ratio"].get("value_by_index")
        if not vbi:
            raise ValueError(f"{where}: 'forget_truth_ratio' has no 'value_by_index'")
        scores = [v.get("score") if isinstance(v, Mapping) else v for v in vbi.values()]
        # OU marks items without valid target tokens as None; they carry no truth ratio.
        tr = np.array([x for x in scores if x is not None], dtype=np.float64)
        if tr.size == 0:
            raise ValueError(f"{where}: 'forget_truth_ratio' holds no scores")
    elif "avg_paraphrased_loss" in logs and "average_perturb_loss" in logs:
        # Legacy TOFU stores avg losses (= -mean log-prob): R = exp(para_loss - mean_k pert_loss_k). (TOFU's
        # get_forget_quality computes 1/R; the KS p-value is invariant to R -> 1/R.)
        para = logs["avg_paraphrased_loss"]
        pert = logs["average_perturb_loss"]
        keys = list(para.keys())
        tr = np.array([math.exp(float(para[k]) - float(np.mean(pert[k]))) for k in keys], dtype=np.float64)
    else:
        raise ValueError(f"{where}: no forget truth ratios found (expected key 'forget_truth_ratio' "
                         "(open-unlearning TOFU_EVAL.json) or 'avg_paraphrased_loss'/'average_perturb_loss' "
                         "(legacy TOFU eval_log_forget.json))")
    mia = logs.get("mia_min_k", {})
    mia_auc = mia.get("agg_value") if isinstance(mia, Mapping) else None
    return {"forget_truth_ratios": tr, "mia_auc": mia_auc}


# ------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------

def _set_prefix(name: str) -> str:
    if name.startswith("retain"):
        return "retain"
    return TOFU_SET_PREFIXES.get(name, name)


def _validate_items(items: Any, set_name: str, fields: Sequence[str]) -> None:
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(f"data[{set_name!r}] must be a list of question/answer dicts")
    if len(items) == 0:
        raise ValueError(f"data[{set_name!r}] is empty")
    for i, it in enumerate(items):
        if not isinstance(it, Mapping):
            raise TypeError(f"data[{set_name!r}][{i}] must be a dict, got {type(it).__name__}")
        for f in fields:
            v = it.get(f)
            if f == "perturbed_answer":
                ok = (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(s, str) for s in v))
            else:
                ok = isinstance(v, str)
            if not ok:
                need = "a non-empty list of str" if f == "perturbed_answer" else "a str"
                raise ValueError(f"data[{set_name!r}][{i}] needs field {f!r} ({need}) for the TOFU metrics "
                                 f"of this set, got {type(v).__name__}")


def _by_index(values: Sequence[Any], key: Optional[str] = None) -> dict[str, Any]:
    return {str(i): ({key: v} if key else v) for i, v in enumerate(values)}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _mean(x: Sequence[float]) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64)))


class _SetScorer:
    """Log-probs of one set's answers (true, paraphrased, perturbed), cached per field."""

    def __init__(self, model: Any, tokenizer: Any, collator: QACollator, items: Sequence[Mapping[str, Any]],
                 batch_size: int, progress: bool, name: str) -> None:
        self.model, self.tok, self.col, self.items = model, tokenizer, collator, items
        self.bs, self.progress, self.name = batch_size, progress, name
        self.q = [it["question"] for it in items]

    def field(self, key: str, tokens: bool = False) -> AnswerLogProbs:
        return answer_log_probs(self.model, self.tok, self.q, [it[key] for it in self.items], self.bs,
                                collator=self.col, return_token_log_probs=tokens, progress=self.progress,
                                desc=f"{self.name}: {key}")

    def perturbed(self) -> tuple[list[list[float]], list[list[float]]]:
        """Ragged ``[N][K]`` mean log-probs and avg losses of the perturbed answers."""
        flat_q, flat_a, owner = [], [], []
        for i, it in enumerate(self.items):
            for a in it["perturbed_answer"]:
                flat_q.append(it["question"])
                flat_a.append(a)
                owner.append(i)
        lp = answer_log_probs(self.model, self.tok, flat_q, flat_a, self.bs, collator=self.col,
                              progress=self.progress, desc=f"{self.name}: perturbed_answer").mean_log_prob
        rows: list[list[float]] = [[] for _ in self.items]
        for o, v in zip(owner, lp.tolist()):
            rows[o].append(v)
        return rows, [[-v for v in r] for r in rows]


def _prob_entry(lp: AnswerLogProbs) -> dict[str, Any]:
    probs = answer_probability(lp.sum_log_prob, lp.num_tokens)
    avg_loss = (-lp.mean_log_prob).tolist()
    return {"agg_value": _mean(probs),
            "value_by_index": {str(i): {"prob": float(p), "avg_loss": float(l)}
                               for i, (p, l) in enumerate(zip(probs, avg_loss))}}


def _pert_prob_entry(rows: list[list[float]], losses: list[list[float]]) -> dict[str, Any]:
    probs = [[math.exp(v) for v in r] for r in rows]
    # OU aggregates a multi-answer probability as the per-item mean, then the mean over items.
    return {"agg_value": _mean([np.mean(p) for p in probs]),
            "value_by_index": {str(i): {"prob": p, "avg_loss": l} for i, (p, l) in enumerate(zip(probs, losses))}}


def _truth_ratio_entry(ratios: np.ndarray, aggregator: str) -> dict[str, Any]:
    return {"agg_value": truth_ratio_score(ratios, aggregator),
            "value_by_index": _by_index([float(r) for r in ratios], "score")}


def _rouge_entry(items: Sequence[Mapping[str, Any]], gens: list[str]) -> dict[str, Any]:
    answers = [it["answer"] for it in items]
    rec = rouge_l_recall(gens, answers)
    return {"agg_value": _mean(rec),
            "value_by_index": {str(i): {"rougeL_recall": r, "input": it["question"], "ground_truth": a,
                                        "generation": g}
                               for i, (r, it, a, g) in enumerate(zip(rec, items, answers, gens))}}


def evaluate_tofu(model: Any, tokenizer: Any, data: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  forget_split: str = "forget10",
                  retain_sets: Union[Sequence[str], Mapping[str, str]] = ("retain", "world_facts"),
                  holdout: Union[None, str, Sequence[Mapping[str, Any]]] = None,
                  retain_model_eval: Union[None, Mapping[str, Any], PathLike] = None,
                  retain_model: Any = None,
                  collator: Optional[QACollator] = None,
                  batch_size: int = 16, max_new_tokens: int = 200, mia_k: float = 0.4,
                  out_dir: Optional[PathLike] = None, progress: bool = True) -> dict[str, float]:
    """Run the TOFU evaluation suite and return the summary (metric name -> aggregate value).

    Args:
        model, tokenizer: a HF causal LM and its tokenizer (the model's training mode is restored).
        data: set name -> list of TOFU items (``question``, ``answer``, ``paraphrased_answer``,
            ``perturbed_answer``: list of str). The forget split and every ``retain*`` set need all four
            fields; the other retain-type sets (``real_authors``, ``world_facts``) need ``question``,
            ``answer`` and ``perturbed_answer``.
        forget_split: key of the forget set in ``data`` (metric prefix ``forget``).
        retain_sets: keys of the retain-type sets (model utility); prefixes follow OU: ``retain*`` ->
            ``retain``, ``real_authors`` -> ``ra``, ``world_facts`` -> ``wf``, others their own name. A
            mapping ``{set name: prefix}`` overrides the prefix; prefix ``"retain"`` means paraphrased-answer
            truth ratio and plain probability, any other prefix the true-answer truth ratio and the
            normalised probability, as for OU's ``ra``/``wf``.
        holdout: key in ``data`` or a list of items never trained on; enables ``mia_min_k`` (forget vs
            holdout AUC) and ``privleak``.
        retain_model_eval: a retain-only model's evaluation (dict, ``TOFU_EVAL.json`` path or directory;
            see :func:`load_retain_eval`) for ``forget_quality`` (OU's ``retain_logs_path``).
        retain_model: alternatively the retain-only model itself (its forget truth ratios, and with a holdout
            its Min-K% AUC, are computed here with the same tokenizer and collator). Without either,
            ``forget_quality`` is not reported and ``privleak`` uses the reference AUC 0.5 (as OU does).
        collator: prompt/answer formatting (default ``QACollator(tokenizer)``, as in training).
        batch_size: items per forward / generate call. max_new_tokens: greedy answer length (OU: 200).
        mia_k: Min-K% fraction (OU ``mia_min_k`` default 0.4).
        out_dir: if given, ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` are written there (created if needed).
        progress: tqdm progress bars.
    Returns:
        ``{"forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "wf_Q_A_Prob_normalised", ...}``: the
        content of ``TOFU_SUMMARY.json`` (metrics whose value is None, e.g. ``forget_quality`` without a
        reference, are left out, as in OU).
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a dict of set name -> items, got {type(data).__name__}")
    if forget_split not in data:
        raise ValueError(f"forget_split {forget_split!r} is not a key of data (keys: {sorted(data)})")
    if retain_model is not None and retain_model_eval is not None:
        raise ValueError("pass retain_model or retain_model_eval, not both")
    if isinstance(retain_sets, str):
        raise TypeError("retain_sets must be a sequence of set names (or a mapping name -> prefix), not a str")
    prefixes = dict(retain_sets) if isinstance(retain_sets, Mapping) else {s: _set_prefix(s) for s in retain_sets}
    for s in prefixes:
        if s not in data:
            raise ValueError(f"retain set {s!r} is not a key of data (keys: {sorted(data)})")
    if len(set(prefixes.values())) != len(prefixes) or "forget" in prefixes.values():
        raise ValueError(f"retain set prefixes must be distinct and not 'forget', got {prefixes}")
    _check_batch_size(batch_size)
    collator = collator if collator is not None else QACollator(tokenizer)
    full = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    _validate_items(data[forget_split], forget_split, full)
    for s, p in prefixes.items():
        _validate_items(data[s], s, full if p == "retain" else ("question", "answer", "perturbed_answer"))
    holdout_items = None
    if holdout is not None:
        holdout_items = data[holdout] if isinstance(holdout, str) else holdout
        _validate_items(holdout_items, "holdout", ("question", "answer"))

    logs: dict[str, Any] = {}
    gen_kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, collator=collator, progress=progress)

    # ---- forget set
    forget = data[forget_split]
    fs = _SetScorer(model, tokenizer, collator, forget, batch_size, progress, "forget")
    f_true = fs.field("answer", tokens=holdout_items is not None)
    f_para = fs.field("paraphrased_answer")
    f_pert, f_pert_loss = fs.perturbed()
    logs["forget_Q_A_Prob"] = _prob_entry(f_true)
    logs["forget_Q_A_PARA_Prob"] = _prob_entry(f_para)
    logs["forget_Q_A_PERT_Prob"] = _pert_prob_entry(f_pert, f_pert_loss)
    f_tr = truth_ratio(f_para.mean_log_prob, f_pert)
    logs["forget_truth_ratio"] = _truth_ratio_entry(f_tr, "closer_to_1_better")
    logs["forget_Q_A_ROUGE"] = _rouge_entry(forget, greedy_generate(
        model, tokenizer, fs.q, desc="forget: generate", **gen_kw))

    # ---- retain-type sets
    utility: dict[str, float] = {}
    for s, p in prefixes.items():
        items = data[s]
        sc = _SetScorer(model, tokenizer, collator, items, batch_size, progress, s)
        true = sc.field("answer")
        pert, pert_loss = sc.perturbed()
        logs[f"{p}_Q_A_Prob"] = _prob_entry(true)
        logs[f"{p}_Q_A_PERT_Prob"] = _pert_prob_entry(pert, pert_loss)
        if p == "retain":
            para = sc.field("paraphrased_answer")
            logs[f"{p}_Q_A_PARA_Prob"] = _prob_entry(para)
            tr = truth_ratio(para.mean_log_prob, pert)
            prob_key = f"{p}_Q_A_Prob"
        else:
            true_p = answer_probability(true.sum_log_prob, true.num_tokens)
            norm = normalised_probability(true_p, [[math.exp(v) for v in r] for r in pert])
            logs[f"{p}_Q_A_Prob_normalised"] = {"agg_value": _mean(norm),
                                                "value_by_index": _by_index([float(x) for x in norm], "prob")}
            tr = truth_ratio(true.mean_log_prob, pert)
            prob_key = f"{p}_Q_A_Prob_normalised"
        logs[f"{p}_Truth_Ratio"] = _truth_ratio_entry(tr, "true_better")
        logs[f"{p}_Q_A_ROUGE"] = _rouge_entry(items, greedy_generate(
            model, tokenizer, sc.q, desc=f"{s}: generate", **gen_kw))
        for key in (prob_key, f"{p}_Q_A_ROUGE", f"{p}_Truth_Ratio"):
            utility[key] = logs[key]["agg_value"]
    if utility:
        logs["model_utility"] = {"agg_value": model_utility(utility), "components": utility}

    # ---- forget quality against the retain-only model
    reference = None
    if retain_model is not None:
        rs = _SetScorer(retain_model, tokenizer, collator, forget, batch_size, progress, "retain model")
        r_para = rs.field("paraphrased_answer")
        r_pert, _ = rs.perturbed()
        reference = {"forget_truth_ratios": truth_ratio(r_para.mean_log_prob, r_pert), "mia_auc": None}
        if holdout_items is not None:  # the retain model's own MIA AUC is privleak's reference (OU privleak)
            rh = _SetScorer(retain_model, tokenizer, collator, holdout_items, batch_size, progress, "retain model")
            r_f = rs.field("answer", tokens=True).token_log_probs
            r_h = rh.field("answer", tokens=True).token_log_probs
            reference["mia_auc"] = min_k_prob_mia_auc([min_k_score(t, mia_k) for t in r_f],  # type: ignore
                                                      [min_k_score(t, mia_k) for t in r_h])  # type: ignore
    elif retain_model_eval is not None:
        reference = load_retain_eval(retain_model_eval)
    logs["forget_quality"] = {"agg_value": (forget_quality(f_tr, reference["forget_truth_ratios"])
                                            if reference is not None else None)}

    # ---- membership inference (Min-K%) forget vs holdout, and MUSE-style privleak
    if holdout_items is not None:
        hs = _SetScorer(model, tokenizer, collator, holdout_items, batch_size, progress, "holdout")
        h_true = hs.field("answer", tokens=True)
        f_scores = [min_k_score(t, mia_k) for t in f_true.token_log_probs]  # type: ignore[union-attr]
        h_scores = [min_k_score(t, mia_k) for t in h_true.token_log_probs]  # type: ignore[union-attr]
        auc = min_k_prob_mia_auc(f_scores, h_scores)
        logs["mia_min_k"] = {
            "forget": {"agg_value": _mean(f_scores), "value_by_index": _by_index(f_scores, "score")},
            "holdout": {"agg_value": _mean(h_scores), "value_by_index": _by_index(h_scores, "score")},
            "auc": auc, "agg_value": auc, "k": mia_k}
        # OU privleak: relative change of (1 - AUC) against the retain model's (default reference AUC 0.5).
        ref_auc = reference["mia_auc"] if reference is not None and reference["mia_auc"] is not None else 0.5
        logs["privleak"] = {"agg_value": ((1 - auc) - (1 - ref_auc)) / ((1 - ref_auc) + 1e-10) * 100,
                            "reference_auc": ref_auc}

    summary = {k: float(v["agg_value"]) for k, v in sorted(logs.items()) if v.get("agg_value") is not None}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "TOFU_EVAL.json"), "w") as f:
            json.dump(dict(sorted(logs.items())), f, indent=4, default=_json_default)
        with open(os.path.join(out_dir, "TOFU_SUMMARY.json"), "w") as f:
            json.dump(summary, f, indent=4)
    return summary
