"""Exact top-k selection: every back end against the stable-sort oracle
(reference.select_topk_bits), the primitives of every back end against their reference, validation, opcheck,
SIMD paths and multi-process selection over gloo."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import wagle_ext
from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import (backend_device, backend_params, cpu_backends, cuda_only, op_impl, require_cpp, run_on_cpu,
                      same_floats)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = cpu_backends("topk_mask_bits")
ODD_SIZES = [(0,), (1,), (7,), (64,), (65,), (33, 17), (1023,), (3, 5, 129), (70001,)]


# ----------------------------------------------------------------------------- helpers
def _random_scores(gen, shapes, dtype=torch.float32, noncontig=False, kind="randn"):
    out = []
    for i, shape in enumerate(shapes):
        if kind == "randn":
            x = torch.randn(*shape, 2, generator=gen) * 10 ** float(torch.randint(-3, 3, (1,), generator=gen))
        elif kind == "abs":
            x = torch.randn(*shape, 2, generator=gen).abs()
        else:
            raise AssertionError(kind)
        x = x.to(dtype)
        # Every other tensor a strided view when asked (the selection must not care).
        out.append(x[..., 1] if noncontig and i % 2 == 0 else x[..., 1].contiguous())
    return out


def _assert_masks(masks, expected_bits, scores):
    assert len(masks) == len(expected_bits) == len(scores)
    for i, (m, b, s) in enumerate(zip(masks, expected_bits, scores)):
        assert m.shape == s.shape, i
        assert m.bits.dtype == torch.uint8 and m.bits.numel() == (s.numel() + 7) // 8, i
        assert torch.equal(m.bits, b), f"tensor {i} (numel {s.numel()}): bits differ from the oracle"
        assert m.nnz == int(ref.unpack_bits(b, s.numel()).sum()), i


def _select_and_check(scores, k, largest=True, **kw):
    masks = wagle_ext.select_topk_mask(scores, k=k, largest=largest, **kw)
    _assert_masks(masks, ref.select_topk_bits(scores, k, largest), scores)
    assert sum(m.nnz for m in masks) == k
    return masks


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False])
def test_global_matches_oracle(backend, dtype, largest, gen, use_backend):
    use_backend(backend)
    scores = _random_scores(gen, ODD_SIZES, dtype, noncontig=True)
    n = sum(s.numel() for s in scores)
    for k in (1, int(torch.randint(2, n, (1,), generator=gen)), n // 3, n - 1):
        _select_and_check(scores, k, largest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_tensors(backend, gen, use_backend):
    use_backend(backend)
    sizes = torch.randint(0, 700, (230,), generator=gen).tolist()
    shapes = [(s,) if i % 3 else (s // 7 + 1, 7) for i, s in enumerate(sizes)]
    scores = _random_scores(gen, shapes, torch.float32, kind="abs")
    n = sum(s.numel() for s in scores)
    for ratio in (0.05, 0.2, 0.8):
        masks = wagle_ext.select_topk_mask(scores, ratio=ratio)
        _assert_masks(masks, ref.select_topk_bits(scores, int(n * ratio), True), scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_call(backend, gen, use_backend):
    use_backend(backend)
    scores = [t.to(d) for t, d in zip(_random_scores(gen, [(129,), (300,), (17, 3)]), DTYPES)]
    _select_and_check(scores, 150, True)
    _select_and_check(scores, 150, False)


def _special(case, gen):
    n1, n2, n3 = 3001, 70001, 5
    if case == "all_equal":
        return [torch.full((n1,), 0.25), torch.full((n2,), 0.25), torch.full((n3,), 0.25)]
    if case == "many_zeros":
        out = []
        for n in (n1, n2, n3):
            x = torch.rand(n, generator=gen)
            x[torch.rand(n, generator=gen) < 0.9] = 0.0
            out.append(x)
        return out
    if case == "negative":
        return [-torch.rand(n, generator=gen) - 1.0 for n in (n1, n2, n3)]
    if case == "signed_zeros":
        out = []
        for n in (n1, n2, n3):
            x = torch.where(torch.rand(n, generator=gen) < 0.5, torch.tensor(0.0), torch.tensor(-0.0))
            x[torch.rand(n, generator=gen) < 0.1] = 1.0
            x[torch.rand(n, generator=gen) < 0.1] = -1.0
            out.append(x)
        return out
    if case == "infinities":
        out = []
        for n in (n1, n2, n3):
            x = torch.randn(n, generator=gen)
            r = torch.rand(n, generator=gen)
            x[r < 0.2] = float("inf")
            x[r > 0.8] = float("-inf")
            out.append(x)
        return out
    if case == "few_distinct":  # ties straddle 65536-element chunk boundaries
        return [torch.randint(0, 3, (n,), generator=gen).float() for n in (n1, 200003, n3)]
    raise AssertionError(case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["all_equal", "many_zeros", "negative", "signed_zeros", "infinities", "few_distinct"])
@pytest.mark.parametrize("largest", [True, False])
def test_special_values(backend, case, largest, gen, use_backend):
    use_backend(backend)
    scores = _special(case, gen)
    n = sum(s.numel() for s in scores)
    for k in (0, 1, 2999, 3002, 65537, int(torch.randint(0, n + 1, (1,), generator=gen)), n - 1, n):
        _select_and_check(scores, min(k, n), largest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_k_zero_and_all(backend, dtype, gen, use_backend):
    use_backend(backend)
    scores = _random_scores(gen, ODD_SIZES, dtype)
    n = sum(s.numel() for s in scores)
    for k in (0, n):
        masks = _select_and_check(scores, k)
        assert all(m.nnz == (m.numel if k else 0) for m in masks)
    masks = wagle_ext.select_topk_mask(scores, ratio=1.0)
    _assert_masks(masks, ref.select_topk_bits(scores, n, True), scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_is_floor_of_n_times_ratio(backend, gen, use_backend):
    use_backend(backend)
    scores = _random_scores(gen, [(333,), (1001,), (7, 9)])
    n = sum(s.numel() for s in scores)
    for ratio in (0.01, 0.3333, 0.5, 0.999):
        a = wagle_ext.select_topk_mask(scores, ratio=ratio)
        b = wagle_ext.select_topk_mask(scores, k=int(n * ratio))
        assert all(torch.equal(x.bits, y.bits) for x, y in zip(a, b))
        assert sum(m.nnz for m in a) == int(n * ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("largest", [True, False])
def test_per_tensor_scope(backend, largest, gen, use_backend):
    use_backend(backend)
    scores = _random_scores(gen, ODD_SIZES, torch.float32, noncontig=True)
    scores.append(torch.zeros(100))  # all ties
    masks = wagle_ext.select_topk_mask(scores, ratio=0.3, scope="per_tensor", largest=largest)
    for m, s in zip(masks, scores):
        k = int(s.numel() * 0.3)
        assert torch.equal(m.bits, ref.select_topk_bits([s], k, largest)[0])
        assert m.nnz == k
    masks = wagle_ext.select_topk_mask(scores, k=50, scope="per_tensor", largest=largest)
    for m, s in zip(masks, scores):
        assert torch.equal(m.bits, ref.select_topk_bits([s], min(50, s.numel()), largest)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("largest", [True, False])
def test_histogram_from_score_kernel(backend, largest, gen, use_backend):
    use_backend(backend)
    shapes = [(257, 9), (1,), (0,), (70001,), (33,)]
    ws = [torch.randn(*s, generator=gen) for s in shapes]
    gfs = [torch.randn(*s, generator=gen) * 1e-3 for s in shapes]
    grs = [torch.randn(*s, generator=gen) * 1e-6 for s in shapes]
    scores, hist = wagle_ext.attribution_scores(ws, gfs, grs, gamma=1e-5, return_histogram=True)
    assert torch.equal(hist, ref.radix_histogram(scores, 0, 0))
    n = sum(s.numel() for s in scores)
    for k in (1, n // 10, n // 2):
        with_hist = wagle_ext.select_topk_mask(scores, k=k, largest=largest, histogram=hist)
        without = wagle_ext.select_topk_mask(scores, k=k, largest=largest)
        _assert_masks(with_hist, [m.bits for m in without], scores)
        _assert_masks(with_hist, ref.select_topk_bits(scores, k, largest), scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_raises(backend, use_backend):
    use_backend(backend)
    x = torch.rand(100)
    x[37] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        wagle_ext.select_topk_mask([torch.rand(10), x], k=5)
    with pytest.raises(ValueError, match="NaN"):
        wagle_ext.select_topk_mask([x], ratio=0.5, scope="per_tensor")


def test_empty_list():
    assert wagle_ext.select_topk_mask([], k=0) == []
    with pytest.raises(ValueError, match="k must be"):
        wagle_ext.select_topk_mask([], k=1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(ratio=0.0), ValueError, "ratio must be in"),
        (dict(ratio=1.5), ValueError, "ratio must be in"),
        (dict(ratio=float("nan")), ValueError, "ratio must be in"),
        (dict(k=-1), ValueError, "k must be in"),
        (dict(k=1_000_000), ValueError, "k must be in"),
        (dict(k=1.5), TypeError, "k must be an int"),
        (dict(), ValueError, "exactly one of ratio= or k="),
        (dict(ratio=0.5, k=3), ValueError, "exactly one of ratio= or k="),
        (dict(k=3, scope="layer"), ValueError, "scope must be"),
        (dict(k=-1, scope="per_tensor"), ValueError, "k must be >= 0"),
        (dict(k=3, histogram=torch.zeros(100, dtype=torch.int64)), ValueError, "histogram must be int64"),
        (dict(k=3, histogram=torch.zeros(ref.HIST_SIZE, dtype=torch.float32)), ValueError, "histogram must be int64"),
        (dict(k=3, histogram=torch.zeros(ref.HIST_SIZE, dtype=torch.int64)), ValueError, "histogram counts 0"),
        (dict(k=3, scope="per_tensor", histogram=torch.zeros(ref.HIST_SIZE, dtype=torch.int64)), ValueError,
         "only used with scope='global'"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    scores = [torch.rand(10), torch.rand(5, 3)]
    with pytest.raises(exc, match=match):
        wagle_ext.select_topk_mask(scores, **kwargs)


def test_bad_scores():
    with pytest.raises(TypeError, match=r"scores\[1\] must be float32"):
        wagle_ext.select_topk_mask([torch.rand(3), torch.arange(4)], k=1)
    with pytest.raises(TypeError, match="scores"):
        wagle_ext.select_topk_mask([torch.rand(3), "x"], k=1)
    with pytest.raises(ValueError, match=r"scores\[1\] is on meta"):
        wagle_ext.select_topk_mask([torch.rand(3), torch.empty(4, device="meta")], k=1)


# ----------------------------------------------------------------------------- C++ primitives
def _cpp_or_skip():
    require_cpp()
    if "cpp" not in BACKENDS:
        pytest.skip("no C++ selection kernels in this build")
    return torch.ops.wagle


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_radix_histogram_all_levels(dtype, gen):
    W = _cpp_or_skip()
    scores = _random_scores(gen, ODD_SIZES + [(200001,)], dtype, noncontig=True)
    scores[2][3] = float("nan")
    assert torch.equal(W.radix_histogram(scores, 0, 0), ref.radix_histogram(scores, 0, 0))
    keys = torch.cat([ref.float_key(s) for s in scores])
    finite = keys[torch.cat([~torch.isnan(s.reshape(-1).float()) for s in scores])]
    for _ in range(4):
        key = int(finite[int(torch.randint(0, finite.numel(), (1,), generator=gen))])
        for pb in (11, 22):
            got = W.radix_histogram(scores, key >> (32 - pb), pb)
            assert torch.equal(got, ref.radix_histogram(scores, key >> (32 - pb), pb)), pb
            assert int(got.sum()) >= 1 and int(got[-1]) == 0
    # A prefix nobody has.
    assert int(W.radix_histogram(scores, 0, 22).sum()) == 0


def test_cpp_radix_histogram_concentrated(gen):
    """All keys in one bin (the same-bin counter path) at every level."""
    W = _cpp_or_skip()
    scores = [torch.full((100003,), 3.5), torch.zeros(777)]
    key = int(ref.float_key(torch.tensor([3.5]))[0])
    for pb, prefix in ((0, 0), (11, key >> 21), (22, key >> 10)):
        assert torch.equal(W.radix_histogram(scores, prefix, pb), ref.radix_histogram(scores, prefix, pb))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_count_key(dtype, gen):
    W = _cpp_or_skip()
    scores = [torch.randint(-2, 3, (n,), generator=gen).to(dtype) for n in (0, 1, 63, 4097, 70001)]
    scores.append(torch.tensor([0.0, -0.0, float("nan"), 1.0], dtype=dtype))
    for v in (-2.0, 0.0, 1.0, 0.5, float("nan")):  # a NaN key: NaN scores never count
        key = int(ref.float_key(torch.tensor([v]))[0])
        assert torch.equal(W.count_key(scores, key), ref.count_key(scores, key)), v
    assert int(ref.count_key(scores, int(ref.float_key(torch.tensor([float("nan")]))[0])).sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False])
def test_cpp_topk_mask_bits_random_quotas(dtype, largest, gen):
    W = _cpp_or_skip()
    sizes = [0, 1, 7, 64, 65, 1000, 65536, 65537, 200003]
    scores = [torch.randint(0, 4, (n,), generator=gen).to(dtype) for n in sizes]
    scores[4][3] = float("nan")
    for v in (0.0, 1.0, 2.0, 3.0):
        key = int(ref.float_key(torch.tensor([v]))[0])
        counts = ref.count_key(scores, key).tolist()
        quotas = [int(torch.randint(-1, c + 2, (1,), generator=gen)) if c else int(torch.randint(-1, 2, (1,), generator=gen))
                  for c in counts]
        got = W.topk_mask_bits(scores, key, largest, quotas)
        want = ref.topk_mask_bits(scores, key, largest, quotas)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (v, i, quotas[i])
    # NaN threshold keys and extreme keys behave like the reference (NaN never selected).
    for key in (0, 0xFFFFFFFF, int(ref.float_key(torch.tensor([float("nan")]))[0])):
        got = W.topk_mask_bits(scores, key, largest, [-1] * len(scores))
        want = ref.topk_mask_bits(scores, key, largest, [-1] * len(scores))
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_cpp_topk_mask_collect(dtype, largest, isa, gen, monkeypatch):
    """The fused mask + boundary-bucket pass equals its reference: bits, and candidates (keys,
    tensor and flat indices) in global order, at both prefix levels; NaN never a candidate."""
    W = _cpp_or_skip()
    monkeypatch.setenv("WAGLE_CPU_ISA", isa)
    scores = _random_scores(gen, ODD_SIZES + [(70001,)], dtype, noncontig=True)
    scores[2][3] = float("nan")
    keys = torch.cat([ref.float_key(s) for s in scores])
    finite = keys[torch.cat([~torch.isnan(s.reshape(-1).float()) for s in scores])]
    for _ in range(3):
        key = int(finite[int(torch.randint(0, finite.numel(), (1,), generator=gen))])
        for pb in (11, 22):
            got = W.topk_mask_collect(scores, key >> (32 - pb), pb, largest)
            want = ref.topk_mask_collect(scores, key >> (32 - pb), pb, largest)
            assert all(torch.equal(a, b) for a, b in zip(got[0], want[0])), pb
            for a, b in zip(got[1:], want[1:]):
                assert torch.equal(a, b), pb
            assert got[1].numel() >= 1


def test_select_uses_collect_path_and_matches_oracle(gen, monkeypatch):
    """Selections whose boundary bucket is small go through topk_mask_collect (counted here) and
    still equal the stable-sort oracle, ties included."""
    W = _cpp_or_skip()
    monkeypatch.setenv("WAGLE_BACKEND", "cpp")
    calls = []
    real = ops._collect_and_resolve
    monkeypatch.setattr(ops, "_collect_and_resolve", lambda *a: calls.append(1) or real(*a))
    scores = [torch.randn(5003, generator=gen), torch.randint(0, 3, (4099,), generator=gen).float(),
              torch.zeros(77)]
    n = sum(s.numel() for s in scores)
    for k in (1, 17, 2500, n // 2, n - 1):
        for largest in (True, False):
            masks = wagle_ext.select_topk_mask(scores, k=k, largest=largest)
            want = ref.select_topk_bits(scores, k, largest)
            assert all(torch.equal(m.bits, b) for m, b in zip(masks, want)), (k, largest)
    assert calls


def test_cpp_primitive_errors():
    W = _cpp_or_skip()
    x = [torch.rand(10)]
    with pytest.raises(ValueError, match="prefix_bits must be 0, 11 or 22"):
        W.radix_histogram(x, 0, 5)
    with pytest.raises(ValueError, match="does not fit"):
        W.radix_histogram(x, 1 << 11, 11)
    with pytest.raises(TypeError, match=r"scores\[0\] must be float32"):
        W.radix_histogram([torch.arange(3)], 0, 0)
    with pytest.raises(ValueError, match="key"):
        W.count_key(x, -1)
    with pytest.raises(ValueError, match="threshold_key"):
        W.topk_mask_bits(x, 1 << 32, True, [-1])
    with pytest.raises(ValueError, match="ties_take has 2 entries"):
        W.topk_mask_bits(x, 5, True, [-1, -1])
    with pytest.raises(ValueError, match=r"ties_take\[0\] must be >= -1"):
        W.topk_mask_bits(x, 5, True, [-2])


def test_cpp_opcheck(gen):
    W = _cpp_or_skip()
    scores = [torch.rand(37, generator=gen), torch.rand(5, 7, generator=gen).to(torch.bfloat16), torch.rand(130, generator=gen)]
    key = int(ref.float_key(scores[0][:1])[0])
    torch.library.opcheck(W.radix_histogram, (scores, 0, 0))
    torch.library.opcheck(W.radix_histogram, (scores, key >> 21, 11))
    torch.library.opcheck(W.count_key, (scores, key))
    torch.library.opcheck(W.topk_mask_bits, (scores, key, True, [1, -1, 0]))
    # Data-dependent candidate count: schema check only (as for popcount_bits).
    torch.library.opcheck(W.topk_mask_collect, (scores, key >> 21, 11, True), test_utils=("test_schema",))


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_cpu_isa_paths_identical(isa, gen, monkeypatch):
    """WAGLE_CPU_ISA caps the SIMD path per call; every path gives the same bits and counts."""
    W = _cpp_or_skip()
    scores = [t.to(d) for t, d in zip(_special("few_distinct", gen), DTYPES)]
    scores += _random_scores(gen, [(70001,), (65,), (3, 129)], torch.float32)
    key = int(ref.float_key(torch.tensor([1.0]))[0])
    quotas = [5, 70000, -1, 0, 3, 2]

    def run():
        return (W.radix_histogram(scores, 0, 0), W.radix_histogram(scores, key >> 21, 11),
                W.radix_histogram(scores, key >> 10, 22), W.count_key(scores, key),
                W.topk_mask_bits(scores, key, True, quotas), W.topk_mask_bits(scores, key, False, quotas),
                [m.bits for m in wagle_ext.select_topk_mask(scores, ratio=0.37)])

    monkeypatch.delenv("WAGLE_CPU_ISA", raising=False)
    best = run()
    monkeypatch.setenv("WAGLE_CPU_ISA", isa)
    assert W.cpu_isa() in (isa, "default")
    capped = run()
    for a, b in zip(best, capped):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- multi-process
def _mp_cases(seed):
    """(name, full list of scores, split index: rank 0 gets [:split], rank 1 the rest, k)."""
    g = torch.Generator().manual_seed(seed)
    rnd = [torch.randn(n, generator=g) for n in (100, 0, 70001, 33)] + [torch.randn(9, 11, generator=g)]
    ties = [torch.full((n,), 2.0) for n in (50, 70, 3)] + [torch.zeros(20)]
    return [
        ("random", rnd, 2, 7000),
        ("random_smallest", rnd, 3, 5),
        ("ties_across_ranks", ties, 1, 80),  # 50 ties on rank 0, 30 more from rank 1
        ("ties_rank1_only", ties, 1, 30),
        ("rank1_empty", rnd, len(rnd), 1234),
        ("rank0_empty", rnd, 0, 1234),
    ]


def _mp_worker(rank, world, seed, out_dir, backends):
    import torch.distributed as dist

    # File rendezvous: no TCP port to pick, so parallel runs cannot race for one.
    rendezvous = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        results = {}
        for backend in backends:
            os.environ["WAGLE_BACKEND"] = backend
            for name, scores, split, k in _mp_cases(seed):
                mine = scores[:split] if rank == 0 else scores[split:]
                largest = name != "random_smallest"
                masks = wagle_ext.select_topk_mask(mine, k=k, largest=largest, process_group=True)
                results[(backend, name)] = [m.bits for m in masks]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_multi_process_gloo_matches_single_process():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_mp_worker, args=(2, seed, d, BACKENDS), nprocs=2, join=True)
        r0 = torch.load(os.path.join(d, "rank0.pt"))
        r1 = torch.load(os.path.join(d, "rank1.pt"))
    for backend in BACKENDS:
        for name, scores, split, k in _mp_cases(seed):
            largest = name != "random_smallest"
            got = r0[(backend, name)] + r1[(backend, name)]
            assert len(got) == len(scores), (backend, name)
            want = ref.select_topk_bits(scores, k, largest)
            for i, (a, b) in enumerate(zip(got, want)):
                assert torch.equal(a, b), (backend, name, i, seed)


def test_process_group_without_init():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(ValueError, match="not initialised"):
        wagle_ext.select_topk_mask([torch.rand(4)], k=1, process_group=True)


# ---- every back end on small inputs (Triton in the interpreter; CUDA marked and skipped here) ---------
PRIMITIVES = backend_params("topk_mask_bits", ("cpp", "triton", "cuda"))
PUBLIC = backend_params("topk_mask_bits", ("reference", "cpp", "triton", "cuda"))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


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


@pytest.mark.parametrize("backend", PRIMITIVES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_histogram_all_levels_with_specials(backend, dtype, gen):
    dev = backend_device(backend)
    impl = op_impl("radix_histogram", backend)
    scores = [_scores_with_specials(n, gen, dtype) for n in (0, 1, 13, 40001)]
    scores[3][::997] = float("nan")
    on = [s.to(dev) for s in scores]
    assert torch.equal(impl(on, 0, 0).cpu(), ref.radix_histogram(scores, 0, 0))
    # Prefixes taken from real keys (the most common ones), so the prefix filter matters.
    keys = ref.float_key(scores[3][~torch.isnan(scores[3].float())])
    for pb in (11, 22):
        prefix = int(torch.mode(keys >> (32 - pb)).values)
        want = ref.radix_histogram(scores, prefix, pb)
        assert int(want.sum()) > 0
        assert torch.equal(impl(on, prefix, pb).cpu(), want)
    with pytest.raises(ValueError, match="prefix_bits"):
        impl(on, 0, 5)


@pytest.mark.parametrize("backend", PRIMITIVES)
def test_count_key_with_specials(backend, gen):
    dev = backend_device(backend)
    impl = op_impl("count_key", backend)
    scores = [_scores_with_specials(n, gen) for n in (0, 9, 40001, 333)]
    on = [s.to(dev) for s in scores]
    for value in (0.0, 0.25, -1.0, float("inf"), 1e-40):
        key = int(ref.float_key(torch.tensor([value]))[0])
        assert torch.equal(impl(on, key).cpu(), ref.count_key(scores, key))
    assert int(impl(on, int(ref.float_key(torch.tensor([0.0]))[0])).sum()) > 0


@pytest.mark.parametrize("backend", PRIMITIVES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_mask_bits_tie_quotas(backend, largest, dtype, gen):
    # Few distinct values: the threshold key has thousands of ties spread over several programs.
    dev = backend_device(backend)
    impl = op_impl("topk_mask_bits", backend)
    scores = [(torch.randint(-3, 4, (n,), generator=gen).float() / 2).to(dtype) for n in (40001, 0, 17, 9999)]
    scores[0][5] = float("nan")  # never selected
    scores[0][100] = -0.0  # ties with +0.0
    on = [s.to(dev) for s in scores]
    thr = int(ref.float_key(torch.tensor([0.0]))[0])
    counts = ref.count_key(scores, thr).tolist()
    assert counts[0] > 3000  # about 1/7 of 40001
    for take in ([-1, -1, -1, -1], [0, 0, 0, 0], [1, 0, 3, 0], [counts[0] // 2 + 1, 0, counts[2], 7],
                 [counts[0], 0, 0, counts[3]]):
        got = impl(on, thr, largest, take)
        want = ref.topk_mask_bits(scores, thr, largest, take)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.device.type == dev.type and _bits_equal(g, w)


@pytest.mark.parametrize("backend", PUBLIC)
@pytest.mark.parametrize("largest", [True, False])
def test_select_topk_mask_quota_across_tensors(backend, largest, gen, use_backend):
    use_backend(backend)
    dev = backend_device(backend)
    sizes = [(257, 31), (0,), (1,), (40001,), (999,)]
    scores = [torch.randn(*s, generator=gen).abs() for s in sizes]
    scores[3] = torch.round(scores[3] * 8) / 8  # ties at the boundary: quota across tensors
    n = sum(s.numel() for s in scores)
    for k in (0, 1, 37, n // 3, n // 2 + 1, n - 1, n):
        masks = wagle_ext.select_topk_mask([s.to(dev) for s in scores], k=k, largest=largest)
        want = ref.select_topk_bits(scores, k, largest)
        assert sum(m.nnz for m in masks) == k
        for m, w, s in zip(masks, want, scores):
            assert m.shape == s.shape
            assert _bits_equal(m.bits, w)


@pytest.mark.parametrize("backend", PUBLIC)
def test_select_topk_mask_bf16_histogram_and_per_tensor(backend, gen, use_backend):
    use_backend(backend)
    dev = backend_device(backend)
    w = [torch.randn(3001, generator=gen).to(torch.bfloat16), torch.randn(77, 13, generator=gen)]
    gf = [torch.randn(3001, generator=gen).to(torch.bfloat16), torch.randn(77, 13, generator=gen)]
    scores, hist = wagle_ext.attribution_scores([t.to(dev) for t in w], [t.to(dev) for t in gf], kind="snip",
                                                return_histogram=True)
    masks = wagle_ext.select_topk_mask(scores, ratio=0.1, histogram=hist)
    cpu_scores = [s.cpu() for s in scores]
    want = ref.select_topk_bits(cpu_scores, int(sum(s.numel() for s in scores) * 0.1), True)
    for m, b in zip(masks, want):
        assert _bits_equal(m.bits, b)
    low = [torch.round(torch.randn(2000, generator=gen) * 3).to(torch.bfloat16) for _ in range(2)]
    for m, s in zip(wagle_ext.select_topk_mask([t.to(dev) for t in low], k=150, scope="per_tensor", largest=False),
                    low):
        assert _bits_equal(m.bits, ref.select_topk_bits([s], 150, False)[0])


@pytest.mark.parametrize("backend", PUBLIC)
def test_select_nan_scores_rejected_on_every_backend(backend, use_backend):
    use_backend(backend)
    s = torch.tensor([1.0, float("nan"), 2.0], device=backend_device(backend))
    with pytest.raises(ValueError, match="NaN"):
        wagle_ext.select_topk_mask([s], k=1)


@pytest.mark.parametrize("backend", backend_params("topk_mask_bits", ("triton",)))
def test_gpu_geometry_in_the_interpreter(backend, monkeypatch, gen, use_backend):
    # On a GPU the Triton kernels use small blocks, many programs and several blocks per histogram
    # program; the interpreter defaults to one large block. Force a GPU-like geometry here so the
    # multi-block loops, partial last programs and cross-program tie ranks are exercised too.
    from wagle_ext.kernels.triton import _launch

    use_backend(backend)
    tk_hist, tk_count, tk_mask = (op_impl(o, backend) for o in ("radix_histogram", "count_key", "topk_mask_bits"))
    monkeypatch.setattr(_launch, "FORCED_GEOMETRY", (256, 3))
    n = 20001
    w, gf, gr = (torch.randn(n, generator=gen) for _ in range(3))
    w[::101] = float("nan")
    (s,), hist = wagle_ext.attribution_scores([w], [gf], [gr], gamma=1e-2, return_histogram=True)
    rs, rh = ref.attribution_score(w, gf, gr, None, "wagle", 1e-2, 0.0)
    assert same_floats(s, rs) and torch.equal(hist, rh)
    scores = [_scores_with_specials(m, gen) for m in (n, 777)]
    keys = ref.float_key(scores[0])
    for pb in (0, 11, 22):
        prefix = int(torch.mode(keys >> (32 - pb)).values) if pb else 0
        want = ref.radix_histogram(scores, prefix, pb)
        assert int(want.sum()) > 0 and torch.equal(tk_hist(scores, prefix, pb), want)
    thr = int(ref.float_key(torch.tensor([0.25]))[0])
    c = ref.count_key(scores, thr).tolist()
    assert torch.equal(tk_count(scores, thr), ref.count_key(scores, thr))
    for take in ([c[0] // 2 + 1, 3], [-1, 0]):
        for a, b in zip(tk_mask(scores, thr, True, take), ref.topk_mask_bits(scores, thr, True, take)):
            assert _bits_equal(a, b)
    mask = torch.rand(n, generator=gen) < 0.5
    bits = wagle_ext.pack_bits(mask)
    assert _bits_equal(bits, ref.pack_bits(mask)) and torch.equal(wagle_ext.unpack_bits(bits, n), mask)
    assert wagle_ext.popcount_bits(bits, n) == int(mask.sum())
    masks = wagle_ext.select_topk_mask(scores, k=5000)
    for m, o in zip(masks, ref.select_topk_bits(scores, 5000, True)):
        assert _bits_equal(m.bits, o)


# ---- GPU back ends (cuda, compiled Triton) on CUDA tensors against the CPU result ----------------------
def _scores_with_ties(n, gen, dtype=torch.float32):
    x = torch.randint(-3, 4, (n,), generator=gen).float() / 2
    x = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randn(n, generator=gen), x)
    return x.to(dtype)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_selection_primitives(gpu_backend, dtype, gen):
    cuda = torch.device("cuda")
    impl = ops._impl
    scores = [_scores_with_ties(n, gen, dtype) for n in (0, 1, 17, 8191, 8193, 300001)]
    scores[-1][::1009] = float("nan")
    g = [s.to(cuda) for s in scores]
    assert torch.equal(impl("radix_histogram", cuda)(g, 0, 0).cpu(), ref.radix_histogram(scores, 0, 0))
    keys = ref.float_key(scores[-1][~torch.isnan(scores[-1].float())])
    for pb in (11, 22):
        prefix = int(torch.mode(keys >> (32 - pb)).values)
        assert torch.equal(impl("radix_histogram", cuda)(g, prefix, pb).cpu(), ref.radix_histogram(scores, prefix, pb))
    thr = int(ref.float_key(torch.tensor([0.5]))[0])
    counts = ref.count_key(scores, thr)
    assert torch.equal(impl("count_key", cuda)(g, thr).cpu(), counts)
    c = counts.tolist()
    for largest in (True, False):
        for take in ([-1] * 6, [0] * 6, [0, 0, 1, c[3], c[4] // 2, c[5] // 3 + 1], [0, 0, 0, 0, 0, c[5]]):
            got = impl("topk_mask_bits", cuda)(g, thr, largest, take)
            want = ref.topk_mask_bits(scores, thr, largest, take)
            for a, b in zip(got, want):
                assert a.is_cuda and torch.equal(a.cpu(), b)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("largest", [True, False])
def test_gpu_select_topk_mask_end_to_end(gpu_backend, largest, gen):
    cuda = torch.device("cuda")
    shapes = [(1031, 77), (0,), (5,), (1 << 20,), (4097,)]
    scores = [torch.randn(s, generator=gen).abs() for s in shapes]
    scores[3] = torch.round(scores[3] * 16) / 16  # heavy ties at the boundary
    n = sum(s.numel() for s in scores)
    g = [s.to(cuda) for s in scores]
    for k in (0, 1, 1000, n // 3, n // 2 + 7, n):
        masks = wagle_ext.select_topk_mask(g, k=k, largest=largest)
        cpu_masks = run_on_cpu(wagle_ext.select_topk_mask, scores, k=k, largest=largest)
        oracle = ref.select_topk_bits(scores, k, largest)
        for m, cm, o in zip(masks, cpu_masks, oracle):
            assert m.bits.is_cuda
            assert torch.equal(m.bits.cpu(), cm.bits) and torch.equal(cm.bits, o)
