"""The DeepSpeed ZeRO path: masked gradients + frozen parameters with DeepSpeed's own AdamW.

Without DeepSpeed: the config generator, the shipped accelerate configs, and the masking itself
with ``torch.optim.AdamW(fused=True)`` standing in for DeepSpeed's optimizer (bit for bit against
MaskedAdamW, whose arithmetic is torch's fused AdamW). With DeepSpeed installed (it is not a
dependency): one process, ZeRO stage 0 with MaskedAdamW as the client optimizer, and stages 2 and 3
with the masked hooks, against MaskedAdamW (fp32 tolerance: DeepSpeed runs torch's non-fused AdamW).
"""
import copy
import os

import pytest
import torch

from wagle_ext import MaskedAdamW
from wagle_ext.ops import PackedMask
from wagle_ext.parallel.deepspeed import deepspeed_config, mask_gradients_for_zero

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3))


def _masks(model, gen):
    ps = dict(model.named_parameters())
    return {"0.weight": PackedMask.from_bool(torch.rand(ps["0.weight"].shape, generator=gen) < 0.3),
            "2.weight": PackedMask.full(ps["2.weight"].shape, False),  # selects nothing: frozen
            "4.weight": PackedMask.from_bool(torch.rand(ps["4.weight"].shape, generator=gen) < 0.5),
            "0.bias": None}  # dense; 2.bias, 4.bias: missing


def _loss(model, step, rows=slice(None)):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(6, 9, generator=g)[rows]
    return (model(x) ** 2).mean()


def _masked_adamw_optimizer(model, masks, wd, mode):
    """MaskedAdamW with the groups of mask_gradients_for_zero: dense 0.bias decays; the partly selected
    weights decay only with mode "all" (exact=False); nothing selected or missing: no gradient."""
    ps = dict(model.named_parameters())
    for n in ("2.weight", "2.bias", "4.bias"):
        ps[n].requires_grad_(False)
    groups = [{"params": [ps["0.bias"]], "weight_decay": wd},
              {"params": [ps["0.weight"], ps["4.weight"]], "weight_decay": wd if mode == "all" else 0.0}]
    return MaskedAdamW(groups, masks=[None, masks["0.weight"], masks["4.weight"]], lr=1e-2, weight_decay=wd,
                       weight_decay_mode=mode)


def _masked_adamw_run(model, masks, wd, mode, steps=3):
    opt = _masked_adamw_optimizer(model, masks, wd, mode)
    for s in range(steps):
        _loss(model, s).backward()
        opt.step()
        opt.zero_grad()
    return model


def test_masked_hooks_with_torch_adamw_equal_masked_adamw(gen):
    base = _model()
    masks = _masks(base, gen)
    init = copy.deepcopy(base)
    for exact, mode in ((True, "masked"), (False, "all")):
        m = copy.deepcopy(init)
        groups, handles = mask_gradients_for_zero(m, masks, weight_decay=0.1, missing="frozen", exact=exact)
        assert not m[2].weight.requires_grad and not m[2].bias.requires_grad  # nothing selected / missing
        opt = torch.optim.AdamW(groups, lr=1e-2, fused=True)
        for s in range(3):
            _loss(m, s).backward()
            opt.step()
            opt.zero_grad()
        ref = _masked_adamw_run(copy.deepcopy(init), masks, 0.1, mode)
        for (n, a), b in zip(m.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), (exact, n)
        if exact:
            for n, mk in masks.items():
                if mk is not None:
                    sel = mk.to_bool()
                    assert torch.equal(dict(m.named_parameters())[n][~sel], dict(init.named_parameters())[n][~sel])
        for h in handles:
            h.remove()


def test_deepspeed_config_and_errors():
    cfg = deepspeed_config(3, bf16=True, offload_optimizer=True)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["bf16"]["enabled"]
    assert deepspeed_config(0, gradient_clipping=None)["gradient_clipping"] == 0.0
    assert deepspeed_config(2)["bf16"]["enabled"] == "auto"  # filled from TrainingArguments(bf16=)
    for bad in (4, -1, True, "2"):
        with pytest.raises(ValueError, match="stage"):
            deepspeed_config(bad)
    with pytest.raises(ValueError, match="offload"):
        deepspeed_config(0, offload_optimizer=True)
    m = _model()
    with pytest.raises(KeyError):
        mask_gradients_for_zero(m, {"nope": None}, weight_decay=0.0)
    with pytest.raises(ValueError, match="shape"):
        mask_gradients_for_zero(m, {"0.weight": PackedMask.full((3, 3))}, weight_decay=0.0)
    with pytest.raises(ValueError, match="missing"):
        mask_gradients_for_zero(m, {}, weight_decay=0.0, missing="maybe")


def test_shipped_accelerate_configs_parse():
    yaml = pytest.importorskip("yaml")
    import json

    seen = {}
    for name in ("accelerate_ddp.yaml", "accelerate_fsdp2.yaml", "accelerate_deepspeed.yaml"):
        with open(os.path.join(EXAMPLES, name)) as f:
            seen[name] = yaml.safe_load(f)
        assert seen[name]["num_processes"] >= 2
    assert seen["accelerate_ddp.yaml"]["distributed_type"] == "MULTI_GPU"
    fsdp = seen["accelerate_fsdp2.yaml"]
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    ds = seen["accelerate_deepspeed.yaml"]
    assert ds["distributed_type"] == "DEEPSPEED"
    with open(os.path.join(EXAMPLES, ds["deepspeed_config"]["deepspeed_config_file"].split("/")[-1])) as f:
        assert json.load(f) == deepspeed_config(2)  # the shipped JSON is what the generator writes


@pytest.fixture()
def ds_single_process(tmp_path):
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    try:
        yield deepspeed
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero_runs_masked(ds_single_process, gen):
    deepspeed = ds_single_process
    base = _model()
    masks = _masks(base, gen)
    ref = _masked_adamw_run(copy.deepcopy(base), masks, 0.1, "masked")
    for stage in (0, 2, 3):
        m = copy.deepcopy(base)
        cfg = deepspeed_config(stage, bf16=False, lr=1e-2, weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8,
                               gradient_clipping=None)
        cfg.update(train_micro_batch_size_per_gpu=6, gradient_accumulation_steps=1, train_batch_size=6)
        if stage == 0:  # no partitions: MaskedAdamW itself is the client optimizer
            cfg.pop("optimizer")
            opt = _masked_adamw_optimizer(m, masks, 0.1, "masked")
            engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=cfg)
        else:
            groups, _ = mask_gradients_for_zero(m, masks, weight_decay=0.1, missing="frozen")
            engine, *_ = deepspeed.initialize(model=m, model_parameters=groups, config=cfg)
        for s in range(3):
            engine.backward(_loss(engine, s))
            engine.step()
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(m.parameters())):
                got = [p.detach().clone() for p in m.parameters()]
        else:
            got = [p.detach().clone() for p in m.parameters()]
        for (n, b), a in zip(ref.named_parameters(), got):
            if stage == 0:
                assert torch.equal(a, b), (stage, n)
            else:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda s, n=n: f"stage {stage} {n}: {s}")
            mk = masks.get(n)
            if mk is not None:
                sel = mk.to_bool()
                assert torch.equal(a[~sel], dict(base.named_parameters())[n][~sel]), (stage, n)  # bit-identical


def test_unlearn_trainer_refuses_mask_under_deepspeed():
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from wagle_ext.unlearn.trainer import _check_deepspeed

    with pytest.raises(ValueError, match="mask_gradients_for_zero"):
        _check_deepspeed(object(), SimpleNamespace(deepspeed="examples/deepspeed_zero2.json"))
    _check_deepspeed(None, SimpleNamespace(deepspeed="examples/deepspeed_zero2.json"))  # no mask: DeepSpeed's run
    _check_deepspeed(object(), SimpleNamespace(deepspeed=None))


def _ds_worker(rank: int, world: int, outdir: str) -> None:
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{outdir}/rendezvous", rank=rank, world_size=world)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        torch.set_num_threads(1)
        base = _model()
        masks = {n: None if m is None else PackedMask.from_bool(m)
                 for n, m in torch.load(os.path.join(outdir, "masks.pt")).items()}
        out = {}
        for stage in (2, 3):
            m = copy.deepcopy(base)
            cfg = deepspeed_config(stage, bf16=False, lr=1e-2, weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8,
                                   gradient_clipping=None)
            cfg.update(train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=1, train_batch_size=3 * world)
            groups, _ = mask_gradients_for_zero(m, masks, weight_decay=0.1, missing="frozen")
            engine, *_ = deepspeed.initialize(model=m, model_parameters=groups, config=cfg)
            for s in range(3):
                engine.backward(_loss(engine, s, slice(3 * rank, 3 * rank + 3)))
                engine.step()
            with deepspeed.zero.GatheredParameters(list(m.parameters()), enabled=stage == 3):
                out[stage] = [p.detach().clone() for p in m.parameters()]
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero_two_processes(tmp_path, gen):
    """ZeRO-2 and ZeRO-3 over 2 gloo processes, half the batch each: the masked hooks act on each
    rank's gradient before DeepSpeed averages them, which commutes with the mask."""
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    base = _model()
    masks = _masks(base, gen)
    torch.save({n: None if m is None else m.to_bool() for n, m in masks.items()}, tmp_path / "masks.pt")
    mp.start_processes(_ds_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ref = _masked_adamw_run(copy.deepcopy(base), masks, 0.1, "masked")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for stage, params in got.items():
            for (n, b), a in zip(ref.named_parameters(), params):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda s, n=n: f"stage {stage} {n}: {s}")
                mk = masks.get(n)
                if mk is not None:
                    sel = mk.to_bool()
                    assert torch.equal(a[~sel], dict(base.named_parameters())[n][~sel]), (stage, n)
