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
