"""Bit-array helpers (pack_bits, unpack_bits, popcount_bits): every back end against the
reference, edge sizes, non-contiguous inputs, validation and opcheck."""
import pytest
import torch

import wagle_ext
from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import backend_device, backend_params, cpu_backends, cuda_only, require_cpp

SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 1000, 65536 * 8 + 13]


@pytest.mark.parametrize("backend", cpu_backends("pack_bits"))
@pytest.mark.parametrize("n", SIZES)
def test_pack_unpack_popcount_match_reference(backend, n, gen, use_backend):
    use_backend(backend)
    density = float(torch.rand(1, generator=gen))
    mask = torch.rand(n, generator=gen) < density
    bits = ops.pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == ((n + 7) // 8,)
    assert torch.equal(bits, ref.pack_bits(mask))
    if n % 8:  # padding bits of the last byte are zero
        assert int(bits[-1]) >> (n % 8) == 0
    assert torch.equal(ops.unpack_bits(bits, n), mask)
    assert ops.popcount_bits(bits, n) == int(mask.sum())
    # Fewer bits than the bytes hold: trailing bits ignored by unpack/popcount.
    if n > 3:
        full = torch.full_like(bits, 0xFF)
        assert torch.equal(ops.unpack_bits(full, n - 3), torch.ones(n - 3, dtype=torch.bool))
        assert ops.popcount_bits(full, n - 3) == n - 3


@pytest.mark.parametrize("backend", cpu_backends("pack_bits"))
def test_shapes_and_views(backend, gen, use_backend):
    use_backend(backend)
    base = torch.rand(37, 41, generator=gen) < 0.3
    view = base.t()  # non-contiguous
    assert not view.is_contiguous()
    assert torch.equal(ops.pack_bits(view), ref.pack_bits(view))
    bits = ref.pack_bits(base)
    strided = torch.stack([bits, torch.zeros_like(bits)], 1)[:, 0]
    assert not strided.is_contiguous()
    assert torch.equal(ops.unpack_bits(strided, base.numel()), base.reshape(-1))
    assert ops.popcount_bits(strided, base.numel()) == int(base.sum())


def test_bool_storage_not_zero_one(gen):
    """A bool tensor viewed from uint8 bytes other than 0/1 still packs 'non-zero = True'."""
    require_cpp()
    raw = torch.randint(0, 256, (1003,), generator=gen, dtype=torch.uint8)
    raw[::3] = 0
    mask = raw.view(torch.bool)
    assert torch.equal(torch.ops.wagle.pack_bits(mask), ref.pack_bits(raw != 0))


@pytest.mark.parametrize("backend", cpu_backends("pack_bits"))
def test_bad_inputs(backend, use_backend):
    use_backend(backend)
    with pytest.raises(TypeError, match="bool"):
        ops.pack_bits(torch.ones(8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        ops.unpack_bits(torch.ones(2, dtype=torch.int32), 8)
    with pytest.raises(TypeError, match="uint8"):
        ops.popcount_bits(torch.ones(2, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="cannot hold 17 bits"):
        ops.unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="cannot hold"):
        ops.popcount_bits(torch.zeros(2, dtype=torch.uint8), -1)


def test_cpp_errors_and_opcheck(gen):
    require_cpp()
    W = torch.ops.wagle
    with pytest.raises(TypeError, match="pack_bits: mask must be bool"):
        W.pack_bits(torch.ones(3))
    with pytest.raises(ValueError, match="unpack_bits: 1 bytes cannot hold 9 bits"):
        W.unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        W.popcount_bits(torch.zeros(1, dtype=torch.uint8), -1)
    mask = torch.rand(3, 43, generator=gen) < 0.5
    bits = ref.pack_bits(mask)
    torch.library.opcheck(W.pack_bits, (mask,))
    torch.library.opcheck(W.unpack_bits, (bits, 129))
    # popcount_bits returns a Python int whose fake value is an unbacked symbol: schema check only.
    torch.library.opcheck(W.popcount_bits, (bits, 129), test_utils=("test_schema",))


# ---- every back end on small inputs (Triton in the interpreter; CUDA marked and skipped here) ---------
@pytest.mark.parametrize("backend", backend_params("pack_bits", ("cpp", "triton", "cuda")))
def test_public_entry_points_every_backend(backend, gen, use_backend):
    use_backend(backend)
    dev = backend_device(backend)
    for n in (0, 1, 7, 8, 9, 1000, 40003):
        mask = torch.rand(n, generator=gen) < 0.3
        bits = wagle_ext.pack_bits(mask.to(dev))
        assert bits.device.type == dev.type and torch.equal(bits.cpu(), ref.pack_bits(mask))
        assert torch.equal(wagle_ext.unpack_bits(bits, n).cpu(), mask)
        assert wagle_ext.popcount_bits(bits, n) == int(mask.sum())
    # Bits beyond numel are not counted or unpacked.
    full = torch.full((5,), 0xFF, dtype=torch.uint8, device=dev)
    assert wagle_ext.popcount_bits(full, 37) == 37
    assert wagle_ext.unpack_bits(full, 37).all() and wagle_ext.unpack_bits(full, 37).numel() == 37
    with pytest.raises(TypeError, match="bool"):
        wagle_ext.pack_bits(torch.zeros(3, device=dev))
    with pytest.raises(ValueError, match="cannot hold"):
        wagle_ext.unpack_bits(full, 41)


# ---- GPU back ends (cuda, compiled Triton) on CUDA tensors -------------------------------------------
@pytest.mark.cuda
@cuda_only
def test_gpu_bits(gpu_backend, gen):
    cuda = torch.device("cuda")
    for n in (0, 1, 7, 9, 1000, 1 << 20 | 5):
        mask = torch.rand(n, generator=gen) < 0.3
        bits = wagle_ext.pack_bits(mask.to(cuda))
        assert torch.equal(bits.cpu(), ref.pack_bits(mask))
        assert torch.equal(wagle_ext.unpack_bits(bits, n).cpu(), mask)
        assert wagle_ext.popcount_bits(bits, n) == int(mask.sum())
