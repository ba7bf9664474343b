"""``wagle sweep`` on a tiny grid: the front PNG, the table and results.json are written, the numbers
in them come from the runs' trajectories, masks are shared across learning rates and seeds, and a
rerun skips the finished runs (a grown grid runs only the new ones)."""
import json
import os

import pytest
import torch

from wagle_ext.cli import main

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

TINY = ["--benchmark.n_authors", "10", "--benchmark.hidden_size", "32", "--benchmark.intermediate_size", "64",
        "--benchmark.train_steps", "40", "--benchmark.batch_size", "8", "--unlearn.steps", "4",
        "--unlearn.batch_size", "2", "--eval_every", "2", "--eval.batch_size", "64", "--eval.max_new_tokens", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def _runs(out):
    return {d: os.path.getmtime(os.path.join(out, "runs", d, "result.json")) for d in os.listdir(os.path.join(out, "runs"))}


def _mask_files(out: str) -> list:
    return [f for f in os.listdir(os.path.join(out, "masks")) if f.endswith(".safetensors")]


def test_mask_diagnostics_types_and_overlaps():
    import torch

    from wagle_ext.app.mask_diagnostics import format_mask_diagnostics, layer_type_of, mask_diagnostics
    from wagle_ext.masks import MaskSet

    assert [layer_type_of(n) for n in (
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight",
        "transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.ln_2.weight",
        "transformer.wte.weight", "base_model.model.model.layers.0.self_attn.v_proj.weight")] == [
        "embed", "attention", "mlp", "norm", "norm", "lm_head", "attention", "mlp", "norm", "embed", "attention"]
    shapes = {"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4),
              "model.layers.0.mlp.up_proj.weight": (8, 4)}
    a = MaskSet.from_bool_dict({n: torch.ones(s, dtype=torch.bool) if "q_proj" in n else torch.zeros(s, dtype=torch.bool)
                                for n, s in shapes.items()})
    b = MaskSet.from_bool_dict({n: torch.ones(s, dtype=torch.bool) if "proj" in n else torch.zeros(s, dtype=torch.bool)
                                for n, s in shapes.items()})
    d = mask_diagnostics({"a": a, "b": b, "c": b}, ratios={"a": 0.1, "b": 0.1, "c": 0.5})
    assert d["masks"]["a"]["per_type"]["attention"] == {"numel": 16, "selected": 16, "density": 1.0, "share": 1.0}
    assert d["masks"]["b"]["per_type"]["mlp"]["share"] == pytest.approx(32 / 48)
    (o,) = d["overlaps"]  # only the pair of equal ratio
    assert (o["a"], o["b"]) == ("a", "b") and o["fraction_of_a"] == 1.0 and o["jaccard"] == pytest.approx(16 / 48)
    assert o["expected_random"] == pytest.approx(48 / 88) and o["lift"] == pytest.approx(88 / 48)
    assert "overlap a / b" in format_mask_diagnostics(d)


def test_scopes_add_runs_without_changing_the_global_ones(tmp_path):
    from wagle_ext.app.config import SweepConfig, load_config
    from wagle_ext.app.sweep import _specs

    base = ["--masks", "[dense, random, wagle]", "--seeds", "[0]"]
    one = load_config(SweepConfig, None, base)
    two = load_config(SweepConfig, None, [*base, "--scopes", "[global, per_tensor]"])
    a, b = _specs(one, str(tmp_path)), _specs(two, str(tmp_path))
    assert {sp["key"] for sp in a} < {sp["key"] for sp in b}  # resuming an older sweep redoes nothing
    assert sorted(sp["settings"]["method"] for sp in b) == [
        "dense", "random", "random/per_tensor", "wagle(gamma=1e-06)", "wagle(gamma=1e-06)/per_tensor"]
    three = load_config(SweepConfig, None, [*base, "--rescores", "[0, 5]"])
    c = _specs(three, str(tmp_path))
    assert {sp["key"] for sp in a} < {sp["key"] for sp in c}
    assert sorted(sp["settings"]["method"] for sp in c) == [
        "dense", "random", "random+rescore5", "wagle(gamma=1e-06)", "wagle(gamma=1e-06)+rescore5"]
    assert {sp["settings"]["unlearn"].get("rescore_every", 0) for sp in c} == {0, 5}


def test_forget_targets_add_runs_without_changing_the_answer_ones(tmp_path):
    from wagle_ext.app.config import SweepConfig, load_config
    from wagle_ext.app.sweep import _specs

    base = ["--masks", "[dense, random, wagle]", "--seeds", "[0]"]
    a = _specs(load_config(SweepConfig, None, base), str(tmp_path))
    b = _specs(load_config(SweepConfig, None, [*base, "--forget_targets", "[answer, refusal]"]), str(tmp_path))
    assert {sp["key"] for sp in a} < {sp["key"] for sp in b}
    # random masks take no forget gradient: one per grid point, not one per target
    assert sorted(sp["settings"]["method"] for sp in b) == [
        "dense", "random", "wagle(gamma=1e-06)", "wagle(gamma=1e-06)@refusal"]
    assert [sp["settings"].get("forget_target") for sp in b if "@" in sp["settings"]["method"]] == ["refusal"]


def test_lora_kinds_are_an_axis_of_the_grid(tmp_path):
    from wagle_ext.app.config import SweepConfig, load_config
    from wagle_ext.app.sweep import _specs

    base = ["--masks", "[dense, wagle]", "--seeds", "[0]", "--ratios", "[0.05, 0.1]"]
    a = _specs(load_config(SweepConfig, None, base), str(tmp_path))
    cfg = load_config(SweepConfig, None, ["--masks", "[dense, wagle, lora, lora+fila, lora+wagle]", "--seeds", "[0]",
                                          "--ratios", "[0.05, 0.1]", "--lora_rank", "4"])
    b = _specs(cfg, str(tmp_path))
    assert {sp["key"] for sp in a} < {sp["key"] for sp in b}
    got = sorted((sp["settings"]["method"], sp["settings"]["ratio"]) for sp in b)
    assert got == [("dense", 1.0), ("lora(r=4)", 1.0), ("lora+fila(r=4)", 1.0), ("lora+wagle(r=4, gamma=1e-06)", 0.05),
                   ("lora+wagle(r=4, gamma=1e-06)", 0.1), ("wagle(gamma=1e-06)", 0.05), ("wagle(gamma=1e-06)", 0.1)]
    assert {sp["settings"].get("lora_rank") for sp in b if "lora" in sp["settings"]["mask"]} == {4}


def test_sweep_lora_runs_adapters_placed_by_the_wagle_mask(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    args = ["sweep", *TINY, "--cache_dir", str(tmp_path / "cache"), "--masks", "[lora, lora+wagle]", "--lora_rank", "2",
            "--ratios", "[0.1]", "--learning_rates", "[3e-2]", "--seeds", "[0]", "--out", out]
    assert main(args) == 0
    res = json.loads(open(os.path.join(out, "results.json")).read())
    assert len(_mask_files(out)) == 1  # the WAGLE mask that places lora+wagle's adapters (no mask of its own)
    target = next(iter(res["references"].values()))["target"]["metrics"]
    runs = {r["settings"]["mask"]: json.load(open(os.path.join(out, "runs", r["key"], "result.json")))
            for r in res["runs"]}
    assert set(runs) == {"lora", "lora+wagle"}
    for kind, r in runs.items():
        lo = r["lora"]
        assert lo["rank"] == 2 and 0 < lo["trainable_fraction"] < 1 and lo["adapted_modules"] >= 1
        assert r["trajectory"][-1]["metrics"]["forget_Q_A_Prob"] != target["forget_Q_A_Prob"]  # it trained
    assert runs["lora+wagle"]["lora"]["placement_source"] == "mask"
    assert runs["lora+wagle"]["lora"]["adapted_modules"] < runs["lora"]["lora"]["adapted_modules"]
    table = open(os.path.join(out, "table.txt")).read()
    assert "lora(r=2)" in table and "lora+wagle(r=2, gamma=1e-06)" in table and "ratio 0.1, lr 0.03" in table


def test_masks_scored_on_refusals_are_the_po_forget_gradients(tmp_path, capsys):
    """forget_targets [answer, refusal]: two WAGLE masks, the refusal one equal to a mask scored by the
    library on refusal_targets (the forget loss of PO), recorded in its metadata and diagnostics."""
    from torch.utils.data import DataLoader

    from wagle_ext import MaskSet, QACollator, build_mask, refusal_targets, score_model
    from wagle_ext.app.config import SweepConfig, load_config
    from wagle_ext.app.sweep import _context

    out = str(tmp_path / "sweep")
    args = [*TINY, "--cache_dir", str(tmp_path / "cache"), "--objectives", "[po]", "--masks", "[wagle]",
            "--forget_targets", "[answer, refusal]", "--ratios", "[0.1]", "--learning_rates", "[1e-2]",
            "--seeds", "[0]", "--mask_seed", "3", "--out", out]
    assert main(["sweep", *args]) == 0
    res = json.loads(open(os.path.join(out, "results.json")).read())
    assert sorted(r["settings"]["method"] for r in res["runs"]) == ["wagle(gamma=1e-06)", "wagle(gamma=1e-06)@refusal"]
    assert {row["method"] for row in res["table_rows"]} == {"wagle(gamma=1e-06)", "wagle(gamma=1e-06)@refusal"}
    masks = {MaskSet.load(os.path.join(out, "masks", f)).metadata.get("forget_target", "answer"):
             MaskSet.load(os.path.join(out, "masks", f)) for f in _mask_files(out)}
    assert set(masks) == {"answer", "refusal"}
    (diag,) = res["mask_diagnostics"].values()
    (o,) = diag["overlaps"]
    assert {o["a"], o["b"]} == {"wagle(gamma=1e-06) @0.1", "wagle(gamma=1e-06)@refusal @0.1"}
    assert o["fraction_of_a"] < 1.0  # scored on other targets, the masks differ

    cfg = load_config(SweepConfig, None, args)
    ctx = _context(cfg, cfg.benchmark.seed, str(tmp_path / "ctx"))
    coll = QACollator(ctx.tok)
    fl = DataLoader(refusal_targets(ctx.data["forget"], ctx.data["retain"], seed=3), batch_size=8, collate_fn=coll)
    rl = DataLoader(ctx.data["retain"], batch_size=8, collate_fn=coll)
    expected = build_mask(score_model(ctx.model, fl, rl, kind="wagle", gamma=1e-6, seed=3), 0.1, model=ctx.model)
    for name, m in expected.items():
        assert torch.equal(masks["refusal"][name].to_bool(), m.to_bool()), name


def test_sweep_tiny_grid_front_table_results_and_rerun(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    args = ["sweep", *TINY, "--cache_dir", str(tmp_path / "cache"), "--masks", "[dense, wagle]", "--ratios", "[0.1]",
            "--learning_rates", "[1e-2]", "--seeds", "[0, 1]", "--out", out]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"results in {out}" in text
    for f in ("fronts.png", "table.txt", "results.json", "run.json", "log.txt"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert os.path.getsize(os.path.join(out, "fronts.png")) > 10_000
    res = json.loads(open(os.path.join(out, "results.json")).read())
    assert res["n_runs"] == 4 and res["n_skipped"] == 0 and res["utility_key"] == "model_utility"
    assert len(_mask_files(out)) == 1  # the wagle mask, shared by both seeds
    # its diagnostics: layer-type shares (adding up to 1) and the dominant term of the WAGLE score
    (diag,) = res["mask_diagnostics"].values()
    (label, d), = diag["masks"].items()
    assert label == "wagle(gamma=1e-06) @0.1" and d["terms"]["dominant"] in ("weight", "retain_gradient")
    assert sum(v["share"] for v in d["per_type"].values()) == pytest.approx(1.0)
    assert {"embed", "attention", "mlp", "norm"} <= set(d["per_type"]) and diag["overlaps"] == []
    assert json.load(open(os.path.join(out, "masks", "diagnostics.json"))) == res["mask_diagnostics"]
    # every run: trajectory at steps 2 and 4 (step 0 is the original model, evaluated once)
    for r in res["runs"]:
        assert [e["step"] for e in r["trajectory"]] == [2, 4]
        assert {"forget_quality", "model_utility", "forget_Q_A_ROUGE"} <= set(r["trajectory"][-1]["metrics"])
    target = next(iter(res["references"].values()))["target"]["metrics"]
    # the table's numbers are the runs' own: best FQ over the points keeping >= 95% of the original utility
    table = open(os.path.join(out, "table.txt")).read()
    assert table.strip() == res["table"].strip() and "FQ @ MU>=95%" in table and "FQ @ MU>=90%" in table
    for row in res["table_rows"]:
        runs = [r for r in res["runs"] if r["settings"]["method"] == row["method"]]
        assert len(runs) == 2
        per_seed = []
        for r in sorted(runs, key=lambda r: r["settings"]["seed"]):
            pts = [target] + [e["metrics"] for e in r["trajectory"]]
            per_seed.append(max(m["forget_quality"] for m in pts if m["model_utility"] >= 0.95 * target["model_utility"]))
        assert row["0.95"]["per_seed"] == pytest.approx(per_seed)
        assert row["0.95"]["mean"] == pytest.approx(sum(per_seed) / 2)
        assert row["method"] in table and f"{row['0.95']['mean']:.3g}" in table
    curve = res["settings"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4] and curve[0]["utility_mean"] == target["model_utility"]

    # rerun: nothing is redone
    before = _runs(out)
    assert main(args) == 0
    assert "4 runs (4 done before, skipped)" in capsys.readouterr().out
    assert _runs(out) == before
    assert json.loads(open(os.path.join(out, "results.json")).read())["n_skipped"] == 4
    # a grown grid (one more seed) runs only the new runs, and reuses the mask
    assert main([*args, "--seeds", "[0, 1, 2]"]) == 0
    assert "6 runs (4 done before, skipped)" in capsys.readouterr().out
    after = _runs(out)
    assert len(after) == 6 and all(after[k] == v for k, v in before.items())
    assert len(_mask_files(out)) == 1
    res = json.loads(open(os.path.join(out, "results.json")).read())
    assert all(len(row["0.9"]["per_seed"]) == 3 for row in res["table_rows"])


def test_parallel_workers_give_the_runs_of_one_process(tmp_path):
    """--workers 2 (spawned processes): the same run keys and bit-identical trajectories as in one process."""
    common = ["sweep", *TINY, "--cache_dir", str(tmp_path / "cache"), "--masks", "[dense, wagle]", "--ratios", "[0.1]",
              "--learning_rates", "[1e-2]", "--seeds", "[0]"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main([*common, "--out", one]) == 0
    assert main([*common, "--workers", "2", "--out", two]) == 0
    runs = [{r["key"]: r["trajectory"] for r in json.load(open(os.path.join(d, "results.json")))["runs"]}
            for d in (one, two)]
    assert len(runs[0]) == 2 and runs[0].keys() == runs[1].keys()
    for key, traj in runs[0].items():
        assert [e["metrics"] for e in traj] == [e["metrics"] for e in runs[1][key]], key


@pytest.mark.parametrize("overrides,field", [
    (["--masks", "[dense, lottery]"], r"masks\[1\]: unknown mask kind"),
    (["--lora_rank", "0"], "lora_rank: must be an int >= 1"),
    (["--gammas", "[0]"], r"gammas\[0\]: must be a number > 0"),
    (["--ratios", "[0.1, 2]"], r"ratios\[1\]: must be in"),
    (["--learning_rates", "[]"], "learning_rates: must hold at least one value"),
    (["--seeds", "[0, 0]"], "seeds: holds a value twice"),
    (["--eval_every", "0"], "eval_every: must be >= 1"),
    (["--scopes", "[global, per_layer]"], r"scopes\[1\]: must be global, per_tensor or per_row"),
    (["--rescores", "[0, -1]"], r"rescores\[1\]: must be an int >= 0"),
    (["--unlearn.rescore_every", "5"], "unlearn.rescore_every: is a grid axis in a sweep"),
    (["--workers", "0"], "workers: must be >= 1"),
    (["--forget_targets", "[answer, idk]"], r"forget_targets\[1\]: must be one of answer, refusal"),
    (["--masks", "[dense, random]", "--forget_targets", "[refusal]"], r"forget_targets\[0\]: 'refusal' changes"),
    (["--forget_targets", "[answer, answer]"], "forget_targets: holds a value twice"),
    (["--eval.metrics", "some"], "eval.metrics: must be one of all, fast"),
])
def test_bad_sweep_fields_are_named(overrides, field, capsys):
    import re

    assert main(["sweep", *overrides]) == 2
    assert re.search(field, capsys.readouterr().err)


def test_config_reads_numbers_yaml_reads_as_strings():
    from wagle_ext.app.config import SweepConfig, load_config

    cfg = load_config(SweepConfig, None, ["--learning_rates", "[1e-3, 5e-4]", "--gammas", "[1e-6, 1, fisher]"])
    assert cfg.learning_rates == [1e-3, 5e-4] and cfg.gammas == [1e-6, 1.0, "fisher"]
