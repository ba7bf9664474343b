"""The G-effect probe: equal to a direct computation of <grad R, grad L> (EMA off), negative for
gradient ascent on the forget risk, split by groups and by mask, over checkpoints, and as a training
callback that leaves the run bit-identical."""
import copy
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

from tiny_models import TINY_QA, char_tokenizer, tiny_llama

pytest.importorskip("transformers")

from wagle_ext.eval.g_effect import GEffectCallback, g_effect, plot_g_effect, weight_groups  # noqa: E402
from wagle_ext.unlearn.data import ForgetRetainDataset, QACollator  # noqa: E402
from wagle_ext.unlearn.objectives import _forward_logits, get_objective, nll_loss, token_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=16, layers=3, heads=2, intermediate=32)
    forget, retain = TINY_QA[:4], TINY_QA[4:]
    ds = ForgetRetainDataset(forget, retain, seed=0)
    loader = DataLoader(ds, batch_size=2, collate_fn=QACollator(tok))
    return tok, model, loader


def _grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.float() for g in torch.autograd.grad(loss, params)]


def _nll(model, seq):
    return nll_loss(*token_logprobs(_forward_logits(model, seq), seq["labels"]))


def _dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


@pytest.mark.parametrize("objective", ["ga", "graddiff"])
def test_equals_direct_inner_product(setup, objective):
    _, model, loader = setup
    batch = next(iter(loader))
    res = g_effect(model, objective, [batch], ema=None)
    rec = res["records"][0]
    obj = get_objective(objective)
    g_l = _grad(model, obj(model, batch)[0])
    g_f = _grad(model, _nll(model, batch["forget"]))
    g_r = _grad(model, _nll(model, batch["retain"]))
    assert rec["e_unlearn"] == pytest.approx(_dot(g_f, g_l), rel=1e-5)
    assert rec["e_retain"] == pytest.approx(_dot(g_r, g_l), rel=1e-5, abs=1e-9)
    # gradient ascent on the forget risk: e_unlearn = -|grad R_f|^2 < 0, a forgetting step
    assert rec["e_unlearn"] < 0
    if objective == "ga":
        assert rec["e_unlearn"] == pytest.approx(-_dot(g_f, g_f), rel=1e-5)
    # the groups add up to the totals
    for key in ("e_unlearn", "e_retain"):
        assert sum(g[key] for g in rec["groups"].values()) == pytest.approx(rec[key], rel=1e-9, abs=1e-12)
    assert set(rec["groups"]) == {"embed", "layers 0-9", "other", "lm_head"} - (
        {"lm_head"} if model.config.tie_word_embeddings else set())


def test_groups_bands_and_mask_split(setup, tmp_path):
    _, model, loader = setup
    groups = weight_groups(model, layer_band=2)
    assert {"embed", "layers 0-1", "layers 2-3", "other"} <= set(groups.values())
    from wagle_ext.masks import build_mask

    scores = {n: p.detach().abs() for n, p in model.named_parameters()}
    mask = build_mask(scores, 0.3, model=model)
    batch = next(iter(loader))
    rec = g_effect(model, "ga", [batch], ema=None, mask=mask, layer_band=2)["records"][0]
    for g in rec["groups"].values():
        assert g["e_unlearn_masked"] + g["e_unlearn_frozen"] == pytest.approx(g["e_unlearn"], rel=1e-9, abs=1e-12)
    # a masked probe is drawn with its masked part (and the frozen part on request)
    import matplotlib.pyplot as plt

    saved = []
    orig = plt.Figure.savefig
    try:
        plt.Figure.savefig = lambda fig, *a, **k: (saved.append(
            sorted(line.get_label() for ax in fig.axes for line in ax.get_lines())), orig(fig, *a, **k))
        plot_g_effect({"ga": {"records": [dict(rec, step=1)]}}, str(tmp_path / "m.png"), frozen=True)
    finally:
        plt.Figure.savefig = orig
    assert "ga unlearn (masked weights)" in saved[0] and "ga unlearn (frozen weights)" in saved[0]
    assert "ga unlearn" not in saved[0]


def test_ema_of_equal_gradients_is_the_plain_value(setup):
    _, model, loader = setup
    batch = next(iter(loader))
    plain = g_effect(model, "graddiff", [batch], ema=None)["records"][0]["e_unlearn"]
    smoothed = g_effect(model, "graddiff", [batch, batch, batch], ema=0.4)["records"]
    for r in smoothed:
        assert r["e_unlearn"] == pytest.approx(plain, rel=1e-6)


def test_over_checkpoints(setup, tmp_path):
    tok, model, loader = setup
    paths = []
    m = copy.deepcopy(model)
    for step in (2, 4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        d = tmp_path / f"checkpoint-{step}"
        m.save_pretrained(d)
        paths.append(str(d))
    res = g_effect(paths, "graddiff", loader, ema=None)
    assert [r["step"] for r in res["records"]] == [2, 4]
    batch = next(iter(loader))
    from transformers import AutoModelForCausalLM

    direct = g_effect(AutoModelForCausalLM.from_pretrained(paths[0]), "graddiff", [batch], ema=None)
    assert res["records"][0]["e_unlearn"] == pytest.approx(direct["records"][0]["e_unlearn"], rel=1e-6)
    png = plot_g_effect({"graddiff": res}, str(tmp_path / "g.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("grad_mode", ["dense", "compact"])
def test_callback_leaves_the_run_bit_identical(setup, tmp_path, grad_mode):
    import transformers

    from wagle_ext.masks import build_mask
    from wagle_ext.unlearn.trainer import UnlearnTrainer

    tok, model, loader = setup
    mask = build_mask({n: p.detach().abs() for n, p in model.named_parameters()}, 0.3, model=model)
    ds = ForgetRetainDataset(TINY_QA[:4], TINY_QA[4:], seed=0)

    def run(with_probe: bool):
        m = copy.deepcopy(model)
        args = transformers.TrainingArguments(str(tmp_path / f"o{with_probe}"), per_device_train_batch_size=2,
                                              learning_rate=1e-2, max_steps=4, report_to=[], use_cpu=True,
                                              save_strategy="no", seed=0, disable_tqdm=True, logging_steps=100)
        tr = UnlearnTrainer(model=m, args=args, objective="graddiff", mask=mask, train_dataset=ds,
                            data_collator=QACollator(tok), grad_mode=grad_mode)
        cb = None
        if with_probe:
            cb = GEffectCallback("graddiff", loader, every=2, mask=mask, path=str(tmp_path / "ge.json"))
            tr.add_callback(cb)
        tr.train()
        return m, cb

    a, _ = run(False)
    b, cb = run(True)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert [r["step"] for r in cb.result["records"]] == [2, 4]
    assert json.loads(open(tmp_path / "ge.json").read())["records"][-1]["step"] == 4
    assert all("e_unlearn_masked" in g for g in cb.result["records"][0]["groups"].values())
    assert os.path.getsize(tmp_path / "ge.json") > 0
