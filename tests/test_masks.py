"""build_mask / MaskSet: exact counts, determinism, oracles, include/exclude, artifacts."""
import json
import math
from collections import OrderedDict

import pytest
import torch

from wagle_ext import PackedMask
from wagle_ext.attribution import compute_scores, score_model
from wagle_ext.kernels import reference as ref
from wagle_ext.masks import (MaskSet, build_mask, model_fingerprint, normalize_param_name, partition_names,
                             select_per_row)

from test_attribution import _data, _model  # shared tiny-model helpers
from tiny_models import char_tokenizer, tiny_llama

RATIOS = [1e-4, 0.1, 0.37, 0.5, 0.8, 0.95, 0.99, 1.0]
SHAPES = [(33, 17), (7,), (0,), (1,), (64, 5), (3, 5, 9), (0, 4), (4, 0), (101, 32)]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _scores(gen, tie_heavy=False, shapes=SHAPES):
    out = OrderedDict()
    for i, sh in enumerate(shapes):
        t = torch.rand(sh, generator=gen)
        if tie_heavy:  # few distinct values, plus exact zeros and -0.0, to exercise tie-breaking
            t = torch.floor(t * 4) / 4
            t[t == 0.25] = -0.0
        out[f"model.layers.{i % 3}.mlp.p{i}.weight"] = t
    return out


def _oracle_global(scores, ratio):
    tensors = list(scores.values())
    k = int(sum(t.numel() for t in tensors) * ratio)
    bits = ref.select_topk_bits([t + 0.0 for t in tensors], k, True)
    return {n: PackedMask(b, t.shape) for (n, t), b in zip(scores.items(), bits)}


def _rows(t):
    """[rows, cols] view: a 1-D tensor is one row; N-D is [shape[0], prod(shape[1:])]."""
    return t.reshape(1, t.numel()) if t.dim() <= 1 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _oracle_row(t, ratio):
    rows = _rows(t)
    k = int(rows.shape[1] * ratio)
    sel = torch.zeros_like(rows, dtype=torch.bool)
    for r in range(rows.shape[0]):
        order = sorted(range(rows.shape[1]), key=lambda j: (-float(rows[r, j] + 0.0), j))[:k]
        sel[r, order] = True
    return sel.reshape(t.shape)


# ----------------------------------------------------------------------------- counts and oracles
@pytest.mark.parametrize("tie_heavy", [False, True])
@pytest.mark.parametrize("scope", ["global", "per_tensor", "per_row"])
def test_exact_count_and_oracle(gen, scope, tie_heavy):
    scores = _scores(gen, tie_heavy)
    for ratio in RATIOS:
        # allow_empty: the oracle comparison covers the ratios that select nothing too.
        m = build_mask(scores, ratio, scope=scope, allow_empty=True)
        assert list(m) == list(scores)
        if scope == "global":
            n = sum(t.numel() for t in scores.values())
            assert m.total_selected == int(n * ratio)
            want = _oracle_global(scores, ratio)
            for name in scores:
                assert m[name] == want[name], (ratio, name)
        elif scope == "per_tensor":
            for name, t in scores.items():
                assert m[name].nnz == int(t.numel() * ratio)
                k = int(t.numel() * ratio)
                assert m[name] == PackedMask(ref.select_topk_bits([t + 0.0], k, True)[0], t.shape)
        else:
            for name, t in scores.items():
                rows = _rows(m[name].to_bool())
                assert (rows.sum(1) == int(rows.shape[1] * ratio)).all()
                assert torch.equal(m[name].to_bool(), _oracle_row(t, ratio)), (ratio, name)
        # Bit-packed counts agree with the unpacked masks.
        assert m.total_selected == sum(int(v.sum()) for v in m.to_bool_dict().values())


def test_deterministic_across_runs_and_layouts(gen):
    scores = _scores(gen, tie_heavy=True)
    a = build_mask(scores, 0.43)
    b = build_mask(OrderedDict((n, t.clone()) for n, t in scores.items()), 0.43)
    # Non-contiguous views of the same values select the same weights.
    nc = OrderedDict((n, t.t() .contiguous().t() if t.dim() == 2 else t) for n, t in scores.items())
    c = build_mask(nc, 0.43)
    assert a == b == c
    # bf16 scores: exact count too.
    d = build_mask(OrderedDict((n, t.to(torch.bfloat16)) for n, t in scores.items()), 0.43)
    assert d.total_selected == a.total_selected


def test_model_scores_every_kind(tok, gen):
    model = _model(tok, gen)
    forget, retain = _data(tok, gen)
    for kind in ("wagle", "snip", "gradient", "magnitude", "random"):
        s = score_model(model, forget, retain, kind=kind, progress=False)
        for scope in ("global", "per_tensor"):
            m1 = build_mask(s, 0.6, scope=scope, model=model)
            m2 = build_mask(s, 0.6, scope=scope, model=model)
            assert m1 == m2
            assert m1.metadata["score_kind"] == kind and m1.fingerprint == model_fingerprint(model)
        n = sum(p.numel() for p in model.parameters())
        assert build_mask(s, 0.6).total_selected == int(n * 0.6)


def test_wanda_per_row_counts(tok, gen):
    model = _model(tok, gen)
    forget, _ = _data(tok, gen)
    s = score_model(model, forget, kind="wanda", progress=False)
    ratio = float(torch.empty(1).uniform_(0.05, 0.95, generator=gen))
    m = build_mask(s, ratio, scope="per_row", model=model)
    assert m.missing == "frozen"  # embeddings, norms, lm_head are not covered: frozen by default
    assert "model.embed_tokens.weight" not in m and "lm_head.weight" not in m
    # WAGLE's Wanda baseline trains them densely: only when asked for.
    assert build_mask(s, ratio, scope="per_row", model=model, missing="dense").missing == "dense"
    for name, pm in m.items():
        b = pm.to_bool()
        assert (b.sum(1) == int(b.shape[1] * ratio)).all(), name
        assert torch.equal(b, _oracle_row(s[name], ratio))


def test_select_per_row_chunks_and_ties(gen):
    t = torch.floor(torch.rand(37, 23, generator=gen) * 3)
    for chunk in (1, 23, 50, 1 << 20):
        assert torch.equal(select_per_row(t, 0.4, chunk_elements=chunk).to_bool(), _oracle_row(t, 0.4))
    assert select_per_row(torch.zeros(0, 3), 0.5).nnz == 0
    assert select_per_row(torch.zeros(3, 0), 0.5).shape == (3, 0)
    t = torch.zeros(4, 10)  # all ties: the lowest columns win
    sel = select_per_row(t, 0.3).to_bool()
    assert sel[:, :3].all() and not sel[:, 3:].any()
    with pytest.raises(ValueError, match="NaN"):
        select_per_row(torch.tensor([[1.0, float("nan")]]), 0.5)


# ----------------------------------------------------------------------------- include / exclude
@pytest.mark.parametrize("excluded", ["frozen", "dense", "absent"])
def test_include_exclude(tok, gen, excluded):
    model = _model(tok, gen)
    s = compute_scores(model, kind="random", seed=_s(gen))
    ratio = 0.3
    m = build_mask(s, ratio, exclude=["embed_tokens", "norm", "lm_head"], excluded=excluded)
    pool = [n for n in s if not any(x in n for x in ("embed_tokens", "norm", "lm_head"))]
    other = [n for n in s if n not in pool]
    assert other and pool
    assert sum(m[n].nnz for n in pool) == int(sum(s[n].numel() for n in pool) * ratio)
    for n in other:
        if excluded == "absent":
            assert n not in m
        else:
            assert m[n].nnz == (s[n].numel() if excluded == "dense" else 0)
    # The included pool is selected exactly as if only it had been scored.
    alone = build_mask(OrderedDict((n, s[n]) for n in pool), ratio)
    for n in pool:
        assert m[n] == alone[n]
    inc = build_mask(s, 0.5, include=r"mlp\.", excluded="absent")
    assert set(inc) == {n for n in s if "mlp." in n}
    both = build_mask(s, 0.5, include=r"layers\.0\.", exclude=["down_proj"], excluded="absent")
    assert set(both) == {n for n in s if "layers.0." in n and "down_proj" not in n}
    assert m.metadata["exclude"] == ["embed_tokens", "norm", "lm_head"]
    assert m.missing == "frozen"
    fr = build_mask(s, 0.5, exclude="lm_head", excluded="absent", missing="frozen")
    assert fr.missing == "frozen" and "lm_head.weight" not in fr


def _s(gen):
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def test_build_mask_errors(gen):
    scores = _scores(gen)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="ratio"):
            build_mask(scores, bad)
    with pytest.raises(ValueError, match="scope"):
        build_mask(scores, 0.5, scope="per_layer")
    with pytest.raises(ValueError, match="no parameter left"):
        build_mask(scores, 0.5, include="does-not-exist")
    with pytest.raises(ValueError, match="regular expression"):
        build_mask(scores, 0.5, exclude="(")
    with pytest.raises(TypeError, match="mapping"):
        build_mask(list(scores.values()), 0.5)
    with pytest.raises(TypeError, match="float32"):
        build_mask({"a": torch.ones(3, dtype=torch.int32)}, 0.5)
    nan = OrderedDict(scores)
    nan["x"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        build_mask(nan, 0.5)
    with pytest.raises(ValueError, match="excluded"):
        build_mask(scores, 0.5, excluded="zero")
    with pytest.raises(ValueError, match="missing"):
        build_mask(scores, 0.5, missing="zero")
    with pytest.raises(TypeError, match="JSON"):
        build_mask(scores, 0.5, metadata={"x": object()})


# ----------------------------------------------------------------------------- MaskSet artifact
def test_save_load_round_trip(tok, gen, tmp_path):
    model = _model(tok, gen)
    forget, retain = _data(tok, gen)
    s = score_model(model, forget, retain, kind="wagle", gamma=1e-5, progress=False)
    m = build_mask(s, 0.37, model=model, metadata={"run": "unit-test"})
    path = tmp_path / "mask.safetensors"
    m.save(path)
    back = MaskSet.load(path, model=model)
    assert back == m and back.names() == m.names()
    assert back.fingerprint == m.fingerprint == model_fingerprint(model) and back.missing == m.missing
    assert back.metadata["score_kind"] == "wagle" and back.metadata["gamma"] == 1e-5
    assert back.metadata["ratio"] == 0.37 and back.metadata["scope"] == "global"
    assert back.metadata["run"] == "unit-test" and back.metadata["library_version"]
    assert back.total_selected == m.total_selected
    # The file is plain safetensors: bits as uint8 and readable metadata.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["score_kind"] == "wagle" and meta["scope"] == "global"
        header = json.loads(meta["wagle_ext"])
        assert header["names"] == m.names()
        assert [tuple(x) for x in header["shapes"]] == [tuple(m[n].shape) for n in m]
        t = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert t.dtype == torch.uint8 and t.numel() == (32 * 32 + 7) // 8
    # Packed: 1 bit per weight.
    n = sum(p.numel() for p in model.parameters())
    assert m.nbytes <= n // 8 + len(m)


def test_round_trip_odd_and_empty_shapes(gen, tmp_path):
    scores = _scores(gen, tie_heavy=True)
    m = build_mask(scores, 0.5, scope="per_tensor")
    m.save(tmp_path / "m.safetensors")
    assert MaskSet.load(tmp_path / "m.safetensors") == m
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a wagle_ext MaskSet"):
        MaskSet.load(tmp_path / "other.safetensors")


def test_fingerprint_mismatch_errors(tok, gen, tmp_path):
    model = _model(tok, gen)
    m = build_mask(compute_scores(model, kind="magnitude"), 0.5, model=model)
    m.save(tmp_path / "m.safetensors")
    # Resized vocabulary: shapes differ.
    bigger = tiny_llama(len(tok) + 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        MaskSet.load(tmp_path / "m.safetensors", model=bigger)
    # One more layer: every masked name still fits, but the model differs.
    deeper = tiny_llama(len(tok), layers=3)
    with pytest.raises(ValueError, match="fingerprint"):
        MaskSet.load(tmp_path / "m.safetensors", model=deeper)
    MaskSet.load(tmp_path / "m.safetensors", model=deeper, strict=False)  # names/shapes only
    # Fewer layers: masked parameters missing from the model.
    shallow = tiny_llama(len(tok), layers=1)
    with pytest.raises(ValueError, match="not in the model"):
        m.check_compatible(shallow)
    # Same architecture, other weights: compatible (the fingerprint ignores values).
    MaskSet.load(tmp_path / "m.safetensors", model=tiny_llama(len(tok), seed=_s(gen)))


class _DDPLike(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.module = m


class _PeftLike(torch.nn.Module):
    """Names like PEFT's: base_model.model.<hf names>, wrapped layer weight under .base_layer,
    plus adapter weights lora_A/lora_B."""

    def __init__(self, m):
        super().__init__()
        self.base_model = torch.nn.Module()
        self.base_model.model = m
        q = m.model.layers[0].self_attn.q_proj
        wrapper = torch.nn.Module()
        wrapper.base_layer = q
        wrapper.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(q.in_features, 2, bias=False)})
        wrapper.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, q.out_features, bias=False)})
        m.model.layers[0].self_attn.q_proj = wrapper


def test_wrapped_model_names(tok, gen):
    model = _model(tok, gen)
    m = build_mask(compute_scores(model, kind="random", seed=1), 0.2, model=model)
    ddp = _DDPLike(model)
    assert model_fingerprint(ddp) == model_fingerprint(model)
    m.check_compatible(ddp)
    bound = m.for_model(ddp)
    assert list(bound) == [f"module.{n}" for n in m.names()]
    assert m["module.model.norm.weight"] is m["model.norm.weight"]
    peft = _PeftLike(model)
    assert model_fingerprint(peft) == m.fingerprint
    bound = m.for_model(peft)
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert q in bound and bound[q] == m["model.layers.0.self_attn.q_proj.weight"]
    assert not any("lora_" in n for n in bound)
    assert normalize_param_name("module._orig_mod.base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    with pytest.raises(TypeError):
        normalize_param_name(3)


def test_maskset_api(gen):
    scores = _scores(gen)
    m = build_mask(scores, 0.25)
    bools = m.to_bool_dict()
    assert list(bools) == m.names() and all(v.dtype == torch.bool for v in bools.values())
    back = MaskSet.from_bool_dict(bools, metadata=m.metadata)
    assert back == m
    assert MaskSet.from_bool_dict({n: v.to(torch.uint8) for n, v in bools.items()}) == m
    assert m.numel == sum(t.numel() for t in scores.values())
    assert abs(m.density - m.total_selected / m.numel) < 1e-12
    cp = m.to("cpu")
    assert cp == m and cp.device == torch.device("cpu")
    assert len(m) == len(scores) and set(m.names()) == set(scores)
    assert "MaskSet(" in repr(m)
    with pytest.raises(TypeError, match="PackedMask"):
        MaskSet({"a": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="same parameter name"):
        MaskSet({"a.w": PackedMask.full((2,)), "module.a.w": PackedMask.full((2,))})
    with pytest.raises(ValueError, match="missing"):
        MaskSet({}, missing="maybe")


def test_overlap_counts_equal_boolean_sets(gen):
    scores = _scores(gen)
    a, b = build_mask(scores, 0.25), build_mask({n: torch.rand(t.shape, generator=gen) for n, t in scores.items()}, 0.1)
    ba, bb = a.to_bool_dict(), b.to_bool_dict()
    inter = sum(int((ba[n] & bb[n]).sum()) for n in ba)
    union = sum(int((ba[n] | bb[n]).sum()) for n in ba)
    o = a.overlap(b)
    assert o["intersection"] == inter and o["selected_self"] == a.total_selected
    assert o["jaccard"] == pytest.approx(inter / union) and o["fraction_of_self"] == pytest.approx(inter / a.total_selected)
    assert o["expected_random"] == pytest.approx(b.total_selected / a.numel)
    assert a.overlap(a)["jaccard"] == 1.0
    with pytest.raises(TypeError):
        a.overlap(ba)
    with pytest.raises(ValueError, match="share no tensor"):
        a.overlap(MaskSet({"zz": PackedMask.full((3,))}))


def test_stats_and_plot(tok, gen, tmp_path):
    model = tiny_llama(len(tok), layers=4, seed=_s(gen))
    forget, retain = _data(tok, gen)
    m = build_mask(score_model(model, forget, retain, progress=False), 0.3, model=model)
    st = m.stats()
    assert st["total"] == {"numel": m.numel, "selected": m.total_selected, "density": m.density}
    assert set(st["per_layer"]) == {"0", "1", "2", "3", "other"}
    for layer, d in st["per_layer"].items():
        names = [n for n in m if (f"layers.{layer}." in n) or (layer == "other" and "layers." not in n)]
        assert d["numel"] == sum(m[n].numel for n in names)
        assert d["selected"] == sum(m[n].nnz for n in names)
    assert st["per_module_type"]["q_proj"]["numel"] == 4 * 32 * 32
    assert st["per_parameter"]["model.layers.2.mlp.down_proj.weight"]["layer"] == 2
    assert st["per_parameter"]["lm_head.weight"]["module_type"] == "lm_head"
    assert st["per_layer_module"]["1"]["gate_proj"] == st["per_parameter"]["model.layers.1.mlp.gate_proj.weight"]["density"]
    json.dumps(st)
    path = tmp_path / "mask.png"
    m.plot(path)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # No decoder layers at all (names without a layer index) still plots.
    flat = MaskSet({"encoder.weight": PackedMask.full((5, 3)), "head.weight": PackedMask.full((4,), False)})
    flat.plot(tmp_path / "flat.png")
    assert flat.stats()["per_layer"]["other"]["density"] == 15 / 19


def test_partition_names(gen):
    sizes = [(f"p{i}", int(x)) for i, x in enumerate(torch.randint(0, 1000, (23,), generator=gen))]
    for world in (1, 2, 3, 7):
        blocks = partition_names(sizes, world)
        assert len(blocks) == world
        assert sum(blocks, []) == [n for n, _ in sizes]  # contiguous, in order
    b = partition_names([("a", 10), ("b", 10), ("c", 10), ("d", 10)], 2)
    assert b == [["a", "b"], ["c", "d"]]
    assert partition_names([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        partition_names(sizes, 0)


# ----------------------------------------------------------------------------- file integrity
def _data_region(path):
    """(start, end) of the tensor data in a safetensors file: after the 8-byte length and the JSON header."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, len(raw)


def _saved(gen, tmp_path, name="m.safetensors"):
    m = build_mask(_scores(gen), 0.37, metadata={"run": "integrity"})
    path = tmp_path / name
    m.save(path)
    return m, path


def _one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert str(path) in msg and "\n" not in msg, msg


def test_checksum_stored_and_verified(gen, tmp_path):
    m, path = _saved(gen, tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["wagle_ext"])
    assert header["checksum"] == m.checksum() and header["checksum"].startswith("sha256:")
    assert header["format_version"] == 2 and header["missing"] == "frozen"
    assert MaskSet.load(path) == m
    # Every single-byte flip in the bits region is caught (a sample of positions, each bit of a byte).
    start, end = _data_region(path)
    good = open(path, "rb").read()
    positions = torch.randint(start, end, (6,), generator=gen).tolist() + [start, end - 1]
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        open(path, "wb").write(bytes(bad))
        with pytest.raises(ValueError, match="checksum mismatch") as ei:
            MaskSet.load(path)
        _one_line_naming(ei, path)
    # The checksum covers names/shapes/counts/missing too: the same bits under another missing differ.
    other = MaskSet(dict(m.items()), missing="dense")
    assert other.checksum() != m.checksum() and other != m


def test_corrupt_files_are_one_line_errors(gen, tmp_path):
    m, path = _saved(gen, tmp_path)
    good = open(path, "rb").read()
    start, _ = _data_region(path)
    cases = {
        "truncated_data": good[: (start + len(good)) // 2],
        "truncated_header": good[: start // 2],
        "empty": b"",
        "random": bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist()),
        "text": b"this is not a mask\n",
    }
    for label, data in cases.items():
        p = tmp_path / f"{label}.safetensors"
        p.write_bytes(data)
        with pytest.raises(ValueError) as ei:
            MaskSet.load(p)
        _one_line_naming(ei, p)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        MaskSet.load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        MaskSet.load(tmp_path)


def _write_with_header(path, tensors, header):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"wagle_ext": json.dumps(header) if isinstance(header, dict) else header})


def test_header_lacking_fields(gen, tmp_path):
    m, path = _saved(gen, tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["wagle_ext"])
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    for drop in ("names", "shapes", "nnz", "checksum", "missing"):
        h = {k: v for k, v in header.items() if k != drop}
        p = tmp_path / f"no_{drop}.safetensors"
        _write_with_header(p, tensors, h)
        with pytest.raises(ValueError, match=drop) as ei:
            MaskSet.load(p)
        _one_line_naming(ei, p)
    bad_cases = {
        "json": "{not json",
        "version": {**header, "format_version": 99},
        "lengths": {**header, "nnz": header["nnz"][:-1]},
        "shape": {**header, "shapes": [[-1]] + header["shapes"][1:]},
        "count": {**header, "nnz": [10 ** 9] + header["nnz"][1:]},
        "absent_tensor": {**header, "names": ["ghost.weight"] + header["names"][1:]},
    }
    for label, h in bad_cases.items():
        p = tmp_path / f"bad_{label}.safetensors"
        _write_with_header(p, tensors, h)
        with pytest.raises(ValueError) as ei:
            MaskSet.load(p)
        _one_line_naming(ei, p)
    # A wrong-length bit array for an entry.
    p = tmp_path / "short_bits.safetensors"
    first = header["names"][0]
    _write_with_header(p, {**tensors, first: tensors[first][:-1].clone()}, header)
    with pytest.raises(ValueError, match="bit array") as ei:
        MaskSet.load(p)
    _one_line_naming(ei, p)


def test_version1_file_without_checksum_loads_with_one_warning(gen, tmp_path):
    """Files written before checksums (format version 1) stored ``missing`` explicitly -- "dense",
    the old default. They load as stored (the file means what it said), with one warning per file."""
    import warnings

    from wagle_ext.masks import maskset as maskset_mod

    m, path = _saved(gen, tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["wagle_ext"])
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    old = {k: v for k, v in header.items() if k != "checksum"}
    old.update(format_version=1, missing="dense", library_version="0.1.0")
    p = tmp_path / "v1.safetensors"
    _write_with_header(p, tensors, old)
    maskset_mod._warned_unchecked.discard(str(p))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = MaskSet.load(p)
        b = MaskSet.load(p)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "without a checksum" in msgs[0] and str(p) in msgs[0], msgs
    assert a.missing == b.missing == "dense" and dict(a.items()) == dict(m.items())
    assert MaskSet.load(p, missing="frozen").missing == "frozen"
    with pytest.raises(ValueError, match="missing"):
        MaskSet.load(p, missing="maybe")
    # A version-1 header without the field at all: the new default.
    del old["missing"]
    p2 = tmp_path / "v1_nomissing.safetensors"
    _write_with_header(p2, tensors, old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert MaskSet.load(p2).missing == "frozen"
    # Re-saving adds the checksum: no warning, verified.
    a.save(tmp_path / "resaved.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MaskSet.load(tmp_path / "resaved.safetensors") == a


def test_missing_default_and_setter():
    m = MaskSet({"a.weight": PackedMask.full((3,))})
    assert m.missing == "frozen"
    m.missing = "dense"
    assert m.missing == "dense" and m.to("cpu").missing == "dense"
    with pytest.raises(ValueError, match="missing"):
        m.missing = "zero"
    assert MaskSet.from_bool_dict({"a.weight": torch.ones(3, dtype=torch.bool)}).missing == "frozen"


# ----------------------------------------------------------------------------- empty selection
@pytest.mark.parametrize("scope", ["global", "per_tensor", "per_row"])
def test_empty_selection_is_an_error(gen, scope):
    scores = _scores(gen)
    n = sum(t.numel() for t in scores.values())
    with pytest.raises(ValueError, match=r"ratio 1e-09 selects 0 of \d+ weights.*allow_empty=True") as ei:
        build_mask(scores, 1e-9, scope=scope)
    assert "\n" not in str(ei.value)
    if scope == "global":
        assert f"of {n} weights" in str(ei.value)
    empty = build_mask(scores, 1e-9, scope=scope, allow_empty=True)
    assert empty.total_selected == 0 and list(empty) == list(scores)


def test_empty_selection_depends_on_scope(gen):
    # 1000 weights in 10 rows of 100: ratio 0.005 selects 5 globally, int(100 * 0.005) = 0 per row and
    # 0 per tensor when split into tensors of 100 weights.
    one = OrderedDict([("model.layers.0.mlp.w.weight", torch.rand(10, 100, generator=gen))])
    assert build_mask(one, 0.005).total_selected == 5
    assert build_mask(one, 0.005, scope="per_tensor").total_selected == 5
    with pytest.raises(ValueError, match="per row.*widest has 100 columns"):
        build_mask(one, 0.005, scope="per_row")
    many = OrderedDict((f"model.layers.{i}.mlp.w.weight", torch.rand(100, generator=gen)) for i in range(10))
    assert build_mask(many, 0.005).total_selected == 5
    with pytest.raises(ValueError, match="per tensor.*largest has 100"):
        build_mask(many, 0.005, scope="per_tensor")
    # A scope where only some tensors select something is fine.
    mixed = OrderedDict([("a.weight", torch.rand(10, generator=gen)), ("b.weight", torch.rand(1000, generator=gen))])
    assert build_mask(mixed, 0.005, scope="per_tensor").total_selected == 5
