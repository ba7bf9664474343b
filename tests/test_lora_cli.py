"""``wagle unlearn --lora.*`` and ``wagle score --kind fisher`` (issue 17) on a tiny model of one's own:
the exported folders reload as the trained model, the WAGLE placement keeps its budget, bad
combinations are one-line config errors."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from wagle_ext.cli import main  # noqa: E402

from tiny_models import TINY_QA, char_tokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_user")
    tok = char_tokenizer()
    model = tiny_llama(len(tok), hidden=16, layers=1, heads=2, intermediate=32)
    model.save_pretrained(d / "my-llama")
    tok.save_pretrained(d / "my-llama")
    qa = [{"question": f"{i}: {q['question']}", "answer": q["answer"]} for i, q in enumerate(TINY_QA * 2)]
    (d / "forget.json").write_text(json.dumps(qa[:6]))
    (d / "retain.json").write_text(json.dumps(qa[6:]))
    return d


def _common(d) -> list:
    return ["--model", str(d / "my-llama"), "--data.forget", str(d / "forget.json"), "--data.retain",
            str(d / "retain.json"), "--device", "cpu", "--unlearn.steps", "2", "--unlearn.batch_size", "2",
            "--unlearn.learning_rate", "0.01"]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_unlearn_with_fila_adapters_saves_folders_that_reload_as_the_trained_model(user, tmp_path):
    from transformers import AutoModelForCausalLM

    from wagle_ext.lora import load_adapter_with_base

    out = tmp_path / "run"
    assert main(["unlearn", *_common(user), "--objective", "npo", "--lora.rank", "4", "--lora.init", "fila",
                 "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())["lora"]
    # 7 linears of one decoder layer (hidden 16, intermediate 32), rank 4: 4 * (in + out) each
    assert info["init"] == "fila" and info["adapted_modules"] == 7
    assert info["trainable"] == 4 * (4 * (16 + 16) + 3 * (16 + 32))
    ids = torch.tensor([[5, 17, 30, 42, 8, 9, 60]])
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    pair = load_adapter_with_base(str(out / "adapter"))
    assert float((_logits(merged, ids) - _logits(pair, ids)).abs().max()) <= 1e-5
    original = AutoModelForCausalLM.from_pretrained(user / "my-llama")
    assert float((_logits(merged, ids) - _logits(original, ids)).abs().max()) > 1e-4  # it did train
    # the base under the adapter is FILA's residual, not the original weights
    base = AutoModelForCausalLM.from_pretrained(out / "adapter" / "base")
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(base.named_parameters())[w], dict(original.named_parameters())[w])
    assert "LoRA rank 4 (fila init)" in (out / "log.txt").read_text()


def test_fisher_file_and_wagle_placement_within_the_budget(user, tmp_path):
    from wagle_ext.lora import FisherImportance

    assert main(["score", *_common(user)[:8], "--kind", "fisher", "--out", str(tmp_path / "fisher")]) == 0
    imp = FisherImportance.load(str(tmp_path / "fisher" / "fisher.safetensors"))
    assert len(imp.forget) == 7 and imp.forget_tokens > 0 and imp.retain_tokens > 0
    out = tmp_path / "run"
    assert main(["unlearn", *_common(user), "--objective", "ihl", "--lora.rank", "4", "--lora.init", "fila",
                 "--lora.importances", str(tmp_path / "fisher" / "fisher.safetensors"), "--lora.targets", "wagle",
                 "--lora.budget", "700", "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())["lora"]
    assert 0 < info["trainable"] <= 700 and info["budget"] == 700
    assert info["adapted_modules"] == len(info["placement"]) < 7


@pytest.mark.parametrize("args,field", [
    (["--lora.init", "fila"], "lora.init"),                           # no --lora.rank
    (["--lora.rank", "4", "--lora.targets", "middle"], "lora.targets"),
    (["--lora.rank", "4", "--lora.budget", "100"], "lora.budget"),    # budget only with targets wagle
    (["--lora.rank", "-1"], "lora.rank"),
])
def test_bad_lora_settings_are_config_errors(user, tmp_path, capsys, args, field):
    capsys.readouterr()
    assert main(["unlearn", *_common(user), *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    assert not (tmp_path / "x").exists()


def test_demo_lora_rows(tmp_path):
    """The demo's LoRA rows on a tiny benchmark (mechanics only: 2 steps): FILA on every decoder linear, and
    WAGLE-placed adapters within the trainable-parameter count of rank-r adapters on every decoder linear."""
    out = tmp_path / "demo"
    tiny = ["--benchmark.n_authors", "10", "--benchmark.hidden_size", "32", "--benchmark.intermediate_size", "64",
            "--benchmark.train_steps", "40", "--benchmark.batch_size", "8", "--unlearn.steps", "2",
            "--unlearn.batch_size", "2", "--eval_batch_size", "64"]
    assert main(["demo", *tiny, "--cache_dir", str(tmp_path / "cache"), "--out", str(out), "--objectives", "[npo]",
                 "--masks", "[lora+fila, lora+wagle]", "--lora_rank", "4", "--attacks", "false",
                 "--geffect_every", "0", "--learning_rates", "[1e-2]", "--seeds", "[0]", "--workers", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["mask"]: r for r in res["rows"]}
    assert set(rows) == {"lora+fila", "lora+wagle"}
    all_linears = 2 * 4 * (4 * (32 + 32) + 3 * (32 + 64))  # 2 layers, rank 4
    fila, wagle = rows["lora+fila"]["lora"], rows["lora+wagle"]["lora"]
    assert fila["init"] == "fila" and fila["trainable"] == all_linears and fila["adapted_modules"] == 14
    assert wagle["budget"] == all_linears and 0 < wagle["trainable"] <= all_linears
    for r in rows.values():
        assert 0 < r["ratio"] < 1 and 0 <= r["model_utility"] <= 1 and r["lora"]["rank"] == 4
    assert "lora+wagle" in res["table"]
    # the fronts sweep the LoRA rows too (one lr and seed here)
    assert [r["method"] for r in res["front"]["table_rows"]] == ["lora+fila(r=4)", "lora+wagle(r=4, gamma=1e-06)"]


def test_unlearn_help_lists_the_lora_section(capsys):
    assert main(["unlearn", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lora.rank 0" in out and '--lora.init "default"' in out and "--lora.fisher_batch_size 4" in out
