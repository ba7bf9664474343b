"""LoRA unlearning (issue 17): Fisher importances against a direct per-batch loop, FILA's
initialisation (same logits, non-zero lora_B, Llama and GPT-2 Conv1D layers), LoRA unlearning that
leaves the base weights bit-identical with a reference equal to the starting model, exports that
reload as the trained model (and the LoKU saving quirk they avoid), and the exact budget of
attribution-guided adapter placement. Tiny models from configs, no downloads."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import wagle_ext as W  # noqa: E402
from wagle_ext.lora import (FisherImportance, InitialAdapterReference, add_lora, fila_init, lora_layers,  # noqa: E402
                            lora_param_count, save_adapter_with_base, save_merged, select_lora_targets)
from wagle_ext.unlearn.data import QACollator  # noqa: E402

from tiny_models import TINY_QA, char_tokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def batches(tok):
    coll = QACollator(tok)
    # odd batch sizes and uneven answer lengths: the token weighting matters
    forget = [coll(TINY_QA[0:3]), coll(TINY_QA[3:4])]
    retain = [coll(TINY_QA[4:6]), coll(TINY_QA[6:8])]
    return forget, retain, coll(TINY_QA)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _direct_fisher(model, loader, names):
    """LoKU's loop written out: per batch, backward of the token-mean CE, += n_b * grad^2, / sum n_b."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    tokens = 0
    model.eval()
    for b in loader:
        model.zero_grad(set_to_none=True)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        n_b = int((b["labels"][:, 1:] != -100).sum())
        for n in names:
            acc[n] += params[n].grad.double().pow(2) * n_b
        tokens += n_b
    model.zero_grad(set_to_none=True)
    return {n: a / tokens for n, a in acc.items()}, tokens


def test_fisher_importance_equals_a_direct_per_batch_loop(tok, batches):
    forget, retain, _ = batches
    model = tiny_llama(len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    imp = W.fisher_importance(model, forget, retain, progress=False)
    assert isinstance(imp, FisherImportance)
    # every decoder-layer linear, never lm_head or embeddings
    assert len(imp.forget) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in imp.forget)
    for which, loader, tokens in (("forget", forget, imp.forget_tokens), ("retain", retain, imp.retain_tokens)):
        ref, n_tok = _direct_fisher(model, loader, list(imp.forget))
        assert tokens == n_tok
        for n, t in getattr(imp, which).items():
            assert t.dtype == torch.float32 and t.shape == before[n].shape
            torch.testing.assert_close(t.double(), ref[n], rtol=1e-5, atol=1e-12 * float(ref[n].abs().max()))
    # batch granularity: squares of batch gradients are not the per-example Fisher
    per_example = W.estimate_hessian_diagonal(model, forget, progress=False)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(per_example[name], imp.forget[name], rtol=1e-2)
    # nothing changed on the model
    assert all(torch.equal(p, before[n]) and p.grad is None and p.requires_grad for n, p in model.named_parameters())


def test_fisher_importance_of_a_peft_model_and_a_paired_loader(tok, batches, tmp_path):
    forget, retain, _ = batches
    model = tiny_llama(len(tok))
    plain = W.fisher_importance(model, forget, retain, modules=["q_proj", "down_proj"], progress=False)
    assert set(plain.forget) == {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                                 for m in ("self_attn.q_proj", "mlp.down_proj")}
    paired = [{"forget": f, "retain": r} for f, r in zip(forget, retain)]
    peft_model = add_lora(model, rank=2, targets=["q_proj", "down_proj"])
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    wrapped = W.fisher_importance(peft_model, paired, paired, modules=["q_proj", "down_proj"], forget_key="forget",
                                  retain_key="retain", progress=False)
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags
    for n in plain.forget:
        torch.testing.assert_close(wrapped.forget[n], plain.forget[n], rtol=1e-5, atol=0)
        torch.testing.assert_close(wrapped.retain[n], plain.retain[n], rtol=1e-5, atol=0)
    path = str(tmp_path / "fisher.safetensors")
    plain.save(path)
    back = FisherImportance.load(path)
    assert back.forget_tokens == plain.forget_tokens and list(back.forget) == list(plain.forget)
    assert all(torch.equal(back.retain[n], plain.retain[n]) for n in plain.retain)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        FisherImportance.load(str(tmp_path / "junk.safetensors"))


def test_fila_keeps_the_logits_and_starts_from_nonzero_lora_b(tok, batches):
    forget, retain, every = batches
    model = tiny_llama(len(tok))
    imp = W.fisher_importance(model, forget, retain, progress=False)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _logits(model, every)

    default = add_lora(copy.deepcopy(model), rank=4)  # PEFT's init: lora_B = 0
    assert all(bool((m.lora_B["default"].weight == 0).all()) for _, m in lora_layers(default))

    rng = torch.get_rng_state()
    peft_model = add_lora(model, rank=4, init="fila", importances=imp, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded PEFT init and SVD; the caller's RNG untouched
    layers = lora_layers(peft_model)
    assert len(layers) == 14
    diff = float((_logits(peft_model, every) - ref).abs().max())
    assert diff <= 1e-4, diff
    for name, layer in layers:
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        assert bool((B != 0).any()) and bool((A != 0).any())
        s = layer.scaling["default"]
        assert s == 2.0  # alpha = 2r
        w_res = layer.get_base_layer().weight
        key = W.naming.normalize_param_name(name + ".weight")
        assert not torch.equal(w_res, original[key])  # the base weight is the residual ...
        torch.testing.assert_close(w_res + s * B @ A, original[key], rtol=0, atol=1e-5)  # ... of W
    # a second FILA factors what the layers compute now (residual + adapter): the logits stay
    report = fila_init(peft_model, imp, seed=4, oversample=4)
    assert float((_logits(peft_model, every) - ref).abs().max()) <= 1e-4
    assert len(report) == 14 and all(0.0 <= v["eps_dominated"] <= 1.0 for v in report.values())
    # rank= / alpha= check the adapters; bad inputs are refused clearly
    with pytest.raises(ValueError, match="rank 4 != rank=8"):
        fila_init(peft_model, imp, rank=8)
    with pytest.raises(TypeError, match="FisherImportance"):
        fila_init(peft_model, {"a": torch.zeros(1)})
    partial = W.fisher_importance(tiny_llama(len(tok)), forget, retain, modules=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="no Fisher importance"):
        fila_init(peft_model, partial)
    with pytest.raises(ValueError, match="needs importances"):
        add_lora(tiny_llama(len(tok)), init="fila")


def test_fila_on_gpt2_conv1d_layers(tok, batches, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    forget, retain, every = batches
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4))
    imp = W.fisher_importance(model, forget, retain, modules=W.lora.GPT2_TARGETS, progress=False)
    assert imp.forget["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
    ref = _logits(model, every)
    peft_model = add_lora(model, rank=4, targets=W.lora.GPT2_TARGETS, init="fila", importances=imp)
    assert len(lora_layers(peft_model)) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    diff = float((_logits(peft_model, every) - ref).abs().max())
    assert diff <= 1e-4, diff
    assert all(bool((m.lora_B["default"].weight != 0).any()) for _, m in lora_layers(peft_model))
    # the merged export of Conv1D layers ([in, out], fan_in_fan_out) and tied embeddings
    with torch.no_grad():
        for _, m in lora_layers(peft_model):
            m.lora_B["default"].weight.add_(0.05)  # stands in for training
    moved = _logits(peft_model, every)
    merged = AutoModelForCausalLM.from_pretrained(save_merged(peft_model, str(tmp_path / "gpt2")))
    assert float((_logits(merged, every) - moved).abs().max()) <= 1e-4 < float((moved - ref).abs().max())


def _train(model, objective, steps=3, **kw):
    import transformers

    from wagle_ext.unlearn.data import ForgetRetainDataset
    from wagle_ext.unlearn.trainer import UnlearnTrainer

    tok = char_tokenizer()
    args = transformers.TrainingArguments(
        output_dir=kw.pop("out"), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=steps,
        lr_scheduler_type="constant", weight_decay=0.1, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", logging_steps=1)
    trainer = UnlearnTrainer(model=model, args=args, objective=objective,
                             train_dataset=ForgetRetainDataset(TINY_QA[:4], TINY_QA[4:], seed=0),
                             data_collator=QACollator(tok), **kw)
    return trainer


def test_lora_unlearning_keeps_the_base_and_exports_the_trained_model(tok, batches, tmp_path):
    import transformers

    forget, retain, every = batches
    model = tiny_llama(len(tok))
    imp = W.fisher_importance(model, forget, retain, progress=False)
    peft_model = add_lora(model, rank=4, init="fila", importances=imp)
    start = _logits(peft_model, every)
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}

    trainer = _train(peft_model, "npo", out=str(tmp_path / "t"))
    # NPO's reference is the starting model (base residual + starting adapters), not the residual alone
    assert isinstance(trainer.ref_model, InitialAdapterReference)
    torch.testing.assert_close(_logits(trainer.ref_model, every), start, rtol=0, atol=1e-5)
    trainer.train()
    first = trainer.state.log_history[0]
    assert abs(first["objective/forget_log_ratio"]) < 1e-4  # step 1 compares the model with itself
    assert trainer.trainable_report["updated"] == sum(p.numel() for p in adapters.values())

    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, adapters[n]), n  # trained ...
        else:
            assert torch.equal(p, base[n]), n  # ... the base is bit-identical (weight decay 0.1 included)
    torch.testing.assert_close(_logits(trainer.ref_model, every), start, rtol=0, atol=1e-5)  # still the start

    trained = _logits(peft_model, every)
    assert float((trained - start).abs().max()) > 1e-2
    merged = transformers.AutoModelForCausalLM.from_pretrained(save_merged(peft_model, str(tmp_path / "merged")))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert float((_logits(merged, every) - trained).abs().max()) <= 1e-4
    pair = W.lora.load_adapter_with_base(save_adapter_with_base(peft_model, str(tmp_path / "pair")))
    assert float((_logits(pair, every) - trained).abs().max()) <= 1e-5
    trainer.save_model(str(tmp_path / "final"))  # the trainer's own save keeps the residual base too
    assert float((_logits(W.lora.load_adapter_with_base(str(tmp_path / "final")), every) - trained).abs().max()) <= 1e-5
    # the LoKU saving quirk these exports avoid: the adapter on the ORIGINAL base is another model
    import peft

    wrong = peft.PeftModel.from_pretrained(tiny_llama(len(tok)), str(tmp_path / "pair" / "adapter"))
    assert float((_logits(wrong, every) - trained).abs().max()) > 1e-2


def test_default_lora_uses_the_adapter_disabled_base_as_reference(tok, batches, tmp_path):
    from wagle_ext.unlearn.trainer import _AdapterDisabledReference

    _, _, every = batches
    peft_model = add_lora(tiny_llama(len(tok)), rank=2)
    trainer = _train(peft_model, W.get_objective("graddiff", retain="kl"), steps=1, out=str(tmp_path / "t"))
    assert isinstance(trainer.ref_model, _AdapterDisabledReference)
    plain = sum(p.numel() for p in tiny_llama(len(tok)).parameters())
    adapters = sum(lora_param_count(m.get_base_layer().weight.shape, 2) for _, m in lora_layers(peft_model))
    assert sum(p.numel() for p in peft_model.parameters()) == plain + adapters  # no second copy of the weights


def test_select_lora_targets_respects_the_budget_exactly(tok):
    import peft

    model = tiny_llama(len(tok))
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) * (3.0 if "mlp" in n else 1.0)
              for n, p in model.named_parameters()}
    mask = W.build_mask(scores, 0.1, model=model)
    all_linears = sum(lora_param_count(m.weight.shape, 8) for m in W.lora.lora_target_modules(model).values())
    for budget in (1000, 2 * 96 * 8 + 1, all_linears // 2, all_linears, all_linears + 7):
        for proportional in (False, True):
            place = select_lora_targets(mask, budget, rank=8, proportional=proportional, model=model)
            assert place.trainable <= budget
            masses = [place.mass[m] for m in place.targets]
            assert masses == sorted(masses, reverse=True) and "lm_head" not in " ".join(place.targets)
            pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**place.lora_config_kwargs()))
            trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
            assert trainable == place.trainable, (budget, proportional)
            got = {W.naming.normalize_param_name(n + ".weight")[:-7]: m.r["default"] for n, m in lora_layers(pm)}
            assert got == place.ranks
    # rank r on every module fits exactly the all-linears budget (when every module has mass) ...
    uniform = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    place = select_lora_targets(uniform, all_linears, rank=8, ratio=0.5, model=model)
    assert len(place.targets) == 14 and place.trainable == all_linears
    # ... modules without mass never get an adapter, and mass decides the order
    place = select_lora_targets(mask, all_linears, rank=8, model=model)
    assert all(place.mass[m] > 0 for m in place.targets) and len(place.targets) < 14
    place = select_lora_targets(mask, all_linears // 3, rank=8, model=model)
    assert set(place.targets) <= {m for m in place.mass if "mlp" in m}  # the mlp weights carry 3x the scores
    # scores instead of a mask: the same selection at the same ratio
    assert select_lora_targets(scores, 5000, model=model).ranks == select_lora_targets(mask, 5000, model=model).ranks
    with pytest.raises(ValueError, match="below the cost"):
        select_lora_targets(mask, 10, model=model)
    with pytest.raises(ValueError, match="budget"):
        select_lora_targets(mask, 0)
    with pytest.raises(TypeError, match="MaskSet"):
        select_lora_targets([1, 2], 100)


def test_accumulate_gradients_step_weights_and_batch_granularity(tok, batches):
    """The engine's two additions: ``step_weight`` scales each step (and ``mean`` divides by the total
    weight), ``granularity="batch"`` squares whole-batch gradients; bad values are refused."""
    forget, _, _ = batches
    model = tiny_llama(len(tok))
    name = "model.layers.1.self_attn.o_proj.weight"
    from wagle_ext.attribution import causal_lm_loss

    weights = [3.0, 0.5]
    it = iter(weights)
    got = W.accumulate_gradients(model, forget, causal_lm_loss, names=[name], step_weight=lambda b: next(it),
                                 reduction="mean", progress=False)
    assert got.info["total_weight"] == 3.5 and "granularity" not in got.info
    want = torch.zeros_like(got[name], dtype=torch.float64)
    for w, b in zip(weights, forget):
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, b).backward()
        want += w * dict(model.named_parameters())[name].grad.double()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got[name].double(), want / 3.5, rtol=1e-5, atol=1e-9)
    sq = W.accumulate_gradients(model, forget, causal_lm_loss, names=[name], square=True, granularity="batch",
                                progress=False)
    assert sq.info["granularity"] == "batch"
    with pytest.raises(ValueError, match="granularity"):
        W.accumulate_gradients(model, forget, granularity="token", progress=False)
    with pytest.raises(ValueError, match="step_weight"):
        W.accumulate_gradients(model, forget, reduction="ema", step_weight=lambda b: 1.0, progress=False)
    with pytest.raises(ValueError, match=">= 0"):
        W.accumulate_gradients(model, forget, step_weight=lambda b: -1.0, progress=False)
