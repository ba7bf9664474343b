"""gather_masked (bits -> compact float32 gradient): every CPU back end vs the reference (exact),
every SIMD path, accumulate, odd sizes, empty tensors, non-contiguous sources, validation, opcheck.
The Triton kernel is tested in tests/test_triton_gather.py, the CUDA one in tests/test_cuda.py."""
import pytest
import torch

from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import cpu_backends, require_cpp

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
