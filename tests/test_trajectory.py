"""Evaluation along the unlearning trajectory (``TrajectoryCallback``, ``wagle unlearn --eval_every``):
the metrics at a step equal a separate ``wagle eval`` of the checkpoint saved at that step, evaluating
leaves training bit-identical (even with an evaluator that draws random numbers and flips the model's
mode), and the generation-free ``fast`` metric set equals the full protocol's values of the same names."""
import copy
import json

import pytest
import torch

from wagle_ext.cli import main

pytest.importorskip("transformers")

TINY_BENCH = ["--benchmark.n_authors", "10", "--benchmark.hidden_size", "32", "--benchmark.intermediate_size", "64",
              "--benchmark.train_steps", "40", "--benchmark.batch_size", "8"]


EVAL = ["--batch_size", "64", "--max_new_tokens", "16"]  # `wagle eval`'s options as given to --eval.*


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("wagle_cache"))


@pytest.fixture(scope="module")
def bench(cache):
    from wagle_ext.app.config import UnlearnConfig, load_config
    from wagle_ext.app.embedded_benchmark import load_or_build_benchmark

    cfg = load_config(UnlearnConfig, None, TINY_BENCH)
    return load_or_build_benchmark(cfg.benchmark, cache_dir=cache, log=lambda m: None)


def _close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k


def test_metrics_at_steps_equal_a_separate_evaluation_of_the_checkpoint(cache, tmp_path, capsys):
    udir = tmp_path / "u"
    common = [*TINY_BENCH, "--cache_dir", cache]
    assert main(["unlearn", *common, "--unlearn.steps", "5", "--unlearn.batch_size", "2", "--unlearn.learning_rate",
                 "1e-2", "--eval_every", "2", "--unlearn.save_steps", "2", "--unlearn.save_total_limit", "5",
                 "--eval.batch_size", "64", "--eval.max_new_tokens", "16", "--out", str(udir)]) == 0
    traj = json.loads((udir / "trajectory.json").read_text())
    entries = {e["step"]: e for e in traj["entries"]}
    assert sorted(entries) == [0, 2, 4, 5]  # step 0, every 2 steps, and the last step
    assert all(e["seconds"] > 0 and e["train_seconds"] >= 0 for e in entries.values())
    assert entries[0]["train_seconds"] == 0 and entries[5]["train_seconds"] > entries[2]["train_seconds"]
    assert "trajectory" in json.loads((udir / "run.json").read_text())
    # the trajectory moves (the comparison below is not between copies of one point)
    assert entries[0]["metrics"]["forget_Q_A_Prob"] != entries[4]["metrics"]["forget_Q_A_Prob"]
    for step in (2, 4):
        edir = tmp_path / f"e{step}"
        assert main(["eval", *common, "--model", str(udir / "trainer" / f"checkpoint-{step}"), "--tokenizer",
                     str(udir / "model"), "--data.source", "embedded", *EVAL, "--out", str(edir)]) == 0
        summary = json.loads((edir / "TOFU_SUMMARY.json").read_text())
        assert {"forget_quality", "model_utility", "forget_Q_A_ROUGE"} <= set(summary)
        _close(entries[step]["metrics"], summary)
    # step 0 is the original model: `wagle eval` of the embedded target
    assert main(["eval", *common, *EVAL, "--out", str(tmp_path / "e0")]) == 0
    _close(entries[0]["metrics"], json.loads((tmp_path / "e0" / "TOFU_SUMMARY.json").read_text()))
    # the final entry is the saved model
    assert main(["eval", *common, "--model", str(udir / "model"), "--data.source", "embedded", *EVAL,
                 "--out", str(tmp_path / "e5")]) == 0
    _close(entries[5]["metrics"], json.loads((tmp_path / "e5" / "TOFU_SUMMARY.json").read_text()))


def _run(bench, tmp_path, name, callbacks=()):
    from wagle_ext.app.config import UnlearnSettings
    from wagle_ext.app.pipeline import _unlearn

    model = copy.deepcopy(bench.target)
    for m in model.modules():  # dropout: training draws from torch's RNG at every step
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.3
    u = UnlearnSettings(steps=7, batch_size=2, learning_rate=1e-2, seed=3)  # 5 forget items: 3 epochs
    _unlearn(model, bench.tokenizer, bench.data["forget10"], bench.data["retain90"], "graddiff", None, u,
             str(tmp_path / name), demo=True, callbacks=list(callbacks))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_evaluating_leaves_training_bit_identical(bench, tmp_path):
    import random

    import numpy as np
    import transformers

    from wagle_ext.unlearn.trajectory import TrajectoryCallback

    def greedy_evaluator(model):  # consumes every RNG and leaves the model in the other mode
        torch.rand(1000)
        random.random()
        np.random.rand(10)
        model.train(not model.training)
        return {"norm": float(sum(p.detach().float().norm() for p in model.parameters()))}

    class Unguarded(transformers.TrainerCallback):  # the same evaluator without the guard
        def on_step_end(self, args, state, control, model=None, **kw):
            greedy_evaluator(model)

    ref = _run(bench, tmp_path, "plain")
    cb = TrajectoryCallback(greedy_evaluator, every=1, path=str(tmp_path / "t.json"))
    guarded = _run(bench, tmp_path, "guarded", [cb])
    assert [e["step"] for e in cb.entries] == list(range(8))
    for k in ref:
        assert torch.equal(ref[k], guarded[k]), k
    # control: the unguarded evaluator does change the run (so the equality above is not vacuous)
    unguarded = _run(bench, tmp_path, "unguarded", [Unguarded()])
    assert any(not torch.equal(ref[k], unguarded[k]) for k in ref)


def test_eval_every_cli_run_has_the_weights_of_a_run_without(cache, tmp_path):
    common = [*TINY_BENCH, "--cache_dir", cache, "--unlearn.steps", "4", "--unlearn.batch_size", "2",
              "--unlearn.learning_rate", "1e-2"]
    assert main(["unlearn", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["unlearn", *common, "--eval_every", "1", "--eval.metrics", "fast", "--out", str(tmp_path / "b")]) == 0
    digest = [json.loads((tmp_path / d / "run.json").read_text())["weights_sha256_by_rank"] for d in "ab"]
    assert digest[0] == digest[1]
    entries = json.loads((tmp_path / "b" / "trajectory.json").read_text())["entries"]
    assert [e["step"] for e in entries] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "a" / "trajectory.json").exists()


def test_fast_metrics_equal_the_full_protocol(bench):
    from wagle_ext.app.pipeline import _trajectory_evaluator
    from wagle_ext.unlearn.trajectory import preserved_training_state

    sets = {k: bench.data[k] for k in ("forget10", "retain_eval", "world_facts")}
    kw = dict(reference=bench.retain_eval_path, batch_size=64, max_new_tokens=96)
    full = _trajectory_evaluator(bench.tokenizer, sets, "forget10", ["retain_eval", "world_facts"], metrics="all", **kw)
    fast = _trajectory_evaluator(bench.tokenizer, sets, "forget10", ["retain_eval", "world_facts"], metrics="fast",
                                 **kw)
    model = copy.deepcopy(bench.target).train()
    with preserved_training_state(model):
        a, b = full(model), fast(model)
    assert model.training  # restored
    assert "forget_Q_A_ROUGE" in a and not any("ROUGE" in k for k in b)
    shared = set(a) & set(b)
    assert {"forget_quality", "forget_Q_A_Prob", "forget_truth_ratio", "retain_Truth_Ratio",
            "wf_Q_A_Prob_normalised"} <= shared
    for k in shared:
        assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-15), k
    from wagle_ext.eval import model_utility

    comps = ["retain_Q_A_Prob", "retain_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Truth_Ratio"]
    assert b["model_utility_no_rouge"] == pytest.approx(model_utility([a[k] for k in comps]))


def test_callback_and_config_errors(capsys):
    from wagle_ext.unlearn.trajectory import TrajectoryCallback

    with pytest.raises(ValueError, match="every"):
        TrajectoryCallback(lambda m: {}, every=0)
    with pytest.raises(TypeError, match="callable"):
        TrajectoryCallback({}, every=1)
    assert main(["unlearn", "--eval.metrics", "rouge_only"]) == 2
    assert "eval.metrics: must be one of all, fast" in capsys.readouterr().err
    assert main(["unlearn", "--eval_every", "-1"]) == 2
    assert "eval_every: must be >= 0" in capsys.readouterr().err
