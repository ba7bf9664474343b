"""Batch-size invariance of attribution (issue 16 part 3): with the default per-sequence loss a
batch of B sequences accumulates the sum of the B per-example gradients, so scores and masks from a
batched loader equal those of a batch-1 loader (to fp32 rounding), with right or left padding."""
import pytest
import torch
from torch.utils.data import DataLoader

from wagle_ext.attribution import (accumulate_gradients, causal_lm_sequence_loss, collect_input_norms,
                                   estimate_hessian_diagonal, score_model)
from wagle_ext.masks import build_mask
from wagle_ext.unlearn.data import QACollator

from tiny_models import TINY_QA, char_tokenizer, tiny_llama

# Mixed answer lengths (3 to ~60 characters), so batches carry a lot of padding.
ITEMS = TINY_QA + [
    {"question": "Is Orlen Vask real?", "answer": "No."},
    {"question": "Name a river.", "answer": "Tarsel."},
    {"question": "Describe Corrow.", "answer": "Corrow is a windy harbor town with grey roofs and old bells."},
    {"question": "Why?", "answer": "Because the tide turned early that year."},
]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=3)


def loader(tok, items, bs, left=False):
    coll = QACollator(tok)
    batches = list(DataLoader(items, batch_size=bs, collate_fn=coll))
    if left:
        batches = [_left_pad(b) for b in batches]
    return batches


def _left_pad(batch):
    """The same sequences with their padding moved to the left."""
    n = batch["attention_mask"].sum(1).tolist()
    return {k: torch.stack([torch.roll(v[i], -int(n[i])) for i in range(len(n))]) for k, v in batch.items()}


def assert_close_fp32(got, want, rel=2e-5):
    """Equal up to fp32 rounding of differently ordered sums: |got - want| <= rel * max|want|."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=rel * scale + 1e-30)


def test_items_have_mixed_lengths(tok):
    b = loader(tok, ITEMS, len(ITEMS))[0]
    lengths = b["attention_mask"].sum(1)
    assert int(lengths.max() - lengths.min()) >= 40  # real padding in every batched test below


@pytest.mark.parametrize("left", [False, True])
def test_sequence_loss_is_the_sum_of_batch_of_one_losses(tok, model, left):
    model.eval()
    batch = loader(tok, ITEMS, len(ITEMS), left=left)[0]
    if left:
        assert int(batch["attention_mask"][:, 0].sum()) < len(ITEMS)  # some rows really start with padding
    got = causal_lm_sequence_loss(model, batch)
    with torch.no_grad():
        want = sum(model(**b).loss.double() for b in loader(tok, ITEMS, 1))
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    # Not the HF batch loss (token mean over the whole batch) times anything simple.
    with torch.no_grad():
        hf = model(**loader(tok, ITEMS, len(ITEMS))[0]).loss
    assert abs(float(got) - len(ITEMS) * float(hf)) > 1e-3


@pytest.mark.parametrize("bs,left", [(2, False), (5, False), (12, False), (4, True), (12, True)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients_do_not_depend_on_batch_size(tok, model, bs, left, reduction):
    ref = accumulate_gradients(model, loader(tok, ITEMS, 1), reduction=reduction, progress=False)
    got = accumulate_gradients(model, loader(tok, ITEMS, bs, left=left), reduction=reduction, progress=False)
    assert got.info["num_examples"] == ref.info["num_examples"] == len(ITEMS)
    assert got.info["num_batches"] == -(-len(ITEMS) // bs)
    for n in ref:
        assert_close_fp32(got[n], ref[n])
    # A gradient that is not a per-example sum would fail this check: HF's batch-mean loss does.
    from wagle_ext.attribution import causal_lm_loss
    if bs > 2:
        hf = accumulate_gradients(model, loader(tok, ITEMS, bs), causal_lm_loss, reduction=reduction, progress=False)
        n = "model.layers.0.mlp.down_proj.weight"
        assert float((hf[n] - ref[n]).abs().max()) > 1e-3 * float(ref[n].abs().max())


@pytest.mark.parametrize("method", ["fisher", "ema"])
def test_hessian_estimates_split_batches_into_examples(tok, model, method):
    # Squares and EMAs are not linear in the gradient: batches are split into sequences, so the
    # estimate is the batch-1 one (bit for bit: the same sequences, the same order, the same ops).
    ref = estimate_hessian_diagonal(model, loader(tok, ITEMS, 1), method=method, progress=False)
    got = estimate_hessian_diagonal(model, loader(tok, ITEMS, 5), method=method, progress=False)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    assert got.info["num_examples"] == len(ITEMS)


def test_wanda_norms_do_not_depend_on_batch_size(tok, model):
    ref = collect_input_norms(model, loader(tok, ITEMS, 1), progress=False)
    for bs, left in ((4, False), (12, True)):
        got = collect_input_norms(model, loader(tok, ITEMS, bs, left=left), progress=False)
        for n in ref:
            assert_close_fp32(got[n], ref[n])


def _mask_checks(s1, s8, ratios):
    """Masks of s1 and s8 are equal wherever the k-th / (k+1)-th score gap of s1 exceeds the
    scores' fp32 differences (no near-tie at the threshold); returns how many ratios were checked."""
    flat1 = torch.cat([t.reshape(-1) for t in s1.values()])
    flat8 = torch.cat([t.reshape(-1) for t in s8.values()])
    err = float((flat1 - flat8).abs().max())
    srt = flat1.sort(descending=True).values
    checked = 0
    for ratio in ratios:
        k = int(flat1.numel() * ratio)
        if float(srt[k - 1] - srt[k]) > 4 * err:
            assert build_mask(s1, ratio) == build_mask(s8, ratio), ratio
            checked += 1
    return checked


@pytest.mark.parametrize("kind,hessian", [("wagle", None), ("wagle", "fisher"), ("snip", None), ("gradient", None)])
def test_scores_and_masks_do_not_depend_on_batch_size(tok, model, kind, hessian):
    forget, retain = ITEMS[:6], ITEMS[6:]
    s1 = score_model(model, loader(tok, forget, 1), loader(tok, retain, 1), kind=kind, hessian=hessian,
                     gamma=1e-3, progress=False)
    s8 = score_model(model, loader(tok, forget, 6), loader(tok, retain, 3, left=True), kind=kind, hessian=hessian,
                     gamma=1e-3, progress=False)
    assert list(s1) == list(s8)
    for n in s1:
        assert_close_fp32(s8[n], s1[n], rel=1e-4)
    # The Fisher bracket (w - g_r / (h + eps)) spreads scores over many decades: fewer clear gaps.
    checked = _mask_checks(s1, s8, (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6))
    assert checked >= (1 if hessian else 4)


def test_wanda_scores_and_per_row_masks(tok, model):
    s1 = score_model(model, loader(tok, ITEMS, 1), kind="wanda", progress=False)
    s8 = score_model(model, loader(tok, ITEMS, 8), kind="wanda", progress=False)
    for n in s1:
        assert_close_fp32(s8[n], s1[n])
    assert build_mask(s1, 0.5, scope="per_row") == build_mask(s8, 0.5, scope="per_row")


def test_sequence_without_labels_is_an_error(tok, model):
    b = loader(tok, ITEMS[:3], 3)[0]
    b["labels"][2] = -100
    with pytest.raises(ValueError, match=r"sequence\(s\) \[2\]"):
        accumulate_gradients(model, [b], progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_sequence_loss(model, {"labels": b["labels"]})
    assert all(p.grad is None for p in model.parameters())
