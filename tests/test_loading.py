"""wagle_ext.app.loading: devices, dtypes, the user's own model (save_pretrained dir, GGUF, Hub cache),
vocabulary checks and the data fields, with one-line errors. No downloads: models are tiny and built
here; the GGUF file is written with the ``gguf`` package (tests skip when it is not installed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import TINY_QA, char_tokenizer, tiny_llama
from wagle_ext.app import loading as L

pytest.importorskip("transformers")

HAS_CUDA = torch.cuda.is_available()


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


@pytest.fixture
def logs():
    lines: list = []
    return lines


@pytest.fixture
def no_launcher(monkeypatch):
    for k in ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(k, raising=False)


# ------------------------------------------------------------------------------------------- devices
def test_device_auto_and_cpu(no_launcher):
    assert L.resolve_device("cpu") == torch.device("cpu")
    assert L.resolve_device(" CPU ") == torch.device("cpu")
    assert L.resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_one_line(no_launcher, spec):
    with pytest.raises(ValueError) as e:
        L.resolve_device(spec)
    msg = one_line(e)
    assert msg.startswith(f"--device {spec}: CUDA is not available") and "use --device cpu" in msg


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "mps", ""])
def test_unknown_device(no_launcher, spec):
    with pytest.raises(ValueError) as e:
        L.resolve_device(spec, field="device")
    msg = one_line(e)
    assert msg.startswith("device ") and ("expected" in msg or "CUDA is not available" in msg)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_devices(no_launcher):
    assert L.resolve_device("cuda").type == "cuda"
    assert L.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert L.resolve_device("auto").type == "cuda"
    n = torch.cuda.device_count()
    with pytest.raises(ValueError) as e:
        L.resolve_device(f"cuda:{n}")
    assert "does not exist" in one_line(e)


class _FakeState:
    device = torch.device("cpu")


def test_launched_uses_partial_state(monkeypatch):
    """Under a launcher auto/cuda take accelerate's per-rank device; cuda:N is refused; cpu stays cpu."""
    accelerate = pytest.importorskip("accelerate")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert L.launched_distributed()
    monkeypatch.setattr(accelerate, "PartialState", lambda: type("S", (), {"device": torch.device("cuda", 1)})())
    assert L.resolve_device("auto") == torch.device("cuda", 1)
    assert L.resolve_device("cuda") == torch.device("cuda", 1)
    assert L.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError) as e:
        L.resolve_device("cuda:0")
    assert "cuda:LOCAL_RANK" in one_line(e)
    monkeypatch.setattr(accelerate, "PartialState", _FakeState)
    assert L.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError) as e:
        L.resolve_device("cuda")
    assert "CUDA is not available" in one_line(e)


def test_launched_real_partial_state_subprocess():
    """The real accelerate.PartialState in a fresh single-rank 'launched' process."""
    pytest.importorskip("accelerate")
    env = dict(os.environ, LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               ACCELERATE_MIXED_PRECISION="no", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517",
               OMP_NUM_THREADS="1")
    code = ("import torch; from wagle_ext.app.loading import resolve_device as r; "
            "print(r('auto'), torch.cuda.is_available())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dev, cuda = out.stdout.split()[-2:]
    assert dev == ("cuda:0" if cuda == "True" else "cpu")


# -------------------------------------------------------------------------------------------- dtypes
def test_dtypes():
    assert L.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert L.resolve_dtype("float32", "cpu") == torch.float32
    assert L.resolve_dtype("BF16", "cpu") == torch.bfloat16
    assert L.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError) as e:
        L.resolve_dtype("float16", "cpu")
    assert "not supported for training on CPU" in one_line(e)
    with pytest.raises(ValueError) as e:
        L.resolve_dtype("int8", "cpu")
    assert one_line(e).startswith("--dtype 'int8'")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_dtype_auto_on_cuda():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert L.resolve_dtype("auto", "cuda") == want
    assert L.resolve_dtype("float16", "cuda") == torch.float16


# ---------------------------------------------------------------------------- save_pretrained models
def _save_tiny(path, *, pad: bool = True, vocab_size=None):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size or len(tok), layers=1)
    model.save_pretrained(path)
    if not pad:
        tok.pad_token = None
    tok.save_pretrained(path)
    return model, tok


def test_load_save_pretrained_dir(tmp_path, logs):
    ref, ref_tok = _save_tiny(tmp_path / "m")
    model, tok = L.load_model_and_tokenizer(str(tmp_path / "m"), device=torch.device("cpu"),
                                            dtype=torch.float32, log=logs.append)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == len(ref_tok)
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    assert tok.pad_token == "<pad>" and tok("ab").input_ids == ref_tok("ab").input_ids
    assert any("save_pretrained directory" in s for s in logs)


def test_load_bfloat16_and_pad_from_eos(tmp_path, logs):
    ref, _ = _save_tiny(tmp_path / "m", pad=False)
    model, tok = L.load_model_and_tokenizer(str(tmp_path / "m"), device="cpu", dtype=torch.bfloat16,
                                            log=logs.append)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight.to(torch.bfloat16))
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id == 2
    assert any("no pad token" in s and "</s>" in s for s in logs)
    model(input_ids=torch.tensor([[1, 5, 6]])).logits.float().sum()  # runs in bf16 on CPU


def test_separate_tokenizer_and_vocab_mismatch(tmp_path):
    _save_tiny(tmp_path / "m", vocab_size=40)  # the model has 40 embedding rows
    tok_dir = tmp_path / "tok"
    big = char_tokenizer()
    big.save_pretrained(tok_dir)
    with pytest.raises(ValueError) as e:
        L.load_model_and_tokenizer(str(tmp_path / "m"), str(tok_dir), device="cpu", dtype=torch.float32,
                                   log=lambda s: None)
    msg = one_line(e)
    assert f"has {len(big)} tokens" in msg and "40 rows" in msg


def test_check_vocab_special_ids_and_ok_when_smaller():
    model = tiny_llama(120, layers=1)
    L.check_vocab(model, char_tokenizer())  # 100 tokens < 120 rows: fine

    class Tok:
        pad_token_id, eos_token_id, bos_token_id, unk_token_id = 0, 130, 1, None

        def __len__(self):
            return 100

        def get_vocab(self):
            return {"a": 99}

    with pytest.raises(ValueError) as e:
        L.check_vocab(model, Tok())
    assert "eos token id 130" in one_line(e) and "120 rows" in one_line(e)


@pytest.mark.parametrize("value", ["./no/such/model", "/nonexistent/model.gguf", "missing.gguf", "a/b/c"])
def test_missing_model_path(value):
    with pytest.raises(FileNotFoundError) as e:
        L.load_model_and_tokenizer(value, device="cpu", dtype=torch.float32)
    assert one_line(e) == f"--model {value}: no such file or directory"


def test_not_a_model_dir_and_broken_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        L.load_model_and_tokenizer(str(tmp_path / "empty"), device="cpu", dtype=torch.float32)
    assert "no config.json" in one_line(e)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as e:
        L.load_model_and_tokenizer(str(tmp_path / "bad"), device="cpu", dtype=torch.float32)
    assert one_line(e).startswith(f"--model {tmp_path / 'bad'}: cannot load the model")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError) as e:
        L.load_model_and_tokenizer(str(tmp_path / "file.bin"), device="cpu", dtype=torch.float32)
    assert "not a .gguf" in one_line(e)


# ------------------------------------------------------------------------------------------- Hub ids
def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    with pytest.raises(ValueError) as e:
        L.load_model_and_tokenizer("wagle-test/not-cached", device="cpu", dtype=torch.float32)
    msg = one_line(e)
    assert msg.startswith("--model wagle-test/not-cached: not in the local Hugging Face cache")
    assert str(tmp_path / "hf" / "hub") in msg and "offline" in msg


def test_hub_id_offline_from_cache(tmp_path, monkeypatch, logs):
    """A model in the Hub cache layout (models--org--name/snapshots/<rev>) loads offline by its id."""
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--wagle-test--tiny"
    ref, ref_tok = _save_tiny(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    model, tok = L.load_model_and_tokenizer("wagle-test/tiny", device="cpu", dtype=torch.float32,
                                            log=logs.append)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight) and len(tok) == len(ref_tok)
    assert any("Hub cache" in s for s in logs)


# ---------------------------------------------------------------------------------------------- GGUF
def _permute_qk(w, n_head):
    """llama.cpp's q/k row order (convert_hf_to_gguf); transformers undoes it when it reads the file."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, seed: int = 0):
    """A tiny llama as an F32 GGUF with a byte-level BPE tokenizer laid out like SmolLM2's (specials
    ``<|endoftext|>`` = bos, ``<|im_start|>``, ``<|im_end|>`` = eos, no pad token); returns the HF model.
    (A byte-level vocabulary without ``<|endoftext|>`` would get it added past the model's rows.)"""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spelling[b] for b in range(256)] + ["hi"]
    model = tiny_llama(len(tokens), layers=1, seed=seed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("wagle-tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    rope = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(["h i"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        v = t.detach().numpy()
        if name in top:
            out = top[name]
        else:
            parts = name.split(".")  # model.layers.<i>.<module>.weight
            module = ".".join(parts[3:-1])
            out = f"blk.{parts[2]}.{sub[module]}.weight"
            if module == "self_attn.q_proj":
                v = _permute_qk(v, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                v = _permute_qk(v, cfg.num_key_value_heads)
        w.add_tensor(out, np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_gguf_round_trip(tmp_path, logs):
    ref = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = L.load_model_and_tokenizer(str(tmp_path / "tiny.gguf"), device="cpu", dtype=torch.float32,
                                            log=logs.append)
    got = model.state_dict()
    for name, t in ref.state_dict().items():
        assert torch.equal(t, got[name]), name
    assert all(p.requires_grad for p in model.parameters())
    assert len(tok) == 260 and tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    assert tok("hi").input_ids[-1] == 259  # the merge from the file
    assert any("no pad token" in s for s in logs) and any("GGUF tiny.gguf" in s for s in logs)
    ids = torch.tensor([tok("hi there").input_ids])
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    # a directory holding just that one .gguf works too, and bf16 loads
    model, _ = L.load_model_and_tokenizer(str(tmp_path), device="cpu", dtype=torch.bfloat16, log=logs.append)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_gguf_corrupt_file_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ValueError) as e:
        L.load_model_and_tokenizer(str(bad), device="cpu", dtype=torch.float32)
    assert one_line(e).startswith(f"--model {bad}: ")


def test_gguf_without_package_is_one_line(tmp_path):
    try:
        import gguf  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("checks the error where the gguf package is not installed")
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError) as e:
        L.load_model_and_tokenizer(str(tmp_path / "m.gguf"), device="cpu", dtype=torch.float32)
    assert "gguf" in one_line(e)


# ---------------------------------------------------------------------------------------------- data
def _write(path, items, fmt):
    if fmt == "json":
        path.write_text(json.dumps(items))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(items), str(path))


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_data_file_path_ignores_source(tmp_path, fmt, logs):
    f = tmp_path / f"forget.{fmt}"
    _write(f, TINY_QA[:3], fmt)
    items = L.load_qa_data("locuslab/TOFU", str(f), field="data.forget", log=logs.append)
    assert [x["question"] for x in items] == [x["question"] for x in TINY_QA[:3]]
    assert logs == [f"data.forget: 3 items from {f}"]


def test_data_dir_and_stem_and_relative_name(tmp_path, logs):
    _write(tmp_path / "forget01.json", TINY_QA[:2], "json")
    _write(tmp_path / "retain.jsonl", TINY_QA[2:], "jsonl")
    assert L.load_qa_data(str(tmp_path), "forget01", log=logs.append) == TINY_QA[:2]
    assert L.load_qa_data(str(tmp_path), "retain", log=logs.append) == TINY_QA[2:]
    # a file name relative to data.source
    assert L.load_qa_data(str(tmp_path), "retain.jsonl", log=logs.append) == TINY_QA[2:]
    with pytest.raises(ValueError) as e:
        L.load_qa_data(str(tmp_path), "forget10", field="data.forget")
    assert one_line(e).startswith("data.forget: ") and "forget10" in one_line(e)


def test_data_split_inside_one_json_file(tmp_path):
    f = tmp_path / "all.json"
    f.write_text(json.dumps({"forget": TINY_QA[:2], "retain": TINY_QA[2:5]}))
    assert L.load_qa_data(str(f), "retain", log=lambda s: None) == TINY_QA[2:5]


@pytest.mark.parametrize("columns", ['{"query_text": "question", "reply_text": "answer"}',
                                     {"query_text": "question", "reply_text": "answer"}])
def test_data_columns_mapping(tmp_path, columns):
    f = tmp_path / "qr.jsonl"
    _write(f, [{"query_text": x["question"], "reply_text": x["answer"], "id": i} for i, x in enumerate(TINY_QA)],
           "jsonl")
    items = L.load_qa_data(None, str(f), columns=columns, log=lambda s: None)
    assert [(x["question"], x["answer"]) for x in items] == [(x["question"], x["answer"]) for x in TINY_QA]
    assert items[3]["id"] == 3
    with pytest.raises(ValueError) as e:  # without the mapping the fields are missing
        L.load_qa_data(None, str(f), field="data.forget")
    assert one_line(e).startswith("data.forget: ") and "'question'" in one_line(e)


def test_data_prompt_response_file_loads_as_is_or_mapped(tmp_path):
    """The common prompt/response naming: mapped explicitly with columns (loads whether or not the
    data loader also knows it as an alias)."""
    f = tmp_path / "pr.json"
    _write(f, [{"prompt": x["question"], "response": x["answer"]} for x in TINY_QA], "json")
    items = L.load_qa_data(None, str(f), columns={"prompt": "question", "response": "answer"}, log=lambda s: None)
    assert [(x["question"], x["answer"]) for x in items] == [(x["question"], x["answer"]) for x in TINY_QA]


@pytest.mark.parametrize("columns", ["{bad", '["a"]', {"prompt": 1}])
def test_data_bad_columns(tmp_path, columns):
    f = tmp_path / "a.json"
    _write(f, TINY_QA, "json")
    with pytest.raises(ValueError) as e:
        L.load_qa_data(None, str(f), columns=columns)
    assert one_line(e).startswith("data.columns: ")


@pytest.mark.parametrize("content", ["", "[]", "\n"])
def test_data_empty_is_an_error(tmp_path, content):
    f = tmp_path / "forget.json"
    f.write_text(content)
    with pytest.raises(ValueError) as e:
        L.load_qa_data(None, str(f), field="data.forget")
    assert one_line(e).startswith(f"data.forget: {f} holds no items")


def test_data_missing_and_unset(tmp_path):
    for spec in (str(tmp_path / "nope.json"), "./nope", "sub/nope"):
        with pytest.raises(FileNotFoundError) as e:
            L.load_qa_data(None, spec, field="data.retain")
        assert one_line(e) == f"data.retain {spec}: no such file or directory"
    for spec in (None, "", "  "):
        with pytest.raises(ValueError) as e:
            L.load_qa_data(str(tmp_path), spec, field="data.forget")
        assert one_line(e).startswith("data.forget is not set")
    with pytest.raises(ValueError) as e:
        L.load_qa_data(None, "forget10", field="data.forget")
    assert "data.source is not set" in one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        L.load_qa_data("./no/such/dir", "forget10", field="data.forget")
    assert one_line(e) == "data.source ./no/such/dir: no such file or directory"


def test_data_malformed_item_names_field(tmp_path):
    f = tmp_path / "f.json"
    f.write_text(json.dumps([{"question": "q", "answer": 3}]))
    with pytest.raises(ValueError) as e:
        L.load_qa_data(None, str(f), field="data.forget")
    msg = one_line(e)
    assert msg.startswith("data.forget: ") and str(f) in msg and "'answer'" in msg


@pytest.mark.parametrize("name,content", [("f.parquet", b"PAR1 not really"), ("f.json", b"\xff\xfe[1,"),
                                          ("f.json", b"[{\"question\": \"q\"")])
def test_data_unreadable_file_names_field_and_file(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError) as e:
        L.load_qa_data(None, str(f), field="data.retain")
    msg = one_line(e)
    assert msg.startswith("data.retain: ") and str(f) in msg


def test_data_hub_offline_not_cached(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds")
    with pytest.raises(ValueError) as e:
        L.load_qa_data("wagle-test/not-cached", "forget10", field="data.forget")
    msg = one_line(e)
    assert msg.startswith("data.forget 'forget10': cannot load it from the Hub dataset 'wagle-test/not-cached'")
