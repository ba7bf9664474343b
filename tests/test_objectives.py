"""Objectives: every loss against a direct formula (values and gradients), model-level runs, config errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from wagle_ext import objectives as O
from wagle_ext.data import ForgetRetainDataset, QACollator

from tiny_models import TINY_QA, char_tokenizer, tiny_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 2, 2), (2, 7, 11), (3, 13, 37), (1, 1, 5), (0, 4, 3)]


def _logits_labels(B, T, V, dtype, gen, p_ignore=0.3, scale=3.0):
    logits = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < p_ignore] = -100
    return logits, labels


def _direct_token_logp(logits, labels):
    """Plain PyTorch, fp64: log_softmax(logits[:, :-1])[labels[:, 1:]], 0 at ignored positions."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    y = labels[:, 1:]
    mask = y != -100
    g = lp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(mask, g, torch.zeros_like(g)), mask


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# token_logprobs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_token_logprobs_value_and_grad(dtype, shape, gen):
    logits, labels = _logits_labels(*shape, dtype, gen)
    x = logits.clone().requires_grad_(True)
    lp, mask = O.token_logprobs(x, labels)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lp.shape == mask.shape == (shape[0], shape[1] - 1)
    # Reference on the same (rounded) logits upcast to fp64.
    x_ref = logits.double().requires_grad_(True)
    ref, ref_mask = _direct_token_logp(x_ref, labels)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(lp.double(), ref, **_tol(dtype))
    assert (lp[~mask] == 0).all()
    w = torch.randn(lp.shape, generator=gen, dtype=torch.float64)
    (lp.double() * w).sum().backward()
    (ref * w).sum().backward()
    assert x.grad.dtype == dtype
    gtol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.bfloat16, torch.float16) else _tol(dtype)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **gtol)


def test_token_logprobs_gradcheck(gen):
    logits, labels = _logits_labels(2, 6, 9, torch.float64, gen)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: O.token_logprobs(z, labels)[0], (x,))


def test_token_logprobs_noncontiguous(gen):
    big, labels = _logits_labels(3, 8, 40, torch.float32, gen)
    x = big[:, :, ::2]  # non-contiguous view, vocab 20
    labels = labels.clamp(max=19)
    assert not x.is_contiguous()
    lp, _ = O.token_logprobs(x, labels)
    torch.testing.assert_close(lp.double(), _direct_token_logp(x, labels)[0], rtol=1e-5, atol=1e-5)


def test_token_logprobs_chunked_matches_single_chunk(gen, monkeypatch):
    logits, labels = _logits_labels(3, 17, 29, torch.float32, gen)
    x1 = logits.clone().requires_grad_(True)
    lp1, _ = O.token_logprobs(x1, labels)
    lp1.sum().backward()
    monkeypatch.setattr(O, "_CHUNK_ELEMS", 29 * 3)  # 3 rows per chunk
    x2 = logits.clone().requires_grad_(True)
    lp2, _ = O.token_logprobs(x2, labels)
    lp2.sum().backward()
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


def test_bf16_logits_computed_in_fp32(gen):
    """bf16 logits: log-probs equal the fp32 computation on the same bf16 values, not a bf16 one."""
    logits, labels = _logits_labels(2, 33, 3000, torch.bfloat16, gen, p_ignore=0.0, scale=4.0)
    lp, mask = O.token_logprobs(logits, labels)
    fp32 = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, fp32, rtol=1e-6, atol=1e-5)
    # The check discriminates: a bf16 log-softmax is far off at this tolerance.
    bf16 = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:, None]).squeeze(-1).float()
    assert (bf16 - fp32).abs().max() > 1e-3
    ihl = O.ihl_loss(logits, labels)
    assert ihl.dtype == torch.float32


def test_token_logprobs_bad_inputs():
    with pytest.raises(ValueError, match="labels must be -100 or in"):
        O.token_logprobs(torch.zeros(1, 3, 4), torch.tensor([[0, 4, 1]]))
    with pytest.raises(ValueError, match="labels must have shape"):
        O.token_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must have shape \[batch, seq, vocab\]"):
        O.token_logprobs(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating"):
        O.token_logprobs(torch.zeros(1, 3, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be int64"):
        O.token_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 3))


def test_sequence_logprobs_and_nll(gen):
    logits, labels = _logits_labels(4, 9, 13, torch.float32, gen)
    labels[1] = -100  # a sequence with no answer tokens
    lp, mask = O.token_logprobs(logits, labels)
    ref, _ = _direct_token_logp(logits, labels)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(O.sequence_logprobs(lp, mask, "sum").double(), ref.sum(-1), **tol)
    n = mask.sum(-1).clamp_min(1)
    torch.testing.assert_close(O.sequence_logprobs(lp, mask, "mean").double(), ref.sum(-1) / n, **tol)
    # HF outputs.loss: mean CE over valid tokens with the shift.
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(O.nll_loss(lp, mask), hf, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        O.sequence_logprobs(lp, mask, "avg")


# ------------------------------------------------------------------------------------------------
# NPO / SimNPO / DPO
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0, 4.5])
def test_npo_at_reference_is_2_over_beta_log2(beta, gen):
    lp = -torch.rand(5, generator=gen, dtype=torch.float64) * 50
    loss = O.npo_loss(lp, lp.clone(), beta)
    torch.testing.assert_close(loss, torch.tensor(2 / beta * math.log(2), dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_value_and_gradient_weight(beta, gen):
    B = 6
    lp = (-torch.rand(B, generator=gen, dtype=torch.float64) * 30).requires_grad_(True)
    lp_ref = -torch.rand(B, generator=gen, dtype=torch.float64) * 30
    loss = O.npo_loss(lp, lp_ref, beta)
    nll, nll_ref = -lp.detach(), -lp_ref
    direct = -(2 / beta) * torch.log(torch.sigmoid(beta * (nll - nll_ref))).mean()
    torch.testing.assert_close(loss, direct)
    loss.backward()
    # NPO's weight 2 pi^b / (pi^b + pi_ref^b) = 2 sigmoid(beta (logp - logp_ref)) per sequence (/B: mean).
    torch.testing.assert_close(lp.grad, 2 * torch.sigmoid(beta * (lp.detach() - lp_ref)) / B)
    assert lp_ref.grad is None


def test_simnpo_value(gen):
    mlp = (-torch.rand(5, generator=gen, dtype=torch.float64) * 4).requires_grad_(True)
    for beta, delta in [(4.5, 0.0), (2.5, 1.0), (1.0, -0.5)]:
        loss = O.simnpo_loss(mlp, beta, delta)
        direct = -(2 / beta) * torch.log(torch.sigmoid(beta * (-mlp - delta))).mean()
        torch.testing.assert_close(loss, direct)
    g, = torch.autograd.grad(O.simnpo_loss(mlp, 2.0, 0.5), mlp)
    torch.testing.assert_close(g, 2 * torch.sigmoid(-2.0 * (-mlp.detach() - 0.5)) / 5)


def test_dpo_value_and_reference(gen):
    w, wr, l, lr = (-torch.rand(4, generator=gen, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.3
    direct = -(2 / beta) * torch.log(torch.sigmoid(beta * ((w - wr) - (l - lr)))).mean()
    torch.testing.assert_close(O.dpo_loss(w, wr, l, lr, beta), direct)
    torch.testing.assert_close(O.dpo_loss(w, w.clone(), l, l.clone(), beta),
                               torch.tensor(2 / beta * math.log(2), dtype=torch.float64))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_beta_validation(bad):
    x = torch.zeros(2)
    for fn in (lambda: O.npo_loss(x, x, bad), lambda: O.simnpo_loss(x, bad),
               lambda: O.dpo_loss(x, x, x, x, bad), lambda: O.tnpo_weights(x, x, bad)):
        with pytest.raises(ValueError, match="beta"):
            fn()


# ------------------------------------------------------------------------------------------------
# WGA / TNPO / WTNPO
# ------------------------------------------------------------------------------------------------

def _masked_logp(gen, shape=(3, 8), low=-6.0):
    lp = torch.rand(shape, generator=gen, dtype=torch.float64) * low
    mask = torch.rand(shape, generator=gen) < 0.7
    mask[0, 0] = True
    return torch.where(mask, lp, torch.zeros_like(lp)), mask


@pytest.mark.parametrize("beta", [0.0, 1.0, 5.0])
def test_wga_value_and_gradient(beta, gen):
    lp, mask = _masked_logp(gen)
    lp.requires_grad_(True)
    loss = O.wga_loss(lp, mask, beta)
    p = lp.detach().exp()
    ce = -lp.detach()
    direct = -(p[mask] ** beta * ce[mask]).mean()
    torch.testing.assert_close(loss, direct)
    loss.backward()
    # Stop-gradient weights: dL/dlogp_t = p_t^beta / n on valid tokens, 0 elsewhere.
    expect = torch.where(mask, p ** beta / mask.sum(), torch.zeros_like(p))
    torch.testing.assert_close(lp.grad, expect)


@pytest.mark.parametrize("beta,walpha,eps", [(4.0, 0.0, 0.0), (4.0, 0.0, 1e-5), (4.0, 1.5, 1e-5),
                                             (2.0, 1.5, 0.0), (0.5, 3.0, 1e-3)])
def test_tnpo_matches_original_formula(beta, walpha, eps, gen):
    lp, mask = _masked_logp(gen, low=-3.0)
    lpr, _ = _masked_logp(gen, low=-3.0)
    lp.requires_grad_(True)
    p, pr = lp.detach().exp(), lpr.exp()
    w_orig = 2 * p ** (beta + walpha) / (p ** beta + pr ** beta + eps)  # G-effect code, probability space
    torch.testing.assert_close(O.tnpo_weights(lp, lpr, beta, walpha, eps), w_orig, rtol=1e-10, atol=1e-12)
    loss = O.tnpo_loss(lp, lpr, mask, beta, walpha, eps)
    torch.testing.assert_close(loss, -(w_orig[mask] * -lp.detach()[mask]).mean())
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.where(mask, w_orig / mask.sum(), torch.zeros_like(p)))
    if walpha == 0 and eps == 0:  # TNPO = NPO's weight per token
        torch.testing.assert_close(O.tnpo_weights(lp, lpr, beta), 2 * torch.sigmoid(beta * (lp.detach() - lpr)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tnpo_stable_when_p_beta_underflows(dtype):
    lp = torch.tensor([-200.0, -300.0, -190.0], dtype=dtype)
    lpr = torch.tensor([-201.0, -300.0, -195.0], dtype=dtype)
    beta = 4.0
    p, pr = lp.exp(), lpr.exp()
    naive = 2 * p ** beta / (p ** beta + pr ** beta)
    assert torch.isnan(naive).all()  # 0/0: the probability-space form breaks here
    w = O.tnpo_weights(lp, lpr, beta)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, 2 * torch.sigmoid(beta * (lp - lpr)))
    assert w[0] > 1.9 and abs(float(w[1]) - 1.0) < 1e-6 and w[2] > 1.99
    # WTNPO and eps forms stay finite too (and tiny, since p^(beta+alpha) underflows).
    for walpha, eps in [(1.5, 0.0), (1.5, 1e-5), (0.0, 1e-5)]:
        wt = O.tnpo_weights(lp, lpr, beta, walpha, eps)
        assert torch.isfinite(wt).all() and (wt >= 0).all()
    mask = torch.ones(3, dtype=torch.bool)
    assert torch.isfinite(O.tnpo_loss(lp[None], lpr[None], mask[None], beta, 1.5))


def test_tnpo_eps_not_negligible(gen):
    """pitfall 8: with p = 0.05 and beta = 4 both p^beta < 1e-5, so eps changes the weight a lot."""
    lp = torch.tensor([math.log(0.05)], dtype=torch.float64)
    w0 = O.tnpo_weights(lp, lp, 4.0, 0.0, 0.0)
    w1 = O.tnpo_weights(lp, lp, 4.0, 0.0, 1e-5)
    torch.testing.assert_close(w0, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(w1, torch.tensor([2 * 0.05 ** 4 / (2 * 0.05 ** 4 + 1e-5)], dtype=torch.float64))
    assert float(w1) < 0.6


# ------------------------------------------------------------------------------------------------
# IHL
# ------------------------------------------------------------------------------------------------

def _direct_ihl(logits, labels):
    """LoKU: mean_t clamp(1 + p_y - max_{v != y} p_v, 0) over valid shifted tokens, full softmax fp64."""
    z = logits[:, :-1].double()
    y = labels[:, 1:]
    mask = y != -100
    p = torch.softmax(z[mask], -1)
    yv = y[mask][:, None]
    py = p.gather(1, yv).squeeze(1)
    p_other = p.scatter(1, yv, float("-inf")).amax(1)
    return (1 + py - p_other).clamp_min(0).mean() if mask.any() else z.sum() * 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ihl_value_and_gradient_formula(dtype, shape, gen):
    logits, labels = _logits_labels(*shape, dtype, gen)
    x = logits.clone().requires_grad_(True)
    loss = O.ihl_loss(x, labels)
    torch.testing.assert_close(loss.double(), _direct_ihl(logits, labels), **_tol(dtype))
    loss.backward()
    # Closed-form gradient of the token mean: p_y (e_y - p) - p_m (e_m - p) per valid token, / n.
    B, T, V = shape
    expect = torch.zeros(B, T, V, dtype=torch.float64)
    y = labels[:, 1:]
    n = int((y != -100).sum())
    for b in range(B):
        for t in range(T - 1):
            if y[b, t] == -100:
                continue
            p = torch.softmax(logits[b, t].double(), -1)
            yy = int(y[b, t])
            q = p.clone()
            q[yy] = -1
            m = int(q.argmax())
            e_y, e_m = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
            e_y[yy], e_m[m] = 1, 1
            expect[b, t] = (p[yy] * (e_y - p) - p[m] * (e_m - p)) / n
    assert x.grad.dtype == dtype
    gtol = dict(rtol=2e-2, atol=2e-3) if dtype in (torch.bfloat16, torch.float16) else _tol(dtype)
    torch.testing.assert_close(x.grad.double(), expect, **gtol)


def test_ihl_matches_autograd_of_direct_formula_and_gradcheck(gen):
    logits, labels = _logits_labels(2, 9, 17, torch.float64, gen)
    x = logits.clone().requires_grad_(True)
    O.ihl_loss(x, labels).backward()
    xr = logits.clone().requires_grad_(True)
    _direct_ihl(xr, labels).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    xg = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: O.ihl_token_losses(z, labels)[0], (xg,))


def test_ihl_tie_break_lowest_index():
    # Position 0 predicts label y = 1; tokens 0 and 3 tie for the best non-target logit -> m = 0.
    logits = torch.tensor([[[2.0, 0.5, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[-100, 1]])
    O.ihl_loss(logits, labels).backward()
    g = logits.grad[0, 0]
    p = torch.softmax(logits.detach()[0, 0], -1)
    e1, e0 = torch.eye(4)[1], torch.eye(4)[0]
    torch.testing.assert_close(g, p[1] * (e1 - p) - p[0] * (e0 - p))
    assert g[0] != g[3]


def test_ihl_empty_and_bad_vocab():
    x = torch.zeros(2, 3, 5, requires_grad=True)
    loss = O.ihl_loss(x, torch.full((2, 3), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    with pytest.raises(ValueError, match="at least 2"):
        O.ihl_loss(torch.zeros(1, 3, 1), torch.zeros(1, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# KL retain and activation MSE
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("all_positions", [False, True])
def test_kl_retain_matches_direct(dtype, all_positions, gen):
    logits, labels = _logits_labels(3, 8, 19, dtype, gen)
    ref_logits, _ = _logits_labels(3, 8, 19, dtype, gen)
    x = logits.clone().requires_grad_(True)
    loss = O.kl_retain_loss(x, ref_logits, labels, all_positions=all_positions)
    xr = logits.double().requires_grad_(True)
    if all_positions:  # G-effect / LoKU / open-unlearning form, batchmean over B*T positions
        lt = torch.log_softmax(xr, -1).view(-1, 19)
        lr = torch.log_softmax(ref_logits.double(), -1).view(-1, 19)
        direct = F.kl_div(lt, lr, reduction="batchmean", log_target=True)
    else:  # KL(p_ref || p_theta) at the positions predicting answer tokens
        mask = labels[:, 1:] != -100
        lt = torch.log_softmax(xr[:, :-1][mask], -1)
        lr = torch.log_softmax(ref_logits[:, :-1][mask].double(), -1)
        direct = (lr.exp() * (lr - lt)).sum(-1).mean()
    torch.testing.assert_close(loss.double(), direct, **_tol(dtype))
    loss.backward()
    direct.backward()
    gtol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else _tol(dtype)
    torch.testing.assert_close(x.grad.double(), xr.grad, **gtol)


def test_kl_zero_at_reference_and_errors(gen):
    logits, labels = _logits_labels(2, 6, 7, torch.float32, gen)
    assert abs(float(O.kl_retain_loss(logits, logits.clone(), labels))) < 1e-6
    with pytest.raises(ValueError, match="labels are required"):
        O.kl_retain_loss(logits, logits)
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        O.kl_retain_loss(logits, logits[:, :-1], labels)


def test_activation_mse(gen):
    a = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    tgt = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=gen) < 0.5
    mask[2] = False
    per = []
    for b in range(3):
        rows = a[b][mask[b]]
        per.append(((rows - tgt) ** 2).mean(-1).sum() / max(int(mask[b].sum()), 1))
    torch.testing.assert_close(O.activation_mse(a, tgt, mask), torch.stack(per).mean())
    with pytest.raises(ValueError, match="activations must be"):
        O.activation_mse(a, tgt, mask[:, :-1])


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while running fn()."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), out


@pytest.mark.parametrize("which", ["token_logprobs", "ihl", "kl"])
def test_fused_paths_keep_no_fp32_copy(which, gen):
    """The fused paths save the bf16 logits (a reference, no copy) plus O(rows) state, never an fp32
    [rows, V] log-softmax as F.cross_entropy(logits.float()) does."""
    B, T, V = 2, 16, 4096
    logits, labels = _logits_labels(B, T, V, torch.bfloat16, gen, p_ignore=0.0)
    x = logits.requires_grad_(True)
    ref = logits.detach().clone()
    fns = {"token_logprobs": lambda: O.token_logprobs(x, labels)[0].sum(),
           "ihl": lambda: O.ihl_loss(x, labels),
           "kl": lambda: O.kl_retain_loss(x, ref, labels)}
    nbytes, out = _saved_bytes(fns[which])
    logits_bytes = x.numel() * x.element_size()
    extra = nbytes - logits_bytes * (2 if which == "kl" else 1)
    assert 0 <= extra < 64 * B * T  # a few per-row vectors (lse, rows, targets, mask)
    naive, _ = _saved_bytes(lambda: F.cross_entropy(x[:, :-1].float().reshape(-1, V),
                                                    labels[:, 1:].reshape(-1)))
    assert naive >= B * (T - 1) * V * 4  # the discriminating baseline: an fp32 copy is saved there
    out.backward()
    assert x.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Model-level: objectives on a tiny Llama
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    model = tiny_llama(len(tok), layers=2, seed=0)
    ds = ForgetRetainDataset(TINY_QA[:4], TINY_QA[4:], seed=3, refusal=True, alternate="answer")
    batch = QACollator(tok)([ds[i] for i in range(3)])
    return tok, model, batch


def _frozen(model):
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return ref


ALL = ["ga", "graddiff", "npo", "simnpo", "po", "idkpo", "dpo", "wga", "tnpo", "wtnpo", "ihl", "rmu"]


@pytest.mark.parametrize("name", ALL)
def test_each_objective_runs_and_backprops(name, tiny):
    _, model, batch = tiny
    model = copy.deepcopy(model)
    obj = O.get_objective(name, **({"layer": 0} if name == "rmu" else {}))
    ref = _frozen(model) if obj.needs_reference else None
    loss, logs = obj(model, batch, ref)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert math.isfinite(logs["forget_loss"]) and logs["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if ref is not None:
        assert all(p.grad is None for p in ref.parameters())


@pytest.mark.parametrize("name", ALL)
def test_backward_per_term_gives_the_same_gradients(name, tiny):
    """Objective(backward=): each weighted term is backpropagated on its own; the gradients equal
    those of one backward of the sum (to fp32 rounding: tied weights add 4 contributions in
    another order), the returned loss is detached and has the same value, and the calls match the
    terms (forget, then retain unless retain="none")."""
    _, model, batch = tiny
    obj = O.get_objective(name, **({"layer": 0} if name == "rmu" else {}))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ref = _frozen(model) if obj.needs_reference else None
    loss_a, logs_a = obj(a, batch, ref)
    loss_a.backward()
    calls = []
    loss_b, logs_b = obj(b, batch, ref, backward=lambda t: (calls.append(float(t.detach())), t.backward()))
    assert not loss_b.requires_grad and float(loss_b) == pytest.approx(float(loss_a.detach()), rel=1e-6)
    assert len(calls) == (1 if obj.retain == "none" else 2)
    assert logs_b == pytest.approx(logs_a, rel=1e-6)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
            continue
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7, msg=n)


def _hf_loss(model, seq):
    return model(**seq).loss  # HF's own shifted token-mean CE: an independent reference


def test_graddiff_and_ga_equal_hf_losses(tiny):
    _, model, batch = tiny
    nf, nr = _hf_loss(model, batch["forget"]), _hf_loss(model, batch["retain"])
    loss, logs = O.get_objective("GradDiff", gamma=0.7, alpha=1.9)(model, batch)
    torch.testing.assert_close(loss, 0.7 * -nf + 1.9 * nr, rtol=1e-5, atol=1e-5)
    assert logs["retain_loss"] == pytest.approx(float(nr.detach()), rel=1e-5)
    loss, logs = O.get_objective("ga")(model, batch)
    torch.testing.assert_close(loss, -nf, rtol=1e-5, atol=1e-5)
    assert "retain_loss" not in logs


def test_po_is_nll_on_refusal(tiny):
    _, model, batch = tiny
    loss, _ = O.get_objective("idkpo", alpha=0.5)(model, batch)
    expect = _hf_loss(model, batch["forget_refusal"]) + 0.5 * _hf_loss(model, batch["retain"])
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["seq_sum", "token_mean"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_npo_model_level_at_reference(reduction, beta, tiny):
    _, model, batch = tiny
    obj = O.get_objective("npo", beta=beta, reduction=reduction, retain="none")
    loss, logs = obj(model, batch, _frozen(model))
    assert float(loss.detach()) == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    assert logs["forget_log_ratio"] == 0.0


def test_npo_model_level_matches_formula_after_update(tiny):
    _, model, batch = tiny
    ref = _frozen(model)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    f = batch["forget"]
    for reduction in ("seq_sum", "token_mean"):
        loss, _ = O.get_objective("npo", beta=0.5, reduction=reduction, alpha=0.0)(model, batch, ref)
        n = (f["labels"][:, 1:] != -100).sum(-1)
        # Per-sequence NLL via HF loss on each row separately (token mean) times its token count.
        nll = torch.stack([_hf_loss(model, {k: v[i:i + 1] for k, v in f.items()}) for i in range(3)])
        nll_r = torch.stack([_hf_loss(ref, {k: v[i:i + 1] for k, v in f.items()}) for i in range(3)])
        if reduction == "seq_sum":
            nll, nll_r = nll * n, nll_r * n
        direct = -(2 / 0.5) * F.logsigmoid(0.5 * (nll - nll_r)).mean()
        torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-5)


def test_dpo_model_level_at_reference(tiny):
    _, model, batch = tiny
    for win in ("refusal", "alternate"):
        obj = O.get_objective("dpo", beta=0.25, win=win, retain="none")
        loss, _ = obj(model, batch, _frozen(model))
        assert float(loss.detach()) == pytest.approx(2 / 0.25 * math.log(2), rel=1e-6)


def test_retain_kl_model_level(tiny):
    _, model, batch = tiny
    ref = _frozen(model)
    pert = copy.deepcopy(model)
    with torch.no_grad():
        for p in pert.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    r = batch["retain"]
    for allpos in (False, True):
        obj = O.get_objective("graddiff", retain="kl", kl_all_positions=allpos, gamma=0.0)
        assert obj.needs_reference
        loss, logs = obj(pert, batch, ref)
        lt, lr = pert(**r).logits, ref(**r).logits
        expect = O.kl_retain_loss(lt, lr, r["labels"], all_positions=allpos)
        torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
        assert logs["retain_loss"] > 0


def test_wga_tnpo_ihl_model_level_match_pure_functions(tiny):
    _, model, batch = tiny
    ref = _frozen(model)
    pert = copy.deepcopy(model)
    with torch.no_grad():
        for p in pert.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    f = batch["forget"]
    lt, lr = pert(**f).logits, ref(**f).logits
    lp, mask = O.token_logprobs(lt, f["labels"])
    lpr, _ = O.token_logprobs(lr, f["labels"])
    cases = {
        "wga": (dict(beta=2.0), O.wga_loss(lp, mask, 2.0)),
        "tnpo": (dict(beta=4.0, eps=1e-5), O.tnpo_loss(lp, lpr, mask, 4.0, 0.0, 1e-5)),
        "wtnpo": (dict(beta=3.0, weight_alpha=1.5), O.tnpo_loss(lp, lpr, mask, 3.0, 1.5)),
        "ihl": ({}, _direct_ihl(lt, f["labels"]).float()),
        "simnpo": (dict(beta=2.0, delta=0.3), O.simnpo_loss(O.sequence_logprobs(lp, mask, "mean"), 2.0, 0.3)),
    }
    for name, (kw, expect) in cases.items():
        loss, _ = O.get_objective(name, retain="none", gamma=1.0, **kw)(pert, batch, ref)
        torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6, msg=name)


def test_rmu_control_vector_and_losses(tiny):
    _, model, batch = tiny
    obj = O.get_objective("rmu", layer=0, steering_coeff=3.0, seed=5)
    u = obj.control_vector(32)
    assert float(u.norm()) == pytest.approx(3.0, rel=1e-6) and (u >= 0).all()
    assert torch.equal(u, O.get_objective("rmu", layer=0, steering_coeff=3.0, seed=5).control_vector(32))
    assert not torch.equal(u, O.get_objective("rmu", layer=0, steering_coeff=3.0, seed=6).control_vector(32))
    ref = _frozen(model)
    loss, logs = obj(model, batch, ref)
    assert logs["retain_loss"] == 0.0  # theta == ref
    # Forget term against HF hidden states: hidden_states[1] is decoder layer 0's output.
    f = batch["forget"]
    h = model(**f, output_hidden_states=True).hidden_states[1]
    mask = f["labels"] != -100
    expect = torch.stack([((h[b][mask[b]] - u) ** 2).mean(-1).mean() for b in range(h.shape[0])]).mean()
    torch.testing.assert_close(torch.tensor(logs["forget_loss"]), expect.detach(), rtol=1e-5, atol=1e-6)
    pert = copy.deepcopy(model)
    with torch.no_grad():
        pert.model.layers[0].mlp.down_proj.weight.add_(0.1)
    _, logs = obj(pert, batch, ref)
    assert logs["retain_loss"] > 0
    with pytest.raises(ValueError, match="decoder layers"):
        O.get_objective("rmu", layer=5)(model, batch, ref)


def test_rmu_stop_early_same_loss_and_grads(tiny):
    _, model, batch = tiny
    ref = _frozen(model)
    pert = copy.deepcopy(model)
    with torch.no_grad():
        for p in pert.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    grads = []
    for stop in (True, False):
        pert.zero_grad()
        loss, logs = O.get_objective("rmu", layer=0, alpha=10.0, stop_early=stop)(pert, batch, ref)
        loss.backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in pert.parameters()])
        if stop:
            first = loss.detach()
        else:
            torch.testing.assert_close(loss.detach(), first)
    assert logs["retain_loss"] > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # Later blocks and the LM head get no gradient from RMU (they do not affect layer 0's output).
    assert pert.lm_head.weight.grad is None or float(pert.lm_head.weight.grad.abs().sum()) == 0


def test_decoder_layers_generic():
    tok = char_tokenizer()
    model = tiny_llama(len(tok), layers=3)
    assert O.decoder_layers(model) is model.model.layers
    with pytest.raises(ValueError, match="decoder layer list"):
        O.decoder_layers(torch.nn.Linear(2, 2))


def test_bf16_model_objectives_finite(tiny):
    _, model, batch = tiny
    m = copy.deepcopy(model).to(torch.bfloat16)
    for name in ("npo", "ihl", "tnpo", "wga"):
        obj = O.get_objective(name, retain="kl")
        loss, _ = obj(m, batch, _frozen(m))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        m.zero_grad()


# ------------------------------------------------------------------------------------------------
# Registry and configuration errors
# ------------------------------------------------------------------------------------------------

def test_registry_names_and_defaults():
    assert isinstance(O.get_objective("NPO"), O.NPO) and isinstance(O.get_objective(" IdkPO "), O.PO)
    npo = O.get_objective("npo")
    assert (npo.beta, npo.reduction, npo.gamma, npo.alpha, npo.retain) == (0.1, "seq_sum", 1.0, 1.0, "nll")
    assert O.get_objective("ga").retain == "none" and not O.get_objective("ga").needs_reference
    assert O.get_objective("simnpo").gamma == 0.125
    assert O.get_objective("tnpo").eps == 0.0 and O.get_objective("wtnpo").weight_alpha == 1.5
    needs = {n: O.get_objective(n).needs_reference for n in ALL}
    assert needs == {"ga": False, "graddiff": False, "npo": True, "simnpo": False, "po": False,
                     "idkpo": False, "dpo": True, "wga": False, "tnpo": True, "wtnpo": True,
                     "ihl": False, "rmu": True}
    assert O.get_objective("rmu", retain="nll").needs_reference is False
    assert O.get_objective("po").batch_keys == ("forget_refusal", "retain")
    assert O.get_objective("dpo", win="alternate").batch_keys == ("forget", "forget_alternate", "retain")


def test_bad_config_errors():
    with pytest.raises(ValueError, match="unknown objective 'gd'.*graddiff.*npo"):
        O.get_objective("gd")
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'bta'.*accepted: \[.*'beta'"):
        O.get_objective("npo", bta=0.1)
    with pytest.raises(ValueError, match="'beta'"):
        O.get_objective("graddiff", beta=0.1)
    with pytest.raises(ValueError, match="beta must be"):
        O.get_objective("npo", beta=0)
    with pytest.raises(ValueError, match="reduction"):
        O.get_objective("npo", reduction="mean")
    with pytest.raises(ValueError, match="retain must be one of"):
        O.get_objective("graddiff", retain="activation")
    with pytest.raises(ValueError, match="gamma must be"):
        O.get_objective("ga", gamma=float("nan"))
    with pytest.raises(ValueError, match="win must be"):
        O.get_objective("dpo", win="lose")
    with pytest.raises(TypeError, match="layer must be an int"):
        O.get_objective("rmu", layer=1.5)


class _ExplodingModel(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("the model must not run before the config check")


@pytest.mark.parametrize("name,kw", [("npo", {}), ("dpo", {}), ("tnpo", {}), ("wtnpo", {}), ("rmu", {}),
                                     ("graddiff", {"retain": "kl"}), ("ihl", {"retain": "kl"})])
def test_reference_required_before_compute(name, kw, tiny):
    _, _, batch = tiny
    with pytest.raises(ValueError, match="needs a frozen reference model"):
        O.get_objective(name, **kw)(_ExplodingModel(), batch)


def test_missing_batch_keys(tiny):
    _, model, batch = tiny
    with pytest.raises(ValueError, match="forget_refusal"):
        O.get_objective("po")(model, {"forget": batch["forget"], "retain": batch["retain"]})
    with pytest.raises(ValueError, match="'retain'"):
        O.get_objective("graddiff")(model, {"forget": batch["forget"]})
    with pytest.raises(TypeError, match="mapping"):
        O.get_objective("ga")(model, [batch])
