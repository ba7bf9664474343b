"""Gradient accumulation, attribution scores and Wanda calibration on a tiny LlamaForCausalLM,
each checked against a direct PyTorch computation."""
import logging
import math

import pytest
import torch

from wagle_ext import attribution as A
from wagle_ext.attribution import (accumulate_gradients, collect_input_norms, compute_scores,
                                   decoder_linear_names, estimate_hessian_diagonal, score_model)
from wagle_ext.masks import model_fingerprint

from tiny_models import TINY_QA, char_tokenizer, tiny_llama


# ----------------------------------------------------------------------------- test data
def qa_batches(tok, pairs, batch_size=2):
    """Batches in the package format: prompt 'Q: ...\\nA: ' masked with -100, answer + eos as
    labels, right padding (pad label -100, attention_mask 0)."""
    out = []
    for i in range(0, len(pairs), batch_size):
        ids, labs = [], []
        for p in pairs[i:i + batch_size]:
            q = tok("Q: " + p["question"] + "\nA: ", add_special_tokens=False)["input_ids"]
            a = tok(p["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(q + a)
            labs.append([-100] * len(q) + a)
        t = max(map(len, ids))
        input_ids = torch.full((len(ids), t), tok.pad_token_id)
        labels = torch.full((len(ids), t), -100)
        am = torch.zeros((len(ids), t), dtype=torch.long)
        for j, (x, lab) in enumerate(zip(ids, labs)):
            input_ids[j, :len(x)] = torch.tensor(x)
            labels[j, :len(lab)] = torch.tensor(lab)
            am[j, :len(x)] = 1
        out.append({"input_ids": input_ids, "attention_mask": am, "labels": labels})
    return out


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _seed(gen):
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def _data(tok, gen, bs=2):
    perm = torch.randperm(len(TINY_QA), generator=gen).tolist()
    pairs = [TINY_QA[i] for i in perm]
    return qa_batches(tok, pairs[:4], bs), qa_batches(tok, pairs[4:], bs)


def _model(tok, gen, **kw):
    return tiny_llama(len(tok), seed=_seed(gen), **kw)


def per_example(batches):
    """Every sequence of every batch as its own batch of one, trimmed to its real tokens."""
    out = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            out.append({k: v[i:i + 1, :n] for k, v in b.items()})
    return out


def manual_grads(model, batches, square=False, reduction="sum"):
    """WAGLE's loop (docs/algorithms.md 1.4 pseudo-code) with batches of ONE sequence, in fp32:
    zero_grad, HF ``outputs.loss`` backward, add .grad -- the reference any batch size must match."""
    model.eval()
    acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in model.named_parameters()}
    examples = per_example(batches)
    for b in examples:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                g = p.grad.float()
                acc[n] += g * g if square else g
    model.zero_grad(set_to_none=True)
    if reduction == "mean":
        acc = {n: a / len(examples) for n, a in acc.items()}
    return acc


def assert_close_fp32(got, want, rel=2e-5):
    """Equal up to fp32 rounding of differently ordered sums: |got - want| <= rel * max|want|."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=rel * scale + 1e-30)


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("reduction,square", [("sum", False), ("mean", False), ("sum", True), ("mean", True)])
def test_accumulate_matches_manual_loop(tok, gen, reduction, square):
    model = _model(tok, gen)
    forget, _ = _data(tok, gen)
    model.train()
    got = accumulate_gradients(model, forget, reduction=reduction, square=square, progress=False)
    assert model.training  # mode restored
    want = manual_grads(model, forget, square=square, reduction=reduction)
    assert list(got) == [n for n, _ in model.named_parameters()]
    for n in want:
        assert got[n].dtype == torch.float32 and got[n].shape == want[n].shape
        assert_close_fp32(got[n], want[n])
    assert got.info == {"reduction": reduction, "num_batches": len(forget), "num_examples": 4, "square": square,
                        "dtype": "float32"}
    assert all(p.grad is None for p in model.parameters())
    # WAGLE sums: the summed gradient is not the gradient of one big batch's mean loss.
    assert any(got[n].abs().sum() > 0 for n in got)


def test_accumulate_bf16_model_upcasts_per_step(tok, gen):
    model = _model(tok, gen).to(torch.bfloat16)
    forget, _ = _data(tok, gen)
    got = accumulate_gradients(model, forget, progress=False)
    want = manual_grads(model, forget)
    for n in want:
        assert got[n].dtype == torch.float32
        assert_close_fp32(got[n], want[n], rel=2e-2)  # bf16 forward: batched vs one-by-one rounding
    half = accumulate_gradients(model, forget, dtype=torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in half.values())


def test_accumulate_tied_embeddings(tok, gen):
    # lm_head shares embed_tokens' weight: one parameter, one hook call per backward with the sum
    # of both uses' gradients.
    model = _model(tok, gen, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    forget, _ = _data(tok, gen)
    got = accumulate_gradients(model, forget, progress=False)
    assert "lm_head.weight" not in got
    want = manual_grads(model, forget)
    for n in want:
        assert_close_fp32(got[n], want[n])


def test_accumulate_gradient_checkpointing_train_mode(tok, gen):
    model = _model(tok, gen)
    forget, _ = _data(tok, gen)
    want = accumulate_gradients(model, forget, progress=False)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    got = accumulate_gradients(model, forget, eval_mode=False, progress=False)
    assert model.training
    for n in want:  # Llama has no dropout: checkpointed train-mode gradients equal eval-mode ones
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-9)


def test_accumulate_ema_and_hessian_estimates(tok, gen):
    model = _model(tok, gen)
    _, retain = _data(tok, gen, bs=1)
    beta = 0.9
    h = estimate_hessian_diagonal(model, retain, method="ema", beta=beta, passes=2, progress=False)
    # Manual EMA over two passes from zero.
    model.eval()
    ema = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(2):
        for b in retain:
            model.zero_grad(set_to_none=True)
            model(**b).loss.backward()
            for n, p in model.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                ema[n] = beta * ema[n] + (1 - beta) * g * g
    model.zero_grad(set_to_none=True)
    for n in ema:
        torch.testing.assert_close(h[n], ema[n], rtol=1e-5, atol=1e-12)
    assert h.info["hessian_method"] == "ema" and h.info["num_batches"] == 2 * len(retain)
    fisher = estimate_hessian_diagonal(model, retain, method="fisher", progress=False)
    want = manual_grads(model, retain, square=True, reduction="mean")
    for n in want:
        torch.testing.assert_close(fisher[n], want[n], rtol=1e-6, atol=1e-12)


def test_accumulate_custom_loss_batch_key_names(tok, gen):
    model = _model(tok, gen)
    forget, retain = _data(tok, gen)
    paired = [{"forget": f, "retain": r} for f, r in zip(forget, retain)]
    calls = []

    def neg_ce(m, b):
        calls.append(m.training)
        return -m(**b).loss

    names = ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    got = accumulate_gradients(model, paired, neg_ce, batch_key="forget", names=names, progress=False)
    assert list(got) == names and calls == [False] * len(forget)  # eval mode during the pass
    # The custom loss is used as given (here HF's token mean over the whole batch, not per sequence).
    model.eval()
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(params[n]) for n in names}
    for b in forget:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n in names:
            want[n] += params[n].grad
    model.zero_grad(set_to_none=True)
    for n in names:
        torch.testing.assert_close(got[n], -want[n], rtol=1e-6, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # the temporary freeze is undone
    got = accumulate_gradients(model, paired, batch_key="forget", max_batches=1, progress=False)
    assert got.info["num_batches"] == 1


def test_accumulate_errors(tok, gen):
    model = _model(tok, gen)
    forget, _ = _data(tok, gen)
    bad = dict(forget[0])
    bad["labels"] = bad["labels"].clone()
    bad["labels"][1] = -100  # sequence 1 has no label token: its token mean (HF loss alone) is NaN
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\].*no label token"):
        accumulate_gradients(model, [forget[0], bad], progress=False)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="reduction"):
        accumulate_gradients(model, forget, reduction="max", progress=False)
    with pytest.raises(ValueError, match="no batches"):
        accumulate_gradients(model, [], progress=False)
    with pytest.raises(ValueError, match="batch_key"):
        accumulate_gradients(model, forget, batch_key="forget", progress=False)
    with pytest.raises(ValueError, match="scalar"):
        accumulate_gradients(model, forget, lambda m, b: m(**b).logits.sum(-1), progress=False)
    with pytest.raises(ValueError, match="names"):
        accumulate_gradients(model, forget, names=["nope.weight"], progress=False)


# ----------------------------------------------------------------------------- scores
@pytest.fixture
def grads(tok, gen):
    model = _model(tok, gen)
    forget, retain = _data(tok, gen)
    g_f = accumulate_gradients(model, forget, progress=False)
    g_r = accumulate_gradients(model, retain, progress=False)
    return model, forget, retain, g_f, g_r


def _direct(kind, w, gf, gr, gamma=None, h=None, eps=1e-8):
    w = w.detach().float()
    if kind == "wagle":
        return ((w - gr / (gamma if h is None else h + eps)) * gf).abs()
    if kind == "snip":
        return (w * gf).abs()
    if kind == "gradient":
        return gf.abs()
    return w.abs()


@pytest.mark.parametrize("kind", ["wagle", "wagle_fisher", "snip", "gradient", "magnitude"])
def test_scores_match_direct(grads, kind, gen):
    model, _, retain, g_f, g_r = grads
    gamma = float(10 ** torch.empty(1).uniform_(-7, -1, generator=gen))
    h = None
    if kind == "wagle_fisher":
        h = estimate_hessian_diagonal(model, retain, progress=False)
    base = "wagle" if kind.startswith("wagle") else kind
    s = compute_scores(model, g_f, g_r, kind=base, gamma=gamma, hessian=h)
    params = dict(model.named_parameters())
    assert list(s) == list(params)
    for n, t in s.items():
        assert t.dtype == torch.float32 and t.shape == params[n].shape
        want = _direct(base, params[n], g_f[n], g_r[n], gamma, None if h is None else h[n])
        torch.testing.assert_close(t, want, rtol=2e-6, atol=1e-30)
    assert s.info["score_kind"] == base and s.info["model_fingerprint"] == model_fingerprint(model)
    if kind == "wagle":
        assert s.info["gamma"] == gamma and s.info["hessian"] == "constant"
    if kind == "wagle_fisher":
        assert s.info["hessian"] == "fisher"


def test_scores_bf16_model(tok, gen):
    model = _model(tok, gen).to(torch.bfloat16)
    forget, retain = _data(tok, gen)
    g_f = accumulate_gradients(model, forget, progress=False)
    g_r = accumulate_gradients(model, retain, progress=False)
    s = compute_scores(model, g_f, g_r, kind="wagle", gamma=1e-3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(s[n], _direct("wagle", p, g_f[n], g_r[n], 1e-3), rtol=2e-6, atol=1e-30)
    streamed = score_model(model, forget, retain, gamma=1e-3, stream=True, progress=False)
    for n in s:
        assert torch.equal(streamed[n], s[n])


def test_random_scores_seeded(grads):
    model = grads[0]
    a = compute_scores(model, kind="random", seed=3)
    b = compute_scores(model, kind="random", seed=3)
    c = compute_scores(model, kind="random", seed=4)
    names = list(a)
    part = compute_scores(model, kind="random", seed=3, names=names[5:9])
    for n in names:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n]) or a[n].numel() == 0
        gen = torch.Generator().manual_seed(A._stable_seed(3, n))
        assert torch.equal(a[n], torch.rand(a[n].shape, generator=gen))
        assert float(a[n].min()) >= 0 and float(a[n].max()) < 1
    for n in names[5:9]:  # a process's block sees the same values as the whole model
        assert torch.equal(part[n], a[n])


def test_streaming_equals_non_streaming(tok, gen):
    model = _model(tok, gen)
    forget, retain = _data(tok, gen)
    for kind, hess in (("wagle", None), ("wagle", "fisher"), ("snip", None), ("gradient", None)):
        s1 = score_model(model, forget, retain, kind=kind, hessian=hess, stream=True, progress=False)
        s2 = score_model(model, forget, retain, kind=kind, hessian=hess, stream=False, progress=False)
        assert list(s1) == list(s2)
        for n in s1:
            assert torch.equal(s1[n], s2[n]), (kind, hess, n)


def test_inplace_reuses_forget_buffer_and_frees_retain(grads):
    model, _, _, g_f, g_r = grads
    want = compute_scores(model, g_f, g_r, kind="wagle")
    ptrs = {n: t.data_ptr() for n, t in g_f.items()}
    s = compute_scores(model, g_f, g_r, kind="wagle", inplace=True)
    assert len(g_r) == 0  # freed tensor by tensor
    for n in s:
        assert s[n].data_ptr() == ptrs[n]  # scores live in the forget accumulator
        assert torch.equal(s[n], want[n])
    bf = {n: t.to(torch.bfloat16) for n, t in want.items()}
    with pytest.raises(ValueError, match="float32"):
        compute_scores(model, bf, kind="gradient", inplace=True)


def test_term_log_and_norms(grads, caplog):
    model, _, _, g_f, g_r = grads
    with caplog.at_level(logging.INFO, logger="wagle_ext.attribution"):
        s = compute_scores(model, g_f, g_r, kind="wagle", gamma=1e-6)
    assert any("dominant" in r.getMessage() for r in caplog.records)
    t = s.info["terms"]
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    r = torch.cat([g.reshape(-1) / 1e-6 for g in g_r.values()]).double()
    assert math.isclose(t["weight_norm"], float(w.norm()), rel_tol=1e-6)
    assert math.isclose(t["retain_term_norm"], float(r.norm()), rel_tol=1e-6)
    assert math.isclose(t["frac_weight_dominant"], float((w.float().abs() > r.float().abs()).double().mean()),
                        rel_tol=1e-9)
    # With WAGLE's gamma = 1e-6 on summed gradients the retain term dominates (docs/algorithms.md 1.2);
    # with a huge gamma the weight term does.
    assert t["dominant"] == "retain_gradient"
    assert compute_scores(model, g_f, g_r, kind="wagle", gamma=1e9).info["terms"]["dominant"] == "weight"


def test_score_errors(grads):
    model, _, _, g_f, g_r = grads
    with pytest.raises(ValueError, match="kind"):
        compute_scores(model, g_f, kind="salun")
    with pytest.raises(ValueError, match="g_r"):
        compute_scores(model, g_f, kind="wagle")
    with pytest.raises(ValueError, match="g_f"):
        compute_scores(model, kind="snip")
    with pytest.raises(ValueError, match="gamma"):
        compute_scores(model, g_f, g_r, kind="wagle", gamma=0.0)
    with pytest.raises(ValueError, match="input_norms"):
        compute_scores(model, kind="wanda")
    with pytest.raises(ValueError, match="hessian"):
        compute_scores(model, g_f, kind="snip", hessian=g_r)
    partial = dict(list(g_r.items())[:3])
    with pytest.raises(ValueError, match="g_r has no entry"):
        compute_scores(model, g_f, partial, kind="wagle")
    with pytest.raises(ValueError, match="not a parameter"):
        compute_scores(model, kind="magnitude", names=["x.weight"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_scores_and_masks_match_cpu(grads):
    from wagle_ext.masks import build_mask

    model, forget, retain, g_f, g_r = grads
    cpu = compute_scores(model, g_f, g_r, kind="wagle")
    model_cuda = model.to("cuda")
    gpu = compute_scores(model_cuda, {n: t.cuda() for n, t in g_f.items()}, {n: t.cuda() for n, t in g_r.items()},
                         kind="wagle")
    for n in cpu:
        torch.testing.assert_close(gpu[n].cpu(), cpu[n], rtol=2e-6, atol=1e-30)
    assert build_mask(gpu, 0.3).to("cpu") == build_mask(cpu, 0.3)
    g = accumulate_gradients(model_cuda, forget, progress=False)
    assert all(t.is_cuda and t.dtype == torch.float32 for t in g.values())


# ----------------------------------------------------------------------------- wanda
def test_decoder_linear_names(tok, gen):
    model = _model(tok, gen)
    names = decoder_linear_names(model)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(n.startswith("model.layers.") and n.endswith("_proj.weight") for n in names)
    assert "lm_head.weight" not in names


@pytest.mark.parametrize("exclude_padding", [True, False])
def test_wanda_norms_and_scores_match_direct(tok, gen, exclude_padding):
    model = _model(tok, gen)
    forget, _ = _data(tok, gen, bs=3)  # uneven lengths: padding present
    assert any((b["attention_mask"] == 0).any() for b in forget)
    norms = collect_input_norms(model, forget, exclude_padding=exclude_padding, progress=False)
    # Direct: record every Linear input with our own hooks, then sum squares over kept tokens.
    linears = {n[:-len(".weight")]: n for n in decoder_linear_names(model)}
    seen = {n: [] for n in linears.values()}
    mods = dict(model.named_modules())
    hs = [mods[m].register_forward_hook(lambda mod, args, out, key=n: seen[key].append(args[0].detach()))
          for m, n in linears.items()]
    n_seq = 0
    with torch.no_grad():
        for b in forget:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            n_seq += b["input_ids"].shape[0]
    for h in hs:
        h.remove()
    for n, xs in seen.items():
        tot = 0
        for x, b in zip(xs, forget):
            keep = b["attention_mask"].bool() if exclude_padding else torch.ones_like(b["attention_mask"], dtype=torch.bool)
            tot = tot + x[keep].square().sum(0)
        torch.testing.assert_close(norms[n], (tot / n_seq).sqrt(), rtol=1e-5, atol=1e-7)
    # Independent of hooks for q_proj of layer 0: its input is input_layernorm(embeddings).
    with torch.no_grad():
        tot = 0
        for b in forget:
            x = model.model.layers[0].input_layernorm(model.model.embed_tokens(b["input_ids"]))
            keep = b["attention_mask"].bool() if exclude_padding else torch.ones_like(b["attention_mask"], dtype=torch.bool)
            tot = tot + x[keep].square().sum(0)
        torch.testing.assert_close(norms["model.layers.0.self_attn.q_proj.weight"], (tot / n_seq).sqrt(),
                                   rtol=1e-5, atol=1e-7)
    s = compute_scores(model, kind="wanda", input_norms=norms)
    params = dict(model.named_parameters())
    assert list(s) == decoder_linear_names(model)
    for n, t in s.items():
        torch.testing.assert_close(t, params[n].detach().abs() * norms[n][None, :], rtol=1e-6, atol=0)
    s2 = score_model(model, forget, kind="wanda", progress=False)
    if exclude_padding:
        for n in s:
            assert torch.equal(s[n], s2[n])


def test_wanda_errors(tok, gen):
    model = _model(tok, gen)
    forget, _ = _data(tok, gen)
    with pytest.raises(ValueError, match="nn.Linear"):
        collect_input_norms(model, forget, names=["model.norm.weight"], progress=False)
    norms = collect_input_norms(model, forget, progress=False, max_batches=1)
    n0 = next(iter(norms))
    bad = dict(norms)
    bad[n0] = norms[n0][:-1]
    with pytest.raises(ValueError, match="input_norms"):
        compute_scores(model, kind="wanda", input_norms=bad)
