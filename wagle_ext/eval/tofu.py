"""The TOFU evaluation protocol (Maini et al., 2024) in open-unlearning's output format: which
metric of :mod:`wagle_ext.eval.metrics` runs on which set, under which name, against which reference.

:func:`evaluate_tofu` runs the suite and writes ``TOFU_EVAL.json`` (per metric ``agg_value`` and
``value_by_index``) and ``TOFU_SUMMARY.json`` (metric -> ``agg_value``) with OU's metric names, so an
OU retain-model ``TOFU_EVAL.json`` (``retain_logs_path``) can be used for forget quality and vice versa.
Metric definitions and the documented deviations: :mod:`wagle_ext.eval.metrics`, ``docs/algorithms.md``
section 1.10.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..unlearn.data import QACollator
from .._checks import check_batch_size
from .metrics import (AnswerLogProbs, answer_log_probs, answer_probability, forget_quality,
                      greedy_generate, min_k_prob_mia_auc, min_k_score, model_utility, normalised_probability,
                      rouge_l_recall, truth_ratio, truth_ratio_score)

__all__ = ["TOFU_SET_PREFIXES", "evaluate_tofu", "load_retain_eval"]

#: Metric-name prefix of each TOFU set (OU ``configs/eval/tofu_metrics``). Sets named ``retain*`` use the
#: ``retain`` prefix; any other set uses its own name.
TOFU_SET_PREFIXES = {"real_authors": "ra", "world_facts": "wf"}

PathLike = Union[str, "os.PathLike[str]"]


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
    prefixes, holdout_items = _check_suite_args(data, forget_split, retain_sets, holdout, retain_model,
                                                retain_model_eval, batch_size)
    collator = collator if collator is not None else QACollator(tokenizer)
    run = _Run(model, tokenizer, collator, batch_size, max_new_tokens, progress)
    logs: dict[str, Any] = {}
    forget = data[forget_split]
    f_true, f_tr = _forget_set(run, forget, with_tokens=holdout_items is not None, logs=logs)
    utility: dict[str, float] = {}
    for s, p in prefixes.items():
        _retain_type_set(run, s, p, data[s], logs, utility)
    if utility:
        logs["model_utility"] = {"agg_value": model_utility(utility), "components": utility}
    reference = _retain_model_reference(run, retain_model, retain_model_eval, forget, holdout_items, mia_k)
    logs["forget_quality"] = {"agg_value": (forget_quality(f_tr, reference["forget_truth_ratios"])
                                            if reference is not None else None)}
    if holdout_items is not None:
        _membership_inference(run, f_true, holdout_items, reference, mia_k, logs)
    summary = {k: float(v["agg_value"]) for k, v in sorted(logs.items()) if v.get("agg_value") is not None}
    if out_dir is not None:
        _write_logs(out_dir, logs, summary)
    return summary


def _check_suite_args(data, forget_split, retain_sets, holdout, retain_model, retain_model_eval,
                      batch_size) -> tuple[dict, Optional[Sequence[Mapping[str, Any]]]]:
    """Validate :func:`evaluate_tofu`'s arguments and items before any model call; returns
    ``({retain-type set: metric prefix}, holdout items or None)``."""
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
    check_batch_size(batch_size)
    full = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    _validate_items(data[forget_split], forget_split, full)
    for s, p in prefixes.items():
        _validate_items(data[s], s, full if p == "retain" else ("question", "answer", "perturbed_answer"))
    holdout_items = None
    if holdout is not None:
        holdout_items = data[holdout] if isinstance(holdout, str) else holdout
        _validate_items(holdout_items, "holdout", ("question", "answer"))
    return prefixes, holdout_items


class _Run:
    """The settings every set of one :func:`evaluate_tofu` call is scored with."""

    def __init__(self, model: Any, tokenizer: Any, collator: QACollator, batch_size: int, max_new_tokens: int,
                 progress: bool) -> None:
        self.model, self.tok, self.col = model, tokenizer, collator
        self.bs, self.max_new_tokens, self.progress = batch_size, max_new_tokens, progress

    def scorer(self, items: Sequence[Mapping[str, Any]], name: str, model: Any = None) -> "_SetScorer":
        return _SetScorer(self.model if model is None else model, self.tok, self.col, items, self.bs,
                          self.progress, name)

    def generate(self, questions: Sequence[str], desc: str) -> list:
        return greedy_generate(self.model, self.tok, questions, batch_size=self.bs,
                               max_new_tokens=self.max_new_tokens, collator=self.col, progress=self.progress,
                               desc=desc)


def _forget_set(run: _Run, forget: Sequence[Mapping[str, Any]], with_tokens: bool,
                logs: dict) -> tuple[AnswerLogProbs, np.ndarray]:
    """The forget-set metrics into ``logs``; returns the true-answer log-probs and the truth ratios."""
    fs = run.scorer(forget, "forget")
    f_true = fs.field("answer", tokens=with_tokens)
    f_para = fs.field("paraphrased_answer")
    f_pert, f_pert_loss = fs.perturbed()
    logs["forget_Q_A_Prob"] = _prob_entry(f_true)
    logs["forget_Q_A_PARA_Prob"] = _prob_entry(f_para)
    logs["forget_Q_A_PERT_Prob"] = _pert_prob_entry(f_pert, f_pert_loss)
    f_tr = truth_ratio(f_para.mean_log_prob, f_pert)
    logs["forget_truth_ratio"] = _truth_ratio_entry(f_tr, "closer_to_1_better")
    logs["forget_Q_A_ROUGE"] = _rouge_entry(forget, run.generate(fs.q, "forget: generate"))
    return f_true, f_tr


def _retain_type_set(run: _Run, s: str, p: str, items: Sequence[Mapping[str, Any]], logs: dict,
                     utility: dict) -> None:
    """The metrics of one retain-type set (prefix ``p``) into ``logs``, its model-utility components
    into ``utility``."""
    sc = run.scorer(items, s)
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
    logs[f"{p}_Q_A_ROUGE"] = _rouge_entry(items, run.generate(sc.q, f"{s}: generate"))
    for key in (prob_key, f"{p}_Q_A_ROUGE", f"{p}_Truth_Ratio"):
        utility[key] = logs[key]["agg_value"]


def _retain_model_reference(run: _Run, retain_model: Any, retain_model_eval: Any,
                            forget: Sequence[Mapping[str, Any]], holdout_items: Optional[Sequence[Mapping[str, Any]]],
                            mia_k: float) -> Optional[dict]:
    """The retain-only model's forget truth ratios (and MIA AUC) for forget quality and privleak:
    computed from ``retain_model``, read from ``retain_model_eval``, or None."""
    if retain_model is not None:
        rs = run.scorer(forget, "retain model", model=retain_model)
        r_para = rs.field("paraphrased_answer")
        r_pert, _ = rs.perturbed()
        reference = {"forget_truth_ratios": truth_ratio(r_para.mean_log_prob, r_pert), "mia_auc": None}
        if holdout_items is not None:  # the retain model's own MIA AUC is privleak's reference (OU privleak)
            rh = run.scorer(holdout_items, "retain model", model=retain_model)
            r_f = rs.field("answer", tokens=True).token_log_probs
            r_h = rh.field("answer", tokens=True).token_log_probs
            reference["mia_auc"] = min_k_prob_mia_auc([min_k_score(t, mia_k) for t in r_f],  # type: ignore
                                                      [min_k_score(t, mia_k) for t in r_h])  # type: ignore
        return reference
    if retain_model_eval is not None:
        return load_retain_eval(retain_model_eval)
    return None


def _membership_inference(run: _Run, f_true: AnswerLogProbs, holdout_items: Sequence[Mapping[str, Any]],
                          reference: Optional[dict], mia_k: float, logs: dict) -> None:
    """Min-K% membership inference forget vs holdout, and MUSE-style privleak, into ``logs``."""
    hs = run.scorer(holdout_items, "holdout")
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


def _write_logs(out_dir: PathLike, logs: dict, summary: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "TOFU_EVAL.json"), "w") as f:
        json.dump(dict(sorted(logs.items())), f, indent=4, default=_json_default)
    with open(os.path.join(out_dir, "TOFU_SUMMARY.json"), "w") as f:
        json.dump(summary, f, indent=4)
