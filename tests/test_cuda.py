"""Every wagle op on a GPU against the same op on CPU tensors (``pytest -m cuda``).

Runs each GPU back end that is usable here -- ``cuda`` (kernels compiled in, csrc/cuda) and
``triton`` (compiled Triton) -- and compares with the CPU result (the C++ op where built, else the
reference): scores bit-identical, histograms/counts/masks exactly equal. Skipped without a GPU.
Never run on the project machine (no GPU); written to be run as-is on a GPU box.
"""
import pytest
import torch

import wagle_ext
from wagle_ext import ops
from wagle_ext.kernels import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU tests skipped"),
]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["wagle", "wagle_hessian", "snip", "gradient", "magnitude"]
GPU_BACKENDS = ["cuda", "triton"]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request, monkeypatch):
    name = request.param
    if not ops._backend_has(name, "attribution_score", CUDA):
        pytest.skip(f"back end {name!r} not available for CUDA tensors here ({ops.backend_info()})")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WAGLE_BACKEND", name)
    return name


def _cpu(fn, *args, **kwargs):
    """Run a public wagle_ext function on the CPU back end chosen by default (cpp, else reference)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("WAGLE_BACKEND", raising=False)
    try:
        return fn(*args, **kwargs)
    finally:
        mp.undo()


def _same_floats(a, b):
    return a.shape == b.shape and torch.equal(a.cpu().contiguous().view(torch.int32), b.cpu().contiguous().view(torch.int32))


def test_default_backend_for_cuda_tensors():
    info = wagle_ext.backend_info()
    want = "cuda" if info["cuda"] else ("triton" if info["triton"] else "reference")
    assert info["cuda_default"] == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_scores(gpu_backend, kind, dtype, gen):
    shapes = [(0,), (1,), (7,), (33, 17), (3, 5, 129), (1 << 20) + 3]
    mk = lambda s, scale: (torch.randn(s, generator=gen) * scale).to(dtype)  # noqa: E731
    ws = [mk(s, 0.05) for s in shapes]
    gfs = [mk(s, 1e-3) for s in shapes]
    grs = [mk(s, 1e-6) for s in shapes]
    hs = [(torch.rand(s, generator=gen) * 1e-3).to(dtype) for s in shapes]
    kw = dict(kind="wagle", hessian=None, return_histogram=True)
    if kind == "wagle_hessian":
        kw["hessian"] = hs
    else:
        kw["kind"] = kind
    s_cpu, h_cpu = _cpu(wagle_ext.attribution_scores, ws, gfs, grs, gamma=3e-6, **kw)
    if kw["hessian"] is not None:
        kw["hessian"] = [h.to(CUDA) for h in hs]
    s_gpu, h_gpu = wagle_ext.attribution_scores([w.to(CUDA) for w in ws], [g.to(CUDA) for g in gfs],
                                                [g.to(CUDA) for g in grs], gamma=3e-6, **kw)
    for a, b in zip(s_gpu, s_cpu):
        assert a.is_cuda and _same_floats(a, b)
    assert h_gpu.is_cuda and torch.equal(h_gpu.cpu(), h_cpu)


def test_scores_misaligned_noncontiguous_out_and_stream(gpu_backend, gen):
    n = 100003
    base = torch.randn(n + 1, generator=gen)
    w = base[1:]
    gf = torch.randn(n, 2, generator=gen)[:, 0]  # non-contiguous
    gr = torch.randn(n, generator=gen) * 1e-6
    ref_s, ref_h = _cpu(wagle_ext.attribution_scores, [w], [gf], [gr], return_histogram=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # launches must follow the current stream
        out = [torch.empty(n, device=CUDA)]
        w_gpu = base.to(CUDA)[1:]  # storage offset 1: not 16-byte aligned -> scalar path of the CUDA kernel
        gf_gpu = torch.stack([gf, gf], 1).to(CUDA)[:, 0]  # non-contiguous on the GPU too
        s, h = wagle_ext.attribution_scores([w_gpu], [gf_gpu], [gr.to(CUDA)], out=out, return_histogram=True)
    stream.synchronize()
    assert _same_floats(s[0], ref_s[0]) and torch.equal(h.cpu(), ref_h)


def _scores_with_ties(n, gen, dtype=torch.float32):
    x = torch.randint(-3, 4, (n,), generator=gen).float() / 2
    x = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randn(n, generator=gen), x)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_primitives(gpu_backend, dtype, gen):
    impl = ops._impl
    scores = [_scores_with_ties(n, gen, dtype) for n in (0, 1, 17, 8191, 8193, 300001)]
    scores[-1][::1009] = float("nan")
    g = [s.to(CUDA) for s in scores]
    assert torch.equal(impl("radix_histogram", CUDA)(g, 0, 0).cpu(), ref.radix_histogram(scores, 0, 0))
    keys = ref.float_key(scores[-1][~torch.isnan(scores[-1].float())])
    for pb in (11, 22):
        prefix = int(torch.mode(keys >> (32 - pb)).values)
        assert torch.equal(impl("radix_histogram", CUDA)(g, prefix, pb).cpu(), ref.radix_histogram(scores, prefix, pb))
    thr = int(ref.float_key(torch.tensor([0.5]))[0])
    counts = ref.count_key(scores, thr)
    assert torch.equal(impl("count_key", CUDA)(g, thr).cpu(), counts)
    c = counts.tolist()
    for largest in (True, False):
        for take in ([-1] * 6, [0] * 6, [0, 0, 1, c[3], c[4] // 2, c[5] // 3 + 1], [0, 0, 0, 0, 0, c[5]]):
            got = impl("topk_mask_bits", CUDA)(g, thr, largest, take)
            want = ref.topk_mask_bits(scores, thr, largest, take)
            for a, b in zip(got, want):
                assert a.is_cuda and torch.equal(a.cpu(), b)


def test_bits(gpu_backend, gen):
    for n in (0, 1, 7, 9, 1000, 1 << 20 | 5):
        mask = torch.rand(n, generator=gen) < 0.3
        bits = wagle_ext.pack_bits(mask.to(CUDA))
        assert torch.equal(bits.cpu(), ref.pack_bits(mask))
        assert torch.equal(wagle_ext.unpack_bits(bits, n).cpu(), mask)
        assert wagle_ext.popcount_bits(bits, n) == int(mask.sum())


@pytest.mark.parametrize("largest", [True, False])
def test_select_topk_mask_end_to_end(gpu_backend, largest, gen):
    shapes = [(1031, 77), (0,), (5,), (1 << 20,), (4097,)]
    scores = [torch.randn(s, generator=gen).abs() for s in shapes]
    scores[3] = torch.round(scores[3] * 16) / 16  # heavy ties at the boundary
    n = sum(s.numel() for s in scores)
    g = [s.to(CUDA) for s in scores]
    for k in (0, 1, 1000, n // 3, n // 2 + 7, n):
        masks = wagle_ext.select_topk_mask(g, k=k, largest=largest)
        cpu_masks = _cpu(wagle_ext.select_topk_mask, scores, k=k, largest=largest)
        oracle = ref.select_topk_bits(scores, k, largest)
        for m, cm, o in zip(masks, cpu_masks, oracle):
            assert m.bits.is_cuda
            assert torch.equal(m.bits.cpu(), cm.bits) and torch.equal(cm.bits, o)


# ---- masked_adamw_ --------------------------------------------------------------------------------
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


@pytest.mark.parametrize("adamw_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["masked", "all", "none"])
def test_masked_adamw_matches_cpu(adamw_backend, dtype, mode, gen, monkeypatch):
    """One multi-tensor call (odd sizes, every mask kind, > 1 M elements) on the GPU vs the CPU op
    (or the reference without the C++ extension): p, m, v, vmax and written-back grads bit-identical."""
    if not ops._backend_has(adamw_backend, "masked_adamw_", CUDA):
        pytest.skip(f"back end {adamw_backend!r} has no masked_adamw_ for CUDA tensors here")
    cpu_fn = torch.ops.wagle.masked_adamw_ if ops._backend_has("cpp", "masked_adamw_", CPU) else ref.masked_adamw_
    gpu_fn = torch.ops.wagle.masked_adamw_ if adamw_backend == "cuda" else wagle_ext.kernels.triton.masked_adamw_
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


@pytest.mark.parametrize("adamw_backend", GPU_BACKENDS)
def test_masked_adamw_found_inf_and_bad_directory(adamw_backend, gen):
    if not ops._backend_has(adamw_backend, "masked_adamw_", CUDA):
        pytest.skip(f"back end {adamw_backend!r} has no masked_adamw_ for CUDA tensors here")
    gpu_fn = torch.ops.wagle.masked_adamw_ if adamw_backend == "cuda" else wagle_ext.kernels.triton.masked_adamw_
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


def test_masked_adamw_optimizer_on_cuda(gen):
    """MaskedAdamW on CUDA parameters matches the same optimizer on CPU copies, bit for bit."""
    from wagle_ext.optim import MaskedAdamW

    if not ops._backend_has("cuda", "masked_adamw_", CUDA) and not ops._backend_has("triton", "masked_adamw_", CUDA):
        pytest.skip("no GPU masked_adamw_ back end")
    cpu_params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((129, 65), (7,), (5000,))]
    gpu_params = [torch.nn.Parameter(p.detach().clone().to(CUDA)) for p in cpu_params]
    masks = [torch.rand(p.shape, generator=gen) < 0.2 for p in cpu_params]
    opts = [MaskedAdamW(ps, masks=[m.to(p.device) for p, m in zip(ps, masks)], lr=1e-2, weight_decay=0.1)
            for ps in (cpu_params, gpu_params)]
    for _ in range(3):
        for pc, pg in zip(cpu_params, gpu_params):
            gr = torch.randn(pc.shape, generator=gen)
            pc.grad, pg.grad = gr.clone(), gr.to(CUDA)
        for o in opts:
            o.step()
    for pc, pg in zip(cpu_params, gpu_params):
        assert torch.equal(pc.detach(), pg.detach().cpu())
# ---- end masked_adamw_ -----------------------------------------------------------------------------


# ---- compact gradients: gather_masked_, masked_adamw_(compact_grads=True) -------------------------
def _gather_fn(backend):
    return torch.ops.wagle.gather_masked_ if backend == "cuda" else wagle_ext.kernels.triton.gather_masked_


def _gather_mask(kind, n, gen):
    if kind == "full":
        return torch.ones(n, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "sparse":  # mostly all-zero 32-element words
        return torch.rand(n, generator=gen) < 0.002
    if kind == "random":
        return torch.rand(n, generator=gen) < 0.4
    sel = torch.zeros(n, dtype=torch.bool)  # clustered
    i = 0
    while i < n:
        run = int(torch.randint(1, 3000, (1,), generator=gen))
        sel[i:i + run] = bool(torch.rand(1, generator=gen) < 0.3)
        i += run
    return sel


@pytest.mark.parametrize("adamw_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_gather_masked_matches_reference(adamw_backend, dtype, accumulate, gen):
    """gather_masked_ on the GPU vs the reference on the CPU, bit for bit: odd sizes, chunk
    boundaries, > 1 M elements, every mask kind, infinities/NaN/denormals in src."""
    if not ops._backend_has(adamw_backend, "gather_masked_", CUDA):
        pytest.skip(f"back end {adamw_backend!r} has no gather_masked_ for CUDA tensors here")
    fn = _gather_fn(adamw_backend)
    sizes = [0, 1, 31, 33 * 17, 4096, 4096 * 3 + 7, (1 << 20) + 3, 300, 70001]
    kinds = ["random", "full", "clustered", "empty", "random", "sparse", "clustered", "full", "sparse"]
    for n, kind in zip(sizes, kinds):
        src = torch.randn(n, generator=gen) * 3
        if n:
            pick = torch.randint(0, n, (min(n, 64),), generator=gen)
            src[pick] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-40, 1e30])[
                torch.randint(0, 6, (len(pick),), generator=gen)]
        src = src.to(dtype)
        sel = _gather_mask(kind, n, gen)
        bits = ref.pack_bits(sel)
        d = ops.masked_adamw_chunk_offsets(bits, n)
        out0 = torch.randn(int(sel.sum()), generator=gen)
        want = out0.clone()
        ref.gather_masked_(want, src, bits, d, accumulate)
        got = out0.to(CUDA)
        fn(got, src.to(CUDA), bits.to(CUDA), d.to(CUDA), accumulate)
        assert _same_floats(got, want), (n, kind)


def test_gather_masked_public_entry_and_bounds(gpu_backend, gen):
    """ops.gather_masked on CUDA (non-contiguous bf16 src, accumulate) equals the reference; a
    corrupt directory never writes outside out (guard values around it stay untouched)."""
    src = torch.randn(301, 651, generator=gen).to(torch.bfloat16).t()
    sel = _gather_mask("clustered", src.numel(), gen)
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, src.numel())
    want = torch.empty(int(sel.sum()))
    ref.gather_masked_(want, src.contiguous(), bits, d, False)
    ref.gather_masked_(want, src.contiguous(), bits, d, True)
    got = ops.gather_masked(src.to(CUDA), bits.to(CUDA), d.to(CUDA))
    ops.gather_masked(src.to(CUDA), bits.to(CUDA), d.to(CUDA), out=got, accumulate=True)
    assert got.is_cuda and _same_floats(got, want)
    # corrupt directory: every chunk claims 100 more slots than its bits hold; out is a window of a
    # larger buffer whose guard values must not change
    bad = d.clone()
    bad[1:] += 100 * torch.arange(1, bad.numel())
    nnz = int(bad[-1])
    buf = torch.full((nnz + 2000,), 7.0, device=CUDA)
    out = buf[1000:1000 + nnz]
    _gather_fn(gpu_backend)(out, src.contiguous().to(CUDA), bits.to(CUDA), bad.to(CUDA), False)
    torch.cuda.synchronize()
    assert torch.all(buf[:1000] == 7.0) and torch.all(buf[1000 + nnz:] == 7.0)


@pytest.mark.parametrize("adamw_backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["masked", "all"])
def test_masked_adamw_compact_grads_matches_reference(adamw_backend, dtype, mode, gen):
    """masked_adamw_(compact_grads=True) on the GPU vs the reference on the CPU, one multi-tensor
    call (dense params get float32[numel] grads): p, m, v, vmax and the written-back compact grads
    bit-identical."""
    if not ops._backend_has(adamw_backend, "masked_adamw_", CUDA):
        pytest.skip(f"back end {adamw_backend!r} has no masked_adamw_ for CUDA tensors here")
    gpu_fn = torch.ops.wagle.masked_adamw_ if adamw_backend == "cuda" else wagle_ext.kernels.triton.masked_adamw_
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
# ---- end compact gradients ------------------------------------------------------------------------
