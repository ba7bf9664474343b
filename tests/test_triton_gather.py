"""Triton ``gather_masked_`` (compact gradients) under the CPU interpreter against the reference.

Every comparison is EXACT (bitwise float32): the kernel widens bf16/fp16 exactly and accumulates
with one float32 add per element, as the reference's ``out.add_``. Inputs stay small (< 1e5
elements): the interpreter costs ~0.5 ms per program.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is decorated or launched

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from wagle_ext import ops  # noqa: E402
from wagle_ext.kernels import reference as ref  # noqa: E402
from wagle_ext.kernels import triton as tk  # noqa: E402
from wagle_ext.kernels.triton import _launch  # noqa: E402

if not tk.AVAILABLE:
    pytest.skip(f"wagle_ext.kernels.triton unavailable: {tk.IMPORT_ERROR}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# empty, tiny, odd 2-D, one chunk + a partial word, three chunks + odd tail
SHAPES = [(0,), (7,), (33, 17), (4096 + 45,), (3 * 4096 + 333,)]
MASKS = ["random", "sparse", "clustered", "full", "empty"]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("WAGLE_BACKEND", "triton")


def make_mask(kind, n, gen):
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
        run = int(torch.randint(1, 700, (1,), generator=gen))
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
    sel = make_mask(kind, n, gen)
    bits = ref.pack_bits(sel)
    d = ref.masked_adamw_chunk_offsets(bits, n)
    src = (torch.randn(shape, generator=gen) * 3).to(dtype)
    out0 = torch.randn(int(sel.sum()), generator=gen)
    return src, bits, d, out0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_reference(dtype, kind, accumulate, gen):
    for shape in SHAPES:
        src, bits, d, out0 = _problem(shape, kind, dtype, gen)
        got, want = out0.clone(), out0.clone()
        tk.gather_masked_(got, src, bits, d, accumulate)
        ref.gather_masked_(want, src, bits, d, accumulate)
        assert _same(got, want), shape
        if not accumulate:  # a plain gather: exactly the selected values, widened
            assert _same(got, src.reshape(-1)[ref.unpack_bits(bits, src.numel())].float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_slice_loop_and_specials(dtype, gen, monkeypatch):
    """The GPU geometry (1024-element slices, 4 per chunk; also 256) in the interpreter, with
    infinities, NaN, -0.0 and denormals in src (accumulate adds them like the reference)."""
    n = 4 * 4096 + 999
    src = torch.randn(n, generator=gen)
    pick = torch.randint(0, n, (200,), generator=gen)
    src[pick] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-40, -3e-39, 0.0, 1e30])[
        torch.randint(0, 8, (200,), generator=gen)]
    src = src.to(dtype)
    sel = make_mask("random", n, gen)
    sel[pick] = True
    bits = ref.pack_bits(sel)
    d = ref.masked_adamw_chunk_offsets(bits, n)
    for blk in (1024, 256):
        monkeypatch.setattr(_launch, "FORCED_GEOMETRY", (blk, 1))
        for accumulate in (False, True):
            out0 = torch.randn(int(sel.sum()), generator=gen)
            got, want = out0.clone(), out0.clone()
            tk.gather_masked_(got, src, bits, d, accumulate)
            ref.gather_masked_(want, src, bits, d, accumulate)
            assert _same(got, want), (blk, accumulate)


def test_public_entry_routes_to_triton(gen, monkeypatch):
    """ops.gather_masked picks the Triton kernel under WAGLE_BACKEND=triton, for a non-contiguous
    src too (read through a contiguous copy), and allocates out when not given."""
    assert ops.resolve_backend("gather_masked_", torch.device("cpu")) == "triton"
    calls = []
    real = tk.gather_masked_
    monkeypatch.setattr(tk, "gather_masked_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    src = torch.randn(65, 301, generator=gen).t()  # non-contiguous view, 19565 elements
    sel = make_mask("clustered", src.numel(), gen)
    bits = ref.pack_bits(sel)
    d = ops.masked_adamw_chunk_offsets(bits, src.numel())
    got = ops.gather_masked(src, bits, d)
    want = torch.empty(int(sel.sum()))
    ref.gather_masked_(want, src.contiguous(), bits, d, False)
    assert _same(got, want)
    ops.gather_masked(src, bits, d, out=got, accumulate=True)
    ref.gather_masked_(want, src.contiguous(), bits, d, True)
    assert _same(got, want) and calls == [1, 1]


def test_rejects_bad_inputs(gen):
    n = 9000
    sel = make_mask("random", n, gen)
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


def test_gpu_codegen():
    """The kernel compiles for sm_90 as launched on a GPU (no GPU needed: Triton's bundled ptxas),
    for every src dtype: float32 adds only with accumulate, and no fma anywhere."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, root], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip(f"Triton cannot compile for CUDA here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [tuple(int(x) for x in line.split()) for line in r.stdout.split("\n") if line.strip()]
    assert len(rows) == 6, r.stdout
    for dtype, acc, adds, fmas in rows:
        assert fmas == 0 and ((adds > 0) if acc else (adds == 0)), rows
