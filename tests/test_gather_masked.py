"""gather_masked (bits -> compact float32 gradient): every back end vs the reference (exact): the C++
kernel on every SIMD path, the Triton kernel in the interpreter (and its GPU code generation), the
CUDA kernel and compiled Triton on a GPU; accumulate, odd sizes, empty tensors, non-contiguous
sources, validation, opcheck."""
import pytest
import torch

from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import (_triton_kernels, backend_params, cpu_backends, cuda_only, op_impl, require_cpp,
                      run_triton_compile_script, same_floats)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 64, 65, 4095, 4096 + 45, 3 * 4096 + 333, 100003]
DENSITIES = [0.0, 0.003, 0.05, 0.4, 0.97, 1.0]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same float32 bit patterns (signed zeros, infinities and NaN included)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _mask(n, density, gen):
    if density >= 1.0:
        return torch.ones(n, dtype=torch.bool)
    return torch.rand(n, generator=gen) < density


@pytest.mark.parametrize("backend", cpu_backends("gather_masked_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(backend, dtype, n, gen, use_backend):
    use_backend(backend)
    for density in DENSITIES:
        sel = _mask(n, density, gen)
        bits = ref.pack_bits(sel)
        d = ops.masked_adamw_chunk_offsets(bits, n)
        src = (torch.randn(n, generator=gen) * 3).to(dtype)
        out = ops.gather_masked(src, bits, d)
        assert out.dtype == torch.float32 and out.shape == (int(sel.sum()),)
        assert torch.equal(out, src[sel].float())
        expect = out.clone()
        ref.gather_masked_(expect, src, bits, d, True)
        ops.gather_masked(src, bits, d, out=out, accumulate=True)
        assert torch.equal(out, expect)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_isa_paths(isa, dtype, gen, monkeypatch):
    """Each SIMD path, on clustered masks (all-ones words) and random ones (mixed words); values
    include subnormals, infinities and NaN (copied, not computed)."""
    require_cpp()
    monkeypatch.setenv("WAGLE_CPU_ISA", isa)
    n = 5 * 4096 + 77
    src = torch.randn(n, generator=gen).to(dtype)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0,
                            torch.finfo(dtype).tiny / 4])
    src[:6] = special.to(dtype)
    clustered = torch.zeros(n, dtype=torch.bool)
    for start in torch.randint(0, n - 500, (20,), generator=gen).tolist():
        clustered[start:start + int(torch.randint(1, 500, (1,), generator=gen))] = True
    for sel in (clustered, _mask(n, 0.3, gen), _mask(n, 0.9, gen)):
        sel[:6] = True
        bits = ref.pack_bits(sel)
        d = ops.masked_adamw_chunk_offsets(bits, n)
        out = torch.full((int(sel.sum()),), 7.0)
        torch.ops.wagle.gather_masked_(out, src, bits, d, False)
        assert _bitwise_equal(out, src[sel].float())
        base = torch.randn(out.numel(), generator=gen)
        acc = base.clone()
        torch.ops.wagle.gather_masked_(acc, src, bits, d, True)
        assert _bitwise_equal(acc, base + src[sel].float())


def test_dense_and_noncontiguous_sources(gen):
    # bits=None: every element (a parameter without a mask)
    x = torch.randn(33, 17, generator=gen).bfloat16()
    assert torch.equal(ops.gather_masked(x, None, None), x.reshape(-1).float())
    # a transposed (non-contiguous) gradient is read in its logical flat order
    t = torch.randn(40, 70, generator=gen).t()
    sel = _mask(t.numel(), 0.2, gen)
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, t.numel())
    assert torch.equal(ops.gather_masked(t, bits, d), t.reshape(-1)[sel])


def test_validation_errors(gen):
    n = 1000
    sel = _mask(n, 0.5, gen)
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    src = torch.randn(n)
    with pytest.raises(TypeError, match="src"):
        ops.gather_masked(src.long(), bits, d)
    with pytest.raises(ValueError, match="both"):
        ops.gather_masked(src, bits, None)
    with pytest.raises(ValueError, match="bits"):
        ops.gather_masked(src[:-9], bits, d)
    with pytest.raises(ValueError, match="chunk_offsets"):
        ops.gather_masked(src, bits, d.int())
    with pytest.raises(ValueError, match="selects"):
        ops.gather_masked(src, bits, d, out=torch.zeros(3))
    with pytest.raises(TypeError, match="float32"):
        ops.gather_masked(src, bits, d, out=torch.zeros(int(sel.sum()), dtype=torch.float64))
    with pytest.raises(ValueError, match="accumulate"):
        ops.gather_masked(src, bits, d, accumulate=True)


def test_kernel_rejects_inconsistent_directory(gen):
    require_cpp()
    n = 3 * 4096
    sel = _mask(n, 0.5, gen)
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    bad = d.clone()
    bad[1] += 1
    bad[2:] += 1
    with pytest.raises(ValueError, match="do not match"):
        torch.ops.wagle.gather_masked_(torch.zeros(int(bad[-1])), torch.randn(n), bits, bad, False)
    with pytest.raises(ValueError, match="out must"):
        torch.ops.wagle.gather_masked_(torch.zeros(int(d[-1]) + 1), torch.randn(n), bits, d, False)


def test_opcheck(gen):
    require_cpp()
    n = 5000
    bits = ref.pack_bits(_mask(n, 0.5, gen))
    d = ops.masked_adamw_chunk_offsets(bits, n)
    out = torch.zeros(int(d[-1]))
    for acc in (False, True):
        torch.library.opcheck(torch.ops.wagle.gather_masked_.default, (out, torch.randn(n), bits, d, acc))


# ---- mask kinds and GPU geometry, every back end (Triton in the interpreter on small inputs) -------------
# Every comparison is EXACT (bitwise float32): each kernel widens bf16/fp16 exactly and accumulates
# with one float32 add per element, as the reference's ``out.add_``.
# empty, tiny, odd 2-D, one chunk + a partial word, three chunks + odd tail
KIND_SHAPES = [(0,), (7,), (33, 17), (4096 + 45,), (3 * 4096 + 333,)]
MASKS = ["random", "sparse", "clustered", "full", "empty"]
KIND_BACKENDS = backend_params("gather_masked_", ("cpp", "triton"))
TRITON_ONLY = backend_params("gather_masked_", ("triton",))


def make_kind_mask(kind, n, gen, max_run=700):
    """Masks by kind: full, empty, random (0.4), sparse (0.002), clustered (runs of < max_run)."""
    if kind == "full":
        return torch.ones(n, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "random":
        return torch.rand(n, generator=gen) < 0.4
    if kind == "sparse":  # most 32-element words (and whole slices) are zero
        return torch.rand(n, generator=gen) < 0.002
    sel = torch.zeros(n, dtype=torch.bool)  # clustered runs, like rows of an attribution mask
    i = 0
    while i < n:
        run = int(torch.randint(1, max_run, (1,), generator=gen))
        sel[i:i + run] = bool(torch.rand(1, generator=gen) < 0.3)
        i += run
    return sel


def _same(a, b) -> bool:
    """Bit-identical, except that NaN payloads are not compared: the reference widens fp16 with
    torch's ``.float()``, whose CPU kernel gives one NaN pattern in its vector body and another in
    the tail (n % 8), so a NaN's bits depend on its position, not on the kernel under test."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    return torch.equal(a[keep].view(torch.int32), b[keep].view(torch.int32))


def _problem(shape, kind, dtype, gen):
    n = int(torch.Size(shape).numel())
    sel = make_kind_mask(kind, n, gen)
    bits = ref.pack_bits(sel)
    d = ref.masked_adamw_chunk_offsets(bits, n)
    src = (torch.randn(shape, generator=gen) * 3).to(dtype)
    out0 = torch.randn(int(sel.sum()), generator=gen)
    return src, bits, d, out0


@pytest.mark.parametrize("backend", KIND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_mask_kinds_match_reference(backend, dtype, kind, accumulate, gen):
    impl = op_impl("gather_masked_", backend)
    for shape in KIND_SHAPES:
        src, bits, d, out0 = _problem(shape, kind, dtype, gen)
        got, want = out0.clone(), out0.clone()
        impl(got, src, bits, d, accumulate)
        ref.gather_masked_(want, src, bits, d, accumulate)
        assert _same(got, want), shape
        if not accumulate:  # a plain gather: exactly the selected values, widened
            assert _same(got, src.reshape(-1)[ref.unpack_bits(bits, src.numel())].float())


@pytest.mark.parametrize("backend", TRITON_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_slice_loop_and_specials(backend, dtype, gen, monkeypatch):
    """The GPU geometry (1024-element slices, 4 per chunk; also 256) in the interpreter, with
    infinities, NaN, -0.0 and denormals in src (accumulate adds them like the reference)."""
    from wagle_ext.kernels.triton import _launch

    n = 4 * 4096 + 999
    src = torch.randn(n, generator=gen)
    pick = torch.randint(0, n, (200,), generator=gen)
    src[pick] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-40, -3e-39, 0.0, 1e30])[
        torch.randint(0, 8, (200,), generator=gen)]
    src = src.to(dtype)
    sel = make_kind_mask("random", n, gen)
    sel[pick] = True
    bits = ref.pack_bits(sel)
    d = ref.masked_adamw_chunk_offsets(bits, n)
    for blk in (1024, 256):
        monkeypatch.setattr(_launch, "FORCED_GEOMETRY", (blk, 1))
        for accumulate in (False, True):
            out0 = torch.randn(int(sel.sum()), generator=gen)
            got, want = out0.clone(), out0.clone()
            _triton_kernels().gather_masked_(got, src, bits, d, accumulate)
            ref.gather_masked_(want, src, bits, d, accumulate)
            assert _same(got, want), (blk, accumulate)


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_public_entry_routes_to_triton(backend, gen, monkeypatch, use_backend):
    """ops.gather_masked picks the Triton kernel under WAGLE_BACKEND=triton, for a non-contiguous
    src too (read through a contiguous copy), and allocates out when not given."""
    use_backend(backend)
    assert ops.resolve_backend("gather_masked_", torch.device("cpu")) == "triton"
    tk = _triton_kernels()
    calls = []
    real = tk.gather_masked_
    monkeypatch.setattr(tk, "gather_masked_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    src = torch.randn(65, 301, generator=gen).t()  # non-contiguous view, 19565 elements
    sel = make_kind_mask("clustered", src.numel(), gen)
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, src.numel())
    got = ops.gather_masked(src, bits, d)
    want = torch.empty(int(sel.sum()))
    ref.gather_masked_(want, src.contiguous(), bits, d, False)
    assert _same(got, want)
    ops.gather_masked(src, bits, d, out=got, accumulate=True)
    ref.gather_masked_(want, src.contiguous(), bits, d, True)
    assert _same(got, want) and calls == [1, 1]


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_triton_rejects_bad_inputs(backend, gen):
    tk = _triton_kernels()
    n = 9000
    sel = make_kind_mask("random", n, gen)
    bits = ref.pack_bits(sel)
    d = ref.masked_adamw_chunk_offsets(bits, n)
    nnz = int(sel.sum())
    src = torch.randn(n, generator=gen)
    bad = d.clone()
    bad[1] += 1  # chunk 0 claims one more selected element than its bits hold
    bad[2:] += 1
    with pytest.raises(ValueError, match="chunk_offsets"):
        tk.gather_masked_(torch.zeros(nnz + 1), src, bits, bad, False)
    with pytest.raises(ValueError, match="out has"):
        tk.gather_masked_(torch.zeros(nnz + 1), src, bits, d, False)
    with pytest.raises(TypeError, match="out"):
        tk.gather_masked_(torch.zeros(nnz, dtype=torch.float64), src, bits, d, False)
    with pytest.raises(TypeError, match="src"):
        tk.gather_masked_(torch.zeros(nnz), src.double(), bits, d, False)
    with pytest.raises(ValueError, match="bits"):
        tk.gather_masked_(torch.zeros(nnz), src, bits[:-1], d, False)
    with pytest.raises(ValueError, match="chunk_offsets"):
        tk.gather_masked_(torch.zeros(nnz), src, bits, d.int(), False)
    with pytest.raises(ValueError, match="out has"):  # the public entry checks before any kernel
        ops.gather_masked(src, bits, d, out=torch.zeros(nnz - 1))


_COMPILE_SCRIPT = r'''
import re, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wagle_ext.kernels.triton.gather_masked import _gather_masked_kernel
fn = _gather_masked_kernel.kernel()
for dtype, src_t in ((0, "*fp32"), (1, "*i16"), (2, "*fp16")):
    for acc in (False, True):
        sig = dict(out_ptr="*fp32", src_ptr=src_t, bits_ptr="*u8", dir_ptr="*i64", err_ptr="*i32", n="i64", nnz="i64")
        consts = dict(DTYPE=dtype, ACCUMULATE=acc, BLOCK=1024, CHUNK_=4096)
        sig.update({k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        adds = len(re.findall(r"\badd(\.rn)?\.f32\b", ptx))
        fmas = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
        print(dtype, int(acc), adds, fmas)
'''


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_gpu_codegen(backend):
    """The kernel compiles for sm_90 as launched on a GPU (no GPU needed: Triton's bundled ptxas),
    for every src dtype: float32 adds only with accumulate, and no fma anywhere."""
    r = run_triton_compile_script(_COMPILE_SCRIPT)
    rows = [tuple(int(x) for x in line.split()) for line in r.stdout.split("\n") if line.strip()]
    assert len(rows) == 6, r.stdout
    for dtype, acc, adds, fmas in rows:
        assert fmas == 0 and ((adds > 0) if acc else (adds == 0)), rows


# ---- GPU back ends (cuda, compiled Triton) on CUDA tensors against the CPU result ----------------------
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
GPU_BACKENDS = ["cuda", "triton"]


def _gather_fn(backend):
    return torch.ops.wagle.gather_masked_ if backend == "cuda" else _triton_kernels().gather_masked_


def _gather_mask(kind, n, gen):
    return make_kind_mask(kind, n, gen, max_run=3000)


@pytest.mark.cuda
@cuda_only
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
        assert same_floats(got, want), (n, kind)


@pytest.mark.cuda
@cuda_only
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
    assert got.is_cuda and same_floats(got, want)
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
