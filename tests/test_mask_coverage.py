"""What a mask really trains: ``MaskSet.missing`` honoured by UnlearnTrainer (uncovered parameters
frozen by default, dense on request), the honest start-of-run report (``trainable_report``), and a
mask that trains nothing refused before training. Small and fast: an untrained tiny Llama, a few steps."""
import logging
import re
from collections import OrderedDict

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="UnlearnTrainer needs transformers")

from wagle_ext import ForgetRetainDataset, MaskSet, QACollator, build_mask  # noqa: E402
from wagle_ext.masks import format_trainable_report, trainable_report  # noqa: E402
from wagle_ext.unlearn.trainer import UnlearnTrainer  # noqa: E402

from tiny_models import TINY_QA, char_tokenizer, tiny_llama  # noqa: E402

LINEAR = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+\.weight$")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _model(tok, seed=0):
    return tiny_llama(len(tok), hidden=32, layers=2, heads=4, intermediate=64, seed=seed)


def _wanda_like(model, gen, ratio=0.1, missing="frozen", allow_empty=False):
    """A per-tensor mask over the decoder linears only (as Wanda scores): embeddings, norms and
    lm_head have no entry."""
    scores = OrderedDict((n, torch.rand(p.shape, generator=gen)) for n, p in model.named_parameters()
                         if LINEAR.search(n))
    return build_mask(scores, ratio, scope="per_tensor", missing=missing, allow_empty=allow_empty)


def _trainer(tok, model, mask, tmp_path, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=kw.pop("weight_decay", 0.1), logging_steps=100,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        max_grad_norm=kw.pop("max_grad_norm", 1.0))
    ds = ForgetRetainDataset(TINY_QA[:4], TINY_QA[4:], seed=0)
    return UnlearnTrainer(model=model, args=args, objective="graddiff", mask=mask, train_dataset=ds,
                          data_collator=QACollator(tok), **kw)


# ----------------------------------------------------------------------------- the report itself
def test_trainable_report_counts(tok, gen):
    model = _model(tok)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    covered = [n for n in params if LINEAR.search(n)]
    uncovered = [n for n in params if n not in covered]
    assert uncovered and "lm_head.weight" in uncovered and "model.embed_tokens.weight" in uncovered
    mask = _wanda_like(model, gen)
    selected = sum(int(mask[n].to_bool().sum()) for n in covered)
    n_uncovered = sum(params[n].numel() for n in uncovered)

    rep = trainable_report(model, mask)
    assert rep == mask.coverage(model)
    assert rep["total"] == total and rep["missing"] == "frozen"
    assert rep["updated"] == selected and rep["frozen"] == total - selected
    assert rep["density"] == selected / total
    assert rep["masked"] == {"tensors": len(covered), "numel": total - n_uncovered, "selected": selected}
    assert rep["frozen_missing"] == {"tensors": len(uncovered), "numel": n_uncovered}
    assert rep["dense_missing"] == {"tensors": 0, "numel": 0}

    mask.missing = "dense"
    rep = trainable_report(model, mask)
    assert rep["updated"] == selected + n_uncovered and rep["density"] == (selected + n_uncovered) / total
    assert rep["dense_missing"] == {"tensors": len(uncovered), "numel": n_uncovered}
    # The reported case: density 0.1 on the linears, but most of a tiny model is embeddings/lm_head.
    assert rep["density"] > 2 * mask.density

    rep = trainable_report(model, None)
    assert rep["updated"] == total and rep["density"] == 1.0 and rep["missing"] is None
    model.model.embed_tokens.weight.requires_grad_(False)
    n_emb = model.model.embed_tokens.weight.numel()
    rep = trainable_report(model, None)
    assert rep["updated"] == total - n_emb and rep["not_trainable"] == {"tensors": 1, "numel": n_emb}

    line = format_trainable_report(trainable_report(model, mask))
    assert line.startswith("trainable ") and f"of {total} weights" in line
    assert f"masked {selected} in {len(covered)} tensors" in line and "dense (missing='dense')" in line
    with pytest.raises(TypeError):
        trainable_report(model, {"x": 1})


# ----------------------------------------------------------------------------- the trainer honours missing
def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("grad_mode,wd_mode", [("dense", "masked"), ("dense", "all"), ("compact", "masked")])
def test_trainer_freezes_uncovered_parameters(tok, gen, tmp_path, caplog, grad_mode, wd_mode):
    model = _model(tok)
    mask = _wanda_like(model, gen)
    before = _snapshot(model)
    tr = _trainer(tok, model, mask, tmp_path, grad_mode=grad_mode, weight_decay_mode=wd_mode)
    with caplog.at_level(logging.INFO, logger="wagle_ext.unlearn.trainer"):
        tr.train()
    moved = 0
    for n, p in model.named_parameters():
        now = p.detach()
        if n in mask:
            sel = mask[n].to_bool()
            moved += int((now[sel] != before[n][sel]).sum())
            if wd_mode == "masked":
                assert torch.equal(now[~sel], before[n][~sel]), n
        else:  # embeddings, norms, lm_head: bit-identical, no decay even with weight_decay_mode="all"
            assert torch.equal(now, before[n]), n
    assert moved > 0
    rep = tr.trainable_report
    assert rep == mask.coverage(model) and rep["updated"] == mask.total_selected
    lines = [r.getMessage() for r in caplog.records if "trainable" in r.getMessage()]
    assert len(lines) == 1 and format_trainable_report(rep) in lines[0], lines
    assert f"frozen {rep['frozen']}" in lines[0] and "dense (missing='frozen') 0" in lines[0]


def test_trainer_dense_missing_trains_uncovered(tok, gen, tmp_path):
    model = _model(tok)
    mask = _wanda_like(model, gen, missing="dense")
    before = _snapshot(model)
    tr = _trainer(tok, model, mask, tmp_path)
    tr.train()
    for n in ("lm_head.weight", "model.embed_tokens.weight"):
        assert not torch.equal(dict(model.named_parameters())[n].detach(), before[n]), n
    for n in mask:
        sel = mask[n].to_bool()
        assert torch.equal(dict(model.named_parameters())[n].detach()[~sel], before[n][~sel]), n
    rep = tr.trainable_report
    assert rep["dense_missing"]["numel"] > 0 and rep["updated"] == mask.total_selected + rep["dense_missing"]["numel"]


def test_trainer_without_mask_reports_all_dense(tok, tmp_path):
    model = _model(tok)
    tr = _trainer(tok, model, None, tmp_path)
    tr.create_optimizer()
    total = sum(p.numel() for p in model.parameters())
    assert tr.trainable_report["updated"] == total and tr.trainable_report["density"] == 1.0


def test_trainer_refuses_mask_that_trains_nothing(tok, gen, tmp_path):
    model = _model(tok)
    empty = _wanda_like(model, gen, ratio=1e-9, allow_empty=True)
    assert empty.total_selected == 0
    with pytest.raises(ValueError, match="the mask updates nothing.*selects 0 of") as ei:
        _trainer(tok, model, empty, tmp_path)
    assert "\n" not in str(ei.value)
    # An all-False mask over every parameter: the same.
    none = MaskSet.from_bool_dict({n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match="updates nothing"):
        _trainer(tok, model, none, tmp_path)
    # With missing="dense" the uncovered parameters still train: accepted, and reported.
    empty.missing = "dense"
    tr = _trainer(tok, model, empty, tmp_path)
    assert tr.trainable_report["updated"] == tr.trainable_report["dense_missing"]["numel"] > 0


def test_mask_file_round_trip_keeps_frozen_semantics(tok, gen, tmp_path):
    """A saved and reloaded mask trains exactly what the in-memory one does."""
    model = _model(tok)
    mask = _wanda_like(model, gen)
    mask.save(tmp_path / "m.safetensors")
    back = MaskSet.load(tmp_path / "m.safetensors", model=model)
    assert back.missing == "frozen" and back.coverage(model) == mask.coverage(model)
