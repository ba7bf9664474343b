"""Triton kernels under the CPU interpreter against the pure-PyTorch reference.

TRITON_INTERPRET=1 is set before the kernels are first launched (the kernels are jitted lazily,
see wagle_ext/kernels/triton/_launch.py), and every op is forced through WAGLE_BACKEND=triton so
the public entry points of wagle_ext.ops run the Triton code. Scores, histograms, counts and masks
must be exactly equal to the reference (same fp32 operations; exact selection). Inputs are small
(<= 1e5 elements per tensor): the interpreter costs ~0.5 ms per program.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is decorated or launched

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import wagle_ext  # noqa: E402
from wagle_ext import ops  # noqa: E402
from wagle_ext.kernels import reference as ref  # noqa: E402
from wagle_ext.kernels import triton as tk  # noqa: E402

if not tk.AVAILABLE:
    pytest.skip(f"wagle_ext.kernels.triton unavailable: {tk.IMPORT_ERROR}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["wagle", "wagle_hessian", "snip", "gradient", "magnitude"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("WAGLE_BACKEND", "triton")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b)


def _same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors (NaN == NaN, -0.0 != +0.0)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _scores_with_specials(n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Signed scores with heavy ties, -0.0/+0.0, infinities and denormals, for key/tie edge cases."""
    x = torch.randn(n, generator=gen)
    if n == 0:
        return x.to(dtype)
    x = torch.where(torch.rand(n, generator=gen) < 0.3, torch.round(x * 4) / 4, x)  # many ties
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 1.0, -1.0])
    pick = torch.randint(0, n, (min(n, 64),), generator=gen)
    x[pick] = specials[torch.randint(0, len(specials), (len(pick),), generator=gen)]
    return x.to(dtype)


# ----------------------------------------------------------------------------- back-end choice
def test_forced_backend_is_triton():
    assert ops.resolve_backend("attribution_score", CPU) == "triton"
    for op in ("radix_histogram", "count_key", "topk_mask_bits", "pack_bits", "unpack_bits", "popcount_bits"):
        assert ops.resolve_backend(op, CPU) == "triton"
    assert wagle_ext.backend_info()["triton"] is True


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.resolve_backend("attribution_score", CPU)


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_reference(kind, dtype, gen):
    # Several odd sizes in one call (one launch per tensor): empty, tails, > one program.
    shapes = [(0,), (1,), (7,), (33, 17), (3, 5, 129), (70001,)]
    ws = [(torch.randn(*s, generator=gen) * 0.05).to(dtype) for s in shapes]
    gfs = [(torch.randn(*s, generator=gen) * 1e-3).to(dtype) for s in shapes]
    grs = [(torch.randn(*s, generator=gen) * 1e-6).to(dtype) for s in shapes]
    hs = [(torch.rand(*s, generator=gen) * 1e-3).to(dtype) for s in shapes]
    if kind == "wagle_hessian":
        scores, hist = wagle_ext.attribution_scores(ws, gfs, grs, kind="wagle", hessian=hs, eps=1e-8,
                                                    return_histogram=True)
    else:
        scores, hist = wagle_ext.attribution_scores(ws, gfs, grs, kind=kind, gamma=3e-6, return_histogram=True)
    ref_hist = torch.zeros_like(hist)
    for s, w, gf, gr, h in zip(scores, ws, gfs, grs, hs):
        rs, rh = ref.attribution_score(w, gf, gr, h, kind, 3e-6, 1e-8)
        assert s.dtype == torch.float32 and s.shape == w.shape
        assert _same_floats(s, rs)
        ref_hist += rh
    assert torch.equal(hist, ref_hist)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_denormals_and_signed_zeros(dtype, gen):
    # Denormals of each dtype survive widening (the interpreter's own bf16 conversion does not:
    # the kernels widen bf16 by a bit shift), and -0.0 scores land in the +0.0 bucket.
    tiny = torch.finfo(dtype).smallest_normal
    w = torch.tensor([tiny / 2, -tiny / 4, tiny / 64, -0.0, 0.0, tiny, -1.0, 3.0], dtype=torch.float32).to(dtype)
    w = torch.cat([w, (torch.randn(997, generator=gen) * tiny).to(dtype)])
    gf = torch.full_like(w, -1.0)
    for kind in ("magnitude", "snip", "gradient"):
        (s,), hist = wagle_ext.attribution_scores([w], [gf], kind=kind, return_histogram=True)
        rs, rh = ref.attribution_score(w, gf, None, None, kind, 1.0, 0.0)
        assert _same_floats(s, rs)
        assert torch.equal(hist, rh)
    assert torch.equal(tk.radix_histogram([w], 0, 0), ref.radix_histogram([w], 0, 0))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, inside the interpreter
def test_scores_nan_inf_mixed_dtypes_noncontiguous(gen):
    n = 5000
    w = (torch.randn(n, 3, generator=gen) * 0.05).to(torch.bfloat16)[:, 1]  # non-contiguous bf16
    gf = torch.randn(n, generator=gen) * 1e-3  # fp32 accumulators beside bf16 weights
    gr = torch.randn(n, generator=gen) * 1e-6
    w[:7] = float("inf")
    gf[:3] = 0.0  # inf * 0 = NaN scores
    gf[10:13] = float("nan")
    assert not w.is_contiguous()
    (s,), hist = wagle_ext.attribution_scores([w], [gf], [gr], gamma=1e-5, return_histogram=True)
    rs, rh = ref.attribution_score(w, gf, gr, None, "wagle", 1e-5, 0.0)
    assert _same_floats(s, rs)
    assert torch.equal(hist, rh)
    assert int(hist[ref.HIST_BINS]) == 6  # 3 x (inf * 0) + 3 x NaN gradient


def test_scores_out_buffer(gen):
    w = torch.randn(1000, generator=gen)
    gf = torch.randn(1000, generator=gen)
    out = [torch.full((1000,), -1.0)]
    (s,) = wagle_ext.attribution_scores([w], [gf], kind="snip", out=out)
    assert s.data_ptr() == out[0].data_ptr()
    assert _same_floats(out[0], ref.attribution_score(w, gf, None, None, "snip", 1.0, 0.0)[0])


# ----------------------------------------------------------------------------- selection primitives
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_histogram_all_levels(dtype, gen):
    scores = [_scores_with_specials(n, gen, dtype) for n in (0, 1, 13, 40001)]
    scores[3][::997] = float("nan")
    assert torch.equal(tk.radix_histogram(scores, 0, 0), ref.radix_histogram(scores, 0, 0))
    # Prefixes taken from real keys (the most common ones), so the prefix filter matters.
    keys = ref.float_key(scores[3][~torch.isnan(scores[3].float())])
    for pb in (11, 22):
        prefix = int(torch.mode(keys >> (32 - pb)).values)
        got = tk.radix_histogram(scores, prefix, pb)
        want = ref.radix_histogram(scores, prefix, pb)
        assert int(want.sum()) > 0
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="prefix_bits"):
        tk.radix_histogram(scores, 0, 5)


def test_count_key(gen):
    scores = [_scores_with_specials(n, gen) for n in (0, 9, 40001, 333)]
    for value in (0.0, 0.25, -1.0, float("inf"), 1e-40):
        key = int(ref.float_key(torch.tensor([value]))[0])
        got = tk.count_key(scores, key)
        want = ref.count_key(scores, key)
        assert torch.equal(got, want)
    assert int(tk.count_key(scores, int(ref.float_key(torch.tensor([0.0]))[0])).sum()) > 0


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_mask_bits_tie_quotas(largest, dtype, gen):
    # Few distinct values: the threshold key has thousands of ties spread over several programs.
    scores = [(torch.randint(-3, 4, (n,), generator=gen).float() / 2).to(dtype) for n in (40001, 0, 17, 9999)]
    scores[0][5] = float("nan")  # never selected
    scores[0][100] = -0.0  # ties with +0.0
    thr = int(ref.float_key(torch.tensor([0.0]))[0])
    counts = ref.count_key(scores, thr).tolist()
    assert counts[0] > 3000  # about 1/7 of 40001
    for take in ([-1, -1, -1, -1], [0, 0, 0, 0], [1, 0, 3, 0], [counts[0] // 2 + 1, 0, counts[2], 7],
                 [counts[0], 0, 0, counts[3]]):
        got = tk.topk_mask_bits(scores, thr, largest, take)
        want = ref.topk_mask_bits(scores, thr, largest, take)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert _bits_equal(g, w)


# ----------------------------------------------------------------------------- bits
def test_pack_unpack_popcount(gen):
    for n in (0, 1, 7, 8, 9, 1000, 40003):
        mask = torch.rand(n, generator=gen) < 0.3
        bits = wagle_ext.pack_bits(mask)
        assert _bits_equal(bits, ref.pack_bits(mask))
        assert torch.equal(wagle_ext.unpack_bits(bits, n), mask)
        assert wagle_ext.popcount_bits(bits, n) == int(mask.sum())
    # Bits beyond numel are not counted or unpacked.
    full = torch.full((5,), 0xFF, dtype=torch.uint8)
    assert wagle_ext.popcount_bits(full, 37) == 37
    assert wagle_ext.unpack_bits(full, 37).all() and wagle_ext.unpack_bits(full, 37).numel() == 37
    with pytest.raises(TypeError, match="bool"):
        wagle_ext.pack_bits(torch.zeros(3))
    with pytest.raises(ValueError, match="cannot hold"):
        wagle_ext.unpack_bits(full, 41)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("largest", [True, False])
def test_select_topk_mask_matches_oracle(largest, gen):
    sizes = [(257, 31), (0,), (1,), (40001,), (999,)]
    scores = [torch.randn(*s, generator=gen).abs() for s in sizes]
    scores[3] = torch.round(scores[3] * 8) / 8  # ties at the boundary: quota across tensors
    n = sum(s.numel() for s in scores)
    for k in (0, 1, 37, n // 3, n // 2 + 1, n - 1, n):
        masks = wagle_ext.select_topk_mask(scores, k=k, largest=largest)
        want = ref.select_topk_bits(scores, k, largest)
        assert sum(m.nnz for m in masks) == k
        for m, w, s in zip(masks, want, scores):
            assert m.shape == s.shape
            assert _bits_equal(m.bits, w)


def test_select_topk_mask_bf16_histogram_and_per_tensor(gen):
    w = [torch.randn(3001, generator=gen).to(torch.bfloat16), torch.randn(77, 13, generator=gen)]
    gf = [torch.randn(3001, generator=gen).to(torch.bfloat16), torch.randn(77, 13, generator=gen)]
    scores, hist = wagle_ext.attribution_scores(w, gf, kind="snip", return_histogram=True)
    masks = wagle_ext.select_topk_mask(scores, ratio=0.1, histogram=hist)
    want = ref.select_topk_bits(scores, int(sum(s.numel() for s in scores) * 0.1), True)
    for m, b in zip(masks, want):
        assert _bits_equal(m.bits, b)
    low = [torch.round(torch.randn(2000, generator=gen) * 3).to(torch.bfloat16) for _ in range(2)]
    for m, s in zip(wagle_ext.select_topk_mask(low, k=150, scope="per_tensor", largest=False), low):
        assert _bits_equal(m.bits, ref.select_topk_bits([s], 150, False)[0])


def test_select_nan_scores_rejected():
    s = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="NaN"):
        wagle_ext.select_topk_mask([s], k=1)


# ----------------------------------------------------------------------------- op registration
def test_triton_ops_registered_and_opcheck(gen):
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


# ----------------------------------------------------------------------------- GPU launch geometry
def test_gpu_geometry_in_the_interpreter(monkeypatch, gen):
    # On a GPU the kernels use small blocks, many programs and several blocks per histogram
    # program; the interpreter defaults to one large block. Force a GPU-like geometry here so the
    # multi-block loops, partial last programs and cross-program tie ranks are exercised too.
    from wagle_ext.kernels.triton import _launch

    monkeypatch.setattr(_launch, "FORCED_GEOMETRY", (256, 3))
    n = 20001
    w, gf, gr = (torch.randn(n, generator=gen) for _ in range(3))
    w[::101] = float("nan")
    (s,), hist = wagle_ext.attribution_scores([w], [gf], [gr], gamma=1e-2, return_histogram=True)
    rs, rh = ref.attribution_score(w, gf, gr, None, "wagle", 1e-2, 0.0)
    assert _same_floats(s, rs) and torch.equal(hist, rh)
    scores = [_scores_with_specials(m, gen) for m in (n, 777)]
    keys = ref.float_key(scores[0])
    for pb in (0, 11, 22):
        prefix = int(torch.mode(keys >> (32 - pb)).values) if pb else 0
        want = ref.radix_histogram(scores, prefix, pb)
        assert int(want.sum()) > 0 and torch.equal(tk.radix_histogram(scores, prefix, pb), want)
    thr = int(ref.float_key(torch.tensor([0.25]))[0])
    c = ref.count_key(scores, thr).tolist()
    assert torch.equal(tk.count_key(scores, thr), ref.count_key(scores, thr))
    for take in ([c[0] // 2 + 1, 3], [-1, 0]):
        for a, b in zip(tk.topk_mask_bits(scores, thr, True, take), ref.topk_mask_bits(scores, thr, True, take)):
            assert _bits_equal(a, b)
    mask = torch.rand(n, generator=gen) < 0.5
    bits = wagle_ext.pack_bits(mask)
    assert _bits_equal(bits, ref.pack_bits(mask)) and torch.equal(wagle_ext.unpack_bits(bits, n), mask)
    assert wagle_ext.popcount_bits(bits, n) == int(mask.sum())
    masks = wagle_ext.select_topk_mask(scores, k=5000)
    for m, o in zip(masks, ref.select_topk_bits(scores, 5000, True)):
        assert _bits_equal(m.bits, o)
