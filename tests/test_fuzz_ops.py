"""Property-based fuzzing of every op (issue 12 item 5): each back end that can run on CPU tensors
here (``reference`` through the public entry points, ``cpp``, ``triton`` under the interpreter)
against the pure-PyTorch reference, on Hypothesis-drawn inputs: ragged tensor lists with empty,
size-1, odd and chunk-boundary sizes, float32/bfloat16/float16 (mixed where the op allows it),
non-contiguous views and storage offsets, tie-heavy values, +-inf, NaN, subnormals and +-0; the C++
kernels on every SIMD path (a drawn ``WAGLE_CPU_ISA`` cap).

Contracts checked (the ones the per-op tests and the op docstrings state, no weaker, no stronger):

* ``attribution_scores``: float32 scores bit-identical to ``reference.attribution_score`` (NaN
  wherever the reference has NaN), the fused histogram equal to the reference one (entry 2048 =
  NaN count), ``out=`` buffers returned, inputs never mutated.
* ``score_histogram``: equal to ``reference.radix_histogram(scores, 0, 0)``.
* ``select_topk_mask``: bits equal to the stable-sort oracle ``reference.select_topk_bits``; exactly
  k selected (``k = int(N * ratio)``, per tensor for ``scope="per_tensor"``), including k = 0 and
  k = N; checked independently of the oracle too: every selected key >= every unselected key and
  ties at the threshold go to the lowest global index; NaN anywhere raises ``ValueError``.
* ``pack_bits`` / ``unpack_bits`` / ``popcount_bits``: equal to the reference, padding bits zero,
  bits beyond ``numel`` ignored; ``masked_adamw_chunk_offsets`` equal to the reference.
* ``gather_masked``: bit-identical to ``reference.gather_masked_`` (specials copied or added
  as IEEE float32 adds), ``src`` never mutated.
* ``masked_adamw_``: params, moments, amsgrad maxima and written-back grads bit-identical to
  ``reference.masked_adamw_`` (NaN wherever the reference has NaN); unselected params bit-identical
  to before (``weight_decay_mode`` masked/none), unselected grads untouched, ``found_inf == 1``
  changes nothing.

NaN payloads are not compared (any NaN equals any NaN, in the same places): torch's own CPU
float16 -> float32 conversion, which the reference uses, gives NaN 0x7fc00000 in its vector body
but 0x7fffffff in its scalar tail (the last ``n % 8`` elements), so the reference itself has no
single NaN bit pattern; -0.0 vs +0.0 and everything else is compared bit for bit.

Bounded for CI: ``WAGLE_FUZZ_EXAMPLES`` (default 30) examples per C++/reference property, a
quarter of that (at least 3) and smaller tensors for the Triton interpreter, a fifth for the
selections with one > 65536-element tensor of ties. Not derandomized: every run explores new
inputs; a failure prints its ``@reproduce_failure`` blob, and the examples database
(``.pytest_cache/hypothesis``) replays it on the next run. Long local run:
``WAGLE_FUZZ_EXAMPLES=1000 pytest tests/test_fuzz_ops.py``.
"""
import contextlib
import os
import pathlib

import pytest

pytest.importorskip("hypothesis", reason="property-based fuzzing needs the hypothesis package")

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

from wagle_ext import ops  # noqa: E402
from wagle_ext.kernels import reference as ref  # noqa: E402

import fuzz_strategies as fz  # noqa: E402

# ----------------------------------------------------------------------------- settings
_BASE = max(1, int(os.environ.get("WAGLE_FUZZ_EXAMPLES", "30")))
settings.register_profile(
    "wagle-fuzz",
    max_examples=_BASE,
    deadline=None,
    derandomize=False,  # explicit: Hypothesis' auto-loaded "ci" profile would derandomize
    print_blob=True,
    phases=[ph for ph in Phase if ph != Phase.explain],  # explain re-runs a failure many times: slow here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=DirectoryBasedExampleDatabase(
        str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "hypothesis")),
)
FUZZ = settings(settings.get_profile("wagle-fuzz"))
FUZZ_TRITON = settings(FUZZ, max_examples=max(3, _BASE // 4))
FUZZ_BIG = settings(FUZZ, max_examples=max(3, _BASE // 5))  # > 65536-element tensors

# The Triton interpreter evaluates kernels in numpy, which warns on inf - inf, 0 * inf, overflow...
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# Per-tensor bounds: C++ / reference, and the (slow) Triton interpreter.
CPU_TENSORS, CPU_NUMEL = 6, 5000
TRITON_TENSORS, TRITON_NUMEL = 4, 1200


# ----------------------------------------------------------------------------- back ends
@contextlib.contextmanager
def forced(backend: str, isa=None):
    """WAGLE_BACKEND=backend (and WAGLE_CPU_ISA=isa, the SIMD cap of the C++ kernels, when given)."""
    env = {"WAGLE_BACKEND": backend, "WAGLE_CPU_ISA": isa}
    old = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The C++ kernels read WAGLE_CPU_ISA per call (capped at what the CPU has): every SIMD path.
isas = st.sampled_from((None, "default", "avx2", "avx512"))


def _can_force(backend: str, op: str) -> bool:
    with forced(backend):
        try:
            return ops.resolve_backend(op, torch.device("cpu")) == backend
        except RuntimeError:
            return False


def cpu_backends(op: str) -> list:
    return [b for b in ("reference", "cpp") if _can_force(b, op)]


def triton_only(op: str):
    return pytest.mark.skipif(not _can_force("triton", op), reason=f"the Triton back end cannot run {op} on CPU "
                              "tensors here (needs triton and TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------- comparisons
def _int_view(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns (-0.0 != +0.0; NaN payloads must match): for values
    that were only copied (inputs that must not change, unselected elements)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_int_view(a), _int_view(b))


def assert_same_values(a: torch.Tensor, b: torch.Tensor, what: str):
    """Bit-identical except that any NaN equals any NaN (payloads are not part of the contract)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        i = int((na != nb).reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: NaN at flat index {i} in only one of them "
                             f"({a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r})")
    ia, ib = _int_view(a).reshape(-1), _int_view(b).reshape(-1)
    diff = (ia != ib) & ~na.reshape(-1)
    if bool(diff.any()):
        i = int(diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} elements differ, first at flat index {i}: "
                             f"{a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- attribution_scores
KINDS = ("wagle", "wagle_hessian", "snip", "gradient", "magnitude")


@st.composite
def score_cases(draw, max_tensors, max_numel):
    weights = draw(fz.ragged(max_tensors, max_numel))

    def like(w):  # same shape, its own dtype, layout and values (fp32 grads beside bf16 weights...)
        return st.builds(fz.TSpec, shape=st.just(w.shape), layout=st.sampled_from(fz.LAYOUTS),
                         dtype=st.sampled_from(fz.FLOAT_DTYPES), values=fz.values())

    return dict(
        kind=draw(st.sampled_from(KINDS)),
        weights=weights,
        grads_forget=[draw(like(w)) for w in weights],
        grads_retain=[draw(like(w)) for w in weights],
        hessian=[draw(like(w)) for w in weights],
        gamma=draw(st.sampled_from((1e-6, 3e-4, 1.0, 7.5))),
        eps=draw(st.sampled_from((0.0, 1e-8, 1e-3))),
        use_out=draw(st.booleans()),
        return_histogram=draw(st.booleans()),
    )


def check_scores(backend: str, case: dict, seed: int, isa=None):
    g = _gen(seed)
    kind = case["kind"]
    ws = [fz.build_tensor(s, g) for s in case["weights"]]
    gfs = [fz.build_tensor(s, g) for s in case["grads_forget"]]
    grs = [fz.build_tensor(s, g) for s in case["grads_retain"]]
    hs = [fz.build_tensor(s, g).abs_() for s in case["hessian"]]  # a Hessian diagonal is >= 0 (abs_ keeps the view)
    inputs = [t.clone() for t in ws + gfs + grs + hs]
    outs = [torch.full((w.numel(),), float("nan")) for w in ws] if case["use_out"] else None
    kw = dict(gamma=case["gamma"], eps=case["eps"], out=outs, return_histogram=case["return_histogram"])
    with forced(backend, isa):
        if ws:
            assert ops.resolve_backend("attribution_score", torch.device("cpu")) == backend
        if kind == "wagle_hessian":
            res = ops.attribution_scores(ws, gfs, grs, kind="wagle", hessian=hs, **kw)
        elif kind == "magnitude":
            res = ops.attribution_scores(ws, kind=kind, **kw)
        else:
            res = ops.attribution_scores(ws, gfs, grs if kind == "wagle" else None, kind=kind, **kw)
    scores, hist = res if case["return_histogram"] else (res, None)
    assert len(scores) == len(ws)
    want_hist = torch.zeros(ref.HIST_SIZE, dtype=torch.int64)
    for i, (s, w, gf, gr, h) in enumerate(zip(scores, ws, gfs, grs, hs)):
        rs, rh = ref.attribution_score(w.contiguous(), gf.contiguous(), gr.contiguous(), h.contiguous(), kind,
                                       case["gamma"], case["eps"])
        assert s.dtype == torch.float32 and s.shape == w.shape, i
        assert_same_values(s, rs, f"scores[{i}]")
        if outs is not None:
            assert s.data_ptr() == outs[i].data_ptr(), f"scores[{i}] is not out[{i}]"
        want_hist += rh
    if hist is not None:
        assert hist.dtype == torch.int64 and hist.shape == (ref.HIST_SIZE,)
        assert torch.equal(hist, want_hist), "fused histogram differs from the reference"
        assert int(hist.sum()) == sum(w.numel() for w in ws)
        assert int(hist[ref.HIST_BINS]) == sum(int(torch.isnan(s).sum()) for s in scores)
    for i, (a, b) in enumerate(zip(inputs, ws + gfs + grs + hs)):
        assert same_bits(a, b), f"input {i} was mutated"


@pytest.mark.parametrize("backend", cpu_backends("attribution_score"))
@FUZZ
@given(case=score_cases(CPU_TENSORS, CPU_NUMEL), seed=fz.seeds, isa=isas)
def test_attribution_scores(backend, case, seed, isa):
    check_scores(backend, case, seed, isa)


@triton_only("attribution_score")
@FUZZ_TRITON
@given(case=score_cases(TRITON_TENSORS, TRITON_NUMEL), seed=fz.seeds)
def test_attribution_scores_triton(case, seed):
    check_scores("triton", case, seed)


# ----------------------------------------------------------------------------- score_histogram
def check_histogram(backend: str, specs: list, seed: int, isa=None):
    g = _gen(seed)
    scores = [fz.build_tensor(s, g) for s in specs]
    with forced(backend, isa):
        hist = ops.score_histogram(scores)
    want = ref.radix_histogram([s.contiguous() for s in scores], 0, 0)
    assert hist.dtype == torch.int64 and torch.equal(hist, want)
    assert int(hist.sum()) == sum(s.numel() for s in scores)
    assert int(hist[ref.HIST_BINS]) == sum(int(torch.isnan(s.float()).sum()) for s in scores)


@pytest.mark.parametrize("backend", cpu_backends("radix_histogram"))
@FUZZ
@given(specs=fz.ragged(CPU_TENSORS, CPU_NUMEL), seed=fz.seeds, isa=isas)
def test_score_histogram(backend, specs, seed, isa):
    check_histogram(backend, specs, seed, isa)


@triton_only("radix_histogram")
@FUZZ_TRITON
@given(specs=fz.ragged(TRITON_TENSORS, TRITON_NUMEL), seed=fz.seeds)
def test_score_histogram_triton(specs, seed):
    check_histogram("triton", specs, seed)


# ----------------------------------------------------------------------------- select_topk_mask
@st.composite
def select_cases(draw, max_tensors, max_numel, big_ties=False):
    specs = draw(fz.ragged(max_tensors, max_numel, min_tensors=1))
    if big_ties:  # one tensor of > 65536 ties: the C++ path past the fused collect (histogram levels, count_key)
        big = fz.TSpec(shape=(draw(st.integers(65537, 140000)),), layout=draw(st.sampled_from(fz.LAYOUTS)),
                       dtype=draw(st.sampled_from(fz.FLOAT_DTYPES)),
                       values=fz.Values("ties", pool=tuple(draw(st.lists(st.sampled_from(fz.TIE_POOL), min_size=1,
                                                                          max_size=3))),
                                        special_frac=draw(st.sampled_from((0.0, 0.001)))))
        specs.insert(draw(st.integers(0, len(specs))), big)
    n = sum(s.numel for s in specs)
    scope = draw(st.sampled_from(("global", "global", "per_tensor")))
    largest = draw(st.booleans())
    if draw(st.booleans()):  # k=, biased to the ends: 0, 1, 2, N-2, N-1, N
        hi = n if scope == "global" else max([s.numel for s in specs] + [0]) + 2
        ends = [k for k in (0, 1, 2, hi - 2, hi - 1, hi) if 0 <= k <= hi]
        k = draw(st.one_of(st.sampled_from(ends), st.integers(0, hi)))
        ratio = None
    else:  # ratio=, near 0 (k = 0 or 1) and near 1 (k = N - 1 or N)
        m = max(n, 1)
        near = [1e-12, 0.5 / m, 1.0 / m, 1.5 / m, 1.0 - 1e-12, 1.0 - 1.0 / m, 1.0 - 0.5 / m, 1.0, 0.5]
        ratio = draw(st.one_of(st.sampled_from([r for r in near if 0 < r <= 1]),
                               st.floats(min_value=1e-9, max_value=1.0)))
        k = None
    use_hist = scope == "global" and draw(st.booleans())
    return dict(specs=specs, scope=scope, largest=largest, k=k, ratio=ratio, use_hist=use_hist)


def _check_topk_contract(flat: torch.Tensor, sel: torch.Tensor, k: int, largest: bool, what: str):
    """Oracle-free: exactly k selected, none unselected better than a selected one, and the ties at
    the threshold key taken by the lowest global indices."""
    assert int(sel.sum()) == k, f"{what}: {int(sel.sum())} selected, wanted {k}"
    if k == 0 or k == flat.numel():
        return
    key = ref.float_key(flat)
    if not largest:
        key = 0xFFFFFFFF - key
    thr = int(key[sel].min())
    assert int(key[~sel].max()) <= thr, f"{what}: an unselected score beats a selected one"
    tie_sel = (sel & (key == thr)).nonzero()
    tie_rest = (~sel & (key == thr)).nonzero()
    if tie_sel.numel() and tie_rest.numel():
        assert int(tie_sel.max()) < int(tie_rest.min()), f"{what}: ties not taken lowest global index first"


def check_select(backend: str, case: dict, seed: int, isa=None):
    g = _gen(seed)
    scores = [fz.build_tensor(s, g, nan=False) for s in case["specs"]]
    flat32 = [s.contiguous().float() for s in scores]
    n = sum(s.numel() for s in scores)
    kw = dict(scope=case["scope"], largest=case["largest"])
    if case["k"] is not None:
        kw["k"] = case["k"]
    else:
        kw["ratio"] = case["ratio"]
    before = [s.clone() for s in scores]
    with forced(backend, isa):
        assert ops.resolve_backend("topk_mask_bits", torch.device("cpu")) == backend
        if case["use_hist"]:
            kw["histogram"] = ops.score_histogram(scores)
        masks = ops.select_topk_mask(scores, **kw)
        nnz = [m.nnz for m in masks]
    assert len(masks) == len(scores)
    for i, (m, s) in enumerate(zip(masks, scores)):
        assert m.shape == s.shape, i
        assert m.bits.dtype == torch.uint8 and m.bits.shape == ((s.numel() + 7) // 8,), i
        assert same_bits(s, before[i]), f"scores[{i}] was mutated"
    if case["scope"] == "global":
        k = int(n * case["ratio"]) if case["k"] is None else case["k"]
        want = ref.select_topk_bits(flat32, k, case["largest"])
        for i, (m, b) in enumerate(zip(masks, want)):
            assert torch.equal(m.bits, b), f"tensor {i} (numel {scores[i].numel()}): bits differ from the oracle"
        assert sum(nnz) == k
        sel = torch.cat([ref.unpack_bits(m.bits, s.numel()) for m, s in zip(masks, scores)])
        _check_topk_contract(torch.cat([f.reshape(-1) for f in flat32]), sel, k, case["largest"], "global")
    else:
        for i, (m, f) in enumerate(zip(masks, flat32)):
            k = int(f.numel() * case["ratio"]) if case["k"] is None else min(case["k"], f.numel())
            assert torch.equal(m.bits, ref.select_topk_bits([f], k, case["largest"])[0]), \
                f"tensor {i}: per-tensor bits differ from the oracle"
            assert nnz[i] == k, i
            _check_topk_contract(f.reshape(-1), ref.unpack_bits(m.bits, f.numel()), k, case["largest"], f"tensor {i}")


@pytest.mark.parametrize("backend", cpu_backends("topk_mask_bits"))
@FUZZ
@given(case=select_cases(CPU_TENSORS, CPU_NUMEL), seed=fz.seeds, isa=isas)
def test_select_topk_mask(backend, case, seed, isa):
    check_select(backend, case, seed, isa)


@triton_only("topk_mask_bits")
@pytest.mark.parametrize("backend", cpu_backends("topk_mask_bits"))
@FUZZ_BIG
@given(case=select_cases(3, 2000, big_ties=True), seed=fz.seeds, isa=isas)
def test_select_topk_mask_big_ties(backend, case, seed, isa):
    check_select(backend, case, seed, isa)


@FUZZ_TRITON
@given(case=select_cases(TRITON_TENSORS, TRITON_NUMEL), seed=fz.seeds)
def test_select_topk_mask_triton(case, seed):
    check_select("triton", case, seed)


def check_select_nan(backend: str, case: dict, where: tuple, seed: int, isa=None):
    """NaN policy: a single NaN anywhere makes selection raise ValueError, whatever k (0 and N
    included), scope or histogram."""
    g = _gen(seed)
    scores = [fz.build_tensor(s, g, nan=False) for s in case["specs"]]
    nonempty = [i for i, s in enumerate(scores) if s.numel()]
    assume(nonempty)
    t = scores[nonempty[where[0] % len(nonempty)]]
    j = where[1] % t.numel()
    if t.dim() == 0:
        t.fill_(float("nan"))
    else:
        t[tuple(int(x) for x in torch.unravel_index(torch.tensor(j), t.shape))] = float("nan")
    n = sum(s.numel() for s in scores)
    kw = dict(scope=case["scope"], largest=case["largest"])
    if case["k"] is not None:
        kw["k"] = min(case["k"], n) if case["scope"] == "global" else case["k"]
    else:
        kw["ratio"] = case["ratio"]
    with forced(backend, isa):
        if case["use_hist"]:
            kw["histogram"] = ops.score_histogram(scores)
        with pytest.raises(ValueError, match="NaN"):
            ops.select_topk_mask(scores, **kw)


_where = st.tuples(st.integers(0, 64), st.integers(0, 1 << 20))


@pytest.mark.parametrize("backend", cpu_backends("topk_mask_bits"))
@FUZZ
@given(case=select_cases(CPU_TENSORS, CPU_NUMEL), where=_where, seed=fz.seeds, isa=isas)
def test_select_topk_mask_nan_raises(backend, case, where, seed, isa):
    check_select_nan(backend, case, where, seed, isa)


@triton_only("topk_mask_bits")
@FUZZ_TRITON
@given(case=select_cases(TRITON_TENSORS, TRITON_NUMEL), where=_where, seed=fz.seeds)
def test_select_topk_mask_nan_raises_triton(case, where, seed):
    check_select_nan("triton", case, where, seed)


# ----------------------------------------------------------------------------- bits
@st.composite
def bits_cases(draw, max_numel):
    spec = draw(fz.tensor_specs(max_numel))
    return dict(shape=spec.shape, layout=spec.layout, density=draw(st.sampled_from((0.0, 0.01, 0.5, 0.99, 1.0))),
                n_bytes=draw(fz.sizes(max_numel // 8 + 2)), byte_step=draw(st.sampled_from((1, 1, 2, 3))),
                numel_slack=draw(st.integers(0, 8)))


def check_bits(backend: str, case: dict, seed: int, isa=None):
    g = _gen(seed)
    n = 1
    for d in case["shape"]:
        n *= d
    flat = torch.rand(n, generator=g) < case["density"] if case["density"] < 1 else torch.ones(n, dtype=torch.bool)
    mask = fz.layout(flat, case["shape"], case["layout"], torch.bool, g)
    # Arbitrary bytes (padding bits set too), possibly a strided view, and a numel that leaves
    # 0..8 bits of the last byte(s) unused.
    raw = torch.randint(0, 256, (case["n_bytes"] * case["byte_step"],), generator=g, dtype=torch.uint8)
    raw = raw[::case["byte_step"]]
    m = max(0, raw.numel() * 8 - case["numel_slack"])
    with forced(backend, isa):
        assert ops.resolve_backend("pack_bits", torch.device("cpu")) == backend
        bits = ops.pack_bits(mask)
        unpacked = ops.unpack_bits(bits, n)
        count = ops.popcount_bits(bits, n)
        u2 = ops.unpack_bits(raw, m)
        c2 = ops.popcount_bits(raw, m)
        with pytest.raises(ValueError, match="cannot hold"):
            ops.unpack_bits(raw, raw.numel() * 8 + 1)
        with pytest.raises(ValueError, match="cannot hold"):
            ops.popcount_bits(raw, -1)
    assert bits.dtype == torch.uint8 and bits.shape == ((n + 7) // 8,)
    assert torch.equal(bits, ref.pack_bits(mask.contiguous()))
    if n % 8:
        assert int(bits[-1]) >> (n % 8) == 0, "padding bits set"
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, flat)
    assert count == int(flat.sum())
    assert torch.equal(u2, ref.unpack_bits(raw.contiguous(), m))
    assert c2 == ref.popcount_bits(raw.contiguous(), m)


@pytest.mark.parametrize("backend", cpu_backends("pack_bits"))
@FUZZ
@given(case=bits_cases(4 * CPU_NUMEL), seed=fz.seeds, isa=isas)
def test_bits(backend, case, seed, isa):
    check_bits(backend, case, seed, isa)


@triton_only("pack_bits")
@FUZZ_TRITON
@given(case=bits_cases(TRITON_NUMEL), seed=fz.seeds)
def test_bits_triton(case, seed):
    check_bits("triton", case, seed)


@FUZZ
@given(n=fz.sizes(3 * 4096 + 100), mask=fz.masks(allow_dense=False), pad_bit=st.integers(0, 7), seed=fz.seeds)
def test_masked_adamw_chunk_offsets(n, mask, pad_bit, seed):
    sel = fz.build_mask(mask, n, _gen(seed))
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    assert d.dtype == torch.int64 and torch.equal(d, ref.masked_adamw_chunk_offsets(bits, n))
    assert int(d[-1]) == int(sel.sum())
    if n % 8 and pad_bit >= n % 8:  # a set padding bit is rejected, not counted
        bad = bits.clone()
        bad[-1] |= 1 << pad_bit
        with pytest.raises(ValueError, match="padding"):
            ops.masked_adamw_chunk_offsets(bad, n)


# ----------------------------------------------------------------------------- gather_masked
@st.composite
def gather_cases(draw, max_numel):
    return dict(src=draw(fz.tensor_specs(max_numel)), mask=draw(fz.masks()), accumulate=draw(st.booleans()),
                pass_out=draw(st.booleans()), out_values=draw(fz.values()))


def check_gather(backend: str, case: dict, seed: int, isa=None):
    g = _gen(seed)
    src = fz.build_tensor(case["src"], g)
    n = src.numel()
    sel = fz.build_mask(case["mask"], n, g)
    bits = None if sel is None else ref.pack_bits(sel)
    d = None if sel is None else ops.masked_adamw_chunk_offsets(bits, n)
    nnz = n if sel is None else int(sel.sum())
    out0 = fz.fill(nnz, case["out_values"], torch.float32, g)
    src0 = src.clone()
    want = out0.clone()
    if sel is None:
        want.add_(src.reshape(-1).float()) if case["accumulate"] else want.copy_(src.reshape(-1).float())
    else:
        ref.gather_masked_(want, src.contiguous(), bits, d, case["accumulate"])
    out = out0.clone() if case["accumulate"] or case["pass_out"] else None
    with forced(backend, isa):
        assert ops.resolve_backend("gather_masked_", torch.device("cpu")) == backend
        got = ops.gather_masked(src, bits, d, out=out, accumulate=case["accumulate"])
    if out is not None:
        assert got is out
    assert_same_values(got, want, "gathered values")
    if not case["accumulate"]:
        flat = src.reshape(-1)
        assert_same_values(got, (flat if sel is None else flat[sel]).float(), "gathered values vs src")
    assert same_bits(src, src0), "src was mutated"


@pytest.mark.parametrize("backend", cpu_backends("gather_masked_"))
@FUZZ
@given(case=gather_cases(3 * 4096 + 100), seed=fz.seeds, isa=isas)
def test_gather_masked(backend, case, seed, isa):
    check_gather(backend, case, seed, isa)


@triton_only("gather_masked_")
@FUZZ_TRITON
@given(case=gather_cases(2 * 4096 + 100), seed=fz.seeds)
def test_gather_masked_triton(case, seed):
    check_gather("triton", case, seed)


# ----------------------------------------------------------------------------- masked_adamw_
@st.composite
def adamw_cases(draw, max_tensors, max_numel):
    dtype = draw(st.sampled_from(fz.FLOAT_DTYPES))
    # Params are written in place: every layout but overlapping ones.
    params = draw(fz.ragged(max_tensors, max_numel, dtypes=(dtype,)))
    per = [dict(mask=draw(fz.masks()), grad_layout=draw(st.sampled_from(fz.LAYOUTS)), grad_values=draw(fz.values()),
                offsets=draw(st.booleans())) for _ in params]
    scaled = draw(st.booleans())
    return dict(
        dtype=dtype, params=params, per=per,
        step=draw(st.integers(1, 6)),
        lr=draw(st.sampled_from((0.0, 1e-3, 3e-2, 1.0))),
        beta1=draw(st.sampled_from((0.0, 0.3, 0.9))),
        beta2=draw(st.sampled_from((0.0, 0.5, 0.999))),
        weight_decay=draw(st.sampled_from((0.0, 0.01, 0.1))),
        eps=draw(st.sampled_from((0.0, 1e-8, 1e-3))),
        amsgrad=draw(st.booleans()), maximize=draw(st.booleans()),
        weight_decay_mode=draw(st.sampled_from(("masked", "all", "none"))),
        grad_scale=draw(st.sampled_from((0.75, 2.0, 1024.0, 3.0 * 2 ** -10))) if scaled else None,
        found_inf=draw(st.sampled_from((None, 0.0, 0.0, 1.0))) if scaled else None,
        compact_grads=draw(st.booleans()),
        nonfinite=draw(st.booleans()),  # +-inf / NaN in params and grads
    )


def check_adamw(backend: str, case: dict, seed: int, isa=None):
    g = _gen(seed)
    nonfinite = case["nonfinite"]
    P, G, M, V, VM, S, B, D, O, SEL = ([] for _ in range(10))
    for spec, per in zip(case["params"], case["per"]):
        p = fz.build_tensor(spec, g, nan=nonfinite, inf=nonfinite)
        n = p.numel()
        sel = fz.build_mask(per["mask"], n, g)
        nnz = n if sel is None else int(sel.sum())
        gflat = fz.fill(n, per["grad_values"], case["dtype"], g, nan=nonfinite, inf=nonfinite)
        if case["compact_grads"]:
            dense = gflat.to(case["dtype"]).float()  # what gather_masked would compact
            grad = (dense if sel is None else dense[sel]).contiguous()
        else:
            grad = fz.layout(gflat, spec.shape, per["grad_layout"], case["dtype"], g)
        P.append(p)
        G.append(grad)
        M.append(torch.randn(nnz, generator=g) * 0.1)
        V.append(torch.rand(nnz, generator=g) * 0.01)
        VM.append(V[-1] + torch.rand(nnz, generator=g) * 0.01)
        S.append(torch.tensor(float(case["step"])))
        B.append(None if sel is None else ref.pack_bits(sel))
        D.append(None if sel is None else ops.masked_adamw_chunk_offsets(B[-1], n))
        O.append(torch.randint(0, case["step"], (nnz,), generator=g, dtype=torch.int32) if per["offsets"] else None)
        SEL.append(sel)
    amsgrad = case["amsgrad"]
    scale = None if case["grad_scale"] is None else torch.tensor(case["grad_scale"])
    found = None if case["found_inf"] is None else torch.tensor(case["found_inf"])
    hyper = dict(lr=case["lr"], beta1=case["beta1"], beta2=case["beta2"], weight_decay=case["weight_decay"],
                 eps=case["eps"], amsgrad=amsgrad, maximize=case["maximize"],
                 weight_decay_mode=case["weight_decay_mode"])

    # The reference, on contiguous copies in logical flat order.
    rP = [p.contiguous().clone() for p in P]
    rG = [x.contiguous().clone() for x in G]
    rM, rV, rVM = [x.clone() for x in M], [x.clone() for x in V], [x.clone() for x in VM]
    ref.masked_adamw_(
        rP, rG, rM, rV, rVM if amsgrad else [], [s.clone() for s in S],
        [torch.empty(0, dtype=torch.uint8) if b is None else b for b in B],
        [torch.empty(0, dtype=torch.int64) if d is None else d for d in D],
        [torch.empty(0, dtype=torch.int32) if o is None else o for o in O],
        grad_scale=scale, found_inf=found, torch_tail=ops.torch_fused_adamw_tail(),
        compact_grads=case["compact_grads"], **hyper)

    P0 = [p.clone() for p in P]
    G0 = [x.clone() for x in G]
    S0 = [s.clone() for s in S]
    with forced(backend, isa):
        if P:
            assert ops.resolve_backend("masked_adamw_", torch.device("cpu")) == backend
        ops.masked_adamw_(P, G, M, V, VM if amsgrad else [], S, B, D, O, grad_scale=scale, found_inf=found,
                          compact_grads=case["compact_grads"], **hyper)
    for i, sel in enumerate(SEL):
        assert_same_values(P[i], rP[i].view(P[i].shape), f"params[{i}]")
        assert_same_values(M[i], rM[i], f"exp_avgs[{i}]")
        assert_same_values(V[i], rV[i], f"exp_avg_sqs[{i}]")
        if amsgrad:
            assert_same_values(VM[i], rVM[i], f"max_exp_avg_sqs[{i}]")
        assert_same_values(G[i], rG[i].view(G[i].shape), f"grads[{i}]")
        assert same_bits(S[i], S0[i]), f"state_steps[{i}] was changed"
        if found is not None and float(found) == 1.0:
            assert same_bits(P[i], P0[i]) and same_bits(G[i], G0[i]), f"found_inf=1 changed tensor {i}"
            assert same_bits(M[i], rM[i]) and same_bits(V[i], rV[i])
        if sel is None:
            continue
        if case["weight_decay_mode"] != "all":
            assert same_bits(P[i].reshape(-1)[~sel], P0[i].reshape(-1)[~sel]), \
                f"params[{i}]: an unselected weight was written"
        if not case["compact_grads"]:
            assert same_bits(G[i].reshape(-1)[~sel], G0[i].reshape(-1)[~sel]), \
                f"grads[{i}]: an unselected grad was written"


@pytest.mark.parametrize("backend", cpu_backends("masked_adamw_"))
@FUZZ
@given(case=adamw_cases(4, CPU_NUMEL), seed=fz.seeds, isa=isas)
def test_masked_adamw(backend, case, seed, isa):
    check_adamw(backend, case, seed, isa)


@triton_only("masked_adamw_")
@FUZZ_TRITON
@given(case=adamw_cases(3, TRITON_NUMEL), seed=fz.seeds)
def test_masked_adamw_triton(case, seed):
    check_adamw("triton", case, seed)


# ----------------------------------------------------------------------------- regressions found by fuzzing
# Triton once built the step coefficient as tl.zeros_like(g) + nss, which turns nss = -0.0 (lr = 0) into
# +0.0 (kernels/triton/masked_adamw.py, tensor-wide step path); fixed with tl.full.
ADAMW_BACKENDS = cpu_backends("masked_adamw_") + (["triton"] if _can_force("triton", "masked_adamw_") else [])


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
@pytest.mark.parametrize("masked", [True, False])
def test_masked_adamw_lr0_signed_zero_params(backend, masked):
    """Shrunk from test_masked_adamw_triton: with lr=0 the step coefficient -(lr/bc1) is -0.0, and
    a +-0.0 weight plus (-0.0 * m) / den must keep the sign IEEE (and torch._fused_adamw_) give it:
    -0.0 + (-0.0 * -1) / 1 = +0.0. Deterministic version of the fuzzed property."""
    p = torch.tensor([-0.0, -0.0, 0.0, 0.0, 1.0, -0.0, -0.0, -0.0, -0.0])
    g = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, -2.0, 0.5, -1e-30, 3.0])
    n = p.numel()
    bits = ref.pack_bits(torch.ones(n, dtype=torch.bool)) if masked else None
    d = ops.masked_adamw_chunk_offsets(bits, n) if masked else None
    hyper = dict(lr=0.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                 weight_decay_mode="masked")
    want = p.clone()
    ref.masked_adamw_([want], [g.clone()], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(1.0)],
                      [bits if masked else torch.empty(0, dtype=torch.uint8)],
                      [d if masked else torch.empty(0, dtype=torch.int64)], [torch.empty(0, dtype=torch.int32)],
                      torch_tail=ops.torch_fused_adamw_tail(), **hyper)
    got = p.clone()
    with forced(backend):
        ops.masked_adamw_([got], [g.clone()], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(1.0)], [bits],
                          [d], **hyper)
    assert_same_values(got, want, "params")
