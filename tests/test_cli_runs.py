"""The ``wagle`` command line on a user's own model and data files (issue 14): safe output directories
(``--out`` new or empty unless ``--overwrite``, ``<out>.partial`` renamed on success, ``run.json`` and
``log.txt``), one-line errors with exit status 1 and no partial output, ``wagle mask --scores``,
devices, checkpoints and ``--resume`` after ``kill -9`` (bit-identical weights), ``accelerate launch``
with two CPU processes, and the README's worked example."""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from wagle_ext.cli import main

from tiny_models import TINY_QA, char_tokenizer, tiny_llama

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def _qa(n: int, tag: str) -> list:
    base = [dict(q) for q in TINY_QA]
    out = []
    for i in range(n):
        q, a = base[i % len(base)]["question"], base[i % len(base)]["answer"]
        other = base[(i + 1) % len(base)]["answer"]
        out.append({"question": f"{tag} {i}: {q}", "answer": a, "paraphrased_answer": a.lower(),
                    "perturbed_answer": [other, other.upper()]})
    return out


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A user's own model (save_pretrained folder) and QA files, as the README's example has them."""
    d = tmp_path_factory.mktemp("user")
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=16, layers=1, heads=2, intermediate=32)
    model.save_pretrained(d / "my-llama")
    tok.save_pretrained(d / "my-llama")
    (d / "forget.json").write_text(json.dumps(_qa(6, "forget")))
    with open(d / "retain.jsonl", "w") as f:
        for it in _qa(10, "retain"):
            f.write(json.dumps(it) + "\n")
    return d


def _common(d) -> list:
    return ["--model", str(d / "my-llama"), "--data.forget", str(d / "forget.json"),
            "--data.retain", str(d / "retain.jsonl"), "--device", "cpu"]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------
# safe output directories
# ------------------------------------------------------------------------------------------------

def test_score_mask_unlearn_write_run_records_and_refuse_to_overwrite(user_files, tmp_path, capsys):
    d = user_files
    out = tmp_path / "mask"
    assert main(["mask", *_common(d), "--kind", "magnitude", "--ratio", "0.1", "--out", str(out)]) == 0
    assert not (tmp_path / "mask.partial").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["job"] == "mask" and run["versions"]["torch"] == torch.__version__
    assert run["config"]["ratio"] == 0.1 and "select" in run["timings_s"]
    log = (out / "log.txt").read_text()
    assert "[mask]" in log and "weights selected" in log
    before = (out / "mask.safetensors").read_bytes()

    capsys.readouterr()
    assert main(["mask", *_common(d), "--kind", "magnitude", "--ratio", "0.2", "--out", str(out)]) == 1
    assert "--overwrite" in _err_line(capsys)
    assert (out / "mask.safetensors").read_bytes() == before  # untouched
    assert main(["mask", *_common(d), "--kind", "magnitude", "--ratio", "0.2", "--out", str(out),
                 "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["ratio"] == 0.2
    assert not (tmp_path / "mask.old").exists() and not (tmp_path / "mask.partial").exists()

    # an empty directory is fine without --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["mask", *_common(d), "--kind", "magnitude", "--out", str(empty)]) == 0


def test_mask_from_precomputed_scores(user_files, tmp_path, capsys):
    d = user_files
    sdir = tmp_path / "score"
    assert main(["score", *_common(d), "--kind", "wagle", "--ratio", "0.1", "--out", str(sdir)]) == 0
    assert (sdir / "scores.safetensors").is_file()
    mdir = tmp_path / "mask"
    capsys.readouterr()
    # no data given: the scores are all `wagle mask --scores` needs
    assert main(["mask", "--scores", str(sdir / "scores.safetensors"), "--ratio", "0.1", "--out", str(mdir)]) == 0
    from wagle_ext import MaskSet

    a, b = MaskSet.load(str(sdir / "mask.safetensors")), MaskSet.load(str(mdir / "mask.safetensors"))
    assert a.names() == b.names() and all(torch.equal(a[n].bits, b[n].bits) for n in a.names())
    # with the model given, the mask is bound to it (its fingerprint); a job's folder stands for its file
    assert main(["mask", "--scores", str(sdir), "--model", str(d / "my-llama"),
                 "--ratio", "0.1", "--out", str(tmp_path / "mask2")]) == 0
    assert main(["unlearn", *_common(d), "--mask", str(tmp_path / "mask2"), "--unlearn.steps", "1",
                 "--out", str(tmp_path / "u")]) == 0
    capsys.readouterr()
    assert main(["unlearn", *_common(d), "--mask", str(tmp_path), "--out", str(tmp_path / "u2")]) == 2
    assert "a mask file, or the folder" in _err_line(capsys)
    # a file that is not a scores file: one line, exit 1, nothing written
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(300))
    capsys.readouterr()
    assert main(["mask", "--scores", str(bad), "--out", str(tmp_path / "m3")]) == 1
    assert str(bad) in _err_line(capsys)
    assert not (tmp_path / "m3").exists() and not (tmp_path / "m3.partial").exists()


# ------------------------------------------------------------------------------------------------
# bad inputs: one line on stderr, exit status 1, no partial output
# ------------------------------------------------------------------------------------------------

def _bad_cases(d, tmp_path):
    """(name, argv, text the error line must contain) for every bad input of the issue."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    truncated = tmp_path / "truncated.safetensors"
    bad_eval = tmp_path / "bad_eval.json"
    bad_eval.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    other_tok = tmp_path / "big-vocab"
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(500)}
    vocab.update({"<unk>": 500, "<|pad|>": 501, "<|eos|>": 502})
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<|pad|>",
                            eos_token="<|eos|>").save_pretrained(other_tok)
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    common = _common(d)
    return [
        ("unknown objective_kwargs key", ["unlearn", *common, "--objective", "npo",
                                          "--objective_kwargs", "{betta: 0.1}"], "betta"),
        ("random file as --mask", ["unlearn", *common, "--mask", str(garbage)], str(garbage)),
        ("truncated mask", ["unlearn", *common, "--mask", str(truncated)], str(truncated)),
        ("tokenizer does not fit the model", ["unlearn", *common, "--tokenizer", str(other_tok)], "tokenizer"),
        ("empty forget set", ["unlearn", *common[:2], "--data.forget", str(empty), *common[4:]], "data.forget"),
        ("non-writable out", ["mask", *common, "--kind", "magnitude", "--out", str(ro / "sub" / "x")], str(ro)),
        ("malformed retain_model_eval", ["eval", *common, "--retain_model_eval", str(bad_eval),
                                         "--max_new_tokens", "4"], str(bad_eval)),
        ("ratio selecting nothing", ["mask", *common, "--kind", "magnitude", "--ratio", "1e-9"], "0 of"),
        ("cuda without CUDA", ["unlearn", *common[:-1], "cuda"], "cuda"),
    ]


def test_bad_inputs_end_in_one_line_exit_1_and_no_output(user_files, tmp_path, capsys):
    d = user_files
    # a valid mask, cut short, for the "truncated mask" case
    good = tmp_path / "good"
    assert main(["mask", *_common(d), "--kind", "magnitude", "--out", str(good)]) == 0
    raw = (good / "mask.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    cases = _bad_cases(d, tmp_path)
    if torch.cuda.is_available():
        cases = [c for c in cases if c[0] != "cuda without CUDA"]
    if os.geteuid() == 0:  # root writes anywhere
        cases = [c for c in cases if c[0] != "non-writable out"]
    failures = []
    for i, (name, argv, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        if "--out" not in argv:
            argv = [*argv, "--out", str(out)]
        capsys.readouterr()
        status = main(argv)
        err = capsys.readouterr().err.strip()
        lines = err.splitlines()
        problems = []
        if status != 1:
            problems.append(f"exit status {status}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        if needle.lower() not in err.lower():
            problems.append(f"{needle!r} not named")
        if out.exists() or (tmp_path / f"out{i}.partial").exists():
            problems.append("partial output left")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {err[:300]}")
    assert not failures, "\n".join(failures)


def test_model_without_data_is_an_error_naming_the_field(user_files, capsys):
    assert main(["unlearn", "--model", str(user_files / "my-llama")]) == 2
    assert "data.forget" in _err_line(capsys)


# ------------------------------------------------------------------------------------------------
# checkpoints and --resume after kill -9
# ------------------------------------------------------------------------------------------------

def _wagle(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "wagle_ext.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model", "model.safetensors"))


@pytest.mark.parametrize("grad_mode", ["dense", "compact"])
def test_resume_after_sigkill_is_bit_identical(user_files, tmp_path, grad_mode, capsys):
    d = user_files
    mdir = tmp_path / "mask"
    assert main(["mask", *_common(d), "--kind", "magnitude", "--ratio", "0.3", "--out", str(mdir)]) == 0
    steps = 30
    args = ["unlearn", *_common(d), "--mask", str(mdir / "mask.safetensors"), "--objective", "npo",
            "--unlearn.steps", str(steps), "--unlearn.batch_size", "2", "--unlearn.learning_rate", "1e-2",
            "--unlearn.weight_decay", "0.1", "--unlearn.grad_mode", grad_mode, "--unlearn.save_steps", "2"]
    ref = tmp_path / "uninterrupted"
    assert main([*args, "--out", str(ref)]) == 0

    killed = tmp_path / "killed"
    partial = tmp_path / "killed.partial"
    p = _wagle([*args, "--out", str(killed)])
    deadline = time.time() + 300
    ckpt = None
    while time.time() < deadline and p.poll() is None:
        ck = partial / "trainer"
        if ck.is_dir():
            done = [c for c in ck.iterdir() if (c / "trainer_state.json").is_file()]
            if done:
                ckpt = done[0]
                break
        time.sleep(0.01)
    if p.poll() is not None:
        pytest.fail(f"the run finished (status {p.returncode}) before a checkpoint was seen; raise steps")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert ckpt is not None and not killed.exists() and partial.is_dir()

    # a plain rerun refuses to touch the interrupted run
    assert main([*args, "--out", str(killed)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((killed / "run.json").read_text())["resumed"] is True


# ------------------------------------------------------------------------------------------------
# accelerate launch, 2 CPU processes
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(user_files, tmp_path):
    pytest.importorskip("accelerate")
    d = user_files
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # accelerate's own --cpu flag starts ONE process unless mpirun is installed; --multi_gpu starts the
    # processes through torchrun whatever the device, and --device cpu makes them use gloo
    # the shipped examples/accelerate_ddp.yaml is --multi_gpu --num_processes 2 (README, Multi-GPU)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "examples", "accelerate_ddp.yaml"),
           "--main_process_port", str(_free_port()), "-m", "wagle_ext.cli", "unlearn", *_common(d),
           "--objective", "graddiff", "--unlearn.steps", "4", "--unlearn.batch_size", "2", "--out", str(out)]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    digests = run["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (out / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# the README's worked example
# ------------------------------------------------------------------------------------------------

def _readme_example() -> list:
    text = open(os.path.join(REPO, "README.md")).read()
    m = re.search(r"<!-- worked-example:start -->\s*```bash\n(.*?)```\s*<!-- worked-example:end -->", text, re.S)
    assert m, "README.md lost its worked example (between the worked-example markers)"
    cmds = []
    for line in m.group(1).replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            cmds.append(shlex.split(line))
    return cmds


def test_readme_worked_example_runs(user_files, tmp_path, monkeypatch, capsys):
    """The README's "Bring your own model and data" commands, run as written in a folder holding the
    files they name (a tiny model here)."""
    import shutil

    d = user_files
    shutil.copytree(d / "my-llama", tmp_path / "my-llama")
    shutil.copy(d / "forget.json", tmp_path / "forget.json")
    shutil.copy(d / "retain.jsonl", tmp_path / "retain.jsonl")
    monkeypatch.chdir(tmp_path)
    cmds = _readme_example()
    assert [c[:2] for c in cmds] == [["wagle", "score"], ["wagle", "mask"], ["wagle", "unlearn"], ["wagle", "eval"]]
    for c in cmds:
        assert main(c[1:]) == 0, (c, capsys.readouterr().err)
    summary = json.loads((tmp_path / "runs" / "eval" / "TOFU_SUMMARY.json").read_text())
    assert "forget_Q_A_Prob" in summary and "model_utility" in summary
    # progress of every phase lands in the run's log as plain lines with an ETA (stdout is no TTY here)
    score_log = (tmp_path / "runs" / "score" / "log.txt").read_text()
    assert re.search(r"forget gradients: \d+/\d+ \(\d+%\) .* ETA", score_log), score_log
    unlearn_log = (tmp_path / "runs" / "unlearn" / "log.txt").read_text()
    assert re.search(r"step 10/10 .*loss .* ETA", unlearn_log) and "trainable" in unlearn_log, unlearn_log
    assert "\r" not in score_log + unlearn_log


# ------------------------------------------------------------------------------------------------
# wagle eval on TOFU-format files, default protocol
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["official", "multi_array", "prompt_response"])
def test_wagle_eval_on_tofu_files_defaults_to_the_full_protocol(user_files, tmp_path, variant):
    from test_ou_parity import OU_NINE, _tofu_sets, _write_layout

    _write_layout(tmp_path / "tofu", _tofu_sets(), variant)
    retain_dir = tmp_path / "retain-model"
    tok = char_tokenizer()
    torch.manual_seed(1)
    tiny_llama(len(tok), hidden=16, layers=1, heads=2, intermediate=32).save_pretrained(retain_dir)
    tok.save_pretrained(retain_dir)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(user_files / "my-llama"), "--data.source", str(tmp_path / "tofu"),
                 "--retain_model", str(retain_dir), "--max_new_tokens", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    assert set(logs["model_utility"]["components"]) == set(OU_NINE)
    assert {"model_utility", "forget_quality", "mia_min_k", "privleak"} <= set(summary)
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["model_utility"] == summary["model_utility"]

    # the retain model's saved evaluation is refused for another forget set
    other = tmp_path / "tofu2"
    _write_layout(other, _tofu_sets(seed=3), variant)
    assert main(["eval", "--model", str(user_files / "my-llama"), "--data.source", str(other),
                 "--retain_model_eval", str(out / "TOFU_EVAL.json"), "--max_new_tokens", "4", "--device", "cpu",
                 "--out", str(tmp_path / "eval2")]) == 1
    assert not (tmp_path / "eval2").exists() and not (tmp_path / "eval2.partial").exists()


def test_data_source_builder_name_and_files_with_the_embedded_model(capsys, tmp_path):
    from wagle_ext.config import UnlearnConfig, load_config

    # `--data.source json` would make `datasets` read every file of the current folder
    assert main(["unlearn", "--model", "embedded", "--data.source", "json", "--out", str(tmp_path / "x")]) == 2
    assert "data.source" in _err_line(capsys)
    # a forget file given with the default (embedded) model is used, not replaced by the benchmark's data
    f = tmp_path / "forget.json"
    f.write_text(json.dumps(_qa(2, "f")))
    cfg = load_config(UnlearnConfig, None, ["--data.forget", str(f), "--data.retain", str(f)])
    assert cfg.data.source is None and cfg.data.forget == str(f)


def test_bench_out_reaches_the_scripts(monkeypatch, tmp_path):
    """``wagle bench --out DIR`` hands DIR to the scripts (WAGLE_BENCH_OUT), whose write_json honours it."""
    import importlib.util

    from wagle_ext.cli import _source_root

    root = _source_root()
    if root is None:
        pytest.skip("needs a source checkout (bench/)")
    seen = []

    class Done:
        returncode = 0

    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append((cmd, kw["env"])) or Done())
    out = tmp_path / "results"
    assert main(["bench", "--out", str(out), "--scripts", "[bench_score.py]"]) == 0
    assert seen and seen[0][1]["WAGLE_BENCH_OUT"] == str(out)
    monkeypatch.undo()  # the real subprocess.run again (write_json records the environment with it)
    monkeypatch.setenv("WAGLE_BENCH_OUT", str(out))
    spec = importlib.util.spec_from_file_location("bench_common_for_test", os.path.join(root, "bench", "_common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.write_json("probe", {"rows": []})
    assert path == str(out / "probe.json") and json.loads((out / "probe.json").read_text())["bench"] == "probe"


# ------------------------------------------------------------------------------------------------
# wagle attack and wagle unlearn --geffect_every
# ------------------------------------------------------------------------------------------------

def test_wagle_attack_writes_every_attack(user_files, tmp_path):
    d = user_files
    out = tmp_path / "attack"
    assert main(["attack", "--model", str(d / "my-llama"), "--data.forget", str(d / "forget.json"), "--device", "cpu",
                 "--reference_model", str(d / "my-llama"), "--relearn_steps", "[0, 2]", "--max_new_tokens", "4",
                 "--relearn_fraction", "0.3", "--out", str(out)]) == 0
    allres = json.loads((out / "ATTACKS.json").read_text())
    assert set(allres["results"]) == {"relearn", "in_context", "prompt", "output_quality"}
    for kind in allres["results"]:
        assert (out / f"ATTACK_{kind}.json").is_file()
        assert set(allres["results"][kind]) == {"model", "reference_model"}
    assert [c["step"] for c in allres["results"]["relearn"]["model"]["curve"]] == [0, 2]
    q = allres["results"]["output_quality"]["model"]
    assert q["mean_perplexity"] is not None and len(q["generations"]) == 6
    assert main(["attack", "--model", str(d / "my-llama"), "--data.forget", str(d / "forget.json"),
                 "--attacks", "[jailbreak]", "--out", str(tmp_path / "a2")]) == 1


def test_unlearn_records_the_g_effect(user_files, tmp_path):
    d = user_files
    out = tmp_path / "ge"
    assert main(["unlearn", *_common(d), "--objective", "npo", "--unlearn.steps", "4", "--unlearn.batch_size", "2",
                 "--geffect_every", "2", "--out", str(out)]) == 0
    ge = json.loads((out / "g_effect.json").read_text())
    assert [r["step"] for r in ge["records"]] == [2, 4] and ge["objective"] == "npo"
    assert (out / "g_effect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mask_with_a_memory_budget_equals_the_unbounded_mask(user_files, tmp_path):
    d = user_files
    assert main(["mask", *_common(d), "--kind", "wagle", "--ratio", "0.1", "--out", str(tmp_path / "a")]) == 0
    # a budget far below the 8 B/param (47 KB) of the two accumulators of this 5840-weight model: several groups
    assert main(["mask", *_common(d), "--kind", "wagle", "--ratio", "0.1", "--memory_budget", "16KB",
                 "--out", str(tmp_path / "b")]) == 0
    from wagle_ext import MaskSet

    a, b = MaskSet.load(str(tmp_path / "a" / "mask.safetensors")), MaskSet.load(str(tmp_path / "b" / "mask.safetensors"))
    assert a == b
    assert "parameter groups" in (tmp_path / "b" / "log.txt").read_text()
    assert main(["score", *_common(d), "--memory_budget", "12KB", "--out", str(tmp_path / "c")]) == 1
