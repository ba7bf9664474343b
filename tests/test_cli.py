"""The ``wagle`` command line: config loading/overrides/errors, ``wagle demo`` end to end on a tiny
embedded benchmark (table, JSON, PNG; the cached models reused on the second run), and the
mask -> unlearn -> eval chain of the single-step jobs."""
import json
import os

import pytest
import torch

from wagle_ext.cli import main
from wagle_ext.config import (DemoConfig, EvalConfig, ScoreConfig, UnlearnConfig, load_config,
                              parse_overrides)

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

# A benchmark small enough to build in a few seconds (its models memorise little; the mechanics are
# what is tested here, the sizing of the default benchmark is measured by `make demo`).
TINY = ["--benchmark.n_authors", "10", "--benchmark.hidden_size", "32", "--benchmark.intermediate_size", "64",
        "--benchmark.train_steps", "40", "--benchmark.batch_size", "8", "--unlearn.steps", "2",
        "--unlearn.batch_size", "2", "--eval_batch_size", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("wagle_cache"))


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------

def test_defaults_and_overrides_dotted_and_typed():
    cfg = load_config(DemoConfig, None, ["--ratio", "0.2", "--benchmark.n_authors=12", "--objectives", "[npo]",
                                         "--unlearn.learning-rate", "5e-4", "--rebuild"])
    assert cfg.ratio == 0.2 and cfg.benchmark.n_authors == 12 and cfg.objectives == ["npo"]
    assert cfg.unlearn.learning_rate == 5e-4 and cfg.rebuild is True
    assert cfg.benchmark.hidden_size == DemoConfig().benchmark.hidden_size  # untouched defaults stay
    assert isinstance(load_config(DemoConfig, None, ["--ratio", "1"]).ratio, float)  # int accepted for float


@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_file_then_overrides(tmp_path, ext):
    body = {"ratio": 0.3, "masks": ["dense", "wagle"], "benchmark": {"n_authors": 8, "seed": 3},
            "unlearn": {"steps": 7}}
    p = tmp_path / f"c.{ext}"
    if ext == "json":
        p.write_text(json.dumps(body))
    else:
        import yaml

        p.write_text(yaml.safe_dump(body))
    cfg = load_config(DemoConfig, str(p), ["--unlearn.steps", "9", "--benchmark.seed", "4"])
    assert cfg.ratio == 0.3 and cfg.masks == ["dense", "wagle"]
    assert cfg.benchmark.n_authors == 8 and cfg.benchmark.seed == 4 and cfg.unlearn.steps == 9


@pytest.mark.parametrize("overrides,field", [
    (["--ratoi", "0.1"], "ratoi: unknown field"),
    (["--benchmark.n_autors", "3"], "benchmark.n_autors: unknown field"),
    (["--benchmark.n_authors", "many"], "benchmark.n_authors: expected int"),
    (["--benchmark.n_authors", "2.5"], "benchmark.n_authors: expected int"),
    (["--unlearn.steps", "true"], "unlearn.steps: expected int"),
    (["--ratio", "abc"], "ratio: expected float"),
    (["--ratio", "1.5"], "ratio: must be in"),
    (["--ratio", "0"], "ratio: must be in"),
    (["--objectives", "npo"], "objectives: expected list"),
    (["--objectives", "[graddiff, nonsense]"], r"objectives\[1\]: unknown objective"),
    (["--masks", "[dense, lottery]"], r"masks\[1\]: unknown mask kind"),
    (["--benchmark.forget_split", "forget50"], "benchmark.forget_split"),
    (["--benchmark.hidden_size", "30", "--benchmark.num_heads", "4"], "benchmark.hidden_size: must be a multiple"),
    (["--unlearn.learning_rate", "-1"], "unlearn.learning_rate: must be > 0"),
    (["--unlearn.grad_mode", "sparse"], "unlearn.grad_mode: must be dense or compact"),
    (["--unlearn.step_in_backward", "true"], "unlearn.step_in_backward: needs grad_mode compact"),
    (["--unlearn.rounding", "up"], "unlearn.rounding: must be one of"),
    (["--learning_rates", "[1e-3, -1]"], r"learning_rates\[1\]: must be a number > 0"),
    (["--seeds", "[]"], "seeds: must hold at least one value"),
    (["--unlearn.master_weights", "false", "--unlearn.rounding", "stochastic"], "unlearn.rounding: stochastic"),
    (["--unlearn.master_weights", "maybe"], "unlearn.master_weights: expected"),
    (["--benchmark", "3"], "benchmark: expected a mapping"),
    (["ratio", "0.1"], "expected --key value"),
])
def test_bad_demo_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        load_config(DemoConfig, None, overrides)


def test_bad_fields_of_other_jobs(tmp_path):
    with pytest.raises(ValueError, match="kind: unknown score kind"):
        load_config(ScoreConfig, None, ["--kind", "lottery"])
    with pytest.raises(ValueError, match="scope"):
        load_config(ScoreConfig, None, ["--scope", "per_layer"])
    with pytest.raises(ValueError, match="forget_target: must be one of answer, refusal"):
        load_config(ScoreConfig, None, ["--forget_target", "idk"])
    with pytest.raises(ValueError, match="forget_target: 'refusal' changes the forget gradient"):
        load_config(ScoreConfig, None, ["--kind", "magnitude", "--forget_target", "refusal"])
    with pytest.raises(ValueError, match="objective: unknown objective"):
        load_config(UnlearnConfig, None, ["--objective", "forgetful"])
    with pytest.raises(ValueError, match="mask: file not found"):
        load_config(UnlearnConfig, None, ["--mask", str(tmp_path / "nope.safetensors")])
    with pytest.raises(ValueError, match="model: not found"):
        load_config(EvalConfig, None, ["--model", str(tmp_path / "no_model")])
    with pytest.raises(ValueError, match="data.sourse: unknown field"):
        load_config(EvalConfig, None, ["--data.sourse", "x"])
    with pytest.raises(ValueError, match="config file not found"):
        load_config(DemoConfig, str(tmp_path / "missing.yaml"))
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(DemoConfig, str(p))


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c=x y", "--flag", "--d", "null", "--e", "{beta: 0.5}"]) == {
        "a": {"b": 1}, "c": "x y", "flag": True, "d": None, "e": {"beta": 0.5}}
    with pytest.raises(ValueError, match="both as a value and as a section"):
        parse_overrides(["--a", "1", "--a.b", "2"])


def test_cli_bad_config_exits_2_naming_the_field(capsys):
    assert main(["demo", "--benchmark.n_authors", "many"]) == 2
    err = capsys.readouterr().err
    assert "bad config" in err and "benchmark.n_authors" in err
    assert main(["frobnicate"]) == 2
    assert main(["demo", "--help"]) == 0
    assert "--benchmark.n_authors" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# wagle demo end to end
# ------------------------------------------------------------------------------------------------

def test_demo_end_to_end_and_cache_reuse(tmp_path, cache, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *TINY, "--cache_dir", cache, "--out", str(out), "--geffect_every", "1",
                 "--masks", "[dense, random, magnitude, wagle]",  # LoRA rows: tests/test_lora_cli.py
                 "--learning_rates", "[1e-2]", "--seeds", "[0]", "--eval_every", "1", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"results in {out}" in printed and "forget_quality" in printed and "model_utility" in printed
    for f in ("results.json", "table.txt", "forget_quality_vs_utility.png", "config.json",
              "masks/wagle_0.1.safetensors", "masks/wagle_mask.png", "runs/npo_wagle/TOFU_SUMMARY.json"):
        assert (out / f).is_file(), f
    assert (out / "forget_quality_vs_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    pairs = [(r["objective"], r["mask"]) for r in res["rows"]]
    assert sorted(pairs) == sorted((o, m) for o in ("graddiff", "npo") for m in ("dense", "random", "magnitude",
                                                                                  "wagle"))
    for r in res["rows"]:
        assert 0 <= r["forget_quality"] <= 1 and 0 <= r["model_utility"] <= 1, r
        assert 0 <= r["forget_Q_A_Prob"] <= 1 and r["ratio"] == (1.0 if r["mask"] == "dense" else 0.1)
    assert [r["mask"] for r in res["references"]] == ["(target model)", "(retain model)"]
    assert res["references"][1]["forget_quality"] == pytest.approx(1.0)  # the retain model vs itself
    # attack columns on every row, the G-effect of the dense and wagle runs, one figure per objective
    for r in res["rows"] + res["references"]:
        assert {"relearn0_acc", "relearn25_acc", "prompt_worst_acc", "degenerate"} <= set(r), r
    assert (out / "runs/npo_wagle/attacks.json").is_file()
    assert set(res["g_effect"]) == {"graddiff", "npo"} and set(res["g_effect"]["npo"]) == {"dense", "wagle"}
    assert res["g_effect"]["npo"]["wagle"]["records"] and (out / "g_effect_npo.png").is_file()
    for m in ("random", "magnitude", "wagle"):
        assert res["masks"][m]["density"] == pytest.approx(0.1, abs=1e-3)
    assert res["benchmark"]["reused_cache"] is False
    # the fronts: a sweep of the same grid (one lr, one seed here), its table printed and saved
    front = res["front"]
    assert front["n_runs"] == 8 and (out / "fronts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert front["table"] in printed and (out / "sweep" / "table.txt").read_text().strip() == front["table"].strip()
    assert [(r["objective"], r["method"]) for r in front["table_rows"]] == [
        (o, m) for o in ("graddiff", "npo") for m in ("dense", "random", "magnitude", "wagle(gamma=1e-06)")]
    assert set(next(iter(front["mask_diagnostics"].values()))["masks"]) == {
        "random @0.1", "magnitude @0.1", "wagle(gamma=1e-06) @0.1"}
    # the table printed is the table saved
    assert res["table"] in printed and (out / "table.txt").read_text().strip() == res["table"].strip()

    # Second run: the cached models are loaded, not retrained (same files, untouched).
    bdir = res["benchmark"]["directory"]
    weights = os.path.join(bdir, "target", "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    out2 = tmp_path / "demo2"
    assert main(["demo", *TINY, "--cache_dir", cache, "--out", str(out2), "--objectives", "[graddiff]",
                 "--masks", "[dense, wagle]", "--attacks", "false", "--geffect_every", "0", "--front", "false"]) == 0
    assert "reusing cached models" in capsys.readouterr().out
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["benchmark"]["reused_cache"] is True and res2["benchmark"]["directory"] == bdir
    assert os.stat(weights).st_mtime_ns == stamp
    assert [(r["objective"], r["mask"]) for r in res2["rows"]] == [("graddiff", "dense"), ("graddiff", "wagle")]
    # Same benchmark, same seeds: the reference evaluation and the runs are reproduced exactly.
    assert res2["references"][0]["forget_Q_A_Prob"] == res["references"][0]["forget_Q_A_Prob"]
    by = {(r["objective"], r["mask"]): r for r in res["rows"]}
    for r in res2["rows"]:
        assert r["forget_Q_A_Prob"] == pytest.approx(by[(r["objective"], r["mask"])]["forget_Q_A_Prob"], rel=1e-5)


def test_interrupted_build_is_not_reused(tmp_path):
    from wagle_ext.embedded_benchmark import BenchmarkConfig, load_or_build_benchmark

    cfg = BenchmarkConfig(n_authors=4, hidden_size=16, intermediate_size=32, train_steps=3, batch_size=4)
    d = tmp_path / f"embedded-{cfg.key()}"
    (d / "target").mkdir(parents=True)  # a partial directory without benchmark.json
    b = load_or_build_benchmark(cfg, cache_dir=str(tmp_path), log=lambda m: None)
    assert b.built and (d / "benchmark.json").is_file()
    assert BenchmarkConfig(n_authors=5).key() != BenchmarkConfig().key()


# ------------------------------------------------------------------------------------------------
# mask -> unlearn -> eval
# ------------------------------------------------------------------------------------------------

def test_mask_unlearn_eval_chain(tmp_path, cache, capsys):
    bench = TINY[:10]  # the --benchmark.* pairs
    common = [*bench, "--cache_dir", cache]
    mdir = tmp_path / "mask"
    assert main(["mask", *common, "--ratio", "0.05", "--out", str(mdir)]) == 0
    assert f"results in {mdir}" in capsys.readouterr().out
    from wagle_ext import MaskSet

    mask = MaskSet.load(str(mdir / "mask.safetensors"))
    assert mask.density == pytest.approx(0.05, abs=1e-3) and (mdir / "mask.png").is_file()
    assert json.loads((mdir / "mask_stats.json").read_text())

    sdir = tmp_path / "score"
    assert main(["score", *common, "--kind", "magnitude", "--out", str(sdir)]) == 0
    assert (sdir / "scores.safetensors").is_file()

    # scored on refusals (PO's forget loss): another mask, and its file says so -- also through --scores
    rdir, rsdir, rmdir = tmp_path / "mask_refusal", tmp_path / "score_refusal", tmp_path / "mask_refusal2"
    assert main(["mask", *common, "--ratio", "0.05", "--forget_target", "refusal", "--out", str(rdir)]) == 0
    refusal = MaskSet.load(str(rdir / "mask.safetensors"))
    assert refusal.metadata["forget_target"] == "refusal" and "forget_target" not in mask.metadata
    assert refusal.total_selected == mask.total_selected and mask.overlap(refusal)["jaccard"] < 1
    assert main(["score", *common, "--forget_target", "refusal", "--out", str(rsdir)]) == 0
    assert main(["mask", *common, "--ratio", "0.05", "--scores", str(rsdir), "--out", str(rmdir)]) == 0
    again = MaskSet.load(str(rmdir / "mask.safetensors"))
    assert again.metadata["forget_target"] == "refusal"
    assert all(torch.equal(again[n].to_bool(), refusal[n].to_bool()) for n in refusal)

    udir = tmp_path / "unlearn"
    assert main(["unlearn", *common, "--mask", str(mdir / "mask.safetensors"), "--objective", "npo",
                 "--unlearn.steps", "2", "--unlearn.batch_size", "2", "--unlearn.grad_mode", "compact",
                 "--out", str(udir)]) == 0
    assert (udir / "model" / "model.safetensors").is_file() and (udir / "train_log.json").is_file()

    # The unlearned weights differ from the target only where the mask selects.
    from transformers import AutoModelForCausalLM
    from wagle_ext.embedded_benchmark import BenchmarkConfig, load_or_build_benchmark

    cfg = load_config(UnlearnConfig, None, common)
    target = load_or_build_benchmark(cfg.benchmark, cache_dir=cache, log=lambda m: None).target
    new = AutoModelForCausalLM.from_pretrained(str(udir / "model"))
    masks = mask.for_model(new)
    moved = 0
    for (n, p), (_, q) in zip(target.named_parameters(), new.named_parameters()):
        sel = masks[n].to_bool()
        assert torch.equal(p[~sel], q[~sel]), n
        moved += int((p[sel] != q[sel]).sum())
    assert moved > 0

    # a split that the data does not have: one line naming the field, exit status 1
    capsys.readouterr()
    assert main(["eval", *common, "--data.source", "embedded", "--data.forget", "forget77",
                 "--out", str(tmp_path / "bad")]) == 1
    assert "data.forget" in capsys.readouterr().err
    # without a source, data.forget is a file: checked with the config (status 2)
    assert main(["eval", *common, "--data.forget", "forget77", "--out", str(tmp_path / "bad")]) == 2
    assert "data.forget: file not found" in capsys.readouterr().err

    edir = tmp_path / "eval"
    capsys.readouterr()
    # a model of one's own needs its data named: never silently the embedded benchmark's
    assert main(["eval", *common, "--model", str(udir / "model"), "--out", str(edir)]) == 2
    assert "data.forget" in capsys.readouterr().err
    assert main(["eval", *common, "--model", str(udir / "model"), "--data.source", "embedded",
                 "--out", str(edir)]) == 0
    summary = json.loads((edir / "TOFU_SUMMARY.json").read_text())
    assert {"forget_quality", "model_utility", "forget_Q_A_Prob"} <= set(summary)
    assert (edir / "TOFU_EVAL.json").is_file()


def test_bench_in_source_checkout_and_bad_script(capsys):
    from wagle_ext.cli import _source_root

    if _source_root() is None:
        assert main(["bench"]) == 0
        assert "source checkout" in capsys.readouterr().out
    else:
        assert main(["bench", "--scripts", "[bench_score.py, no_such_bench.py]"]) == 2
        assert "scripts[1]" in capsys.readouterr().err
