"""The TOFU evaluation protocol (Maini et al., 2024) in open-unlearning's output format: which
metric of :mod:`wagle_ext.eval.metrics` runs on which set, under which name, against which reference.

:func:`evaluate_tofu` runs the suite and writes ``TOFU_EVAL.json`` (per metric ``agg_value`` and
``value_by_index``) and ``TOFU_SUMMARY.json`` (metric -> ``agg_value``) with OU's metric names, so an
OU retain-model ``TOFU_EVAL.json`` (``retain_logs_path``) can be used for forget quality and vice versa.

By default it runs the full TOFU protocol on whatever ``data`` holds: the forget set (with paraphrased and
perturbed answers), ``retain`` / ``real_authors`` / ``world_facts`` for OU's 9-component model utility,
and ``holdoutNN`` for ``mia_min_k`` and ``privleak``. ``TOFU_EVAL.json`` also records which forget items
were evaluated (``wagle_forget_items``: count and an order-independent SHA-256 of the question/answer pairs;
OU ignores keys it does not know), so a retain-model evaluation made on other items is refused.
Metric definitions: :mod:`wagle_ext.eval.metrics`, ``docs/algorithms.md`` section 1.10; the remaining
deviations from OU: ``docs/tofu_eval.md``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..unlearn.data import QACollator
from .._checks import check_batch_size
from .metrics import (AnswerLogProbs, answer_log_probs, answer_probability, forget_quality,
                      greedy_generate, min_k_prob_mia_auc, min_k_scores, model_utility, normalised_probability,
                      privleak, rouge_l_recall, truth_ratio, truth_ratio_score)
from .tofu_data import _holdout_for

__all__ = ["TOFU_SET_PREFIXES", "FORGET_ITEMS_KEY", "evaluate_tofu", "forget_set_identity", "load_retain_eval",
           "resolve_tofu_sets"]

#: Metric-name prefix of each TOFU set (OU ``configs/eval/tofu_metrics``). Sets named ``retain*`` use the
#: ``retain`` prefix; any other set uses its own name.
TOFU_SET_PREFIXES = {"real_authors": "ra", "world_facts": "wf", "real_authors_perturbed": "ra",
                     "world_facts_perturbed": "wf"}

#: Candidate keys of ``data`` for each retain-type set of the default (``"auto"``) protocol, first found wins.
_AUTO_RETAIN_SETS = (("retain", "retain_perturbed", "retain_eval"), ("real_authors", "real_authors_perturbed"),
                     ("world_facts", "world_facts_perturbed"))

#: Top-level key of ``TOFU_EVAL.json`` identifying the forget items evaluated (ignored by OU).
FORGET_ITEMS_KEY = "wagle_forget_items"

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------------------------
# Retain-model reference logs
# ------------------------------------------------------------------------------------------------

def forget_set_identity(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"n": number of items, "sha256": hex digest}`` of a forget set: SHA-256 over the sorted JSON
    ``[question, answer]`` pairs, so independent of item order (forget quality and the MIA AUC are)."""
    h = hashlib.sha256()
    for line in sorted(json.dumps([it["question"], it["answer"]], ensure_ascii=False) for it in items):
        h.update(line.encode("utf-8") + b"\n")
    return {"n": len(items), "sha256": h.hexdigest()}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def load_retain_eval(source: Union[Mapping[str, Any], PathLike]) -> dict[str, Any]:
    """Reference statistics of a retain-only model from its saved evaluation.

    ``source``: a dict, a JSON file, or a directory holding ``TOFU_EVAL.json``, in OU format
    (``{"forget_truth_ratio": {"value_by_index": {i: {"score": R}}}, "mia_min_k": {"agg_value": auc}, ...}``,
    as written by :func:`evaluate_tofu` or OU's ``retain_logs_path`` files) or legacy TOFU
    ``eval_log_forget.json`` format (``avg_paraphrased_loss`` and ``average_perturb_loss`` per index).
    Returns ``{"forget_truth_ratios": float64 [M], "mia_auc": float or None, "n_items": N (forget items the
    file covers, None scores included), "forget_items": the ``wagle_forget_items`` identity or None,
    "where": the file (or "retain_model_eval")}``.

    Raises:
        FileNotFoundError: no such file / no ``TOFU_EVAL.json`` in the directory.
        ValueError: one line naming the file: not JSON, not an object, no forget truth ratios, a score that
            is not a number, a malformed ``wagle_forget_items``.
    """
    if not isinstance(source, Mapping):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "TOFU_EVAL.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"retain-model evaluation not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                logs = json.load(f)
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"retain-model evaluation {path} is not a readable JSON file "
                             f"({' '.join(str(e).split())})") from None
        where = path
    else:
        logs, where = source, "retain_model_eval"
    bad = f"retain-model evaluation {where}"
    if not isinstance(logs, Mapping):
        raise ValueError(f"{bad} must hold a JSON object, got {type(logs).__name__}")
    if "forget_truth_ratio" in logs:
        vbi = logs["forget_truth_ratio"].get("value_by_index") if isinstance(logs["forget_truth_ratio"],
                                                                             Mapping) else None
        if not isinstance(vbi, Mapping) or not vbi:
            raise ValueError(f"{bad}: 'forget_truth_ratio' has no 'value_by_index' object")
        scores = []
        for k, v in vbi.items():
            x = v.get("score") if isinstance(v, Mapping) else v
            if x is not None and not (_number(x) and x >= 0):
                raise ValueError(f"{bad}: 'forget_truth_ratio' value_by_index[{k!r}] score must be a number >= 0, "
                                 f"got {x!r}")
            scores.append(x)
        # OU marks items without valid target tokens as None; they carry no truth ratio.
        tr = np.array([x for x in scores if x is not None], dtype=np.float64)
        if tr.size == 0:
            raise ValueError(f"{bad}: 'forget_truth_ratio' holds no scores")
        n_items = len(vbi)
    elif "avg_paraphrased_loss" in logs and "average_perturb_loss" in logs:
        # Legacy TOFU stores avg losses (= -mean log-prob): R = exp(-mean_k pert_loss_k) / (exp(-para_loss) + eps)
        # as OU. (TOFU's get_forget_quality computes 1/R; the KS p-value is invariant to R -> 1/R.)
        para, pert = logs["avg_paraphrased_loss"], logs["average_perturb_loss"]
        try:
            keys = list(para.keys())
            tr = truth_ratio([-float(para[k]) for k in keys], [[-float(x) for x in np.ravel(pert[k])] for k in keys])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{bad}: malformed 'avg_paraphrased_loss'/'average_perturb_loss' "
                             f"({' '.join(str(e).split())})") from None
        n_items = len(keys)
    else:
        raise ValueError(f"{bad}: no forget truth ratios found (expected key 'forget_truth_ratio' "
                         "(open-unlearning TOFU_EVAL.json) or 'avg_paraphrased_loss'/'average_perturb_loss' "
                         "(legacy TOFU eval_log_forget.json))")
    mia = logs.get("mia_min_k", {})
    mia_auc = mia.get("agg_value") if isinstance(mia, Mapping) else None
    if mia_auc is not None and not (_number(mia_auc) and 0 <= mia_auc <= 1):
        raise ValueError(f"{bad}: 'mia_min_k' agg_value must be a number in [0, 1], got {mia_auc!r}")
    ident = logs.get(FORGET_ITEMS_KEY)
    if ident is not None and not (isinstance(ident, Mapping) and isinstance(ident.get("n"), int)
                                  and isinstance(ident.get("sha256"), str)):
        raise ValueError(f"{bad}: {FORGET_ITEMS_KEY!r} must be {{'n': int, 'sha256': str}}, got {ident!r}")
    return {"forget_truth_ratios": tr, "mia_auc": mia_auc, "n_items": n_items,
            "forget_items": dict(ident) if ident is not None else None, "where": where}


def _check_reference_forget_set(ref: Mapping[str, Any], forget: Sequence[Mapping[str, Any]]) -> None:
    """A retain-model evaluation must be of the same forget items: by identity when the file records one
    (ours), else by count (OU / legacy files)."""
    mine = forget_set_identity(forget)
    theirs = ref.get("forget_items")
    where = ref.get("where", "retain_model_eval")
    if theirs is not None:
        if theirs["n"] != mine["n"] or theirs["sha256"] != mine["sha256"]:
            raise ValueError(f"retain-model evaluation {where} was made on a different forget set "
                             f"({theirs['n']} items, sha256 {theirs['sha256'][:16]}) than the one evaluated here "
                             f"({mine['n']} items, sha256 {mine['sha256'][:16]})")
    elif ref.get("n_items") is not None and ref["n_items"] != mine["n"]:
        raise ValueError(f"retain-model evaluation {where} was made on a different forget set: it holds "
                         f"{ref['n_items']} forget truth ratios, the forget set evaluated here has {mine['n']} items")


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


def _by_index(values: Sequence[Any], key: Optional[str] = None) -> dict[str, Any]:  # OU's value_by_index
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


def resolve_tofu_sets(data: Mapping[str, Any], forget_split: str = "forget10",
                      retain_sets: Union[str, Sequence[str], Mapping[str, str]] = "auto",
                      holdout: Union[None, str, Sequence[Mapping[str, Any]]] = "auto"
                      ) -> tuple[dict[str, str], Union[None, str, Sequence[Mapping[str, Any]]]]:
    """The retain-type sets (``{key: metric prefix}``) and the holdout (key, items or None) that
    :func:`evaluate_tofu` uses with these arguments. ``"auto"`` (the defaults): for each of retain, real
    authors and world facts the first key of ``data`` among ``retain``/``retain_perturbed``/``retain_eval``,
    ``real_authors``/``real_authors_perturbed``, ``world_facts``/``world_facts_perturbed``; the holdout
    ``holdoutNN`` matching ``forgetNN`` (else ``holdout``) when ``data`` has it."""
    if isinstance(retain_sets, str):
        if retain_sets != "auto":
            raise TypeError("retain_sets must be 'auto', a sequence of set names or a mapping name -> prefix, "
                            f"not the str {retain_sets!r}")
        found = [next((k for k in cands if k in data), None) for cands in _AUTO_RETAIN_SETS]
        retain_sets = [k for k in found if k is not None]
    prefixes = dict(retain_sets) if isinstance(retain_sets, Mapping) else {s: _set_prefix(s) for s in retain_sets}
    if isinstance(holdout, str) and holdout == "auto":
        cands = [h for h in (_holdout_for(forget_split), "holdout") if h is not None]
        holdout = next((h for h in cands if h in data), None)
    return prefixes, holdout


def evaluate_tofu(model: Any, tokenizer: Any, data: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  forget_split: str = "forget10",
                  retain_sets: Union[str, Sequence[str], Mapping[str, str]] = "auto",
                  holdout: Union[None, str, Sequence[Mapping[str, Any]]] = "auto",
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
        retain_sets: ``"auto"`` (default): the full TOFU protocol on the sets ``data`` holds (retain, real
            authors, world facts; see :func:`resolve_tofu_sets`), so model utility is OU's 9-component harmonic
            mean when all three are there. Or the keys of the retain-type sets; prefixes follow OU: ``retain*`` ->
            ``retain``, ``real_authors`` -> ``ra``, ``world_facts`` -> ``wf``, others their own name. A
            mapping ``{set name: prefix}`` overrides the prefix; prefix ``"retain"`` means paraphrased-answer
            truth ratio and plain probability, any other prefix the true-answer truth ratio and the
            normalised probability, as for OU's ``ra``/``wf``.
        holdout: ``"auto"`` (default: ``data["holdoutNN"]`` for ``forgetNN``, else ``data["holdout"]``, when
            present), a key in ``data``, a list of items never trained on, or None; enables ``mia_min_k``
            (forget vs holdout AUC) and ``privleak``.
        retain_model_eval: a retain-only model's evaluation (dict, ``TOFU_EVAL.json`` path or directory;
            see :func:`load_retain_eval`) for ``forget_quality`` (OU's ``retain_logs_path``). It must be of the
            same forget items: checked against its ``wagle_forget_items`` when it has one, else by the number
            of items (``ValueError`` naming the file otherwise), before any model call.
        retain_model: alternatively the retain-only model itself (its forget truth ratios, and with a holdout
            its Min-K% AUC, are computed here with the same tokenizer and collator). Without either,
            ``forget_quality`` is not reported and ``privleak`` uses the reference AUC 0.5 (as OU does).
        collator: prompt/answer formatting (default ``QACollator(tokenizer)``, as in training).
        batch_size: items per forward / generate call.
        max_new_tokens: greedy answer length (default 200, as OU).
        mia_k: Min-K% fraction (OU ``mia_min_k`` default 0.4).
        out_dir: if given, ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` are written there (created if needed).
        progress: progress reports (``wagle_ext._util.progress``: tqdm on a terminal, else periodic plain
            lines with ETA on stderr).
    Returns:
        ``{"forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "wf_Q_A_Prob_normalised", ...}``: the
        content of ``TOFU_SUMMARY.json`` (metrics whose value is None, e.g. ``forget_quality`` without a
        reference, are left out, as in OU).
    """
    prefixes, holdout_items, ref_eval = _check_suite_args(data, forget_split, retain_sets, holdout, retain_model,
                                                          retain_model_eval, batch_size)
    collator = collator if collator is not None else QACollator(tokenizer)
    run = _Run(model, tokenizer, collator, batch_size, max_new_tokens, progress)
    forget = data[forget_split]
    logs: dict[str, Any] = {FORGET_ITEMS_KEY: forget_set_identity(forget)}
    f_true, f_tr = _forget_set(run, forget, with_tokens=holdout_items is not None, logs=logs)
    utility: dict[str, float] = {}
    for s, p in prefixes.items():
        _retain_type_set(run, s, p, data[s], logs, utility)
    if utility:
        logs["model_utility"] = {"agg_value": model_utility(utility), "components": utility}
    reference = ref_eval if ref_eval is not None else \
        _retain_model_reference(run, retain_model, forget, holdout_items, mia_k)
    logs["forget_quality"] = {"agg_value": (forget_quality(f_tr, reference["forget_truth_ratios"])
                                            if reference is not None else None)}
    if holdout_items is not None:
        _membership_inference(run, f_true, holdout_items, reference, mia_k, logs)
    summary = {k: float(v["agg_value"]) for k, v in sorted(logs.items())
               if isinstance(v, Mapping) and v.get("agg_value") is not None}
    if out_dir is not None:
        _write_logs(out_dir, logs, summary)
    return summary


def _check_suite_args(data, forget_split, retain_sets, holdout, retain_model, retain_model_eval,
                      batch_size) -> tuple[dict, Optional[Sequence[Mapping[str, Any]]], Optional[dict]]:
    """Validate :func:`evaluate_tofu`'s arguments and items, and read and check ``retain_model_eval``, before
    any model call; returns ``({retain-type set: metric prefix}, holdout items or None, reference or None)``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a dict of set name -> items, got {type(data).__name__}")
    if forget_split not in data:
        raise ValueError(f"forget_split {forget_split!r} is not a key of data (keys: {sorted(data)})")
    if retain_model is not None and retain_model_eval is not None:
        raise ValueError("pass retain_model or retain_model_eval, not both")
    prefixes, holdout = resolve_tofu_sets(data, forget_split, retain_sets, holdout)
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
        if isinstance(holdout, str) and holdout not in data:
            raise ValueError(f"holdout {holdout!r} is not a key of data (keys: {sorted(data)})")
        holdout_items = data[holdout] if isinstance(holdout, str) else holdout
        _validate_items(holdout_items, "holdout", ("question", "answer"))
    reference = None
    if retain_model_eval is not None:
        reference = load_retain_eval(retain_model_eval)
        _check_reference_forget_set(reference, data[forget_split])
    return prefixes, holdout_items, reference


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


def _retain_model_reference(run: _Run, retain_model: Any, forget: Sequence[Mapping[str, Any]],
                            holdout_items: Optional[Sequence[Mapping[str, Any]]], mia_k: float) -> Optional[dict]:
    """The retain-only model's forget truth ratios (and MIA AUC) for forget quality and privleak, computed
    from ``retain_model``; None without one."""
    if retain_model is not None:
        rs = run.scorer(forget, "retain model", model=retain_model)
        r_para = rs.field("paraphrased_answer")
        r_pert, _ = rs.perturbed()
        reference = {"forget_truth_ratios": truth_ratio(r_para.mean_log_prob, r_pert), "mia_auc": None}
        if holdout_items is not None:  # the retain model's own MIA AUC is privleak's reference (OU privleak)
            rh = run.scorer(holdout_items, "retain model", model=retain_model)
            r_f = rs.field("answer", tokens=True).token_log_probs
            r_h = rh.field("answer", tokens=True).token_log_probs
            reference["mia_auc"] = min_k_prob_mia_auc(min_k_scores(r_f, mia_k), min_k_scores(r_h, mia_k))  # type: ignore
        return reference
    return None


def _membership_inference(run: _Run, f_true: AnswerLogProbs, holdout_items: Sequence[Mapping[str, Any]],
                          reference: Optional[dict], mia_k: float, logs: dict) -> None:
    """Min-K% membership inference forget vs holdout, and MUSE-style privleak, into ``logs``."""
    hs = run.scorer(holdout_items, "holdout")
    h_true = hs.field("answer", tokens=True)
    # OU mia_min_k: every answer label token but the last (the end-of-answer token) is scored.
    f_scores = min_k_scores(f_true.token_log_probs, mia_k)  # type: ignore[arg-type]
    h_scores = min_k_scores(h_true.token_log_probs, mia_k)  # type: ignore[arg-type]
    auc = min_k_prob_mia_auc(f_scores, h_scores)
    logs["mia_min_k"] = {
        "forget": {"agg_value": _mean(f_scores), "value_by_index": _by_index(f_scores, "score")},
        "holdout": {"agg_value": _mean(h_scores), "value_by_index": _by_index(h_scores, "score")},
        "auc": auc, "agg_value": auc, "k": mia_k}
    # OU privleak: relative change of (1 - AUC) against the retain model's (default reference AUC 0.5).
    ref_auc = reference["mia_auc"] if reference is not None and reference["mia_auc"] is not None else 0.5
    logs["privleak"] = {"agg_value": privleak(auc, ref_auc),
                        "reference_auc": ref_auc}


def _write_logs(out_dir: PathLike, logs: dict, summary: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "TOFU_EVAL.json"), "w") as f:
        json.dump(dict(sorted(logs.items())), f, indent=4, default=_json_default)
    with open(os.path.join(out_dir, "TOFU_SUMMARY.json"), "w") as f:
        json.dump(summary, f, indent=4)
