"""MaskedAdamW: parity with torch AdamW, masking semantics, checkpoints, set_masks, schedulers,
GradScaler, transformers.Trainer."""
import io

import pytest
import torch

import wagle_ext
from wagle_ext import MaskedAdamW, PackedMask, ops

TORCH_EXACT = ops.torch_fused_adamw_tail() > 0


def _ulps(a, b):
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def _params(gen, shapes=((37, 53), (1000,), (3,), (129, 7))):
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _copy(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def _set_grads(gen, *param_lists, masks=None, scale=1.0):
    for i, p in enumerate(param_lists[0]):
        g = torch.randn(p.shape, generator=gen) * scale
        for lst in param_lists:
            lst[i].grad = g.clone()


@pytest.mark.skipif(not TORCH_EXACT, reason="torch build without FMA")
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, False), (False, True), (True, True)])
def test_full_mask_all_mode_matches_torch_fused(amsgrad, maximize, gen):
    ps = _params(gen)
    qs = _copy(ps)
    masks = [torch.ones(p.shape, dtype=torch.bool) for p in ps]
    masks[2] = None  # a dense param takes the same path
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    opt = MaskedAdamW(ps, masks=masks, weight_decay_mode="all", **kw)
    ref = torch.optim.AdamW(qs, fused=True, **kw)
    for _ in range(50):
        _set_grads(gen, ps, qs)
        opt.step()
        ref.step()
        for p, q in zip(ps, qs):
            assert _ulps(p.detach(), q.detach()) <= 1
            assert _ulps(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"].view(-1)) <= 1


@pytest.mark.skipif(not TORCH_EXACT, reason="torch build without FMA")
def test_grad_scaler_with_inf_step_matches_torch_fused(gen):
    ps = _params(gen)
    qs = _copy(ps)
    opt = MaskedAdamW(ps, masks=[torch.ones(p.shape, dtype=torch.bool) for p in ps], lr=1e-2,
                      weight_decay=0.1, weight_decay_mode="all")
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, fused=True)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    targets = [torch.randn(p.shape, generator=gen) for p in ps]
    for step in range(20):
        for params, opt_, scaler in ((ps, opt, sa), (qs, ref, sb)):
            opt_.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets))
            scaler.scale(loss).backward()
            if step == 7:
                params[1].grad[3] = float("inf")
            scaler.step(opt_)
            scaler.update()
        for p, q in zip(ps, qs):
            assert _ulps(p.detach(), q.detach()) <= 1
        assert sa.get_scale() == sb.get_scale()
        assert float(opt.state[ps[0]]["step"]) == float(ref.state[qs[0]]["step"])
    assert float(opt.state[ps[0]]["step"]) == 19  # the inf step was undone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_mask_masked_mode(dtype, gen):
    """Frozen weights bit-identical after 50 steps with wd=0.1; selected weights follow AdamW run
    on the selected subset alone."""
    ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params(gen)]
    p0 = [p.detach().clone() for p in ps]
    masks = [torch.rand(p.shape, generator=gen) < 0.3 for p in ps]
    subs = [torch.nn.Parameter(p.detach()[m].float().clone()) for p, m in zip(ps, masks)]
    opt = MaskedAdamW(ps, masks=masks, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(subs, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(50):
        for p, m, s in zip(ps, masks, subs):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad = g
            s.grad = g[m].float()
        opt.step()
        ref.step()
        if dtype == torch.bfloat16:  # the subset runs fp32 master weights; ours round to bf16
            for s, p, m in zip(subs, ps, masks):
                s.data.copy_(p.detach()[m].float())
    for p, q, m, s in zip(ps, p0, masks, subs):
        assert torch.equal(p.detach()[~m], q[~m])
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(p.detach()[m].float(), s.detach(), **tol)
        if m.any():
            assert opt.state[p]["exp_avg"].numel() == int(m.sum())
        else:
            assert p not in opt.state  # an all-zero mask costs nothing


@pytest.mark.skipif(not TORCH_EXACT, reason="torch build without FMA")
def test_all_mode_matches_grad_times_mask_torch_adamw(gen):
    ps = _params(gen)
    qs = _copy(ps)
    masks = [torch.rand(p.shape, generator=gen) < 0.4 for p in ps]
    opt = MaskedAdamW(ps, masks=[PackedMask.from_bool(m) for m in masks], lr=1e-2, weight_decay=0.1,
                      weight_decay_mode="all")
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(30):
        _set_grads(gen, ps, qs)
        for q, m in zip(qs, masks):
            q.grad *= m  # the WAGLE / SalUn recipe
        opt.step()
        ref.step()
        for p, q in zip(ps, qs):
            assert _ulps(p.detach(), q.detach()) <= 1


def test_none_mode_and_empty_mask_cost_nothing(gen):
    ps = _params(gen)
    p0 = [p.detach().clone() for p in ps]
    masks = [torch.zeros(p.shape, dtype=torch.bool) for p in ps]
    masks[1] = torch.rand(ps[1].shape, generator=gen) < 0.5
    opt = MaskedAdamW(ps, masks=masks, lr=1e-2, weight_decay=0.5, weight_decay_mode="none")
    _set_grads(gen, ps)
    ps[1].grad.zero_()  # zero grad, no decay: the selected weights cannot move on step 1 (m = 0)
    opt.step()
    for i, (p, q) in enumerate(zip(ps, p0)):
        assert torch.equal(p.detach(), q)
        assert (p in opt.state) == (i == 1)
    assert opt.state_bytes()["moments"] == 2 * 4 * int(masks[1].sum())


def _run(opt, ps, gen_seed, steps):
    g = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_mid_run(dtype, gen):
    ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params(gen)]
    qs = _copy(ps)
    masks = [torch.rand(p.shape, generator=gen) < 0.25 for p in ps]
    masks[3] = None
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    a = MaskedAdamW(ps, masks=masks, **kw)
    _run(a, ps, 1, 10)
    _run(a, ps, 2, 10)
    b = MaskedAdamW(qs, masks=masks, **kw)
    _run(b, qs, 1, 10)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    c = MaskedAdamW(qs, lr=0.5)  # fresh optimizer, no masks: all come from the checkpoint
    c.load_state_dict(sd)
    assert c.param_groups[0]["lr"] == 1e-2
    assert c.state[qs[0]]["exp_avg"].dtype == torch.float32
    _run(c, qs, 2, 10)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())
    # small checkpoints: compact moments
    assert sd["state"][0]["exp_avg"].numel() == int(masks[0].sum())


def test_set_masks_remaps_state(gen):
    n = 5000
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    old = torch.rand(n, generator=gen) < 0.5
    new = torch.rand(n, generator=gen) < 0.5
    opt = MaskedAdamW([p], masks=[old], lr=1e-2, weight_decay=0.1)
    _run(opt, [p], 3, 5)
    m_old = torch.zeros(n)
    m_old[old] = opt.state[p]["exp_avg"]
    opt.set_masks([new])
    st = opt.state[p]
    assert st["exp_avg"].numel() == int(new.sum())
    kept = (old & new)[new]
    assert torch.equal(st["exp_avg"][kept], m_old[new][kept])
    assert bool((st["exp_avg"][~kept] == 0).all())
    assert bool((st["step_offsets"][~kept] == 5).all()) and bool((st["step_offsets"][kept] == 0).all())
    # One more step: new entries update like a fresh AdamW (own step 1), kept ones continue.
    fresh_p = torch.nn.Parameter(p.detach().clone())
    fresh = MaskedAdamW([fresh_p], masks=[new & ~old], lr=1e-2, weight_decay=0.1)
    g = torch.randn(n, generator=gen)
    p.grad, fresh_p.grad = g.clone(), g.clone()
    before = p.detach().clone()
    opt.step()
    fresh.step()
    newly = new & ~old
    assert torch.equal(p.detach()[newly], fresh_p.detach()[newly])
    assert torch.equal(p.detach()[~new], before[~new])
    assert float(st["step"]) == 6


def test_lr_scheduler(gen):
    ps = _params(gen)
    qs = _copy(ps)
    opt = MaskedAdamW(ps, masks=[torch.ones(p.shape, dtype=torch.bool) for p in ps], lr=1e-2,
                      weight_decay_mode="all")
    ref = torch.optim.AdamW(qs, lr=1e-2, fused=True)
    sa = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    for _ in range(5):
        _set_grads(gen, ps, qs)
        opt.step(); ref.step(); sa.step(); sb.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_param_groups_and_state_size(gen):
    a = torch.nn.Parameter(torch.randn(200, 500, generator=gen))
    b = torch.nn.Parameter(torch.randn(300, generator=gen))
    ma = torch.rand(a.shape, generator=gen) < 0.1
    opt = MaskedAdamW([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.0}], masks=[ma, None])
    b0 = b.detach().clone()
    a.grad = torch.randn(a.shape, generator=gen)
    b.grad = torch.randn(b.shape, generator=gen)
    opt.step()
    assert torch.equal(b.detach(), b0)
    sizes = opt.state_bytes()
    dense_bytes_a = 8 * a.numel()
    a_bytes = sizes["total"] - 8 * b.numel()
    assert a_bytes <= 0.12 * dense_bytes_a, sizes


def test_bad_inputs(gen):
    ps = _params(gen)
    with pytest.raises(ValueError, match="shape"):
        MaskedAdamW(ps, masks=[torch.ones(3, 3, dtype=torch.bool), None, None, None])
    with pytest.raises(ValueError, match="masks has"):
        MaskedAdamW(ps, masks=[None])
    with pytest.raises(ValueError, match="learning rate"):
        MaskedAdamW(ps, lr=-1e-3)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        MaskedAdamW(ps, weight_decay_mode="decoupled")
    with pytest.raises(TypeError, match="from_model"):
        MaskedAdamW(ps, masks={"w": None})
    model = torch.nn.Linear(4, 3)
    with pytest.raises(KeyError, match="does not have"):
        MaskedAdamW.from_model(model, {"weight": torch.ones(3, 4, dtype=torch.bool), "nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'weight'"):
        MaskedAdamW.from_model(model, {"weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        MaskedAdamW.from_model(model, {"weight": torch.ones(3, 4)})


def test_trainer_tiny_llama_keeps_frozen_weights(tmp_path, gen):
    transformers = pytest.importorskip("transformers")
    from tiny_models import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    masks = {n: torch.rand(p.shape, generator=gen) < 0.05 for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedAdamW.from_model(model, masks, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    text = "Orlen Vask was born in Tarsel Bay."
    ids = tok(text, return_tensors="pt")["input_ids"][0]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": ids, "labels": ids.clone()}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=2,
                                          use_cpu=True, report_to=[], logging_steps=100, save_strategy="no",
                                          max_grad_norm=1.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), optimizers=(opt, sched))
    trainer.train()
    moved = 0
    for n, p in model.named_parameters():
        m = masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), n
        moved += int((p.detach()[m] != before[n][m]).sum())
    assert moved > 0
    assert trainer.optimizer.optimizer is opt if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is opt


# ----------------------------------------------------------------------------- from_model(missing=)
def _three_layer(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3))


def _run_steps(net, opt, gen, steps=4):
    for _ in range(steps):
        x = torch.randn(7, 6, generator=gen)
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("grad_mode", ["dense", "compact"])
def test_from_model_missing_frozen_and_dense(gen, grad_mode):
    from wagle_ext.masks import MaskSet

    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    covered = {"2.weight": torch.rand(5, 8, generator=gen) < 0.5, "2.bias": torch.ones(5, dtype=torch.bool)}
    modes = ("masked", "all") if grad_mode == "dense" else ("masked",)
    for wd_mode in modes:
        # missing="frozen": every uncovered parameter is bit-identical, even with weight_decay_mode="all".
        net = _three_layer(seed)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = MaskedAdamW.from_model(net, covered, missing="frozen", lr=1e-2, weight_decay=0.5,
                                     weight_decay_mode=wd_mode, grad_mode=grad_mode)
        _run_steps(net, opt, gen)
        for n, p in net.named_parameters():
            if n in covered:
                m = covered[n]
                assert not torch.equal(p.detach()[m], before[n][m]), n
                if wd_mode == "masked":  # "all" decays the unselected weights of covered tensors (by design)
                    assert torch.equal(p.detach()[~m], before[n][~m]), n
            else:
                assert torch.equal(p.detach(), before[n]), (wd_mode, n)
                assert not opt.state.get(p), n  # no moments kept for them
        if grad_mode == "compact":
            assert not net[0].weight.requires_grad and net[2].weight.requires_grad
        # missing="dense" (and the plain-dict default): uncovered parameters move.
        for kw in ({"missing": "dense"}, {}):
            net = _three_layer(seed)
            opt = MaskedAdamW.from_model(net, covered, lr=1e-2, weight_decay=0.5, weight_decay_mode=wd_mode,
                                         grad_mode=grad_mode, **kw)
            _run_steps(net, opt, gen)
            assert not torch.equal(net[0].weight.detach(), before["0.weight"])
            assert not torch.equal(net[4].bias.detach(), before["4.bias"])
    # A MaskSet brings its own missing (overridable).
    ms = MaskSet.from_bool_dict(covered)
    assert ms.missing == "frozen"
    net = _three_layer(seed)
    opt = MaskedAdamW.from_model(net, ms, lr=1e-2, grad_mode=grad_mode)
    _run_steps(net, opt, gen)
    assert torch.equal(net[0].weight.detach(), before["0.weight"])
    net = _three_layer(seed)
    opt = MaskedAdamW.from_model(net, ms, missing="dense", lr=1e-2, grad_mode=grad_mode)
    _run_steps(net, opt, gen)
    assert not torch.equal(net[0].weight.detach(), before["0.weight"])


def test_from_model_missing_errors():
    net = _three_layer(0)
    with pytest.raises(ValueError, match="missing"):
        MaskedAdamW.from_model(net, {}, missing="zero")
    with pytest.raises(ValueError, match="every trainable parameter is frozen"):
        MaskedAdamW.from_model(net, {}, missing="frozen")
