"""TOFU evaluation metrics against hand-computed values on tiny inputs, and one end-to-end suite run."""
import json
import math

import numpy as np
import pytest
import torch

# The evaluation suite needs the `eval` extra: scipy (KS test of forget quality) and rouge-score.
pytest.importorskip("scipy", reason="TOFU metrics need scipy (pip install wagle-ext[eval])")
pytest.importorskip("rouge_score", reason="TOFU metrics need rouge-score (pip install wagle-ext[eval])")

from wagle_ext.data import QACollator  # noqa: E402
from wagle_ext.evaluation import (
    answer_log_probs,
    answer_probability,
    evaluate_tofu,
    forget_quality,
    greedy_generate,
    load_retain_eval,
    min_k_prob_mia_auc,
    min_k_score,
    min_k_scores,
    model_utility,
    normalised_probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)
from wagle_ext.fictitious_authors import make_fictitious_authors

from conftest import test_seed
from tiny_models import answer_ce, char_tokenizer, finetune_on_qa, tiny_llama

LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


class UnigramLM(torch.nn.Module):
    """A fake causal LM whose next-token distribution is the same fixed ``probs`` at every position, so
    the log-probability of any answer is a product of known numbers."""

    def __init__(self, probs: torch.Tensor, dtype=torch.float32):
        super().__init__()
        self.register_buffer("log_p", probs.double().log().to(dtype))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        return type("Out", (), {"logits": self.log_p.expand(B, T, -1).clone()})()


def _unigram(tok):
    """p(a) = 1/2, p(b) = 1/4, p(</s>) = 1/8, the remaining 1/8 spread over all other tokens."""
    V = len(tok)
    a, b, eos = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), tok.eos_token_id
    p = torch.full((V,), (1 / 8) / (V - 3), dtype=torch.float64)
    p[a], p[b], p[eos] = 1 / 2, 1 / 4, 1 / 8
    return p


# ------------------------------------------------------------------------------------------------
# answer log-probs and probability
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_answer_log_probs_hand_values(chat, dtype):
    tok = char_tokenizer(chat_template=chat)
    model = UnigramLM(_unigram(tok), dtype)
    # answer tokens are the characters plus </s> (char tokenizer): by hand
    #   "ab"  -> 1/2 * 1/4 * 1/8         = 2^-6, 3 tokens
    #   "aab" -> 1/2 * 1/2 * 1/4 * 1/8   = 2^-7, 4 tokens
    #   "b"   -> 1/4 * 1/8               = 2^-5, 2 tokens
    qs = ["Who?", "A much longer question, so the batch is padded?", "Q"]
    ans = ["ab", "aab", "b"]
    for bs in (1, 2, 3):
        lp = answer_log_probs(model, tok, qs, ans, bs, return_token_log_probs=True)
        assert lp.sum_log_prob.dtype == torch.float64 and lp.num_tokens.dtype == torch.int64
        assert lp.num_tokens.tolist() == [3, 4, 2]
        torch.testing.assert_close(lp.sum_log_prob, torch.tensor([-6 * LN2, -7 * LN2, -5 * LN2], dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(lp.token_log_probs[0], torch.tensor([-1, -2, -3], dtype=torch.float32) * LN2)
        prob = answer_probability(lp.sum_log_prob, lp.num_tokens)
        np.testing.assert_allclose(prob, [2 ** -2, 2 ** -1.75, 2 ** -2.5], rtol=1e-5)


def test_answer_log_probs_bf16_logits_are_scored_in_fp32():
    tok = char_tokenizer()
    model = UnigramLM(_unigram(tok), torch.bfloat16)
    lp = answer_log_probs(model, tok, ["Q?"], ["ab"], 1, return_token_log_probs=True)
    assert lp.token_log_probs[0].dtype == torch.float32
    # log(1/2), log(1/4), log(1/8) are not exact in bf16: agree to bf16 resolution of the logits
    torch.testing.assert_close(lp.sum_log_prob, torch.tensor([-6 * LN2], dtype=torch.float64), rtol=0, atol=0.05)


def test_answer_log_probs_padding_safe_on_a_real_model(gen):
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    data = make_fictitious_authors(3, seed=int(torch.randint(0, 1000, (1,), generator=gen)))["full"][:7]
    qs, ans = [x["question"] for x in data], [x["answer"] for x in data]
    model.train()
    ref = answer_log_probs(model, tok, qs, ans, 1)
    assert model.training  # mode restored
    for bs in (2, 7, 16):
        got = answer_log_probs(model, tok, qs, ans, bs)
        torch.testing.assert_close(got.sum_log_prob, ref.sum_log_prob, rtol=1e-5, atol=1e-4)
        assert torch.equal(got.num_tokens, ref.num_tokens)
    # char tokenizer + chat template "...A: {answer}</s>": one token per answer character plus </s>
    assert ref.num_tokens.tolist() == [len(a) + 1 for a in ans]
    # against a direct computation: model loss on the collated batch (mean over answer tokens)
    batch = QACollator(tok)([{"question": q, "answer": a} for q, a in zip(qs[:1], ans[:1])])
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss
    torch.testing.assert_close(ref.mean_log_prob[0].float(), -loss, rtol=1e-5, atol=1e-5)


def test_answer_log_probs_bad_inputs():
    tok = char_tokenizer()
    model = UnigramLM(_unigram(tok))
    with pytest.raises(ValueError, match="differ in length"):
        answer_log_probs(model, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="batch_size"):
        answer_log_probs(model, tok, ["a"], ["c"], 0)
    with pytest.raises(TypeError, match="questions"):
        answer_log_probs(model, tok, "abc", ["c"])
    with pytest.raises(ValueError, match="no answer token.*max_length"):
        answer_log_probs(model, tok, ["a long question indeed?"], ["x"], collator=QACollator(tok, max_length=5))
    with pytest.raises(ValueError, match="num_tokens"):
        answer_probability([0.0], [0])
    empty = answer_log_probs(model, tok, [], [])
    assert empty.sum_log_prob.shape == (0,) and empty.num_tokens.shape == (0,)


# ------------------------------------------------------------------------------------------------
# truth ratio and probabilities
# ------------------------------------------------------------------------------------------------

def test_truth_ratio_hand_values():
    # R = p_pert / (p_para + 1e-10) with OU's epsilon (geometric mean over the perturbed answers):
    # item 0: p_para = 1/2, perturbed 1/4 and 1/16 -> geometric mean 1/8 -> R = 1/4 (up to the epsilon)
    # item 1: p_para = 1/8, perturbed 1/4 (one answer) -> R = 2
    # item 2: p_para = 1/4, perturbed 1/2, 1/8, 1/4 -> geometric mean 1/4 -> R = 1
    eps = 1e-10
    true = [math.log(1 / 2), math.log(1 / 8), math.log(1 / 4)]
    pert = [[math.log(1 / 4), math.log(1 / 16)], [math.log(1 / 4)], [math.log(1 / 2), math.log(1 / 8), math.log(1 / 4)]]
    r = truth_ratio(true, pert)
    hand = [(1 / 8) / (1 / 2 + eps), (1 / 4) / (1 / 8 + eps), (1 / 4) / (1 / 4 + eps)]
    np.testing.assert_allclose(r, hand, rtol=1e-12)
    np.testing.assert_allclose(r, [0.25, 2.0, 1.0], rtol=1e-8)  # the epsilon is small here
    # tensors [N, K] work too
    r2 = truth_ratio(torch.tensor(true[:1], dtype=torch.float64), torch.tensor([pert[0]], dtype=torch.float64))
    np.testing.assert_allclose(r2, hand[:1], rtol=1e-12)
    # forget: mean(min(R, 1/(R + eps))) ~ (1/4 + 1/2 + 1) / 3; retain-type: mean(max(0, 1 - R)) ~ (3/4 + 0 + 0) / 3
    tight = (hand[0] + 1 / (hand[1] + eps) + hand[2]) / 3
    assert truth_ratio_score(r, "closer_to_1_better") == pytest.approx(tight, rel=1e-12)
    assert truth_ratio_score(r, "closer_to_1_better") == pytest.approx(1.75 / 3, rel=1e-8)
    assert truth_ratio_score(r, "true_better") == pytest.approx((1 - hand[0] + 1 - hand[2]) / 3, rel=1e-12)
    assert truth_ratio_score([0.0], "closer_to_1_better") == 0.0
    with pytest.raises(ValueError, match="aggregator"):
        truth_ratio_score(r, "mean")
    with pytest.raises(ValueError, match="empty"):
        truth_ratio([0.0], [[]])
    with pytest.raises(ValueError, match="rows"):
        truth_ratio([0.0, 1.0], [[0.0]])


def test_truth_ratio_collapsed_model_follows_ou_epsilon():
    # A collapsed model: answer losses of 20-800 nats/token. OU divides by p_true + 1e-10, so once p_true falls
    # below ~1e-10 the ratio is p_pert / 1e-10, not p_pert / p_true (the log-space ratio would be exp(-1)).
    got = truth_ratio([-20.0, -25.0, -800.0], [[-21.0], [-26.0], [-801.0]])
    hand = [math.exp(-21) / (math.exp(-20) + 1e-10), math.exp(-26) / (math.exp(-25) + 1e-10), 0.0]
    np.testing.assert_allclose(got, hand, rtol=1e-12)
    assert abs(got[0] - math.exp(-1)) > 0.04 * math.exp(-1) and got[1] < 0.2 * math.exp(-1)  # 4.6 %, 8x
    # closer_to_1_better with R = 0: min(0, 1 / (0 + 1e-10)) = 0, no division by zero
    assert truth_ratio_score([0.0, 1.0], "closer_to_1_better") == pytest.approx((0 + 1 / (1 + 1e-10)) / 2)


def test_normalised_probability_hand_values():
    np.testing.assert_allclose(normalised_probability([0.5, 0.2], [[0.25, 0.25], [0.2]]),
                               [0.5 / (1.0 + 1e-10), 0.2 / (0.4 + 1e-10)], rtol=1e-12)
    # a collapsed model: everything ~0 -> 0, where the epsilon-free ratio would be 0/0 or 1/2
    np.testing.assert_allclose(normalised_probability([1e-15], [[1e-15]]), [1e-15 / (2e-15 + 1e-10)], rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# ROUGE-L recall
# ------------------------------------------------------------------------------------------------

def test_rouge_l_recall_hand_counted_lcs():
    gens = ["the cat on a mat",          # LCS with reference: the cat on mat -> 4 of 6 reference tokens
            "dog runs",                  # stems: dog run vs run dog -> LCS 1 of 2 (0 without the stemmer)
            "",                          # nothing generated -> 0
            "Paris is the capital of France, yes."]  # reference fully contained -> 1
    refs = ["the cat sat on the mat", "running dogs", "some answer", "The capital of France is Paris."]
    got = rouge_l_recall(gens, refs)
    # last case by hand: reference tokens [the capital of france is paris], generation [paris is the capital of
    # france yes]; LCS = the capital of france (4) -> 4/6
    np.testing.assert_allclose(got, [4 / 6, 1 / 2, 0.0, 4 / 6], rtol=1e-12)
    with pytest.raises(ValueError, match="differ in length"):
        rouge_l_recall(["a"], [])


# ------------------------------------------------------------------------------------------------
# forget quality, model utility, MIA
# ------------------------------------------------------------------------------------------------

def test_forget_quality_hand_ks_pvalue():
    # Completely separated samples of sizes 3 and 3: D = 1; the exact two-sided p-value is
    # P(D >= 1) = 2 / C(6, 3) = 2 / 20 (the two orderings where one sample lies entirely below the other).
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1, rel=1e-12)
    # invariant to R -> 1/R (KS only sees the ordering)
    assert forget_quality([1 / 1.0, 1 / 2.0, 1 / 3.0], [1 / 4.0, 1 / 5.0, 1 / 6.0]) == pytest.approx(0.1, rel=1e-12)
    # identical samples: D = 0, p = 1
    assert forget_quality([0.3, 0.7, 0.9], [0.9, 0.3, 0.7]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):
        forget_quality([], [1.0])


def test_forget_quality_matches_scipy(gen):
    from scipy.stats import ks_2samp

    a = torch.rand(17, generator=gen).double().numpy()
    b = (torch.rand(23, generator=gen).double() * 1.5).numpy()
    assert forget_quality(a, b) == ks_2samp(a, b).pvalue


def test_model_utility_harmonic_mean():
    assert model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7, rel=1e-12)  # 3 / (1 + 2 + 4)
    assert model_utility({"p": 0.5, "r": 0.5}) == pytest.approx(0.5)
    assert model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        model_utility([0.5, -0.1])
    with pytest.raises(ValueError, match="at least one"):
        model_utility([])


def test_min_k_score_hand_values():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert min_k_score(lp, 0.4) == pytest.approx(4.5)   # int(5 * 0.4) = 2 lowest: -5, -4
    assert min_k_score(lp, 0.1) == pytest.approx(5.0)   # at least one token
    assert min_k_score(torch.tensor(lp), 1.0) == pytest.approx(3.0)
    assert min_k_score([], 0.4) == 0.0
    # OU's token set: all label tokens but the last (the end-of-answer token): -5 is dropped, int(4 * 0.4) = 1
    assert min_k_scores([torch.tensor(lp), torch.tensor([-7.0]), torch.tensor([-1.0, -9.0])], 0.4) == \
        [pytest.approx(4.0), 0.0, pytest.approx(1.0)]
    with pytest.raises(ValueError, match="k must be"):
        min_k_score(lp, 0.0)


def test_mia_auc_with_ties():
    # pairs (forget, holdout): (1,2) (1,3) (2,2) (2,3) (2,2) (2,3): holdout higher in 4, tied in 2
    # AUC = (4 + 2 * 1/2) / 6 = 5/6
    assert min_k_prob_mia_auc([1.0, 2.0, 2.0], [2.0, 3.0]) == pytest.approx(5 / 6, rel=1e-12)
    assert min_k_prob_mia_auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert min_k_prob_mia_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert min_k_prob_mia_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        min_k_prob_mia_auc([], [1.0])


def test_mia_auc_matches_mann_whitney(gen):
    from scipy.stats import mannwhitneyu

    f = torch.randint(0, 6, (13,), generator=gen).double().numpy()  # many ties
    h = torch.randint(0, 8, (9,), generator=gen).double().numpy()
    u = mannwhitneyu(h, f).statistic
    assert min_k_prob_mia_auc(f, h) == pytest.approx(u / (13 * 9), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# greedy generation
# ------------------------------------------------------------------------------------------------

def test_greedy_generate_left_padding_matches_one_by_one(gen):
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    data = make_fictitious_authors(3, seed=1)["full"]
    finetune_on_qa(model, tok, data, steps=30)
    qs = [x["question"] for x in data[:5]] + ["Hi?", "A rather long question about nothing in particular?"]
    side = tok.padding_side
    model.train()
    alone = [greedy_generate(model, tok, [q], 1, 24)[0] for q in qs]
    for bs in (3, 7):
        assert greedy_generate(model, tok, qs, bs, 24) == alone
    assert tok.padding_side == side and model.training
    assert all(isinstance(g, str) for g in alone)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tok, qs, 2, 0)


@pytest.mark.statistical
def test_greedy_generate_reproduces_memorised_answers(pinned_threads, record_stat):
    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=64, intermediate=128, seed=test_seed())
    items = [{"question": "Q1?", "answer": "Blue fox."}, {"question": "Where now?", "answer": "Red hen."}]
    finetune_on_qa(model, tok, items, steps=150, batch_size=2, lr=3e-3, seed=test_seed())
    # Margin of the memorisation that the exact-generation check relies on (docs/testing.md).
    record_stat("answer_ce", answer_ce(model, tok, items))
    # the model stops at </s>, which is not part of the decoded text
    assert greedy_generate(model, tok, [it["question"] for it in items], 2, 30) == ["Blue fox.", "Red hen."]


# ------------------------------------------------------------------------------------------------
# retain-model reference logs
# ------------------------------------------------------------------------------------------------

def test_load_retain_eval_formats(tmp_path):
    ou = {"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": {"0": {"score": 0.5}, "3": {"score": 2.0},
                                                                      "4": {"score": None}}},
          "mia_min_k": {"agg_value": 0.42}}
    got = load_retain_eval(ou)
    np.testing.assert_array_equal(got["forget_truth_ratios"], [0.5, 2.0])
    assert got["mia_auc"] == 0.42
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(ou))
    np.testing.assert_array_equal(load_retain_eval(tmp_path)["forget_truth_ratios"], [0.5, 2.0])
    np.testing.assert_array_equal(load_retain_eval(tmp_path / "TOFU_EVAL.json")["forget_truth_ratios"], [0.5, 2.0])
    # legacy TOFU eval_log_forget.json: para avg loss 1, perturbed avg losses 2 and 4 -> R = e^-3 / (e^-1 + eps)
    legacy = {"avg_paraphrased_loss": {"0": 1.0}, "average_perturb_loss": {"0": [2.0, 4.0]}}
    np.testing.assert_allclose(load_retain_eval(legacy)["forget_truth_ratios"],
                               [math.exp(-3) / (math.exp(-1) + 1e-10)], rtol=1e-12)
    assert load_retain_eval(legacy)["mia_auc"] is None
    with pytest.raises(ValueError, match="forget_truth_ratio"):
        load_retain_eval({"model_utility": {"agg_value": 1}})
    with pytest.raises(FileNotFoundError):
        load_retain_eval(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# the suite, end to end
# ------------------------------------------------------------------------------------------------

def _tofu_data():
    d = make_fictitious_authors(4, seed=0)
    wf = d["world_facts"]
    holdout = make_fictitious_authors(2, seed=123)["full"]  # authors never trained on
    return {"forget10": d["forget10"], "retain": d["retain"], "world_facts": wf, "holdout10": holdout}


def _trained(items, seed):
    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=48, intermediate=96, seed=seed)
    return finetune_on_qa(model, tok, items, steps=120, batch_size=8, lr=3e-3, seed=seed), tok


@pytest.mark.statistical
def test_evaluate_tofu_end_to_end(tmp_path, pinned_threads, record_stat):
    data = _tofu_data()
    target, tok = _trained(data["forget10"] + data["retain"] + data["world_facts"], seed=test_seed(0))
    retain_model, _ = _trained(data["retain"] + data["world_facts"], seed=test_seed(1))
    kw = dict(forget_split="forget10", retain_sets=("retain", "world_facts"), holdout="holdout10",
              batch_size=8, max_new_tokens=48, progress=False)

    # retain-only model first: its TOFU_EVAL.json is the reference (open-unlearning retain_logs_path)
    ref_dir = tmp_path / "retain90"
    ref_summary = evaluate_tofu(retain_model, tok, data, out_dir=ref_dir, **kw)
    assert "forget_quality" not in ref_summary  # no reference for the reference: left out, as in OU

    out = tmp_path / "target"
    summary = evaluate_tofu(target, tok, data, retain_model_eval=ref_dir, out_dir=out, **kw)
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    on_disk = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert on_disk == pytest.approx(summary)
    expected = {"forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "retain_Q_A_Prob", "retain_Q_A_ROUGE",
                "retain_Truth_Ratio", "retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob", "wf_Q_A_Prob",
                "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio", "wf_Q_A_PERT_Prob", "mia_min_k",
                "privleak"}
    assert set(summary) == expected and set(logs) == expected | {"wagle_forget_items"}
    for k, v in summary.items():
        assert logs[k]["agg_value"] == pytest.approx(v)
    n_forget, n_retain = len(data["forget10"]), len(data["retain"])
    assert len(logs["forget_Q_A_ROUGE"]["value_by_index"]) == n_forget
    assert len(logs["retain_Q_A_Prob"]["value_by_index"]) == n_retain
    assert set(logs["forget_Q_A_ROUGE"]["value_by_index"]["0"]) >= {"rougeL_recall", "generation", "ground_truth"}

    # per-index consistency: truth ratio from the stored paraphrased / perturbed avg losses
    para = logs["forget_Q_A_PARA_Prob"]["value_by_index"]
    pert = logs["forget_Q_A_PERT_Prob"]["value_by_index"]
    tr = logs["forget_truth_ratio"]["value_by_index"]
    for i in map(str, range(n_forget)):
        assert tr[i]["score"] == pytest.approx(math.exp(-np.mean(pert[i]["avg_loss"]))
                                               / (math.exp(-para[i]["avg_loss"]) + 1e-10), rel=1e-12)
    # forget quality = KS p-value between both models' forget truth ratios (read back from the files)
    ref_logs = json.loads((ref_dir / "TOFU_EVAL.json").read_text())
    ref_tr = [v["score"] for v in ref_logs["forget_truth_ratio"]["value_by_index"].values()]
    assert summary["forget_quality"] == pytest.approx(forget_quality([v["score"] for v in tr.values()], ref_tr))
    # ... and the same when the retain model itself is passed
    again = evaluate_tofu(target, tok, data, retain_model=retain_model, retain_sets=("retain", "world_facts"),
                          holdout="holdout10", batch_size=5, max_new_tokens=8, progress=True)
    assert again["forget_quality"] == pytest.approx(summary["forget_quality"], rel=1e-6)
    assert again["privleak"] == pytest.approx(summary["privleak"], rel=1e-6)  # same reference AUC
    auc, ref_auc = summary["mia_min_k"], ref_summary["mia_min_k"]
    assert summary["privleak"] == pytest.approx(((1 - auc) - (1 - ref_auc)) / (1 - ref_auc) * 100, rel=1e-6)
    assert again["forget_Q_A_Prob"] == pytest.approx(summary["forget_Q_A_Prob"], rel=1e-5)
    # model utility = harmonic mean of the six retain-type components
    comps = [summary[k] for k in ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                                  "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")]
    hm = 0.0 if min(comps) == 0 else len(comps) / sum(1 / c for c in comps)
    assert summary["model_utility"] == pytest.approx(hm)
    # the target was trained on the forget set, the retain model was not
    record_stat("forget_prob_target_minus_retain_model", summary["forget_Q_A_Prob"] - ref_summary["forget_Q_A_Prob"])
    assert summary["forget_Q_A_Prob"] > ref_summary["forget_Q_A_Prob"]
    assert logs["mia_min_k"]["agg_value"] == summary["mia_min_k"]
    assert 0.0 <= summary["forget_quality"] <= 1.0 and 0.0 <= summary["mia_min_k"] <= 1.0


def test_evaluate_tofu_validates_sets():
    d = make_fictitious_authors(4, seed=0)
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    d["world_facts"] = [{k: v for k, v in x.items() if k != "perturbed_answer"} for x in d["world_facts"]]
    with pytest.raises(ValueError, match=r"world_facts.*perturbed_answer"):
        evaluate_tofu(model, tok, d, forget_split="forget10", progress=False)
    with pytest.raises(ValueError, match="forget_split"):
        evaluate_tofu(model, tok, d, forget_split="forget99", progress=False)
    with pytest.raises(ValueError, match="not a key"):
        evaluate_tofu(model, tok, d, retain_sets=("real_authors",), progress=False)
    with pytest.raises(ValueError, match="not both"):
        evaluate_tofu(model, tok, d, retain_model=model, retain_model_eval={}, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        evaluate_tofu(model, tok, d, retain_sets={"retain": "retain", "retain95": "retain"}, progress=False)
    with pytest.raises(TypeError, match="retain_sets"):
        evaluate_tofu(model, tok, d, retain_sets="retain", progress=False)
    with pytest.raises(ValueError, match=r"holdout.*'answer'"):
        evaluate_tofu(model, tok, d, retain_sets=("retain",), holdout=[{"question": "q"}], progress=False)


def test_evaluate_tofu_retain_set_prefix_mapping(tmp_path):
    # a custom prefix for a retain-type set: option-set metrics (true-answer truth ratio, normalised prob)
    d = _tofu_data()
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=3)
    s = evaluate_tofu(model, tok, {"forget10": d["forget10"][:2], "facts": d["world_facts"][:3]},
                      retain_sets={"facts": "ra"}, batch_size=2, max_new_tokens=4, progress=False)
    assert set(s) == {"forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_truth_ratio",
                      "forget_Q_A_ROUGE", "ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_Prob_normalised",
                      "ra_Truth_Ratio", "ra_Q_A_ROUGE", "model_utility"}
    comps = [s["ra_Q_A_Prob_normalised"], s["ra_Q_A_ROUGE"], s["ra_Truth_Ratio"]]
    assert s["model_utility"] == pytest.approx(0.0 if min(comps) == 0 else 3 / sum(1 / c for c in comps))


def test_resolve_tofu_sets_auto_defaults():
    from wagle_ext.eval import resolve_tofu_sets

    full = {"forget10": [], "retain": [], "real_authors": [], "world_facts": [], "holdout10": [], "holdout05": [],
            "retain90": []}
    prefixes, holdout = resolve_tofu_sets(full, "forget10")
    assert prefixes == {"retain": "retain", "real_authors": "ra", "world_facts": "wf"} and holdout == "holdout10"
    assert resolve_tofu_sets(full, "forget05")[1] == "holdout05"
    assert resolve_tofu_sets(full, "forget01")[1] is None  # no holdout of the forget set's size
    # TOFU config names as keys, the embedded benchmark's retain_eval, a generic holdout
    alt = {"forget10": [], "retain_perturbed": [], "world_facts_perturbed": [], "holdout": []}
    assert resolve_tofu_sets(alt, "forget10") == ({"retain_perturbed": "retain", "world_facts_perturbed": "wf"},
                                                  "holdout")
    assert resolve_tofu_sets({"forget10": [], "retain_eval": []}, "forget10") == ({"retain_eval": "retain"}, None)
    # explicit arguments are kept as given
    assert resolve_tofu_sets(full, "forget10", ("world_facts",), None) == ({"world_facts": "wf"}, None)
