"""masked_adamw_ op: every back end vs the reference (bit-exact) -- the C++ kernel on every SIMD path,
the Triton kernel in the interpreter (and its GPU code generation), the CUDA kernel and compiled
Triton on a GPU --, the C++ op vs torch._fused_adamw_, validation,
opcheck."""
import pytest
import torch

import wagle_ext
from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import _triton_kernels, backend_params, cuda_only, op_impl, require_cpp, run_triton_compile_script

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0,), (1,), (7,), (33, 17), (4096 * 2 + 77,), (20011,)]
MASK_KINDS = ["dense", "empty", "random5", "random50", "full", "clustered"]
TORCH_EXACT = ops.torch_fused_adamw_tail() > 0  # torch build with FMA (AVX2/AVX512 capability)


def make_mask(kind, n, gen):
    if kind == "dense":
        return None
    if kind == "empty":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "full":
        return torch.ones(n, dtype=torch.bool)
    if kind.startswith("random"):
        return torch.rand(n, generator=gen) < int(kind[6:]) / 100
    # clustered: contiguous runs of random length, like rows of an attribution mask
    sel = torch.zeros(n, dtype=torch.bool)
    i = 0
    while i < n:
        run = int(torch.randint(1, 700, (1,), generator=gen))
        if bool(torch.rand(1, generator=gen) < 0.3):
            sel[i:i + run] = True
        i += run
    return sel


class Problem:
    """One tensor with compact state, stepped by a given implementation."""

    def __init__(self, shape, dtype, mask, gen, amsgrad=False, with_offsets=False):
        n = int(torch.Size(shape).numel())
        self.p = torch.randn(shape, generator=gen).to(dtype)
        self.sel = mask
        if mask is None:
            self.bits, self.dir, nnz = None, None, n
        else:
            self.bits = ref.pack_bits(mask)
            self.dir = ops.masked_adamw_chunk_offsets(self.bits, n)
            nnz = int(mask.sum())
        self.m = torch.randn(nnz, generator=gen) * 0.1
        self.v = torch.rand(nnz, generator=gen) * 0.01
        self.vmax = self.v + torch.rand(nnz, generator=gen) * 0.01 if amsgrad else None
        self.step = torch.tensor(float(torch.randint(0, 5, (1,), generator=gen)))
        self.offs = torch.randint(0, int(self.step) + 1, (nnz,), generator=gen, dtype=torch.int32) if with_offsets else None

    def clone(self):
        c = object.__new__(Problem)
        for k, v in self.__dict__.items():
            setattr(c, k, v.clone() if isinstance(v, torch.Tensor) else v)
        return c

    def call(self, fn, g, amsgrad, **kw):
        self.step += 1
        fn([self.p], [g], [self.m], [self.v], [self.vmax] if amsgrad else [], [self.step],
           [self.bits if self.bits is not None else torch.empty(0, dtype=torch.uint8)],
           [self.dir if self.dir is not None else torch.empty(0, dtype=torch.int64)],
           [self.offs if self.offs is not None else torch.empty(0, dtype=torch.int32)],
           amsgrad=amsgrad, **kw)


def _kw(mode="masked", maximize=False, wd=0.1, **extra):
    return dict(lr=3e-2, beta1=0.9, beta2=0.999, weight_decay=wd, eps=1e-8, maximize=maximize,
                weight_decay_mode=mode, torch_tail=8, **extra)


def _assert_same(a: Problem, b: Problem):
    assert torch.equal(a.p, b.p)
    assert torch.equal(a.m, b.m) and torch.equal(a.v, b.v)
    if a.vmax is not None:
        assert torch.equal(a.vmax, b.vmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("mode", ["masked", "all", "none"])
def test_cpp_matches_reference(dtype, shape, kind, mode, gen):
    require_cpp()
    n = torch.Size(shape).numel()
    amsgrad = bool(torch.rand(1, generator=gen) < 0.5)
    maximize = bool(torch.rand(1, generator=gen) < 0.5)
    a = Problem(shape, dtype, make_mask(kind, n, gen), gen, amsgrad=amsgrad)
    b = a.clone()
    p0 = a.p.clone()
    for _ in range(3):
        g = torch.randn(shape, generator=gen).to(dtype)
        a.call(torch.ops.wagle.masked_adamw_, g.clone(), amsgrad, **_kw(mode, maximize))
        b.call(ref.masked_adamw_, g.clone(), amsgrad, **_kw(mode, maximize))
        _assert_same(a, b)
    if a.sel is not None and mode != "all":  # frozen weights are never written
        assert torch.equal(a.p.view(-1)[~a.sel.view(-1)], p0.view(-1)[~a.sel.view(-1)])


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_isa_paths_and_extras_match_reference(isa, dtype, gen, monkeypatch):
    """Every SIMD path; grad_scale (grads written back), per-element step offsets, beta1 >= 0.5."""
    require_cpp()
    monkeypatch.setenv("WAGLE_CPU_ISA", isa)
    n = 3 * 4096 + 333
    for kind in ("random50", "clustered", "dense"):
        a = Problem((n,), dtype, make_mask(kind, n, gen), gen, amsgrad=True, with_offsets=kind != "dense")
        b = a.clone()
        scale = torch.tensor(float(2 ** int(torch.randint(1, 10, (1,), generator=gen))))
        for beta1 in (0.9, 0.3):
            g = (torch.randn(n, generator=gen) * scale).to(dtype)
            ga, gb = g.clone(), g.clone()
            kw = _kw("all", grad_scale=scale, found_inf=torch.tensor(0.0))
            kw["beta1"] = beta1
            a.call(torch.ops.wagle.masked_adamw_, ga, True, **kw)
            b.call(ref.masked_adamw_, gb, True, **kw)
            _assert_same(a, b)
            assert torch.equal(ga, gb)
            if a.sel is not None:  # unselected grads are not touched
                assert torch.equal(ga[~a.sel], g[~a.sel])


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.view(torch.int32).long()
    ib = b.view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


@pytest.mark.skipif(not TORCH_EXACT, reason="torch build without FMA: arithmetic differs from the probed one")
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("n", [5, 16 * 300 + 13, 4096 * 3 + 7, 65536])
def test_full_mask_all_mode_matches_torch_fused(amsgrad, maximize, n, gen):
    """Full mask + weight_decay_mode='all' == torch._fused_adamw_, within 1 ulp per step (bit-exact
    on the x86-64 wheels), over 50 steps, with a GradScaler-style scale and one inf step."""
    p0 = torch.randn(n, generator=gen)
    ours = Problem((n,), torch.float32, torch.ones(n, dtype=torch.bool), gen, amsgrad=amsgrad)
    ours.p = p0.clone()
    ours.m.zero_(); ours.v.zero_(); ours.step.zero_()
    if amsgrad:
        ours.vmax.zero_()
    P, M, V, VM, S = p0.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.tensor(0.0)
    scale = torch.tensor(64.0)
    for step in range(50):
        g = torch.randn(n, generator=gen) * scale
        inf = torch.tensor(1.0 if step == 17 else 0.0)
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=maximize,
                  grad_scale=scale, found_inf=inf)
        ours.call(torch.ops.wagle.masked_adamw_, g.clone(), amsgrad, weight_decay_mode="all", torch_tail=8, **kw)
        ours.step -= inf
        S += 1
        torch._fused_adamw_([P], [g.clone()], [M], [V], [VM] if amsgrad else [], [S], amsgrad=amsgrad, **kw)
        S -= inf
        assert _ulps(ours.p, P) <= 1 and _ulps(ours.m, M) <= 1 and _ulps(ours.v, V) <= 1
        assert float(ours.step) == float(S)


def test_masked_mode_never_touches_frozen(gen):
    require_cpp()
    n = 50000
    sel = make_mask("random5", n, gen)
    a = Problem((n,), torch.float32, sel, gen)
    p0 = a.p.clone()
    for _ in range(5):
        g = torch.randn(n, generator=gen)
        a.call(torch.ops.wagle.masked_adamw_, g, False, **_kw("masked", grad_scale=torch.tensor(2.0)))
    assert torch.equal(a.p[~sel], p0[~sel])
    assert not torch.equal(a.p[sel], p0[sel])


def test_found_inf_skips_everything(gen):
    require_cpp()
    n = 10000
    a = Problem((n,), torch.float32, make_mask("random50", n, gen), gen)
    b = a.clone()
    g = torch.randn(n, generator=gen)
    gc = g.clone()
    a.call(torch.ops.wagle.masked_adamw_, gc, False, **_kw("all", grad_scale=torch.tensor(8.0),
                                                            found_inf=torch.tensor(1.0)))
    assert torch.equal(a.p, b.p) and torch.equal(a.m, b.m) and torch.equal(a.v, b.v)
    assert torch.equal(gc, g)


def test_public_wrapper_noncontiguous_and_many_tensors(gen):
    params, grads, ms, vs, steps, bits, dirs, sels = [], [], [], [], [], [], [], []
    for i in range(40):
        base = torch.randn(int(torch.randint(1, 300, (1,), generator=gen)), 3, generator=gen)
        p = base.t()  # non-contiguous view
        sel = torch.rand(p.shape, generator=gen) < 0.4
        pm = wagle_ext.PackedMask.from_bool(sel)
        params.append(p); grads.append(torch.randn(p.shape, generator=gen).t().contiguous().t())
        ms.append(torch.zeros(pm.nnz)); vs.append(torch.zeros(pm.nnz)); steps.append(torch.tensor(1.0))
        bits.append(pm.bits); dirs.append(ops.masked_adamw_chunk_offsets(pm.bits, pm.numel)); sels.append(sel)
    expect = [p.clone() for p in params]
    for e, g, sel in zip(expect, grads, sels):
        sub = e[sel].clone()
        torch._fused_adamw_([sub], [g[sel].clone()], [torch.zeros_like(sub)], [torch.zeros_like(sub)], [],
                            [torch.tensor(1.0)], amsgrad=False, lr=1e-2, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, maximize=False)
        e[sel] = sub
    before = [p.clone() for p in params]
    ops.masked_adamw_(params, grads, ms, vs, [], steps, bits, dirs, lr=1e-2, weight_decay=0.0)
    for p, e, b, sel in zip(params, expect, before, sels):
        assert torch.equal(p[~sel], b[~sel])
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)


def test_validation_errors(gen):
    p = torch.randn(100)
    g = torch.randn(100)
    bits = ref.pack_bits(torch.rand(100, generator=gen) < 0.5)
    d = ops.masked_adamw_chunk_offsets(bits, 100)
    nnz = int(d[-1])
    st = [torch.zeros(nnz)], [torch.zeros(nnz)]
    call = lambda **kw: ops.masked_adamw_(  # noqa: E731
        kw.pop("p", [p]), kw.pop("g", [g]), kw.pop("m", st[0]), kw.pop("v", st[1]), [],
        [torch.tensor(1.0)], kw.pop("bits", [bits]), kw.pop("d", [d]), **{"lr": 1e-3, **kw})
    with pytest.raises(ValueError, match="lr"):
        call(lr=-1.0)
    with pytest.raises(ValueError, match="beta1"):
        call(beta1=1.0)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        call(weight_decay_mode="decoupled")
    with pytest.raises(ValueError, match="mask_bits"):
        call(bits=[bits[:-1]])
    with pytest.raises(ValueError, match="exp_avgs"):
        call(m=[torch.zeros(nnz + 1)])
    with pytest.raises(TypeError, match="grads"):
        call(g=[g.half()])
    with pytest.raises(ValueError, match="shape"):
        call(g=[torch.randn(10, 10)])
    with pytest.raises(ValueError, match="padding"):
        ops.masked_adamw_chunk_offsets(torch.tensor([0xFF], dtype=torch.uint8), 5)


def test_directory_matches_reference(gen):
    for n in (0, 1, 4095, 4096, 4097, 100003):
        bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.3)
        assert torch.equal(ops.masked_adamw_chunk_offsets(bits, n), ref.masked_adamw_chunk_offsets(bits, n))


def test_opcheck(gen):
    require_cpp()
    n = 5000
    bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.5)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    nnz = int(d[-1])
    args = ([torch.randn(n), torch.randn(7)], [torch.randn(n), torch.randn(7)], [torch.zeros(nnz), torch.zeros(7)],
            [torch.zeros(nnz), torch.zeros(7)], [], [torch.tensor(1.0), torch.tensor(1.0)],
            [bits, torch.empty(0, dtype=torch.uint8)], [d, torch.empty(0, dtype=torch.int64)],
            [torch.empty(0, dtype=torch.int32)] * 2)
    torch.library.opcheck(torch.ops.wagle.masked_adamw_.default, args,
                          dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False,
                               maximize=False, weight_decay_mode="masked"))


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_compact_grads_match_dense_grads_and_reference(isa, dtype, kind, gen, monkeypatch):
    """compact_grads=True (float32[nnz] grads at the compact slot) gives the same step as the dense
    gradient (bit-exact: the kernel reads the same float32 values), on every SIMD path, with
    grad_scale written back to the compact buffer, amsgrad and per-element step offsets."""
    require_cpp()
    monkeypatch.setenv("WAGLE_CPU_ISA", isa)
    n = 3 * 4096 + 333
    mask = make_mask(kind, n, gen)
    a = Problem((n,), dtype, mask, gen, amsgrad=True, with_offsets=kind.startswith("random"))
    b, c = a.clone(), a.clone()
    sel = torch.ones(n, dtype=torch.bool) if mask is None else mask
    for mode, scale in (("masked", None), ("none", torch.tensor(4.0)), ("masked", torch.tensor(0.5))):
        g = torch.randn(n, generator=gen).to(dtype)
        kw = _kw(mode, maximize=scale is None, grad_scale=scale)
        gd = g.clone()
        a.call(torch.ops.wagle.masked_adamw_, gd, True, **kw)
        gc = g[sel].float()
        b.call(torch.ops.wagle.masked_adamw_, gc, True, compact_grads=True, **kw)
        gr = g[sel].float()
        c.call(ref.masked_adamw_, gr, True, compact_grads=True, **kw)
        _assert_same(b, c)
        assert torch.equal(gc, gr)
        if dtype == torch.float32 or scale is None:
            _assert_same(a, b)  # bf16/fp16 + scale: dense writes back a rounded grad, same update
        else:
            assert torch.equal(a.p, b.p)
        if scale is not None:
            assert torch.equal(gc, g[sel].float() / scale)


def test_compact_grads_validation(gen):
    require_cpp()
    n = 5000
    sel = torch.rand(n, generator=gen) < 0.3
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    nnz = int(d[-1])
    p = torch.randn(n)
    st = [torch.zeros(nnz), torch.zeros(nnz)]

    def call(g):
        ops.masked_adamw_([p], [g], [st[0]], [st[1]], [], [torch.tensor(1.0)], [bits], [d], lr=1e-2,
                          compact_grads=True)

    with pytest.raises(ValueError, match="entries"):
        call(torch.randn(n))  # a dense gradient where a compact one is expected
    with pytest.raises(TypeError, match="float32"):
        call(torch.randn(nnz).bfloat16())
    with pytest.raises(ValueError, match="selected element"):  # the C++ op's own check
        torch.ops.wagle.masked_adamw_([p], [torch.randn(nnz + 1)], st[:1], st[1:], [], [torch.tensor(1.0)], [bits],
                                      [d], [torch.empty(0, dtype=torch.int32)], lr=1e-2, beta1=0.9, beta2=0.999,
                                      weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                                      weight_decay_mode="masked", compact_grads=True)
    call(torch.randn(nnz))  # the right layout works


def test_opcheck_compact_grads(gen):
    require_cpp()
    n = 5000
    bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.5)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    nnz = int(d[-1])
    args = ([torch.randn(n), torch.randn(7)], [torch.randn(nnz), torch.randn(7)],
            [torch.zeros(nnz), torch.zeros(7)], [torch.zeros(nnz), torch.zeros(7)], [],
            [torch.tensor(1.0), torch.tensor(1.0)], [bits, torch.empty(0, dtype=torch.uint8)],
            [d, torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.int32)] * 2)
    torch.library.opcheck(torch.ops.wagle.masked_adamw_.default, args,
                          dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False,
                               maximize=False, weight_decay_mode="masked", compact_grads=True))


# ---- lists of tensors per call, every back end (Triton in the interpreter on small inputs) ---------------
# Every comparison is EXACT (bitwise p, m, v, vmax and written-back grads): each kernel performs the
# same float32 operations in the same order as the reference (true division, IEEE sqrt, fma where
# torch's fused CPU kernel fuses, p*decay rounded on its own), its coefficients come from the same
# double-precision formulas, and bf16/fp16 are converted with round-to-nearest-even. The Triton
# interpreter's own ``tl.fma`` rounds twice, so under TRITON_INTERPRET=1 the Triton kernel emulates a
# correctly rounded fma in float64 (what the GPU instruction computes; see
# wagle_ext/kernels/triton/masked_adamw.py); its GPU code path (tl.fma, enable_fp_fusion=False) is
# checked by test_gpu_codegen_is_exact and run by the GPU tests below.
# Per call: empty, tiny, odd 2-D, one chunk + a partial word, three chunks + odd tail.
LIST_SHAPES = [(0,), (7,), (33, 17), (4096 + 45,), (3 * 4096 + 333,)]
LIST_BACKENDS = backend_params("masked_adamw_", ("cpp", "triton"))
TRITON_ONLY = backend_params("masked_adamw_", ("triton",))


def make_list_mask(kind, n, gen):
    """make_mask's kinds, plus "random" at a random density below 0.6."""
    if kind == "random":
        return torch.rand(n, generator=gen) < float(torch.rand(1, generator=gen)) * 0.6
    return make_mask(kind, n, gen)


class Problems:
    """A list of tensors with compact state (one mask kind for all), stepped by an implementation."""

    def __init__(self, dtype, kind, gen, amsgrad=False, with_offsets=False, shapes=LIST_SHAPES):
        self.p, self.sel, self.bits, self.dir, self.m, self.v, self.vmax, self.step, self.offs = ([] for _ in range(9))
        self.amsgrad = amsgrad
        for shape in shapes:
            n = int(torch.Size(shape).numel())
            mask = make_list_mask(kind, n, gen)
            self.p.append(torch.randn(shape, generator=gen).to(dtype))
            self.sel.append(mask)
            if mask is None:
                self.bits.append(torch.empty(0, dtype=torch.uint8))
                self.dir.append(torch.empty(0, dtype=torch.int64))
                nnz = n
            else:
                b = ref.pack_bits(mask)
                self.bits.append(b)
                self.dir.append(ops.masked_adamw_chunk_offsets(b, n))
                nnz = int(mask.sum())
            self.m.append(torch.randn(nnz, generator=gen) * 0.1)
            self.v.append(torch.rand(nnz, generator=gen) * 0.01)
            if amsgrad:
                self.vmax.append(self.v[-1] + torch.rand(nnz, generator=gen) * 0.01)
            st = float(torch.randint(0, 5, (1,), generator=gen))
            self.step.append(torch.tensor(st))
            self.offs.append(torch.randint(0, int(st) + 1, (nnz,), generator=gen, dtype=torch.int32)
                             if with_offsets else torch.empty(0, dtype=torch.int32))

    def clone(self):
        c = object.__new__(Problems)
        for k, v in self.__dict__.items():
            setattr(c, k, [x.clone() if isinstance(x, torch.Tensor) else x for x in v] if isinstance(v, list) else v)
        return c

    def grads(self, gen, scale=1.0):
        return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in self.p]

    def call(self, fn, grads, **kw):
        for s in self.step:
            s += 1
        fn(self.p, grads, self.m, self.v, self.vmax, self.step, self.bits, self.dir, self.offs,
           amsgrad=self.amsgrad, **kw)


def _same(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _assert_same_lists(a: Problems, b: Problems):
    for i in range(len(a.p)):
        assert _same(a.p[i], b.p[i]), f"params[{i}] differ"
        assert _same(a.m[i], b.m[i]) and _same(a.v[i], b.v[i]), f"moments[{i}] differ"
        if a.amsgrad:
            assert _same(a.vmax[i], b.vmax[i]), f"max_exp_avg_sqs[{i}] differ"


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "clustered", "dense", "empty"])
@pytest.mark.parametrize("mode", ["masked", "all", "none"])
def test_list_matches_reference(backend, dtype, kind, mode, gen):
    """Five tensors per call (empty, odd sizes, chunk boundaries), two steps, bit-exact."""
    impl = op_impl("masked_adamw_", backend)
    a = Problems(dtype, kind, gen)
    b = a.clone()
    p0 = [p.clone() for p in a.p]
    for _ in range(2):
        g = a.grads(gen)
        a.call(impl, [x.clone() for x in g], **_kw(mode))
        b.call(ref.masked_adamw_, [x.clone() for x in g], **_kw(mode))
        _assert_same_lists(a, b)
    if mode != "all":
        for p, q, sel in zip(a.p, p0, a.sel):
            if sel is not None:  # frozen weights are never written
                assert _same(p.view(-1)[~sel.view(-1)], q.view(-1)[~sel.view(-1)])


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_list_amsgrad_maximize_offsets_scale(backend, amsgrad, maximize, dtype, gen):
    """amsgrad, maximize, per-element step offsets, grad_scale (grads written back) with found_inf=0,
    beta1 >= 0.5 (the other lerp form) and torch_tail=0, through the public ops entry."""
    impl = op_impl("masked_adamw_", backend)
    for kind in ("random", "clustered"):
        a = Problems(dtype, kind, gen, amsgrad=amsgrad, with_offsets=True)
        b = a.clone()
        scale = torch.tensor(float(2 ** int(torch.randint(1, 10, (1,), generator=gen))))
        for beta1, tail in ((0.9, 8), (0.3, 0)):
            g = a.grads(gen, float(scale))
            ga, gb = [x.clone() for x in g], [x.clone() for x in g]
            kw = _kw("all", maximize, grad_scale=scale, found_inf=torch.tensor(0.0))
            kw.update(beta1=beta1, torch_tail=tail)
            a.call(impl, ga, **kw)
            b.call(ref.masked_adamw_, gb, **kw)
            _assert_same_lists(a, b)
            for x, y, g0, sel in zip(ga, gb, g, a.sel):
                assert _same(x, y)
                assert _same(x.view(-1)[~sel], g0.view(-1)[~sel])  # unselected grads are not touched


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_public_entry_routes_to_triton(backend, gen, monkeypatch, use_backend):
    """ops.masked_adamw_ (what MaskedAdamW calls) picks the Triton kernel under WAGLE_BACKEND=triton."""
    use_backend(backend)
    impl = op_impl("masked_adamw_", backend)
    assert ops.resolve_backend("masked_adamw_", torch.device("cpu")) == "triton"
    calls = []
    real = _triton_kernels().masked_adamw_
    monkeypatch.setattr(_triton_kernels(), "masked_adamw_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    a = Problems(torch.float32, "random", gen, amsgrad=True, shapes=[(77, 13), (5000,)])
    b = a.clone()
    g = a.grads(gen)
    for s in a.step:
        s += 1
    ops.masked_adamw_(a.p, [x.clone() for x in g], a.m, a.v, a.vmax, a.step,
                      [bb if s is not None else None for bb, s in zip(a.bits, a.sel)],
                      [d if s is not None else None for d, s in zip(a.dir, a.sel)], None,
                      lr=1e-2, amsgrad=True, weight_decay=0.05)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.05, eps=1e-8, maximize=False,
              weight_decay_mode="masked", torch_tail=ops.torch_fused_adamw_tail())
    for s in b.step:
        s += 1
    ref.masked_adamw_(b.p, [x.clone() for x in g], b.m, b.v, b.vmax, b.step, b.bits, b.dir,
                      [torch.empty(0, dtype=torch.int32)] * 2, amsgrad=True, **kw)
    assert calls == [1]
    _assert_same_lists(a, b)


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_list_found_inf_skips_everything(backend, gen):
    impl = op_impl("masked_adamw_", backend)
    a = Problems(torch.float32, "random", gen, shapes=[(10000,)])
    b = a.clone()
    g = a.grads(gen)
    gc = [x.clone() for x in g]
    a.call(impl, gc, **_kw("all", grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0)))
    _assert_same_lists(a, b)
    assert torch.equal(gc[0], g[0])


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_rejects_inconsistent_directory_and_offsets(backend, gen):
    impl = op_impl("masked_adamw_", backend)
    n = 9000
    bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.5)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    bad = d.clone()
    bad[1] += 1  # claims one more element in chunk 0 than the bits hold
    bad[2:] += 1
    nnz = int(bad[-1])
    e32 = torch.empty(0, dtype=torch.int32)
    with pytest.raises(ValueError, match="chunk_offsets"):
        impl([torch.randn(n)], [torch.randn(n)], [torch.zeros(nnz)], [torch.zeros(nnz)], [],
                         [torch.tensor(1.0)], [bits], [bad], [e32], amsgrad=False, **_kw())
    nnz = int(d[-1])
    offs = torch.zeros(nnz, dtype=torch.int32)
    offs[nnz // 2] = 5  # step 3 - 5 < 1
    with pytest.raises(ValueError, match="step_offsets"):
        impl([torch.randn(n)], [torch.randn(n)], [torch.zeros(nnz)], [torch.zeros(nnz)], [],
                         [torch.tensor(3.0)], [bits], [d], [offs], amsgrad=False, **_kw())
    with pytest.raises(ValueError, match="exp_avg"):
        impl([torch.randn(n)], [torch.randn(n)], [torch.zeros(nnz)], [torch.zeros(nnz + 1)], [],
                         [torch.tensor(1.0)], [bits], [d], [e32], amsgrad=False, **_kw())
    with pytest.raises(TypeError, match="grads"):
        impl([torch.randn(n)], [torch.randn(n).half()], [torch.zeros(nnz)], [torch.zeros(nnz)], [],
                         [torch.tensor(1.0)], [bits], [d], [e32], amsgrad=False, **_kw())


# ---- compact gradients (compact_grads=True: grads are float32[nnz] at the compact slot) ----------
def _compact(g, sel):
    """The compact float32 gradient of a dense one (what gather_masked writes)."""
    return g.reshape(-1).float().clone() if sel is None else g.reshape(-1)[sel.reshape(-1)].float()


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "clustered", "dense", "empty"])
@pytest.mark.parametrize("mode", ["masked", "all"])
def test_compact_grads_match_reference(backend, dtype, kind, mode, gen):
    """compact_grads: bit-exact with the reference fed the same compact grads, and with the dense
    path fed the dense grads (bf16/fp16 grads widen exactly, so the update is the same)."""
    impl = op_impl("masked_adamw_", backend)
    a = Problems(dtype, kind, gen)
    b, c = a.clone(), a.clone()
    for _ in range(2):
        g = a.grads(gen)
        gc = [_compact(x, s) for x, s in zip(g, a.sel)]
        a.call(impl, [x.clone() for x in gc], **_kw(mode, compact_grads=True))
        b.call(ref.masked_adamw_, [x.clone() for x in gc], **_kw(mode, compact_grads=True))
        c.call(ref.masked_adamw_, [x.clone() for x in g], **_kw(mode))
        _assert_same_lists(a, b)
        _assert_same_lists(a, c)


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_grads_amsgrad_offsets_scale(backend, amsgrad, dtype, gen):
    """compact_grads with amsgrad, maximize, step offsets and grad_scale: the unscaled float32
    values are written back to the compact grads, exactly as the reference."""
    impl = op_impl("masked_adamw_", backend)
    for kind in ("random", "dense"):
        a = Problems(dtype, kind, gen, amsgrad=amsgrad, with_offsets=True)
        b = a.clone()
        scale = torch.tensor(float(2 ** int(torch.randint(1, 10, (1,), generator=gen))) * 0.75)
        for beta1, tail in ((0.9, 8), (0.3, 0)):
            g = a.grads(gen, float(scale))
            gc = [_compact(x, s) for x, s in zip(g, a.sel)]
            ga, gb = [x.clone() for x in gc], [x.clone() for x in gc]
            kw = _kw("all", True, grad_scale=scale, found_inf=torch.tensor(0.0), compact_grads=True)
            kw.update(beta1=beta1, torch_tail=tail)
            a.call(impl, ga, **kw)
            b.call(ref.masked_adamw_, gb, **kw)
            _assert_same_lists(a, b)
            for x, y, g0 in zip(ga, gb, gc):
                assert _same(x, y)
                assert x.numel() == 0 or not _same(x, g0)  # written back (scale is not 1)


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_compact_grads_public_entry_and_gather(backend, gen, use_backend):
    """The compact path end to end on the Triton back end: ops.gather_masked (accumulating two
    micro-batches) then ops.masked_adamw_(compact_grads=True) equals the reference's dense step on
    the summed gradient; found_inf=1 leaves everything (compact grads included) untouched."""
    use_backend(backend)
    impl = op_impl("masked_adamw_", backend)
    a = Problems(torch.bfloat16, "clustered", gen, amsgrad=True, shapes=[(77, 13), (5000,), (0,)])
    b = a.clone()
    g1, g2 = a.grads(gen), a.grads(gen)
    compact = []
    for x, y, bits, d, sel in zip(g1, g2, a.bits, a.dir, a.sel):
        out = ops.gather_masked(x, bits if sel is not None else None, d if sel is not None else None)
        ops.gather_masked(y, bits if sel is not None else None, d if sel is not None else None, out=out,
                          accumulate=True)
        compact.append(out)
    dense_sum = [x.float() + y.float() for x, y in zip(g1, g2)]
    for s in a.step:
        s += 1
    ops.masked_adamw_(a.p, compact, a.m, a.v, a.vmax, a.step,
                      [bb if s is not None else None for bb, s in zip(a.bits, a.sel)],
                      [d if s is not None else None for d, s in zip(a.dir, a.sel)], None,
                      lr=1e-2, amsgrad=True, weight_decay=0.05, compact_grads=True)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.05, eps=1e-8, maximize=False,
              weight_decay_mode="masked", torch_tail=ops.torch_fused_adamw_tail(), compact_grads=True)
    for s in b.step:
        s += 1
    ref.masked_adamw_(b.p, [_compact(x, s) for x, s in zip(dense_sum, b.sel)], b.m, b.v, b.vmax, b.step,
                      b.bits, b.dir, [torch.empty(0, dtype=torch.int32)] * 3, amsgrad=True, **kw)
    _assert_same_lists(a, b)
    c = a.clone()
    gc = [x.clone() for x in compact]
    a.call(impl, gc, **_kw("all", grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0),
                                       compact_grads=True))
    _assert_same_lists(a, c)
    assert all(_same(x, y) for x, y in zip(gc, compact))


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_compact_grads_rejects_bad_grads(backend, gen):
    impl = op_impl("masked_adamw_", backend)
    n = 9000
    bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.5)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    nnz = int(d[-1])
    e32 = torch.empty(0, dtype=torch.int32)
    args = lambda g: ([torch.randn(n)], [g], [torch.zeros(nnz)], [torch.zeros(nnz)], [],  # noqa: E731
                      [torch.tensor(1.0)], [bits], [d], [e32])
    with pytest.raises(TypeError, match="grads"):
        impl(*args(torch.zeros(nnz, dtype=torch.bfloat16)), amsgrad=False, **_kw(compact_grads=True))
    with pytest.raises(ValueError, match="grads"):
        impl(*args(torch.zeros(n)), amsgrad=False, **_kw(compact_grads=True))
    with pytest.raises(ValueError, match="grads"):
        impl(*args(torch.zeros(2 * nnz)[::2]), amsgrad=False, **_kw(compact_grads=True))


_COMPILE_SCRIPT = r'''
import os, re, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wagle_ext.kernels.triton.masked_adamw import _masked_adamw_kernel
fn = _masked_adamw_kernel.kernel()
sig = {k: "*fp32" for k in ("p_ptr", "g_ptr", "m_ptr", "v_ptr", "vmax_ptr", "table_ptr", "scale_ptr", "found_ptr",
                             "mw_ptr")}
sig.update(bits_ptr="*u8", dir_ptr="*i64", offs_ptr="*i32", err_ptr="*i32")
sig.update({k: "i64" for k in ("n", "nnz", "tail_start", "step_i", "table_len", "key_lo", "key_hi")})
sig.update({k: "fp32" for k in ("nss", "bc2s", "eps", "decay", "w1", "w1m1", "c2", "b2")})
# config 0: dense fp32 grads; 1: compact fp32 grads of bf16 params; 2: fp16 params with master weights
# and stochastic rounding; 3: bf16 params with master weights and stochastic rounding
for cfg, (dtype, compact, mw) in enumerate(((0, False, False), (1, True, False), (2, False, True), (1, True, True))):
    consts = dict(DTYPE=dtype, DENSE=False, AMSGRAD=True, MAXIMIZE=True, HAS_SCALE=True, HAS_FOUND=True,
                  HAS_OFFS=True, DECAY_ALL=True, LERP_SMALL=True, EMU_FMA=False, COMPACT_G=compact, HAS_MW=mw,
                  SR=mw, BLOCK=1024, CHUNK_=4096)
    sig.update({k: "constexpr" for k in consts})
    sig.update(p_ptr={0: "*fp32", 1: "*i16", 2: "*fp16"}[dtype], g_ptr="*fp32" if compact or dtype == 0 else
               {1: "*i16", 2: "*fp16"}[dtype])
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
    for op in ("fma.rn.f32", "mul.f32", "add.f32", "sub.f32", "div.rn.f32", "div.full.f32", "div.approx.f32",
               "sqrt.rn.f32", "sqrt.approx.f32"):
        print(cfg, op, len(re.findall(r"(?<![\w.])" + re.escape(op) + r"(?![\w.])", ptx)))
'''


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_gpu_codegen_is_exact(backend):
    """Compile the kernel for sm_90 (no GPU needed: Triton's bundled ptxas) as it is launched on a GPU,
    with dense fp32 grads, with compact_grads (bf16 params) and with master weights + stochastic
    rounding (fp16, bf16), and check the PTX: IEEE division and square root only, explicit fmas only, and every other float
    multiply/add in its non-contractable .rn form (enable_fp_fusion=False), so ptxas cannot fuse
    p * decay into the final add."""
    r = run_triton_compile_script(_COMPILE_SCRIPT)
    for compact in ("0", "1", "2", "3"):  # dense grads, compact_grads, master weights + SR (fp16, bf16)
        counts = {line.split()[1]: int(line.split()[2]) for line in r.stdout.split("\n")
                  if line.strip() and line.split()[0] == compact}
        assert counts["fma.rn.f32"] > 0 and counts["div.rn.f32"] > 0 and counts["sqrt.rn.f32"] > 0, (compact, counts)
        for op in ("mul.f32", "add.f32", "sub.f32", "div.full.f32", "div.approx.f32", "sqrt.approx.f32"):
            assert counts[op] == 0, (compact, counts)


# ---- GPU back ends (cuda, compiled Triton) on CUDA tensors against the CPU result ----------------------
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
GPU_BACKENDS = ["cuda", "triton"]


def _adamw_problem(dtype, kind, n, gen, amsgrad, with_offsets):
    """(p, sel-or-None, bits, dir, m, v, vmax, step, offs) on the CPU."""
    sel = None
    if kind == "random":
        sel = torch.rand(n, generator=gen) < 0.3
    elif kind == "clustered":
        sel = torch.zeros(n, dtype=torch.bool)
        i = 0
        while i < n:
            run = int(torch.randint(1, 3000, (1,), generator=gen))
            sel[i:i + run] = bool(torch.rand(1, generator=gen) < 0.3)
            i += run
    elif kind == "empty":
        sel = torch.zeros(n, dtype=torch.bool)
    if sel is None:
        bits, d, nnz = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), n
    else:
        bits = ref.pack_bits(sel)
        d = ops.masked_adamw_chunk_offsets(bits, n)
        nnz = int(sel.sum())
    step = float(torch.randint(1, 6, (1,), generator=gen))
    offs = (torch.randint(0, int(step), (nnz,), generator=gen, dtype=torch.int32) if with_offsets
            else torch.empty(0, dtype=torch.int32))
    v = torch.rand(nnz, generator=gen) * 0.01
    # a few denormal-range second moments: a flushing (-ftz) build would differ
    v[: min(nnz, 16)] = torch.rand(min(nnz, 16), generator=gen) * 1e-39
    return dict(p=torch.randn(n, generator=gen).to(dtype), sel=sel, bits=bits, dir=d,
                m=torch.randn(nnz, generator=gen) * 0.1, v=v,
                vmax=v + torch.rand(nnz, generator=gen) * 0.01 if amsgrad else None,
                step=torch.tensor(step), offs=offs)


def _adamw_call(fn, probs, grads, device, amsgrad, **kw):
    to = lambda t: t.to(device)  # noqa: E731
    ps = [to(x["p"]) for x in probs]
    gs = [to(g) for g in grads]
    ms = [to(x["m"]) for x in probs]
    vs = [to(x["v"]) for x in probs]
    vx = [to(x["vmax"]) for x in probs] if amsgrad else []
    fn(ps, gs, ms, vs, vx, [x["step"].clone() for x in probs], [to(x["bits"]) for x in probs],
       [to(x["dir"]) for x in probs], [to(x["offs"]) for x in probs], amsgrad=amsgrad, **kw)
    return [t.cpu() for t in ps + gs + ms + vs + vx]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("adamw_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["masked", "all", "none"])
def test_masked_adamw_matches_cpu(adamw_backend, dtype, mode, gen, monkeypatch):
    """One multi-tensor call (odd sizes, every mask kind, > 1 M elements) on the GPU vs the CPU op
    (or the reference without the C++ extension): p, m, v, vmax and written-back grads bit-identical."""
    if not ops._backend_has(adamw_backend, "masked_adamw_", CUDA):
        pytest.skip(f"back end {adamw_backend!r} has no masked_adamw_ for CUDA tensors here")
    cpu_fn = torch.ops.wagle.masked_adamw_ if ops._backend_has("cpp", "masked_adamw_", CPU) else ref.masked_adamw_
    gpu_fn = torch.ops.wagle.masked_adamw_ if adamw_backend == "cuda" else _triton_kernels().masked_adamw_
    for amsgrad, maximize, offsets in ((False, False, False), (True, True, True)):
        sizes = [0, 1, 31, 33 * 17, 4096, 4096 * 3 + 7, (1 << 20) + 3, 300]
        kinds = ["random", "clustered", "dense", "empty", "random", "clustered", "random", "dense"]
        probs = [_adamw_problem(dtype, k, n, gen, amsgrad, offsets) for k, n in zip(kinds, sizes)]
        grads = [(torch.randn(x["p"].shape, generator=gen) * 64).to(dtype) for x in probs]
        kw = dict(lr=3e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=maximize,
                  weight_decay_mode=mode, torch_tail=8, grad_scale=None, found_inf=None)
        if amsgrad:
            kw.update(grad_scale=torch.tensor(64.0), found_inf=torch.tensor(0.0))
        want = _adamw_call(cpu_fn, probs, grads, CPU, amsgrad, **kw)
        if amsgrad:
            kw.update(grad_scale=kw["grad_scale"].to(CUDA), found_inf=kw["found_inf"].to(CUDA))
        got = _adamw_call(gpu_fn, probs, grads, CUDA, amsgrad, **kw)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
                                                      b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32)), i


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("adamw_backend", GPU_BACKENDS)
def test_masked_adamw_found_inf_and_bad_directory(adamw_backend, gen):
    if not ops._backend_has(adamw_backend, "masked_adamw_", CUDA):
        pytest.skip(f"back end {adamw_backend!r} has no masked_adamw_ for CUDA tensors here")
    gpu_fn = torch.ops.wagle.masked_adamw_ if adamw_backend == "cuda" else _triton_kernels().masked_adamw_
    n = 9000
    x = _adamw_problem(torch.float32, "random", n, gen, False, False)
    g = torch.randn(n, generator=gen)
    kw = dict(lr=3e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=False,
              weight_decay_mode="all", torch_tail=8, grad_scale=torch.tensor(8.0, device=CUDA),
              found_inf=torch.tensor(1.0, device=CUDA))
    out = _adamw_call(gpu_fn, [x], [g], CUDA, False, **kw)
    assert torch.equal(out[0], x["p"]) and torch.equal(out[1], g) and torch.equal(out[2], x["m"])
    bad = x["dir"].clone()
    bad[1:] += 1
    x["dir"] = bad
    x["m"], x["v"] = torch.zeros(int(bad[-1])), torch.zeros(int(bad[-1]))
    kw.update(grad_scale=None, found_inf=None)
    with pytest.raises((ValueError, RuntimeError), match="chunk_offsets"):
        _adamw_call(gpu_fn, [x], [g], CUDA, False, **kw)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("adamw_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["masked", "all"])
def test_masked_adamw_compact_grads_matches_reference(adamw_backend, dtype, mode, gen):
    """masked_adamw_(compact_grads=True) on the GPU vs the reference on the CPU, one multi-tensor
    call (dense params get float32[numel] grads): p, m, v, vmax and the written-back compact grads
    bit-identical."""
    if not ops._backend_has(adamw_backend, "masked_adamw_", CUDA):
        pytest.skip(f"back end {adamw_backend!r} has no masked_adamw_ for CUDA tensors here")
    gpu_fn = torch.ops.wagle.masked_adamw_ if adamw_backend == "cuda" else _triton_kernels().masked_adamw_
    for amsgrad, maximize, offsets in ((False, False, False), (True, True, True)):
        sizes = [0, 1, 31, 33 * 17, 4096, 4096 * 3 + 7, (1 << 20) + 3, 300]
        kinds = ["random", "clustered", "dense", "empty", "random", "clustered", "random", "dense"]
        probs = [_adamw_problem(dtype, k, n, gen, amsgrad, offsets) for k, n in zip(kinds, sizes)]
        grads = []
        for x in probs:
            g = (torch.randn(x["p"].shape, generator=gen) * 64).to(dtype).float()
            grads.append(g if x["sel"] is None else g[x["sel"]])
        kw = dict(lr=3e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, maximize=maximize,
                  weight_decay_mode=mode, torch_tail=8, grad_scale=None, found_inf=None, compact_grads=True)
        if amsgrad:
            kw.update(grad_scale=torch.tensor(48.0), found_inf=torch.tensor(0.0))
        want = _adamw_call(ref.masked_adamw_, probs, grads, CPU, amsgrad, **kw)
        if amsgrad:
            kw.update(grad_scale=kw["grad_scale"].to(CUDA), found_inf=kw["found_inf"].to(CUDA))
        got = _adamw_call(gpu_fn, probs, grads, CUDA, amsgrad, **kw)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
                                                      b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32)), i
