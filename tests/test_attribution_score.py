"""attribution_scores: every back end against the reference (reference, cpp, triton in the
interpreter, cuda and compiled Triton on a GPU), plus validation and opcheck."""
import pytest
import torch

import wagle_ext
from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import (backend_device, backend_params, cpu_backends, cuda_only, op_impl, require_cpp, run_on_cpu,
                      same_floats)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["wagle", "wagle_hessian", "snip", "gradient", "magnitude"]
SHAPES = [(0,), (1,), (7,), (33, 17), (1023,), (3, 5, 129), (70001,)]


def _inputs(shape, dtype, gen, noncontig=False):
    def mk(scale=1.0):
        if noncontig:
            return (torch.randn(*shape, 3, generator=gen) * scale).to(dtype)[..., 1]
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    w = mk(0.05)
    gf = mk(1e-3)
    gr = mk(1e-6)
    h = (torch.rand(*shape, generator=gen) * 1e-3).to(dtype)
    return w, gf, gr, h


def _public(kind, w, gf, gr, h, **kw):
    if kind == "wagle_hessian":
        return wagle_ext.attribution_scores([w], [gf], [gr], kind="wagle", hessian=[h], return_histogram=True, **kw)
    return wagle_ext.attribution_scores([w], [gf], [gr], kind=kind, return_histogram=True, **kw)


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, kind, shape, gen, use_backend):
    use_backend(backend)
    w, gf, gr, h = _inputs(shape, dtype, gen)
    (s,), hist = _public(kind, w, gf, gr, h, gamma=1e-6)
    rs, rh = ref.attribution_score(w, gf, gr, h, kind, 1e-6, 1e-8)
    assert s.dtype == torch.float32 and s.shape == w.shape
    # Same float32 operations in the same order: bit-identical.
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    assert torch.equal(hist, rh)


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
def test_noncontiguous_and_mixed_dtypes(backend, gen, use_backend):
    use_backend(backend)
    w, gf, gr, _ = _inputs((257, 9), torch.bfloat16, gen, noncontig=True)
    gf32, gr32 = gf.float(), gr.float()  # fp32 accumulators beside bf16 weights (the usual case)
    assert not w.is_contiguous()
    (s,), hist = wagle_ext.attribution_scores([w], [gf32], [gr32], gamma=3e-4, return_histogram=True)
    rs, rh = ref.attribution_score(w, gf32, gr32, None, "wagle", 3e-4, 0.0)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    assert torch.equal(hist, rh)


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
def test_many_tensors_histogram_sums(backend, gen, use_backend):
    use_backend(backend)
    shapes = [(int(torch.randint(0, 300, (1,), generator=gen)),) for _ in range(210)]
    ws = [torch.randn(s, generator=gen) for s in shapes]
    gfs = [torch.randn(s, generator=gen) for s in shapes]
    grs = [torch.randn(s, generator=gen) * 1e-7 for s in shapes]
    scores, hist = wagle_ext.attribution_scores(ws, gfs, grs, return_histogram=True)
    assert len(scores) == 210
    total = torch.zeros(ref.HIST_SIZE, dtype=torch.int64)
    for w, gf, gr, s in zip(ws, gfs, grs, scores):
        rs, rh = ref.attribution_score(w, gf, gr, None, "wagle", 1e-6, 0.0)
        torch.testing.assert_close(s, rs, rtol=0, atol=0)
        total += rh
    assert torch.equal(hist, total)
    assert int(hist.sum()) == sum(w.numel() for w in ws)


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
def test_out_buffers_and_in_place(backend, gen, use_backend):
    use_backend(backend)
    w, gf, gr, _ = _inputs((4099,), torch.float32, gen)
    expect, _ = ref.attribution_score(w, gf, gr, None, "wagle", 1e-6, 0.0)
    out = torch.full((4099,), float("nan"))
    (s,) = wagle_ext.attribution_scores([w], [gf], [gr], out=[out])
    assert s.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    # Scores may overwrite g_f in place (saves one fp32 buffer per tensor).
    gf2 = gf.clone()
    wagle_ext.attribution_scores([w], [gf2], [gr], out=[gf2])
    torch.testing.assert_close(gf2, expect, rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
def test_nan_and_signed_zero_histogram(backend, use_backend):
    use_backend(backend)
    w = torch.tensor([0.0, -0.0, float("nan"), 1.0, -2.0, float("inf")])
    (s,), hist = wagle_ext.attribution_scores([w], kind="magnitude", return_histogram=True)
    assert int(hist[ref.HIST_BINS]) == 1
    assert int(hist.sum()) == 6
    assert torch.equal(hist, ref.score_histogram(s))


def test_validation_errors():
    w = torch.randn(10)
    with pytest.raises(ValueError, match="kind"):
        wagle_ext.attribution_scores([w], [w], [w], kind="nope")
    with pytest.raises(ValueError, match="grads_retain"):
        wagle_ext.attribution_scores([w], [w], kind="wagle")
    with pytest.raises(ValueError, match="shape"):
        wagle_ext.attribution_scores([w], [torch.randn(11)], [w])
    with pytest.raises(ValueError, match="grads_forget has 2"):
        wagle_ext.attribution_scores([w], [w, w], [w])
    with pytest.raises(TypeError, match="float32"):
        wagle_ext.attribution_scores([torch.ones(10, dtype=torch.int32)], kind="magnitude")
    with pytest.raises(TypeError, match="grads_forget\\[0\\]"):
        wagle_ext.attribution_scores([w], [w.long()], [w])
    with pytest.raises(ValueError, match="gamma"):
        wagle_ext.attribution_scores([w], [w], [w], gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        wagle_ext.attribution_scores([w], [w], [w], gamma=float("nan"))
    with pytest.raises(ValueError, match="hessian is only used"):
        wagle_ext.attribution_scores([w], [w], [w], kind="snip", hessian=[w])
    with pytest.raises(ValueError, match="out\\[0\\]"):
        wagle_ext.attribution_scores([w], [w], [w], out=[torch.empty(10, dtype=torch.float64)])
    with pytest.raises(TypeError, match="weights\\[1\\]"):
        wagle_ext.attribution_scores([w, "x"], kind="magnitude")


def test_direct_op_rejects_bad_input():
    require_cpp()
    w = torch.randn(8)
    with pytest.raises(ValueError):
        torch.ops.wagle.attribution_score(w, w, torch.randn(9), None, "wagle", 1e-6, 0.0)
    with pytest.raises(ValueError):
        torch.ops.wagle.attribution_score(w, None, None, None, "wagle", 1e-6, 0.0)
    with pytest.raises(ValueError):
        torch.ops.wagle.attribution_score(w, w, w, None, "bogus", 1e-6, 0.0)
    with pytest.raises(TypeError):
        torch.ops.wagle.attribution_score(w.int(), w, w, None, "wagle", 1e-6, 0.0)


def test_opcheck():
    require_cpp()
    g = torch.Generator().manual_seed(0)
    w, gf, gr = (torch.randn(37, 5, generator=g) for _ in range(3))
    torch.library.opcheck(torch.ops.wagle.attribution_score.default, (w, gf, gr, None, "wagle", 1e-6, 0.0))
    torch.library.opcheck(torch.ops.wagle.attribution_score.default, (w, gf, None, None, "snip", 1e-6, 0.0))
    out = torch.empty(37 * 5)
    hist = torch.zeros(ref.HIST_SIZE, dtype=torch.int64)
    torch.library.opcheck(torch.ops.wagle.attribution_score_out.default,
                          (w, gf, gr, None, "wagle", 1e-6, 0.0, out, hist))


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("kind", KINDS)
def test_simd_paths_and_streaming_stores(isa, kind, gen, monkeypatch):
    """Every SIMD path (WAGLE_CPU_ISA caps it; read per call) on a tensor big enough (>= 1 MiB of
    output) for the non-temporal store path, with an unaligned start (a view at offset 3)."""
    require_cpp()
    monkeypatch.setenv("WAGLE_BACKEND", "cpp")
    monkeypatch.setenv("WAGLE_CPU_ISA", isa)
    n = 300_007
    w, gf, gr, h = (t[3:] for t in _inputs((n + 3,), torch.float32, gen))
    (s,), hist = _public(kind, w, gf, gr, h)
    rs, rh = ref.attribution_score(w, gf, gr, h, kind, 1e-6, 1e-8)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    assert torch.equal(hist, rh)
    out = torch.empty(n + 5)[5:]  # misaligned destination
    wagle_ext.attribution_scores([w], [gf], [gr], hessian=[h] if kind == "wagle_hessian" else None,
                                 kind="wagle" if kind == "wagle_hessian" else kind, out=[out])
    torch.testing.assert_close(out, rs, rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
def test_scores_without_histogram(backend, gen, use_backend):
    use_backend(backend)
    w, gf, gr, _ = _inputs((5000,), torch.float32, gen)
    (s,) = wagle_ext.attribution_scores([w], [gf], [gr])
    rs, _ = ref.attribution_score(w, gf, gr, None, "wagle", 1e-6, 0.0)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)


def test_pure_python_fallback_without_extension():
    """With the extension missing (as after WAGLE_NO_EXT=1), import still works and every public op
    runs on the reference back end."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['wagle_ext._C'] = None\n"
        "import torch, wagle_ext\n"
        "info = wagle_ext.backend_info()\n"
        "assert info['cpp'] is False and info['cpu'] == 'reference', info\n"
        "w = torch.randn(100); s = wagle_ext.attribution_scores([w], [w], [w])\n"
        "m = wagle_ext.select_topk_mask(s, ratio=0.1)\n"
        "assert m[0].nnz == 10\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
def test_mixed_gradient_dtypes_are_widened_exactly(backend, gen, use_backend):
    use_backend(backend)
    w = torch.randn(999, generator=gen).to(torch.bfloat16)
    gf = torch.randn(999, generator=gen).to(torch.float16)
    gr = torch.randn(999, generator=gen) * 1e-7  # fp32: must not be rounded to fp16
    h = torch.rand(999, generator=gen).to(torch.bfloat16)
    (s,) = wagle_ext.attribution_scores([w], [gf], [gr], hessian=[h])
    rs, _ = ref.attribution_score(w, gf, gr, h, "wagle_hessian", 1e-6, 1e-8)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)


# ---- every back end on small inputs (Triton in the interpreter; CUDA marked and skipped here) ---------
SMALL = backend_params("attribution_score", ("cpp", "triton", "cuda"))


def _scores_ref_sum(ws, gfs, grs, hs, kind, gamma, eps):
    """Reference scores of a list and their summed histogram (CPU)."""
    hist = torch.zeros(ref.HIST_SIZE, dtype=torch.int64)
    out = []
    for w, gf, gr, h in zip(ws, gfs, grs, hs):
        rs, rh = ref.attribution_score(w, gf, gr, h, kind, gamma, eps)
        out.append(rs)
        hist += rh
    return out, hist


@pytest.mark.parametrize("backend", backend_params("attribution_score", ("cpp", "triton")))
def test_forced_backend_is_used(backend, use_backend):
    use_backend(backend)
    cpu = backend_device(backend)
    for op in ("attribution_score", "radix_histogram", "count_key", "topk_mask_bits", "pack_bits", "unpack_bits",
               "popcount_bits", "masked_adamw_", "gather_masked_"):
        assert ops.resolve_backend(op, cpu) == backend
    assert wagle_ext.backend_info()[backend] is True


@pytest.mark.parametrize("backend", backend_params("attribution_score", ("triton",)))
def test_forced_triton_on_cpu_needs_the_interpreter(backend, use_backend, monkeypatch):
    use_backend(backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.resolve_backend("attribution_score", torch.device("cpu"))


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_list_of_odd_shapes_matches_reference(backend, kind, dtype, gen, use_backend):
    """Several odd sizes in one call (one launch per tensor on GPU back ends): empty, tails, more
    than one program; histograms summed over the list."""
    use_backend(backend)
    dev = backend_device(backend)
    shapes = [(0,), (1,), (7,), (33, 17), (3, 5, 129), (70001,)]
    ws = [(torch.randn(*s, generator=gen) * 0.05).to(dtype) for s in shapes]
    gfs = [(torch.randn(*s, generator=gen) * 1e-3).to(dtype) for s in shapes]
    grs = [(torch.randn(*s, generator=gen) * 1e-6).to(dtype) for s in shapes]
    hs = [(torch.rand(*s, generator=gen) * 1e-3).to(dtype) for s in shapes]
    on = lambda ts: [t.to(dev) for t in ts]  # noqa: E731
    if kind == "wagle_hessian":
        scores, hist = wagle_ext.attribution_scores(on(ws), on(gfs), on(grs), kind="wagle", hessian=on(hs), eps=1e-8,
                                                    return_histogram=True)
    else:
        scores, hist = wagle_ext.attribution_scores(on(ws), on(gfs), on(grs), kind=kind, gamma=3e-6,
                                                    return_histogram=True)
    want, want_hist = _scores_ref_sum(ws, gfs, grs, hs, kind, 3e-6, 1e-8)
    for s, w, rs in zip(scores, ws, want):
        assert s.dtype == torch.float32 and s.shape == w.shape and s.device.type == dev.type
        assert same_floats(s, rs)
    assert torch.equal(hist.cpu(), want_hist)


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_denormals_and_signed_zeros(backend, dtype, gen, use_backend):
    """Denormals of each dtype survive widening (the Triton interpreter's own bf16 conversion does
    not: the kernels widen bf16 by a bit shift), and -0.0 scores land in the +0.0 bucket."""
    use_backend(backend)
    dev = backend_device(backend)
    tiny = torch.finfo(dtype).smallest_normal
    w = torch.tensor([tiny / 2, -tiny / 4, tiny / 64, -0.0, 0.0, tiny, -1.0, 3.0], dtype=torch.float32).to(dtype)
    w = torch.cat([w, (torch.randn(997, generator=gen) * tiny).to(dtype)])
    gf = torch.full_like(w, -1.0)
    for kind in ("magnitude", "snip", "gradient"):
        (s,), hist = wagle_ext.attribution_scores([w.to(dev)], [gf.to(dev)], kind=kind, return_histogram=True)
        rs, rh = ref.attribution_score(w, gf, None, None, kind, 1.0, 0.0)
        assert same_floats(s, rs)
        assert torch.equal(hist.cpu(), rh)
    assert torch.equal(op_impl("radix_histogram", backend)([w.to(dev)], 0, 0).cpu(), ref.radix_histogram([w], 0, 0))


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, inside the Triton interpreter
def test_nan_inf_mixed_dtypes_noncontiguous(backend, gen, use_backend):
    use_backend(backend)
    dev = backend_device(backend)
    n = 5000
    w = (torch.randn(n, 3, generator=gen) * 0.05).to(torch.bfloat16)[:, 1]  # non-contiguous bf16
    gf = torch.randn(n, generator=gen) * 1e-3  # fp32 accumulators beside bf16 weights
    gr = torch.randn(n, generator=gen) * 1e-6
    w[:7] = float("inf")
    gf[:3] = 0.0  # inf * 0 = NaN scores
    gf[10:13] = float("nan")
    w_dev = w.to(dev) if dev.type == "cpu" else torch.stack([w, w], 1).to(dev)[:, 0]
    assert not w_dev.is_contiguous()
    (s,), hist = wagle_ext.attribution_scores([w_dev], [gf.to(dev)], [gr.to(dev)], gamma=1e-5, return_histogram=True)
    rs, rh = ref.attribution_score(w, gf, gr, None, "wagle", 1e-5, 0.0)
    assert same_floats(s, rs)
    assert torch.equal(hist.cpu(), rh)
    assert int(hist[ref.HIST_BINS]) == 6  # 3 x (inf * 0) + 3 x NaN gradient


@pytest.mark.parametrize("backend", SMALL)
def test_out_buffer_is_filled(backend, gen, use_backend):
    use_backend(backend)
    dev = backend_device(backend)
    w = torch.randn(1000, generator=gen)
    gf = torch.randn(1000, generator=gen)
    out = [torch.full((1000,), -1.0, device=dev)]
    (s,) = wagle_ext.attribution_scores([w.to(dev)], [gf.to(dev)], kind="snip", out=out)
    assert s.data_ptr() == out[0].data_ptr()
    assert same_floats(out[0], ref.attribution_score(w, gf, None, None, "snip", 1.0, 0.0)[0])


@pytest.mark.parametrize("backend", backend_params("attribution_score", ("triton",)))
def test_triton_ops_registered_and_opcheck(backend, gen, use_backend):
    use_backend(backend)
    for name in ("attribution_score", "radix_histogram", "count_key", "topk_mask_bits", "pack_bits",
                 "unpack_bits", "popcount_bits"):
        assert hasattr(torch.ops.wagle_triton, name)
    w = torch.randn(300, generator=gen)
    gf = torch.randn(300, generator=gen)
    gr = torch.randn(300, generator=gen)
    # Schema only: under the interpreter wrap_triton returns the interpreted kernel itself, which
    # then runs on FakeTensors, so the fake-tensor check needs compiled Triton (a GPU).
    torch.library.opcheck(torch.ops.wagle_triton.attribution_score.default, (w, gf, gr, None, "wagle", 1e-3, 0.0),
                          test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.wagle_triton.topk_mask_bits.default, ([w.abs(), gf.abs()], 2**31, True, [-1, 3]),
                          test_utils=("test_schema",))


# ---- GPU back ends (cuda, compiled Triton) on CUDA tensors against the CPU result ----------------------
@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_scores(gpu_backend, kind, dtype, gen):
    cuda = torch.device("cuda")
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
    s_cpu, h_cpu = run_on_cpu(wagle_ext.attribution_scores, ws, gfs, grs, gamma=3e-6, **kw)
    if kw["hessian"] is not None:
        kw["hessian"] = [h.to(cuda) for h in hs]
    s_gpu, h_gpu = wagle_ext.attribution_scores([w.to(cuda) for w in ws], [g.to(cuda) for g in gfs],
                                                [g.to(cuda) for g in grs], gamma=3e-6, **kw)
    for a, b in zip(s_gpu, s_cpu):
        assert a.is_cuda and same_floats(a, b)
    assert h_gpu.is_cuda and torch.equal(h_gpu.cpu(), h_cpu)


@pytest.mark.cuda
@cuda_only
def test_gpu_scores_misaligned_noncontiguous_out_and_stream(gpu_backend, gen):
    cuda = torch.device("cuda")
    n = 100003
    base = torch.randn(n + 1, generator=gen)
    w = base[1:]
    gf = torch.randn(n, 2, generator=gen)[:, 0]  # non-contiguous
    gr = torch.randn(n, generator=gen) * 1e-6
    ref_s, ref_h = run_on_cpu(wagle_ext.attribution_scores, [w], [gf], [gr], return_histogram=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # launches must follow the current stream
        out = [torch.empty(n, device=cuda)]
        w_gpu = base.to(cuda)[1:]  # storage offset 1: not 16-byte aligned -> scalar path of the CUDA kernel
        gf_gpu = torch.stack([gf, gf], 1).to(cuda)[:, 0]  # non-contiguous on the GPU too
        s, h = wagle_ext.attribution_scores([w_gpu], [gf_gpu], [gr.to(cuda)], out=out, return_histogram=True)
    stream.synchronize()
    assert same_floats(s[0], ref_s[0]) and torch.equal(h.cpu(), ref_h)
