"""Attacks on unlearning (relearning, facts back in context, prompt rewrites) and the output-quality
check, on tiny Llamas that memorised fictitious-author QA here: every attack returns its documented
keys, and relearning does something -- a gradient-ascent-unlearned model gets its held-out forget
answers back after a few steps on one forget item, a retain-only model (which never knew them)
does not."""
import copy

import pytest
import torch

from conftest import test_seed
from tiny_models import char_tokenizer, finetune_on_qa, tiny_llama

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

from wagle_ext.app.fictitious_authors import make_fictitious_authors  # noqa: E402
from wagle_ext.eval.attacks import (PROMPT_TEMPLATES, answer_accuracy, in_context_attack, output_quality,  # noqa: E402
                                    prompt_attack, relearn_attack)
from wagle_ext.unlearn.data import QACollator  # noqa: E402


@pytest.fixture(scope="module")
def models(pinned_threads):
    seed = test_seed()
    tok = char_tokenizer()
    data = make_fictitious_authors(8, seed=seed)
    forget, retain = data["forget10"], data["retain90"]
    target = tiny_llama(len(tok), hidden=64, layers=2, heads=4, intermediate=128, seed=seed)
    finetune_on_qa(target, tok, data["full"], steps=250, batch_size=8, lr=3e-3, seed=seed)
    retain_model = tiny_llama(len(tok), hidden=64, layers=2, heads=4, intermediate=128, seed=seed)
    finetune_on_qa(retain_model, tok, retain, steps=250, batch_size=8, lr=3e-3, seed=seed)
    # dense gradient ascent on the forget set (full batch, 6 AdamW steps): the answers collapse
    unlearned = copy.deepcopy(target)
    batch = QACollator(tok).collate_items(forget)
    opt = torch.optim.AdamW(unlearned.parameters(), lr=1e-3, weight_decay=0.0)
    unlearned.train()
    for _ in range(6):
        loss = -unlearned(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    unlearned.eval()
    return {"tok": tok, "forget": forget, "retain": retain, "target": target, "retain_model": retain_model,
            "unlearned": unlearned}


@pytest.mark.statistical
def test_relearning_brings_forgotten_answers_back(models, record_stat):
    """The attack does something: 25 steps on one forget item raise the other forget items' answer
    probability above the unlearned level, and a retain-only model (never saw them) stays low.
    Calibrated with tools/stress_tests.sh (seeds 0-4 x threads 1/2 x ATen default/avx2, 2-core AMD
    EPYC, AVX2): the unlearned model's rise was 0.028-0.20 (bound 0.01); the retain-only model ended
    at 0.032-0.125 (bound 0.25) where the target starts at 0.93-0.97. The two overlap: in 2 of 5
    seeds the retain-only model ended higher than the unlearned one, so this test does not claim that
    the unlearned model still *knows* the answers -- only that the attack moves them."""
    m = models
    before = {n: [p.detach().clone() for p in m[n].parameters()] for n in ("unlearned", "retain_model")}
    res = {}
    for name in ("target", "unlearned", "retain_model"):
        res[name] = relearn_attack(m[name], m["tok"], m["forget"], fraction=0.25, steps=(25, 0), learning_rate=1e-3,
                                   max_new_tokens=8)
    for name, r in res.items():
        assert [c["step"] for c in r["curve"]] == [0, 25]
        assert r["attack_items"] == 1 and r["eval_items"] == len(m["forget"]) - 1
        assert set(r["curve"][0]) == {"step", "accuracy", "rouge", "probability"}
    p = {n: [c["probability"] for c in r["curve"]] for n, r in res.items()}
    rise = p["unlearned"][1] - p["unlearned"][0]
    record_stat("relearn_rise_unlearned", rise)
    record_stat("relearn_retain_model_after", p["retain_model"][1])
    record_stat("target_prob_before", p["target"][0])
    assert p["target"][0] > 0.5, p  # the target knows the held-out answers
    assert rise > 0.01, p
    assert p["retain_model"][1] < 0.25, p
    # the attack trains a copy: the models themselves are untouched
    for n, ps in before.items():
        assert all(torch.equal(a, b) for a, b in zip(ps, m[n].parameters())), n


def test_relearn_with_other_text_measures_every_forget_item(models):
    r = relearn_attack(models["unlearned"], models["tok"], models["forget"], relearn_items=models["retain"][:4],
                       steps=(0, 2), max_new_tokens=4)
    assert r["eval_items"] == len(models["forget"]) and r["fraction"] is None and len(r["curve"]) == 2


def test_prompt_and_in_context_attacks(models):
    m = models
    res = prompt_attack(m["target"], m["tok"], m["forget"], max_new_tokens=8)
    assert set(res["templates"]) == set(PROMPT_TEMPLATES)
    worst = res["worst_case"]
    assert worst["accuracy"] == max(t["accuracy"] for t in res["templates"].values())
    items = [{**it, "paraphrased_question": "Tell me: " + it["question"]} for it in m["forget"]]
    res = prompt_attack(m["target"], m["tok"], items, templates={"plain": "{question}"}, max_new_tokens=8)
    assert set(res["templates"]) == {"plain", "paraphrase"}
    ctx = in_context_attack(m["unlearned"], m["tok"], m["forget"], extra_context=1, max_new_tokens=8)
    assert set(ctx) >= {"without", "with_context", "items"} and 0 <= ctx["with_context"]["accuracy"] <= 1
    with pytest.raises(ValueError, match="paraphrased_answer"):
        in_context_attack(m["unlearned"], m["tok"], [{"question": "q", "answer": "a"}], use_paraphrase=True)
    with pytest.raises(ValueError, match="placeholder"):
        prompt_attack(m["target"], m["tok"], m["forget"], templates={"bad": "no slot"})


def test_output_quality_separates_refusals_gibberish_and_fluent_text(models):
    gens = ["I don't know who that is.", "oooooooooooooooooooooooo", "the the the the the the the the",
            "", "Orlen Vask was born in a small harbor town.", "#$% 12@ !!x"]
    q = output_quality(gens)
    kinds = [x["kind"] for x in q["per_item"]]
    assert kinds == ["refusal", "degenerate", "degenerate", "degenerate", "other", "degenerate"]
    assert q["refusal_rate"] == pytest.approx(1 / 6) and q["degenerate_rate"] == pytest.approx(4 / 6)
    assert q["mean_perplexity"] is None
    # "I don't know" in the languages an unlearned multilingual model drifts into
    assert output_quality(["Bien sûr, monsieur, je ne sais pas", "Ich weiß nicht, wo das ist.",
                           "La capital es Madrid."])["refusal_rate"] == pytest.approx(2 / 3)
    # with a reference model: the perplexity of each answer under it
    qs = [it["question"] for it in models["forget"][:2]]
    ans = [it["answer"] for it in models["forget"][:2]]
    q2 = output_quality(ans, questions=qs, reference_model=models["target"], tokenizer=models["tok"])
    assert q2["mean_perplexity"] is not None and q2["mean_perplexity"] < 10  # the target knows them
    assert answer_accuracy(ans, ans)["accuracy"] == 1.0
