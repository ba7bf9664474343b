"""Parity with open-unlearning (OU, github.com/locuslab/open-unlearning, ``src/evals/metrics``).

The ``ou_*`` functions below re-implement OU's code line for line (``memorization.py``: probability,
probability_w_options, truth_ratio, rouge; ``utils.py``: tokenwise_logprobs, eval_rouge_recall_batch;
``mia/min_k.py`` + ``mia/utils.py``: Min-K% score and ``roc_auc_score``; ``privacy.py``: ks_test, privleak;
``utility.py``: hm_aggregate), independent of ``wagle_ext``. They are fed the same per-item values as our
aggregation -- synthetic ones, including a collapsed model with losses above 20 nats/token, and the
per-item values our own ``TOFU_EVAL.json`` stores -- and the results must agree to ~1e-12 or exactly.
The second half evaluates tiny models on TOFU-format files in the official layout (and the multi-array and
prompt/response variants) with the default protocol.
"""
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("scipy", reason="TOFU metrics need scipy (pip install wagle-ext[eval])")
pytest.importorskip("rouge_score", reason="TOFU metrics need rouge-score (pip install wagle-ext[eval])")

import scipy as sc  # noqa: E402
from scipy.stats import ks_2samp  # noqa: E402

from wagle_ext.eval import (FORGET_ITEMS_KEY, answer_log_probs, evaluate_tofu, find_tofu_eval_sets,  # noqa: E402
                            forget_quality, forget_set_identity, load_tofu_eval_sets, min_k_prob_mia_auc,
                            min_k_scores, model_utility, normalised_probability, privleak, rouge_l_recall,
                            truth_ratio, truth_ratio_score)
from wagle_ext.fictitious_authors import make_fictitious_authors  # noqa: E402
from wagle_ext.unlearn.data import IGNORE_INDEX, QACollator  # noqa: E402

from tiny_models import char_tokenizer, tiny_llama  # noqa: E402

OU_NINE = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
           "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


# ------------------------------------------------------------------------------------------------
# open-unlearning, re-implemented from its source
# ------------------------------------------------------------------------------------------------

def ou_aggregate_to_1D(x):
    return np.mean(x, axis=tuple(range(1, x.ndim)))


def ou_probability(value_by_index):
    """memorization.probability: mean over items of the (per-item mean of the) 'prob' values."""
    prob_values = np.array([e["prob"] for e in value_by_index.values() if e["prob"] is not None])
    return np.mean(ou_aggregate_to_1D(prob_values))


def ou_probability_w_options(correct_vbi, wrong_vbi):
    idx = [i for i in correct_vbi if correct_vbi[i] is not None and wrong_vbi[i] is not None]
    correct = np.array([correct_vbi[i]["prob"] for i in idx])
    all_wrong = np.array([wrong_vbi[i]["prob"] for i in idx])
    wrong = np.sum(all_wrong, axis=tuple(range(1, all_wrong.ndim)))
    probs = correct / (correct + wrong + 1e-10)
    return np.mean(probs), probs


def ou_truth_ratio(correct_vbi, wrong_vbi, aggregator):
    def closer_to_1_better(arr):
        return np.mean(np.minimum(arr, 1 / (arr + 1e-10)))

    def true_better(arr):
        return np.mean(np.maximum(0, 1 - arr))

    agg = {"closer_to_1_better": closer_to_1_better, "true_better": true_better}[aggregator]
    idx = [i for i in correct_vbi if correct_vbi[i] is not None and wrong_vbi[i] is not None]
    correct_avg_losses = ou_aggregate_to_1D(np.array([correct_vbi[i]["avg_loss"] for i in idx]))
    wrong_avg_losses = ou_aggregate_to_1D(np.array([wrong_vbi[i]["avg_loss"] for i in idx]))
    correct_prob = np.exp(-correct_avg_losses)
    wrong_prob = np.exp(-wrong_avg_losses)
    truth_ratios = wrong_prob / (correct_prob + 1e-10)
    return agg(truth_ratios), truth_ratios


def ou_ks_test(forget_tr_vbi, retain_tr_vbi):
    forget_tr_stats = np.array([e["score"] for e in forget_tr_vbi.values()])
    retain_tr_stats = np.array([e["score"] for e in retain_tr_vbi.values()])
    return ks_2samp(forget_tr_stats, retain_tr_stats).pvalue


def ou_hm_aggregate(values):
    return sc.stats.hmean(values)


def ou_privleak(forget_auc, ref_auc):
    score, ref = 1 - forget_auc, 1 - ref_auc
    return (score - ref) / (ref + 1e-10) * 100


def ou_tokenwise_logprobs(model, batch):
    """utils.tokenwise_logprobs: per row, the log-probs of the label positions but the last."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    bsz = logits.shape[0]
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    next_tokens = batch["input_ids"][:, 1:].unsqueeze(-1)
    target_log_probs = torch.gather(log_probs, dim=2, index=next_tokens).squeeze(-1)
    out = []
    for i in range(bsz):
        labels = batch["labels"][i]
        actual_indices = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]  # -1 to ignore eos prediction
        if actual_indices.numel() == 0:
            out.append(torch.tensor([]))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        out.append(target_log_probs[i, start_idx - 1: end_idx])
    return out


def ou_min_k_score(sample_stats, k):
    """mia/min_k.MinKProbAttack.compute_score, then float() as Attack.attack does."""
    lp = sample_stats.float().cpu().numpy()
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    sorted_vals = np.sort(lp)
    return float(-np.mean(sorted_vals[:num_k]))


def ou_roc_auc(forget_scores, holdout_scores):
    """mia/utils.mia_auc: sklearn roc_auc_score(labels forget 0 / holdout 1, scores), re-implemented as the
    trapezoidal area under the ROC curve over the distinct score thresholds."""
    scores = np.array(list(forget_scores) + list(holdout_scores), dtype=np.float64)
    labels = np.array([0] * len(forget_scores) + [1] * len(holdout_scores))
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.where(np.diff(s))[0], s.size - 1]  # last index of each distinct threshold
    tps, fps = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    tpr, fpr = np.r_[0, tps] / tps[-1], np.r_[0, fps] / fps[-1]
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def ou_rouge_l_recall(gen_outputs, ground_truths):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    return [scorer.score(gt, gen)["rougeL"].recall for gen, gt in zip(gen_outputs, ground_truths)]


# ------------------------------------------------------------------------------------------------
# identical synthetic per-item values
# ------------------------------------------------------------------------------------------------

def _losses(rng, n, k, lo, hi):
    """Per-item avg losses (nats/token) of a reference answer [n] and k perturbed answers [n, k]."""
    return rng.uniform(lo, hi, n), rng.uniform(lo, hi, (n, k))


def _ou_vbi(avg_loss):
    """OU value_by_index of a probability metric from avg losses ([n] or [n, k])."""
    if np.ndim(avg_loss) == 1:
        return {str(i): {"prob": float(np.exp(-a)), "avg_loss": float(a)} for i, a in enumerate(avg_loss)}
    return {str(i): {"prob": [float(np.exp(-x)) for x in a], "avg_loss": [float(x) for x in a]}
            for i, a in enumerate(avg_loss)}


# healthy model (1-4 nats/token) and collapsed models (answer losses 20-30 and 25-60 nats/token)
REGIMES = {"healthy": (1.0, 4.0), "collapsed": (20.0, 30.0), "very_collapsed": (25.0, 60.0)}
SEEDS = {"healthy": 1, "collapsed": 2, "very_collapsed": 3}


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_truth_ratio_and_normalised_probability_equal_ou(regime):
    rng = np.random.default_rng(SEEDS[regime])
    lo, hi = REGIMES[regime]
    true_loss, pert_loss = _losses(rng, 40, 5, lo, hi)
    for aggregator in ("closer_to_1_better", "true_better"):
        ou_agg, ou_tr = ou_truth_ratio(_ou_vbi(true_loss), _ou_vbi(pert_loss), aggregator)
        ours = truth_ratio(-true_loss, -pert_loss)
        np.testing.assert_allclose(ours, ou_tr, rtol=1e-12, atol=0)
        assert truth_ratio_score(ours, aggregator) == pytest.approx(ou_agg, rel=1e-12, abs=1e-300)
    ou_norm_agg, ou_norm = ou_probability_w_options(_ou_vbi(true_loss), _ou_vbi(pert_loss))
    ours_norm = normalised_probability(np.exp(-true_loss), np.exp(-pert_loss))
    np.testing.assert_allclose(ours_norm, ou_norm, rtol=1e-12, atol=0)
    assert float(np.mean(ours_norm)) == pytest.approx(ou_norm_agg, rel=1e-12, abs=1e-300)
    # the probabilities of the perturbed set: per-item mean over answers, then the mean (OU probability)
    assert ou_probability(_ou_vbi(pert_loss)) == pytest.approx(float(np.mean(np.exp(-pert_loss).mean(1))), rel=1e-12)


@pytest.mark.parametrize("regime", ["healthy", "collapsed", "very_collapsed"])
def test_forget_quality_equals_ou_including_a_collapsed_model(regime):
    # unlearned model in `regime`, retain model healthy: forget quality = KS p-value of the truth ratios
    rng = np.random.default_rng(100 + SEEDS[regime])
    lo, hi = REGIMES[regime]
    u_para, u_pert = _losses(rng, 40, 5, lo, hi)
    r_para, r_pert = _losses(rng, 40, 5, 1.0, 4.0)
    _, ou_u = ou_truth_ratio(_ou_vbi(u_para), _ou_vbi(u_pert), "closer_to_1_better")
    _, ou_r = ou_truth_ratio(_ou_vbi(r_para), _ou_vbi(r_pert), "closer_to_1_better")
    ou_fq = ou_ks_test({str(i): {"score": v} for i, v in enumerate(ou_u)},
                       {str(i): {"score": v} for i, v in enumerate(ou_r)})
    ours = forget_quality(truth_ratio(-u_para, -u_pert), truth_ratio(-r_para, -r_pert))
    assert ours == pytest.approx(ou_fq, rel=1e-12, abs=1e-300)
    if regime != "healthy":
        # the epsilon matters here: the epsilon-free (log-space) ratio gives a different forget quality
        log_space = forget_quality(np.exp(-u_pert.mean(1) + u_para), np.exp(-r_pert.mean(1) + r_para))
        assert not math.isclose(log_space, ou_fq, rel_tol=1e-3)


def test_model_utility_privleak_and_rouge_equal_ou():
    rng = np.random.default_rng(3)
    nine = dict(zip(OU_NINE, rng.uniform(0.05, 1.0, 9)))
    assert model_utility(nine) == ou_hm_aggregate(list(nine.values()))
    assert model_utility(dict(nine, wf_Q_A_ROUGE=0.0)) == ou_hm_aggregate(list(dict(nine, wf_Q_A_ROUGE=0.0).values()))
    for auc, ref in ((0.8, 0.5), (0.3, 0.62), (1.0, 1.0), (0.5, 0.0)):
        assert privleak(auc, ref) == pytest.approx(ou_privleak(auc, ref), rel=1e-12, abs=1e-12)
    gens = ["The author was born in Paris, France.", "", "running dogs bark", "Nobody knows?", "x " * 50]
    gts = ["The author was born in Paris.", "Something.", "The dog runs and barks.", "Nobody.", "x"]
    assert rouge_l_recall(gens, gts) == ou_rouge_l_recall(gens, gts)


def test_min_k_and_auc_equal_ou_on_identical_token_log_probs():
    g = torch.Generator().manual_seed(11)
    # per item: the log-probs of every answer label token (ours), including the final end-of-answer token
    forget = [-torch.rand(int(n), generator=g) * 3 for n in torch.randint(1, 30, (25,), generator=g)]
    holdout = [-torch.rand(int(n), generator=g) * 6 for n in torch.randint(1, 30, (20,), generator=g)]
    for k in (0.1, 0.2, 0.4, 1.0):
        # OU scores tokenwise_logprobs' output, which drops the last label position
        ou_f = [ou_min_k_score(t[:-1], k) for t in forget]
        ou_h = [ou_min_k_score(t[:-1], k) for t in holdout]
        assert min_k_scores(forget, k) == ou_f and min_k_scores(holdout, k) == ou_h  # exact (float32 as OU)
        assert min_k_prob_mia_auc(ou_f, ou_h) == pytest.approx(ou_roc_auc(ou_f, ou_h), rel=1e-12)
    # with the end-of-answer token scored (our former behaviour), the scores are not OU's
    assert [ou_min_k_score(t, 0.4) for t in forget] != min_k_scores(forget, 0.4)


def test_min_k_scores_the_tokens_ou_scores_on_a_real_model():
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=5).eval()
    items = make_fictitious_authors(2, seed=4)["full"][:6] + [{"question": "Q?", "answer": ""}]
    qs, ans = [x["question"] for x in items], [x["answer"] for x in items]
    ours = answer_log_probs(model, tok, qs, ans, 3, return_token_log_probs=True).token_log_probs
    ou = ou_tokenwise_logprobs(model, QACollator(tok).collate_items([{"question": q, "answer": a}
                                                                     for q, a in zip(qs, ans)]))
    for mine, theirs in zip(ours, ou):
        assert mine.numel() == theirs.numel() + 1  # OU drops exactly the final label token
        torch.testing.assert_close(mine[:-1], theirs.float(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(min_k_scores(ours, 0.4), [ou_min_k_score(t, 0.4) for t in ou], rtol=1e-5, atol=1e-6)
    assert min_k_scores(ours, 0.4)[-1] == 0.0  # an empty answer leaves only the end token: OU scores 0


# ------------------------------------------------------------------------------------------------
# TOFU-format files, evaluated with the default protocol
# ------------------------------------------------------------------------------------------------

def _tofu_sets(seed=0):
    d = make_fictitious_authors(4, seed=seed)
    facts = d["world_facts"]
    return {"forget10": d["forget10"][:3], "retain": d["retain"][:4], "real_authors": facts[:3],
            "world_facts": facts[3:6], "holdout10": make_fictitious_authors(2, seed=99)["full"][:3],
            "retain90": d["retain"][:4]}


CONFIG = {"forget10": "forget10_perturbed", "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
          "world_facts": "world_facts_perturbed", "holdout10": "holdout10", "retain90": "retain90"}


def _write_layout(root, sets, variant):
    """The official TOFU file layout; ``multi_array``: each file as several JSON arrays, one per line;
    ``prompt_response``: question/answer stored as prompt/response."""
    root.mkdir()
    keep = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    for key, config in CONFIG.items():
        rows = [{k: v for k, v in r.items() if k in keep} for r in sets[key]]
        if key in ("real_authors", "world_facts"):
            rows = [{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in rows]
        if variant == "prompt_response":
            rows = [{("prompt" if k == "question" else "response" if k == "answer" else k): v for k, v in r.items()}
                    for r in rows]
        if variant == "multi_array":
            text = "\n".join(json.dumps(rows[i:i + 2]) for i in range(0, len(rows), 2)) + "\n"
        else:
            text = "".join(json.dumps(r) + "\n" for r in rows)  # JSON lines, as the Hub files
        (root / f"{config}.json").write_text(text)


@pytest.fixture(scope="module")
def models():
    tok = char_tokenizer()
    return tok, tiny_llama(len(tok), seed=1), tiny_llama(len(tok), seed=2)


@pytest.mark.parametrize("variant", ["official", "multi_array", "prompt_response"])
def test_tofu_files_default_protocol_nine_component_utility(tmp_path, models, variant):
    tok, model, retain_model = models
    sets = _tofu_sets()
    _write_layout(tmp_path / "tofu", sets, variant)
    found = find_tofu_eval_sets(tmp_path / "tofu", "forget10")
    assert found == {("forget" if k == "forget10" else "holdout" if k == "holdout10" else k): v
                     for k, v in CONFIG.items() if k != "retain90"}
    data = load_tofu_eval_sets(tmp_path / "tofu", forget_split="forget10", sets=found)
    assert [x["question"] for x in data["forget10"]] == [x["question"] for x in sets["forget10"]]
    out = tmp_path / "eval"
    summary = evaluate_tofu(model, tok, data, retain_model=retain_model, batch_size=4, max_new_tokens=6,
                            out_dir=out, progress=False)
    on_disk = json.loads((out / "TOFU_SUMMARY.json").read_text())
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    assert on_disk == summary
    assert {"model_utility", "forget_quality", "mia_min_k", "privleak"} <= set(on_disk)
    assert set(logs["model_utility"]["components"]) == set(OU_NINE)
    assert on_disk["model_utility"] == ou_hm_aggregate([on_disk[k] for k in OU_NINE])
    assert logs[FORGET_ITEMS_KEY] == forget_set_identity(data["forget10"])
    # OU's aggregations recomputed from the per-item values we store equal our aggregates
    for p in ("retain", "ra", "wf"):
        assert on_disk[f"{p}_Q_A_Prob"] == pytest.approx(ou_probability(logs[f"{p}_Q_A_Prob"]["value_by_index"]),
                                                         rel=1e-12)
        assert on_disk[f"{p}_Q_A_PERT_Prob"] == pytest.approx(
            ou_probability(logs[f"{p}_Q_A_PERT_Prob"]["value_by_index"]), rel=1e-12)
        correct = logs["retain_Q_A_PARA_Prob" if p == "retain" else f"{p}_Q_A_Prob"]["value_by_index"]
        agg, _ = ou_truth_ratio(correct, logs[f"{p}_Q_A_PERT_Prob"]["value_by_index"], "true_better")
        assert on_disk[f"{p}_Truth_Ratio"] == pytest.approx(agg, rel=1e-12, abs=1e-15)
        rouge = logs[f"{p}_Q_A_ROUGE"]["value_by_index"].values()
        assert on_disk[f"{p}_Q_A_ROUGE"] == pytest.approx(np.mean(ou_rouge_l_recall(
            [r["generation"] for r in rouge], [r["ground_truth"] for r in rouge])), rel=1e-12, abs=1e-15)
    for p in ("ra", "wf"):
        agg, _ = ou_probability_w_options(logs[f"{p}_Q_A_Prob"]["value_by_index"],
                                          logs[f"{p}_Q_A_PERT_Prob"]["value_by_index"])
        assert on_disk[f"{p}_Q_A_Prob_normalised"] == pytest.approx(agg, rel=1e-12)
    agg, _ = ou_truth_ratio(logs["forget_Q_A_PARA_Prob"]["value_by_index"],
                            logs["forget_Q_A_PERT_Prob"]["value_by_index"], "closer_to_1_better")
    assert on_disk["forget_truth_ratio"] == pytest.approx(agg, rel=1e-12)
    auc = ou_roc_auc([v["score"] for v in logs["mia_min_k"]["forget"]["value_by_index"].values()],
                     [v["score"] for v in logs["mia_min_k"]["holdout"]["value_by_index"].values()])
    assert on_disk["mia_min_k"] == pytest.approx(auc, rel=1e-12)
    assert on_disk["privleak"] == pytest.approx(ou_privleak(auc, logs["privleak"]["reference_auc"]), rel=1e-9)


def test_collapsed_model_forget_quality_equals_ou_end_to_end(tmp_path, models):
    tok, retain_model, _ = models
    sets = _tofu_sets(seed=1)
    data = {k: sets[k] for k in ("forget10", "retain")}
    collapsed = tiny_llama(len(tok), seed=3)
    with torch.no_grad():
        collapsed.lm_head.weight.mul_(100.0)  # near one-hot next-token distributions: huge answer losses
    ref = evaluate_tofu(retain_model, tok, data, batch_size=4, max_new_tokens=2, out_dir=tmp_path / "r",
                        progress=False)
    assert "forget_quality" not in ref
    got = evaluate_tofu(collapsed, tok, data, retain_model_eval=tmp_path / "r", batch_size=4, max_new_tokens=2,
                        out_dir=tmp_path / "u", progress=False)
    logs = json.loads((tmp_path / "u" / "TOFU_EVAL.json").read_text())
    ref_logs = json.loads((tmp_path / "r" / "TOFU_EVAL.json").read_text())
    losses = [v["avg_loss"] for v in logs["forget_Q_A_PARA_Prob"]["value_by_index"].values()]
    assert min(losses) > 20.0  # collapsed: > 20 nats/token
    _, ou_u = ou_truth_ratio(logs["forget_Q_A_PARA_Prob"]["value_by_index"],
                             logs["forget_Q_A_PERT_Prob"]["value_by_index"], "closer_to_1_better")
    _, ou_r = ou_truth_ratio(ref_logs["forget_Q_A_PARA_Prob"]["value_by_index"],
                             ref_logs["forget_Q_A_PERT_Prob"]["value_by_index"], "closer_to_1_better")
    np.testing.assert_allclose([v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()], ou_u,
                               rtol=1e-12, atol=0)
    fq = ou_ks_test(logs["forget_truth_ratio"]["value_by_index"], ref_logs["forget_truth_ratio"]["value_by_index"])
    assert got["forget_quality"] == pytest.approx(fq, rel=1e-12)
    assert fq == pytest.approx(ks_2samp(ou_u, ou_r).pvalue, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# the retain-model reference must be of the same forget items
# ------------------------------------------------------------------------------------------------

class _NeverCalled(torch.nn.Module):
    """A model that fails if evaluated: the reference checks must come before any model call."""

    def forward(self, *a, **k):
        raise AssertionError("the model was called before the reference was checked")


def _one_line_error(match, fn):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_retain_model_eval_of_another_forget_set_is_refused(tmp_path, models):
    tok, retain_model, _ = models
    sets = _tofu_sets(seed=2)
    data = {k: sets[k] for k in ("forget10", "retain")}
    evaluate_tofu(retain_model, tok, data, batch_size=4, max_new_tokens=2, out_dir=tmp_path / "r", progress=False)
    ref_file = tmp_path / "r" / "TOFU_EVAL.json"
    ident = json.loads(ref_file.read_text())[FORGET_ITEMS_KEY]
    assert ident["n"] == 3 and len(ident["sha256"]) == 64
    # same items in another order: accepted (forget quality and AUC do not depend on the order)
    shuffled = dict(data, forget10=data["forget10"][::-1])
    assert forget_set_identity(shuffled["forget10"]) == ident
    # other items of the same size: refused, naming the file, before the model is called
    other = dict(data, forget10=[dict(x, answer=x["answer"] + " Indeed.") for x in data["forget10"]])
    msg = _one_line_error("different forget set", lambda: evaluate_tofu(
        _NeverCalled(), tok, other, retain_model_eval=tmp_path / "r", progress=False))
    assert str(ref_file) in msg and "3 items" in msg
    # an OU file (no identity): the number of items must match
    ou = {k: v for k, v in json.loads(ref_file.read_text()).items() if k != FORGET_ITEMS_KEY}
    (tmp_path / "ou.json").write_text(json.dumps(ou))
    fewer = dict(data, forget10=data["forget10"][:2])
    msg = _one_line_error("different forget set", lambda: evaluate_tofu(
        _NeverCalled(), tok, fewer, retain_model_eval=tmp_path / "ou.json", progress=False))
    assert "ou.json" in msg and "3 forget truth ratios" in msg and "2 items" in msg
    ok = evaluate_tofu(retain_model, tok, shuffled, retain_model_eval=tmp_path / "ou.json", batch_size=4,
                       max_new_tokens=2, progress=False)
    assert ok["forget_quality"] == pytest.approx(1.0)  # the retain model against itself


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"model_utility": {"agg_value": 0.5}}', "no forget truth ratios"),
    ('{"forget_truth_ratio": {"agg_value": 0.5}}', "no 'value_by_index'"),
    ('{"forget_truth_ratio": {"value_by_index": {"0": {"score": "high"}}}}', "must be a number"),
    ('{"forget_truth_ratio": {"value_by_index": {"0": {"score": 1.0}}}, "mia_min_k": {"agg_value": 7}}',
     "mia_min_k"),
    ('{"forget_truth_ratio": {"value_by_index": {"0": {"score": 1.0}}}, "wagle_forget_items": {"n": "3"}}',
     "wagle_forget_items"),
])
def test_malformed_retain_model_eval_is_one_line_naming_the_file(tmp_path, models, content, match):
    tok = models[0]
    f = tmp_path / "TOFU_EVAL.json"
    f.write_text(content)
    data = {k: v for k, v in _tofu_sets().items() if k in ("forget10",)}
    msg = _one_line_error(match, lambda: evaluate_tofu(_NeverCalled(), tok, data, retain_model_eval=f,
                                                       progress=False))
    assert str(f) in msg
