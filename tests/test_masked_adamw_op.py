"""masked_adamw_ op: C++ kernel vs the reference (bit-exact), vs torch._fused_adamw_, validation,
opcheck."""
import os

import pytest
import torch

import wagle_ext
from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import cpu_backends, require_cpp

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


def _kw(mode, maximize=False, wd=0.1, **extra):
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


def test_kernel_rejects_inconsistent_directory(gen):
    require_cpp()
    n = 9000
    bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.5)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    bad = d.clone()
    bad[1] += 1  # claims one more element in chunk 0 than the bits hold
    bad[2:] += 1
    nnz = int(bad[-1])
    with pytest.raises(ValueError, match="chunk_offsets"):
        torch.ops.wagle.masked_adamw_([torch.randn(n)], [torch.randn(n)], [torch.zeros(nnz)], [torch.zeros(nnz)],
                                      [], [torch.tensor(1.0)], [bits], [bad], [torch.empty(0, dtype=torch.int32)],
                                      **_kw("masked"), amsgrad=False)


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
