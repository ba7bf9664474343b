"""Compact fp32 master weights (MaskedAdamW(master_weights=...), wagle::masked_adamw_master_).

* op level: every back end (reference, cpp, Triton in the interpreter) bit-identical, for both
  roundings, bf16 and fp16, dense and compact gradients, weight-decay modes, amsgrad/offsets/scale;
* optimizer level: a bf16/fp16 model with master weights follows the fp32 AdamW trajectory of the
  selected elements exactly -- the master copy IS that trajectory bit for bit, and each weight is
  round_to_nearest_even of it after every step --, frozen weights stay bit-identical, a state_dict
  round trip continues identically, ``set_masks`` remaps the master copy like the moments;
* stochastic rounding: unbiased (binomial tests with scipy.stats), deterministic for a seed,
  identical on every back end;
* why it matters: bf16 AdamW at lr 1e-5 without master weights leaves the weights unchanged.
"""
import copy
import io

import pytest
import torch

from wagle_ext import MaskedAdamW, memory_report, ops
from wagle_ext.kernels import reference as ref

from conftest import backend_params, op_impl

LOW = [torch.bfloat16, torch.float16]
OP_BACKENDS = backend_params("masked_adamw_master_", ("cpp", "triton"))
ALL_CPU = backend_params("masked_adamw_master_", ("reference", "cpp", "triton"))
SHAPES = [(0,), (7,), (33, 17), (4096 + 45,), (2 * 4096 + 333,)]  # Triton: < 1e5 elements in total


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _mask(kind, n, gen):
    if kind == "dense":
        return None
    if kind == "empty":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "full":
        return torch.ones(n, dtype=torch.bool)
    return torch.rand(n, generator=gen) < 0.35


# ---------------------------------------------------------------------------------------------- op level
class MWProblems:
    """A list of bf16/fp16 tensors with compact state and compact master weights."""

    def __init__(self, dtype, kind, gen, amsgrad=False, with_offsets=False, compact=False):
        self.p, self.sel, self.bits, self.dir, self.m, self.v, self.vmax, self.step, self.offs, self.mw = (
            [] for _ in range(10))
        self.amsgrad, self.compact = amsgrad, compact
        for shape in SHAPES:
            n = int(torch.Size(shape).numel())
            sel = _mask(kind, n, gen)
            self.p.append(torch.randn(shape, generator=gen).to(dtype))
            self.sel.append(torch.ones(n, dtype=torch.bool) if sel is None else sel)
            if sel is None:
                self.bits.append(torch.empty(0, dtype=torch.uint8))
                self.dir.append(torch.empty(0, dtype=torch.int64))
            else:
                b = ref.pack_bits(sel)
                self.bits.append(b)
                self.dir.append(ops.masked_adamw_chunk_offsets(b, n))
            nnz = int(self.sel[-1].sum())
            # master = the weight plus a sub-ulp offset: proves the kernels read the master copy
            base = self.p[-1].reshape(-1)[self.sel[-1]].float()
            self.mw.append(base + base.abs() * 1e-3 * torch.rand(nnz, generator=gen))
            self.m.append(torch.randn(nnz, generator=gen) * 0.1)
            self.v.append(torch.rand(nnz, generator=gen) * 0.01)
            if amsgrad:
                self.vmax.append(self.v[-1] + torch.rand(nnz, generator=gen) * 0.01)
            st = float(torch.randint(1, 5, (1,), generator=gen))
            self.step.append(torch.tensor(st))
            self.offs.append(torch.randint(0, int(st) + 1, (nnz,), generator=gen, dtype=torch.int32)
                             if with_offsets else torch.empty(0, dtype=torch.int32))

    def clone(self):
        c = object.__new__(MWProblems)
        for k, v in self.__dict__.items():
            setattr(c, k, [x.clone() for x in v] if isinstance(v, list) else v)
        return c

    def grads(self, gen):
        g = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in self.p]
        if self.compact:
            g = [x.reshape(-1)[s].float().contiguous() for x, s in zip(g, self.sel)]
        return g

    def call(self, fn, grads, seeds=(), **kw):
        for s in self.step:
            s += 1
        fn(self.p, grads, self.m, self.v, self.vmax, self.step, self.bits, self.dir, self.offs, self.mw,
           amsgrad=self.amsgrad, compact_grads=self.compact, rounding_seeds=list(seeds), **kw)

    def assert_same(self, other):
        for i in range(len(self.p)):
            assert _same(self.p[i], other.p[i]), f"params[{i}] differ"
            assert _same(self.mw[i], other.mw[i]), f"master_weights[{i}] differ"
            assert _same(self.m[i], other.m[i]) and _same(self.v[i], other.v[i]), f"moments[{i}] differ"
            if self.amsgrad:
                assert _same(self.vmax[i], other.vmax[i])


def _kw(mode="masked", **extra):
    return dict(lr=3e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=False,
                weight_decay_mode=mode, torch_tail=8, **extra)


SEEDS = [11, 2 ** 62 + 5, 0, 977, 123456789]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["random", "dense", "empty"])
@pytest.mark.parametrize("mode", ["masked", "all"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_op_matches_reference(backend, dtype, kind, mode, rounding, gen):
    """Five tensors per call (empty, odd sizes, chunk boundaries), two steps, bit-exact p, master,
    moments; unselected weights never written in masked mode."""
    impl = op_impl("masked_adamw_master_", backend)
    a = MWProblems(dtype, kind, gen)
    b = a.clone()
    p0 = [p.clone() for p in a.p]
    seeds = SEEDS if rounding == "stochastic" else ()
    for _ in range(2):
        g = a.grads(gen)
        a.call(impl, [x.clone() for x in g], seeds, **_kw(mode))
        b.call(ref.masked_adamw_master_, [x.clone() for x in g], seeds, **_kw(mode))
        a.assert_same(b)
    if mode == "masked":
        for p, q, sel in zip(a.p, p0, a.sel):
            assert _same(p.reshape(-1)[~sel], q.reshape(-1)[~sel])


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("compact", [False, True])
def test_op_amsgrad_offsets_scale_compact(backend, dtype, compact, gen):
    """amsgrad, per-element step offsets, grad_scale, beta1 >= 0.5, torch_tail=0, compact grads."""
    impl = op_impl("masked_adamw_master_", backend)
    a = MWProblems(dtype, "random", gen, amsgrad=True, with_offsets=True, compact=compact)
    b = a.clone()
    for beta1, tail, seeds in ((0.9, 8, SEEDS), (0.3, 0, ())):
        g = a.grads(gen)
        kw = _kw("none", grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
        kw.update(beta1=beta1, torch_tail=tail)
        a.call(impl, [x.clone() for x in g], seeds, **kw)
        b.call(ref.masked_adamw_master_, [x.clone() for x in g], seeds, **kw)
        a.assert_same(b)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_refuses_bad_master_arguments(backend, gen):
    impl = op_impl("masked_adamw_master_", backend)
    a = MWProblems(torch.bfloat16, "random", gen)
    g = a.grads(gen)
    args = (a.p, g, a.m, a.v, [], a.step, a.bits, a.dir, a.offs)
    with pytest.raises((ValueError, RuntimeError), match="master_weights"):
        impl(*args, a.mw[:-1], amsgrad=False, **_kw())
    with pytest.raises((ValueError, RuntimeError), match="master_weights"):
        impl(*args, a.mw[:-1] + [torch.zeros(a.mw[-1].numel() + 1)], amsgrad=False, **_kw())
    with pytest.raises((ValueError, RuntimeError), match="rounding_seeds"):
        impl(*args, a.mw, amsgrad=False, rounding_seeds=[1, 2], **_kw())
    p32 = [p.float() for p in a.p]
    with pytest.raises(TypeError, match="bfloat16/float16"):
        impl(p32, [x.float() for x in g], a.m, a.v, [], a.step, a.bits, a.dir, a.offs, a.mw, amsgrad=False, **_kw())


def test_public_op_validates_master_arguments(gen):
    p = torch.randn(100).to(torch.bfloat16)
    mw = p.float()
    args = ([p], [torch.randn(100).to(torch.bfloat16)], [torch.zeros(100)], [torch.zeros(100)], [],
            [torch.tensor(1.0)], [None], [None])
    with pytest.raises(ValueError, match="master_weights"):
        ops.masked_adamw_(*args, lr=1e-3, master_weights=[mw[:99]])
    with pytest.raises(ValueError, match="rounding_seeds"):
        ops.masked_adamw_(*args, lr=1e-3, rounding_seeds=[3])
    with pytest.raises(ValueError, match="rounding_seeds"):
        ops.masked_adamw_(*args, lr=1e-3, master_weights=[mw], rounding_seeds=[-1])
    with pytest.raises(TypeError, match="bfloat16/float16"):
        ops.masked_adamw_([p.float()], [torch.randn(100)], *args[2:], lr=1e-3, master_weights=[mw])


# ---------------------------------------------------------------------------------------------- stochastic rounding
def test_stochastic_round_reference_properties(gen):
    """The spec's neighbour choice: exact values, NaN, +-inf and RNE overflow as RNE; otherwise one
    of the two neighbours of x; r = 0 rounds toward zero unless frac is 0, r = 2^32-1 up."""
    for dtype in LOW:
        x = torch.cat([torch.randn(5000, generator=gen) * 10 ** torch.randint(-9, 5, (5000,), generator=gen).float(),
                       torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e38, 65519.0, 65530.0,
                                     3e-8, -3e-8, 1e-45])])
        if dtype == torch.bfloat16:
            x = x[x.abs() != 1e38]
        n = x.to(dtype)
        for r in (torch.zeros_like(x, dtype=torch.int64), torch.full_like(x, 2 ** 32 - 1, dtype=torch.int64),
                  ref.sr_bits(12345, torch.arange(x.numel()))):
            y = ref.stochastic_round(x, dtype, r).float()
            fin = torch.isfinite(n.float()) & (n.float() != x)
            assert _same(y[~fin].to(dtype), n[~fin]) or bool(torch.isnan(x[~fin]).any())
            assert torch.equal(torch.isnan(y), torch.isnan(x))
            # the other candidate: the neighbour of n (one step of its magnitude bits) on x's side
            nb = n.view(torch.int16).to(torch.int64)
            other = torch.where(n.float().abs() < x.abs(), nb + 1, nb - 1).to(torch.int16).view(dtype).float()
            ok = (y == n.float()) | (y == other)
            assert bool(ok[fin].all())
            between = (torch.minimum(n.float().abs(), other.abs()) <= x.abs()) & (
                x.abs() <= torch.maximum(n.float().abs(), other.abs()))
            assert bool(between[fin].all())


@pytest.mark.statistical
@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_is_unbiased(dtype, gen, record_stat):
    """Through the C++ op (lr = 0: p = SR(master)): for values at a known fraction f of an ulp above
    a representable value, the number rounded up over N elements is Binomial(N, f) (scipy binomtest,
    two-sided); and the mean rounding error over random values is 0 within 5 standard deviations."""
    from scipy import stats

    n = 60000
    worst = 1.0
    base = (torch.rand(n, generator=gen) * 2 - 1).to(dtype).float()  # representable, mixed signs
    base = torch.where(base == 0, torch.ones_like(base), base)
    ulp = (torch.nextafter(base.to(dtype), base.sign().to(dtype) * float("inf")).float() - base).abs()
    for f in (1 / 256, 0.25, 77 / 256, 0.5, 255 / 256):
        x = base + base.sign() * ulp * f  # exact in fp32: f has at most 8 bits
        y = _sr_through_op(x, dtype, seed=int(f * 1e6))
        up = int((y.abs() > base.abs()).sum())
        assert bool(((y == base) | (y.abs() == (base.abs() + ulp))).all())
        pv = stats.binomtest(up, n, f).pvalue
        worst = min(worst, pv)
        assert pv > 1e-6, (f, up / n, pv)  # a false alarm once in ~10^5 runs (10 tests per run)
    record_stat("min_binom_pvalue", worst)
    # random positions: the sum of rounding errors (in ulps) has mean 0 and variance sum f(1-f)
    x = (torch.randn(n, generator=gen) * 0.3).float()
    y = _sr_through_op(x, dtype, seed=99)
    nb = x.to(dtype).float()
    down = torch.where(nb.abs() <= x.abs(), nb, torch.nextafter(x.to(dtype), torch.zeros_like(x).to(dtype)).float())
    step = (torch.nextafter(down.to(dtype), x.sign().to(dtype) * float("inf")).float() - down).abs()
    frac = ((x - down).abs() / step).double()
    err = ((y - x).abs() * torch.where((y - x).sign() == x.sign(), 1.0, -1.0) / step).double()
    z = float(err.sum() / (frac * (1 - frac)).sum().sqrt())
    record_stat("mean_error_z", z)
    assert abs(z) < 5.0, z
    rne = x.to(dtype).float()
    assert float((rne - x).abs().mean()) < float((y - x).abs().mean())  # SR is noisier than RNE, as expected


def _sr_through_op(x, dtype, seed, backend_fn=None):
    """p = SR(master) via one masked_adamw_master_ step with lr = 0 (the master stays x)."""
    n = x.numel()
    p = torch.zeros(n, dtype=dtype)
    mw = x.clone()
    fn = backend_fn or torch.ops.wagle.masked_adamw_master_
    fn([p], [torch.zeros(n, dtype=dtype)], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(1.0)],
       [torch.empty(0, dtype=torch.uint8)], [torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.int32)],
       [mw], lr=0.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
       weight_decay_mode="none", torch_tail=8, rounding_seeds=[seed])
    assert _same(mw, x)
    return p.float()


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_identical_across_backends_and_deterministic(backend, dtype, gen):
    x = torch.cat([torch.randn(3000, generator=gen), torch.randn(1000, generator=gen) * 1e-6,
                   torch.tensor([0.0, float("nan"), 70000.0, -1e-30])])
    fn = op_impl("masked_adamw_master_", backend)
    y1 = _sr_through_op(x, dtype, 5, fn)
    want = ref.stochastic_round(x, dtype, ref.sr_bits(ref.sr_key(5, 1), torch.arange(x.numel()))).float()
    assert _same(y1, want)
    assert _same(_sr_through_op(x, dtype, 5, fn), y1)  # same seed and step: same bits
    y2 = _sr_through_op(x, dtype, 6, fn)
    assert not _same(y2, y1)


# ---------------------------------------------------------------------------------------------- optimizer level
def _model_params(dtype, gen, noncontig=True):
    shapes = [(0,), (7,), (33, 17), (4096 + 45,), (3, 1000)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    if noncontig:  # a transposed (non-contiguous) parameter
        ps.append(torch.nn.Parameter(torch.randn(40, 30, generator=gen).to(dtype).t()))
    return ps


def _masks_for(ps, gen, density=0.4):
    return [torch.rand(p.shape, generator=gen) < density for p in ps[:-1]] + [None]  # last one dense


def _grads(ps, gen):
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in ps]


def _apply(opt, ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()
        if opt.grad_mode == "compact":  # run the hook as autograd would
            opt._grad_hook(p)
    opt.step()
    opt.zero_grad()


def _fp32_twin(ps, masks, **kw):
    """fp32 copies (exact widening) with an fp32 MaskedAdamW: the reference trajectory."""
    qs = [torch.nn.Parameter(p.detach().float().clone()) for p in ps]
    return qs, MaskedAdamW(qs, masks=masks, **kw)


def _check_trajectory(ps, qs, masks, p0):
    for p, q, m, x0 in zip(ps, qs, masks, p0):
        assert _same(p.detach(), q.detach().to(p.dtype)), "weight != round_to_nearest_even(fp32 trajectory)"
        if m is not None:
            assert _same(p.detach()[~m], x0[~m]), "a frozen weight changed"


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("grad_mode", ["dense", "compact"])
def test_trajectory_equals_fp32_rounded(backend, dtype, grad_mode, gen, use_backend):
    """Six steps (set_masks after the third): bf16/fp16 weights == round(fp32 AdamW trajectory) bit
    for bit, master copy == the fp32 trajectory, frozen weights bit-identical."""
    use_backend(backend)
    ps = _model_params(dtype, gen)
    masks = _masks_for(ps, gen)
    kw = dict(lr=1e-3, weight_decay=0.1, grad_mode=grad_mode)
    qs, ref_opt = _fp32_twin(ps, masks, **kw)
    opt = MaskedAdamW(ps, masks=masks, **kw)
    assert all(opt.uses_master_weights(p) for p in ps) and not ref_opt.uses_master_weights(qs[0])
    p0 = [p.detach().clone() for p in ps]
    for step in range(6):
        if step == 3:
            masks = _masks_for(ps, gen, 0.5)
            opt.set_masks(masks)
            ref_opt.set_masks(masks)
            p0 = [p.detach().clone() for p in ps]
        g = _grads(ps, gen)
        _apply(opt, ps, g)
        _apply(ref_opt, qs, [x.float() for x in g])
        _check_trajectory(ps, qs, masks, p0)
        for p, q, m in zip(ps, qs, masks):
            mw = opt.master_weight(p)
            want = q.detach().reshape(-1) if m is None else q.detach().reshape(-1)[m.reshape(-1)]
            if want.numel() == 0:  # nothing selected: no state at all
                assert mw is None or mw.numel() == 0
                continue
            assert mw is not None and _same(mw, want), "master copy != fp32 trajectory"


def test_set_masks_remaps_master_like_the_moments(gen):
    ps = [torch.nn.Parameter(torch.randn(5000, generator=gen).to(torch.bfloat16))]
    old = torch.rand(5000, generator=gen) < 0.3
    opt = MaskedAdamW(ps, masks=[old], lr=1e-3)
    for _ in range(2):
        _apply(opt, ps, _grads(ps, gen))
    full = torch.full((5000,), float("nan"))
    full[old] = opt.master_weight(ps[0])
    new = torch.rand(5000, generator=gen) < 0.3
    opt.set_masks([new])
    mw = opt.master_weight(ps[0])
    kept, added = (old & new)[new], (~old & new)[new]
    assert _same(mw[kept], full[new][kept])
    assert _same(mw[added], ps[0].detach().float()[new][added])  # new entries: the current weight
    assert mw.numel() == int(new.sum()) and opt.state[ps[0]]["exp_avg"].numel() == mw.numel()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("grad_mode", ["dense", "compact"])
def test_state_dict_round_trip(rounding, grad_mode, gen):
    """Save after 3 steps, load into a fresh optimizer over copies of the weights, continue 3
    steps: identical to the uninterrupted run (master weights and the SR stream included)."""
    ps = _model_params(torch.bfloat16, gen)
    masks = _masks_for(ps, gen)
    kw = dict(lr=1e-3, grad_mode=grad_mode, rounding=rounding, seed=7)
    opt = MaskedAdamW(ps, masks=masks, **kw)
    grads = [_grads(ps, gen) for _ in range(6)]
    for g in grads[:3]:
        _apply(opt, ps, g)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = MaskedAdamW(ps2, masks=[None] * len(ps2), **kw)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.master_weight(ps2[2]) is not None
    for g in grads[3:]:
        _apply(opt, ps, g)
        _apply(opt2, ps2, g)
    for p, q in zip(ps, ps2):
        assert _same(p.detach(), q.detach())
        a, b = opt.master_weight(p), opt2.master_weight(q)
        assert (a is None and b is None) or _same(a, b)  # None: nothing selected, no state


def test_stochastic_rounding_deterministic_per_seed(gen):
    ps = _model_params(torch.bfloat16, gen, noncontig=False)
    masks = _masks_for(ps, gen)
    grads = [_grads(ps, gen) for _ in range(3)]
    runs = []
    for seed in (3, 3, 4):
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt = MaskedAdamW(qs, masks=masks, lr=1e-2, rounding="stochastic", seed=seed)
        for g in grads:
            _apply(opt, qs, g)
        runs.append([q.detach().clone() for q in qs])
    assert all(_same(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(_same(a, b) for a, b in zip(runs[0], runs[2]))


def test_constructor_choices(gen):
    ps32 = [torch.nn.Parameter(torch.randn(10, generator=gen))]
    psb = [torch.nn.Parameter(torch.randn(10, generator=gen).to(torch.bfloat16))]
    assert not MaskedAdamW(ps32).uses_master_weights(ps32[0])  # fp32: its own master
    assert MaskedAdamW(psb).uses_master_weights(psb[0])  # default on for bf16
    assert not MaskedAdamW(psb, master_weights=False).uses_master_weights(psb[0])
    with pytest.raises(ValueError, match="stochastic"):
        MaskedAdamW(psb, master_weights=False, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        MaskedAdamW(psb, rounding="up")
    with pytest.raises(ValueError, match="seed"):
        MaskedAdamW(psb, seed=-1)
    # master_weights=False: the weight itself is read and rounded (the old behaviour, no state)
    opt = MaskedAdamW(psb, master_weights=False, lr=1e-3)
    _apply(opt, psb, _grads(psb, gen))
    assert "master_weight" not in opt.state[psb[0]]
    # reset_master_weights: rebuilt from the current weight at the next step
    opt = MaskedAdamW(psb, lr=1e-3)
    _apply(opt, psb, _grads(psb, gen))
    with torch.no_grad():
        psb[0].fill_(0.5)
    opt.reset_master_weights()
    assert opt.master_weight(psb[0]) is None
    _apply(opt, psb, [torch.zeros_like(psb[0])])
    assert float((opt.master_weight(psb[0]) - 0.5).abs().max()) < 1e-2


def test_memory_report_counts_master_weights(gen):
    model = torch.nn.Linear(200, 100).to(torch.bfloat16)
    masks = {"weight": torch.rand(100, 200, generator=gen) < 0.1}
    opt = MaskedAdamW.from_model(model, masks, missing="frozen", lr=1e-3)
    x = torch.randn(4, 200, generator=gen).to(torch.bfloat16)
    model(x).float().sum().backward()
    opt.step()
    nnz = int(masks["weight"].sum())
    sb = opt.state_bytes()
    assert sb["master_weights"] == 4 * nnz and sb["moments"] == 8 * nnz
    rep = memory_report(model, opt)
    assert rep["master_weights"] == 4 * nnz
    assert rep["optimizer_state"] == 12 * nnz + 4  # + the fp32 step counter (the frozen bias has no state)
    # the dense baseline of a bf16 model: weights + bf16 grads + fp32 master + two fp32 moments = 16 B/param
    n = sum(p.numel() for p in model.parameters())
    assert rep["dense_adamw"] == 16 * n


# ---------------------------------------------------------------------------------------------- why it matters
def test_bf16_lr_1e5_needs_master_weights(gen):
    """bf16 AdamW at lr 1e-5: without master weights nearly every update is below half an ulp and
    rounds away (the weights do not move); with master weights the master copy IS the fp32
    trajectory and the weights are its rounding."""
    n = 20000
    w0 = torch.randn(n, generator=gen).to(torch.bfloat16)
    grads = [(torch.randn(n, generator=gen) * 0.01 + 0.003).to(torch.bfloat16) for _ in range(30)]
    out = {}
    for name, kw in (("no_master", dict(master_weights=False)), ("master", {}), ("fp32", {})):
        p = torch.nn.Parameter(w0.float().clone() if name == "fp32" else w0.clone())
        opt = MaskedAdamW([p], lr=1e-5, weight_decay=0.0, **kw)
        for g in grads:
            _apply(opt, [p], [g.float() if name == "fp32" else g])
        out[name] = (p.detach().clone(), opt, p)
    fp32 = out["fp32"][0]
    moved_fp32 = float((fp32 != w0.float()).float().mean())
    unchanged_no_master = float((out["no_master"][0] == w0).float().mean())
    assert moved_fp32 > 0.999, moved_fp32  # (nearly) every fp32 weight moved, by up to 30 * 1e-5
    assert unchanged_no_master > 0.95, unchanged_no_master  # bf16 without master: they did not
    mw = out["master"][1].master_weight(out["master"][2])
    assert _same(mw, fp32)  # the master copy follows fp32 exactly
    assert _same(out["master"][0], fp32.to(torch.bfloat16))
    # and the drift the rounding lost: the fp32 trajectory moved ~1e-4 on average, the bf16-only run ~0
    assert float((fp32 - w0.float()).abs().mean()) > 5e-5
    assert float((out["no_master"][0].float() - fp32).abs().mean()) > 0.5 * float((fp32 - w0.float()).abs().mean())


def test_deepcopy_keeps_master(gen):
    ps = [torch.nn.Parameter(torch.randn(100, generator=gen).to(torch.float16))]
    opt = MaskedAdamW(ps, lr=1e-3)
    _apply(opt, ps, _grads(ps, gen))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0]["master_weight"].dtype == torch.float32 and sd["state"][0]["master_weight"].numel() == 100


@pytest.mark.parametrize("backend", ALL_CPU)
def test_found_inf_skips_master_too(backend, gen):
    """found_inf == 1 (GradScaler, fp16): weights, master copies and moments all unchanged."""
    impl = op_impl("masked_adamw_master_", backend)
    a = MWProblems(torch.float16, "random", gen)
    b = a.clone()
    a.call(impl, a.grads(gen), SEEDS, **_kw(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0)))
    for s in b.step:
        s += 1
    a.assert_same(b)


def test_step_in_backward_with_master_weights(gen):
    """step_in_backward (LOMO/SIFT) updates through the master copy like step(): same trajectory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5)).to(torch.bfloat16)
    twin = copy.deepcopy(model)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()}
    kw = dict(lr=1e-3, grad_mode="compact", rounding="stochastic", seed=1)
    o1 = MaskedAdamW.from_model(model, masks, **kw)
    o2 = MaskedAdamW.from_model(twin, masks, step_in_backward=True, **kw)
    for _ in range(3):
        x = torch.randn(8, 40, generator=gen).to(torch.bfloat16)
        model(x).float().pow(2).sum().backward()
        o1.step()
        o1.zero_grad()
        twin(x).float().pow(2).sum().backward()  # twin's hooks step each parameter in backward
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert _same(p.detach(), q.detach()), n
        assert _same(o1.master_weight(p), o2.master_weight(q)), n


# ------------------------------------------------------------------ the trainer passes the settings on
def _bf16_trainer(tmp_path, **kw):
    import transformers

    from wagle_ext import ForgetRetainDataset, MaskSet, QACollator
    from wagle_ext.fictitious_authors import make_fictitious_authors
    from wagle_ext.trainer import UnlearnTrainer

    from tiny_models import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    data = make_fictitious_authors(4, seed=0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=4, intermediate=64, seed=0).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    mask = MaskSet.from_bool_dict({n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in model.named_parameters()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=2,
        lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", report_to=[], use_cpu=True,
        seed=7, disable_tqdm=True)
    return UnlearnTrainer(model=model, args=args, objective="graddiff", mask=mask,
                          train_dataset=ForgetRetainDataset(data["forget10"], data["retain90"], seed=0),
                          data_collator=QACollator(tok), **kw)


@pytest.mark.parametrize("settings", [{}, {"master_weights": False}, {"rounding": "stochastic"}])
def test_trainer_passes_master_weight_settings(tmp_path, settings):
    trainer = _bf16_trainer(tmp_path, **settings)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(opt, MaskedAdamW)
    want_master = settings.get("master_weights", True)
    assert opt.master_weights is want_master
    assert opt.rounding == settings.get("rounding", "nearest") and opt.seed == 7
    masked = [p for p in trainer.model.parameters() if opt.mask_of(p) is not None and opt.mask_of(p).nnz > 0]
    assert masked
    for p in masked:
        assert (opt.master_weight(p) is not None) is want_master


def test_trainer_rejects_stochastic_rounding_without_master_weights(tmp_path):
    with pytest.raises(ValueError, match="stochastic"):
        _bf16_trainer(tmp_path, master_weights=False, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        _bf16_trainer(tmp_path, rounding="up")
