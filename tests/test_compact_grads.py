"""grad_mode="compact" (MaskedAdamW hooks + UnlearnTrainer): the same weights as dense mode, no
dense gradient left after any backward, zero-mask parameters without gradients, resume, errors,
memory_report."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="UnlearnTrainer needs transformers")

import wagle_ext  # noqa: E402
from wagle_ext import ForgetRetainDataset, MaskedAdamW, MaskSet, QACollator, memory_report
from wagle_ext.fictitious_authors import make_fictitious_authors
from wagle_ext.trainer import UnlearnTrainer

from tiny_models import char_tokenizer, tiny_llama


# ----------------------------------------------------------------------------- optimizer level
def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(50, 80), torch.nn.ReLU(), torch.nn.Linear(80, 70),
                              torch.nn.ReLU(), torch.nn.Linear(70, 30))
    return net.to(dtype)


def _masks(net, gen):
    out = {}
    for n, p in net.named_parameters():
        out[n] = torch.rand(p.shape, generator=gen) < 0.15
    out["0.bias"] = torch.zeros_like(out["0.bias"])  # all-zero mask: frozen, no gradient
    del out["4.bias"]  # no mask: dense
    return out


def _train(net, masks, gen_seed, steps=5, ga=1, clip=None, **opt_kw):
    opt = MaskedAdamW.from_model(net, masks, lr=1e-2, weight_decay=0.1, **opt_kw)
    g = torch.Generator().manual_seed(gen_seed)
    compact = opt_kw.get("grad_mode") == "compact"
    for _ in range(steps):
        for _ in range(ga):
            x = torch.randn(16, 50, generator=g).to(next(net.parameters()).dtype)
            (net(x).float().pow(2).mean() / ga).backward()
            if compact:
                assert all(p.grad is None for p in net.parameters())
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("ga", [1, 3])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_optimizer_compact_equals_dense(ga, clip, gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    masks = _masks(_net(), gen)
    dense, compact = _net(), _net()
    _train(dense, masks, seed, ga=ga, clip=clip)
    opt = _train(compact, masks, seed, ga=ga, clip=clip, grad_mode="compact")
    for (n, a), (_, b) in zip(dense.named_parameters(), compact.named_parameters()):
        assert torch.equal(a, b), n
    assert not compact[0].bias.requires_grad and compact[0].bias.grad is None
    assert torch.equal(compact[0].bias, _net()[0].bias)
    assert opt.compact_grad(compact[0].weight) is None  # consumed by the step


def test_optimizer_step_in_backward_equals_dense(gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    masks = _masks(_net(), gen)
    dense, sib = _net(), _net()
    _train(dense, masks, seed)
    _train(sib, masks, seed, grad_mode="compact", step_in_backward=True)
    for (n, a), (_, b) in zip(dense.named_parameters(), sib.named_parameters()):
        assert torch.equal(a, b), n


def test_optimizer_compact_bf16_within_tolerance(gen):
    """bf16 weights: dense mode accumulates the gradients in bf16, compact mode in fp32."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    masks = _masks(_net(), gen)
    dense, compact = _net(dtype=torch.bfloat16), _net(dtype=torch.bfloat16)
    _train(dense, masks, seed, ga=2)
    _train(compact, masks, seed, ga=2, grad_mode="compact")
    for (n, a), (_, b) in zip(dense.named_parameters(), compact.named_parameters()):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=0.05), n
        sel = masks.get(n, torch.ones_like(a, dtype=torch.bool))
        assert torch.equal(a[~sel], b[~sel]) and torch.equal(b[~sel], _net(dtype=torch.bfloat16).state_dict()[n][~sel])


def test_optimizer_set_masks_state_dict_and_detach(gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    net = _net()
    masks = _masks(net, gen)
    opt = _train(net, masks, seed, steps=2, grad_mode="compact")
    # a new mask un-freezes 0.bias and freezes 2.bias
    new = dict(masks)
    new["0.bias"] = torch.ones_like(masks["0.bias"])
    new["2.bias"] = torch.zeros_like(masks["2.bias"])
    names = [n for n, _ in net.named_parameters()]
    opt.set_masks([new.get(n) for n in names])
    assert net[0].bias.requires_grad and not net[2].bias.requires_grad
    net(torch.randn(4, 50)).sum().backward()
    assert opt.compact_grad(net[0].bias).shape == (80,) and opt.compact_grad(net[2].bias) is None
    opt.step()
    # state_dict round trip: same compact state, and the copy steps exactly like the original
    net2 = copy.deepcopy(net)
    opt2 = MaskedAdamW(list(net2.parameters()), masks=[new.get(n) for n in names], lr=1e-2, weight_decay=0.1,
                       grad_mode="compact")
    opt2.load_state_dict(opt.state_dict())
    x = torch.randn(4, 50, generator=gen)
    for m, o in ((net, opt), (net2, opt2)):
        m(x).pow(2).sum().backward()
        o.step()
    for (n, a), (_, b) in zip(net.named_parameters(), net2.named_parameters()):
        assert torch.equal(a, b), n
    opt.detach_hooks()
    assert net[2].bias.requires_grad
    net(torch.randn(4, 50)).sum().backward()
    assert net[0].weight.grad is not None  # dense gradients again


def test_optimizer_config_errors():
    net = _net()
    with pytest.raises(ValueError, match="grad_mode"):
        MaskedAdamW(net.parameters(), grad_mode="sparse")
    with pytest.raises(ValueError, match="weight_decay_mode='all'"):
        MaskedAdamW(net.parameters(), grad_mode="compact", weight_decay_mode="all")
    with pytest.raises(ValueError, match="step_in_backward"):
        MaskedAdamW(net.parameters(), step_in_backward=True)


# ----------------------------------------------------------------------------- trainer level
@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    data = make_fictitious_authors(6, seed=0)
    model = tiny_llama(len(tok), hidden=48, layers=2, heads=4, intermediate=96, seed=0)
    return {"tok": tok, "forget": data["forget10"], "retain": data["retain90"], "model": model}


def _mask(model, seed=0, ratio=0.1):
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < ratio for n, p in model.named_parameters()}
    # whole tensors without any selected weight (as a WAGLE mask leaves many norms and biases)
    for n in list(masks)[:3]:
        masks[n] = torch.zeros_like(masks[n])
    return MaskSet.from_bool_dict(masks)


def _trainer(setup, tmp_path, mask, objective="graddiff", callbacks=(), **kw):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=6,
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.1, logging_steps=2, save_strategy="no",
                report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, max_grad_norm=1.0)
    args.update(kw.pop("args", {}))
    ds = ForgetRetainDataset(setup["forget"], setup["retain"], seed=0)
    return UnlearnTrainer(model=copy.deepcopy(setup["model"]), args=transformers.TrainingArguments(**args),
                          objective=objective, mask=mask, train_dataset=ds, data_collator=QACollator(setup["tok"]),
                          callbacks=list(callbacks), **kw)


class _NoDenseGrads(transformers.TrainerCallback):
    """After every backward (micro-step end, and before the optimizer step): no p.grad anywhere."""

    def __init__(self):
        self.checks = 0

    def _check(self, model):
        assert all(p.grad is None for p in model.parameters())
        self.checks += 1

    def on_substep_end(self, args, state, control, model=None, **kw):
        self._check(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self._check(model)


@pytest.mark.parametrize("ga,clip", [(1, 1.0), (2, 1.0), (2, 0.0), (1, 1e-3)])
def test_trainer_compact_equals_dense(setup, tmp_path, ga, clip):
    mask = _mask(setup["model"])
    runs = {}
    for mode in ("dense", "compact"):
        cb = _NoDenseGrads()
        tr = _trainer(setup, tmp_path / mode, mask, objective="npo", grad_mode=mode,
                      callbacks=[cb] if mode == "compact" else [],
                      args={"gradient_accumulation_steps": ga, "max_grad_norm": clip})
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.train()
        runs[mode] = tr
        if mode == "compact":
            assert cb.checks >= 6 * min(ga, 1.5)  # every micro-batch (an epoch of 3 ends a step early)
            logged = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
            dense_logged = [h["grad_norm"] for h in runs["dense"].state.log_history if "grad_norm" in h]
            assert len(logged) == len(dense_logged) > 0
            if clip:  # dense mode logs the masked norm it clipped with; compact mode the same
                assert logged == pytest.approx(dense_logged, rel=1e-5)
    masks = mask.for_model(runs["compact"].model)
    worst = 0.0
    for (n, a), (_, b) in zip(runs["dense"].model.named_parameters(), runs["compact"].model.named_parameters()):
        if ga == 1:
            # one micro-batch: the forget and retain contributions add in either order, bit-identical
            assert torch.equal(a, b), n
        else:
            # with accumulation the dense run adds (f1 + r1) + (f2 + r2), the compact run
            # ((f1 + r1) + f2) + r2 (terms are backpropagated one at a time): fp32 rounding only
            worst = max(worst, float((a - b).detach().abs().max()))
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n
        sel = masks[n].to_bool()
        assert torch.equal(b.detach()[~sel], before[n][~sel]), n
        if masks[n].nnz == 0:
            assert not b.requires_grad and b.grad is None, n
    assert sum(int((b.detach() != before[n]).sum()) for n, b in runs["compact"].model.named_parameters()) > 0
    print(f"ga={ga} clip={clip}: largest |dense - compact| = {worst:.2e}")


def test_trainer_step_in_backward_equals_dense(setup, tmp_path):
    mask = _mask(setup["model"], seed=1)
    dense = _trainer(setup, tmp_path / "d", mask, args={"max_grad_norm": 0.0})
    dense.train()
    sib = _trainer(setup, tmp_path / "s", mask, grad_mode="compact", step_in_backward=True,
                   callbacks=[_NoDenseGrads()], args={"max_grad_norm": 0.0})
    sib.train()
    for (n, a), (_, b) in zip(dense.model.named_parameters(), sib.model.named_parameters()):
        assert torch.equal(a, b), n


def test_trainer_compact_resume_is_exact(setup, tmp_path):
    mask = _mask(setup["model"], seed=2)
    full = _trainer(setup, tmp_path / "full", mask, grad_mode="compact", args={"max_steps": 6})
    full.train()
    part = _trainer(setup, tmp_path / "part", mask, grad_mode="compact",
                    args={"max_steps": 6, "save_strategy": "steps", "save_steps": 3})
    part.train()
    ckpt = os.path.join(str(tmp_path / "part"), "checkpoint-3")
    resumed = _trainer(setup, tmp_path / "part", mask, grad_mode="compact", args={"max_steps": 6})
    resumed.train(resume_from_checkpoint=ckpt)
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


def test_trainer_grad_mode_errors(setup, tmp_path):
    mask = _mask(setup["model"])
    with pytest.raises(ValueError, match="needs a mask"):
        _trainer(setup, tmp_path, None, grad_mode="compact")
    with pytest.raises(ValueError, match="clip_before_mask"):
        _trainer(setup, tmp_path, mask, grad_mode="compact", clip_before_mask=True)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        _trainer(setup, tmp_path, mask, grad_mode="compact", weight_decay_mode="all")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        _trainer(setup, tmp_path, mask, grad_mode="compact", step_in_backward=True,
                 args={"gradient_accumulation_steps": 2, "max_grad_norm": 0.0})
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        _trainer(setup, tmp_path, mask, grad_mode="compact", step_in_backward=True)
    with pytest.raises(ValueError, match="needs grad_mode='compact'"):
        _trainer(setup, tmp_path, mask, step_in_backward=True, args={"max_grad_norm": 0.0})
    with pytest.raises(ValueError, match="grad_mode must be"):
        _trainer(setup, tmp_path, mask, grad_mode="lazy")


# ----------------------------------------------------------------------------- memory_report
def test_memory_report_counts(setup, tmp_path):
    mask = _mask(setup["model"])
    tr = _trainer(setup, tmp_path, mask, grad_mode="compact")
    tr.create_optimizer()
    rep = tr.initial_memory_report
    model = tr.model
    n_params = sum(p.numel() for p in model.parameters())
    nnz = sum(mask[n].nnz for n, _ in model.named_parameters())
    assert rep["weights"] == 4 * n_params
    assert rep["gradients"] == 4 * nnz and rep["optimizer_state"] == 0  # compact buffers allocated up front
    assert rep["masks"] == sum(m.bits.numel() for m in mask.for_model(model).values()) + \
        tr.optimizer.state_bytes()["directory"]
    assert rep["dense_adamw"] == 16 * n_params
    frozen = sum(p.numel() for n, p in model.named_parameters() if mask[n].nnz == 0)
    assert rep["frozen_params"] == 0 and rep["trainable_params"] == n_params and frozen > 0
    # after one step: compact gradient buffers and compact moments, 4 B per selected weight each
    tr.train()
    after = memory_report(model, tr.optimizer)
    assert after["gradients"] == 4 * nnz
    assert after["optimizer_state"] == 8 * nnz + 4 * sum(1 for n, _ in model.named_parameters() if mask[n].nnz)
    assert after["total"] < 0.5 * after["dense_adamw"]
    # torch AdamW over the same model: dense state
    m2 = copy.deepcopy(setup["model"])
    opt = torch.optim.AdamW(m2.parameters())
    m2(torch.randint(0, 10, (1, 5))).logits.sum().backward()
    opt.step()
    dense = wagle_ext.memory_report(m2, opt)
    assert dense["gradients"] == 4 * n_params and dense["optimizer_state"] >= 8 * n_params
