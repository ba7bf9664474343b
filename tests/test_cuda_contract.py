"""Contract between the Python layer and the CUDA bindings' checks, on machines WITHOUT a GPU.

csrc/cuda/bindings.cpp runs every check and host-side computation of a launch through
csrc/cuda/host_plan.h (ATen only). This module compiles that header with g++ against the installed
(CPU) torch into a small library, tests/cuda_contract.cpp, whose ops run the same ``host::plan_*``
functions with the CPU as the op's device type. Then:

* every call ``wagle_ext.ops`` sends to a ``torch.ops.wagle`` op while the public paths run (default
  arguments, ``return_histogram=False``, mixed dtypes, ``out=`` aliasing ``grads_forget``, views,
  empty tensors, every selection path, MaskedAdamW with masks, ``set_masks`` offsets, GradScaler
  tensors, compact gradients) is captured by a dispatch mode and replayed into the CUDA checks:
  each must be accepted (issue 20, finding 1: the default scoring call was refused on CUDA);
* calls the CPU op refuses (bad directories, ties_take < -1, step offsets outside [0, step) of
  their own tensor, ...) must be refused by the CUDA checks too (findings 4 and 6);
* the per-step coefficient table holds only the rows the offsets reach and equals adamw_coeffs()
  bit for bit (finding 3).

Skipped without a C++ compiler or without the CPU extension. The library is cached under
build/cuda_contract/<hash of its sources>.
"""
import hashlib
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import wagle_ext
from wagle_ext import ops
from wagle_ext.kernels import reference as ref

from conftest import require_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCE = os.path.join(ROOT, "tests", "cuda_contract.cpp")
HEADERS = ["cuda/host_plan.h", "cuda/kernel_args.h", "common/checks.h", "common/adamw_math.h", "common/layout.h",
           "common/score_math.h", "common/select_math.h", "common/rounding_math.h"]
# wagle op -> contract op (the same host::plan_* the CUDA binding runs)
CONTRACT = {"attribution_score_out": "attribution_score_out", "radix_histogram": "radix_histogram",
            "count_key": "count_key", "topk_mask_bits": "topk_mask_bits", "pack_bits": "pack_bits",
            "unpack_bits": "unpack_bits", "popcount_bits": "popcount_bits", "masked_adamw_": "masked_adamw",
            "masked_adamw_master_": "masked_adamw_master", "gather_masked_": "gather_masked"}


def _build() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ('{cxx}'): the CUDA checks are not compiled here")
    torch_dir = os.path.dirname(torch.__file__)
    inc, lib = os.path.join(torch_dir, "include"), os.path.join(torch_dir, "lib")
    if not os.path.isfile(os.path.join(inc, "ATen", "ATen.h")):
        pytest.skip("this torch has no C++ headers")
    h = hashlib.sha256(torch.__version__.encode())
    for p in [SOURCE] + [os.path.join(CSRC, x) for x in HEADERS]:
        h.update(open(p, "rb").read())
    out_dir = os.path.join(ROOT, "build", "cuda_contract", h.hexdigest()[:16])
    so = os.path.join(out_dir, "libwagle_cuda_contract.so")
    if not os.path.exists(so):
        os.makedirs(out_dir, exist_ok=True)
        tmp = so + f".{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++20", "-O0", "-g0", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-isystem", inc,
               "-isystem", os.path.join(inc, "torch", "csrc", "api", "include"), "-I", CSRC, SOURCE, "-o", tmp,
               "-L", lib, "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, "host-only build of csrc/cuda/host_plan.h failed:\n" + r.stderr[-6000:]
        os.replace(tmp, so)
    return so


@pytest.fixture(scope="module")
def contract():
    require_cpp()
    if not hasattr(torch.ops.wagle_cuda_contract, "cache_size"):
        torch.ops.load_library(_build())
    return torch.ops.wagle_cuda_contract


class Replay(TorchDispatchMode):
    """Runs every wagle op call through the CUDA checks first (same tensors, same moment), then the op."""

    def __init__(self, contract):
        super().__init__()
        self.contract = contract
        self.calls: dict = {}
        self.refused: list = []
        self.results: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func._schema.name.split("::")
        if ns == "wagle":
            self.calls[name] = self.calls.get(name, 0) + 1
            try:
                if name == "attribution_score":  # the functional form: outputs as csrc/ops.cpp allocates them
                    w = args[0]
                    res = self.contract.attribution_score_out(
                        *args, torch.empty(w.shape, dtype=torch.float32),
                        torch.zeros(ref.HIST_SIZE, dtype=torch.int64), **kwargs)
                elif name in CONTRACT:
                    res = getattr(self.contract, CONTRACT[name])(*args, **kwargs)
                else:
                    res = None  # CPU-only ops (cpu_isa, topk_mask_collect): no CUDA binding
                self.results.setdefault(name, []).append(res)
            except Exception as e:  # noqa: BLE001 - reported below with the op name
                self.refused.append(f"{name}: {type(e).__name__}: {e}")
        return func(*args, **kwargs)


def _public_paths(gen, monkeypatch):
    """Every public path of wagle_ext.ops on small CPU tensors, as the CUDA path calls them."""
    from wagle_ext.optim import MaskedAdamW

    # Selection as on a GPU: radix histogram + count_key + topk_mask_bits, not the CPU-only collect pass.
    monkeypatch.setattr("wagle_ext.ops.select._backend_has_collect", lambda device: False)
    # MaskedAdamW through ops.masked_adamw_ (the CUDA route), not the C++-CPU prevalidated shortcut.
    monkeypatch.setattr("wagle_ext.ops.adamw.resolve_backend", lambda op, device: "cuda")
    bf, hf = torch.bfloat16, torch.float16
    w = torch.randn(300, 7, generator=gen)
    gf, gr, h = torch.randn(300, 7, generator=gen), torch.randn(300, 7, generator=gen) * 1e-6, torch.rand(300, 7)
    # scoring: defaults (no histogram), histogram, every kind, hessian, mixed dtypes, views, empty, inplace
    wagle_ext.attribution_scores([w], [gf], [gr])
    wagle_ext.attribution_scores([w, w[:0]], [gf, gf[:0]], [gr, gr[:0]], return_histogram=True)
    for kind in ("snip", "gradient"):
        wagle_ext.attribution_scores([w], [gf], kind=kind)
    wagle_ext.attribution_scores([w], kind="magnitude", return_histogram=True)
    wagle_ext.attribution_scores([w.to(bf)], [gf.to(hf)], [gr], hessian=[h.to(bf)])
    wagle_ext.attribution_scores([w.t()], [gf.t()], [gr.t()])  # non-contiguous
    base = torch.randn(2101, generator=gen)
    wagle_ext.attribution_scores([base[1:]], [base[:-1]], [base[1:] * 1e-6], return_histogram=True)  # offsets
    g2 = gf.clone()
    wagle_ext.attribution_scores([w], [g2], [gr], out=[g2])  # out aliases grads_forget
    ops.score_histogram([w.reshape(-1), w[:0]])
    # selection: ratio / k, global / per-tensor, ties (quota), largest=False, bf16, histogram reuse, k = 0
    ties = [torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0] * 40), torch.full((77,), 2.0, dtype=bf)]
    for kw in (dict(k=50), dict(k=0), dict(k=277), dict(ratio=0.3, largest=False), dict(ratio=0.5, scope="per_tensor")):
        wagle_ext.select_topk_mask(ties, **kw)
    (s,), hist = wagle_ext.attribution_scores([w], [gf], [gr], return_histogram=True)
    masks = wagle_ext.select_topk_mask([s], ratio=0.2, histogram=hist)
    # bit arrays: views, empty
    m = torch.rand(300, 7, generator=gen) < 0.3
    pm = ops.PackedMask.from_bool(m.t())
    bits = ops.pack_bits(m.t())
    ops.unpack_bits(bits, m.numel())
    ops.popcount_bits(bits, m.numel())
    ops.pack_bits(torch.zeros(0, dtype=torch.bool))
    pm.to_bool()
    masks[0].to_bool()
    # MaskedAdamW: masked + dense params, amsgrad, set_masks (step offsets), GradScaler tensors, "all"/"none"
    for compact in (False, True):
        ps = [torch.nn.Parameter(torch.randn(70, 130, generator=gen)), torch.nn.Parameter(torch.randn(9, generator=gen)),
              torch.nn.Parameter(torch.randn(5000, generator=gen))]
        sel = [torch.rand(p.shape, generator=gen) < 0.3 for p in ps]
        opt = MaskedAdamW(ps, masks=[sel[0], None, sel[2]], lr=1e-2, weight_decay=0.1, amsgrad=True,
                          grad_mode="compact" if compact else "dense")
        for step in range(3):
            loss = sum((p.float() ** 2).sum() for p in ps)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 1:
                opt.set_masks([torch.rand(p.shape, generator=gen) < 0.4 for p in ps[:1]] + [None] +
                              [torch.rand(5000, generator=gen) < 0.2])
    ps2 = [torch.nn.Parameter(torch.randn(64, 64, generator=gen))]
    for mode in ("all", "none"):
        o2 = MaskedAdamW(ps2, masks=[torch.rand(64, 64, generator=gen) < 0.5], lr=1e-3, weight_decay_mode=mode)
        ps2[0].grad = torch.randn(64, 64, generator=gen)
        o2.step()
    # bf16/fp16 models with compact master weights (default on), both roundings, dense and compact
    # grads, set_masks (remapped master, step offsets), an empty and a dense parameter
    for dtype, rounding, compact in ((bf, "nearest", False), (bf, "stochastic", True), (hf, "stochastic", False)):
        ps = [torch.nn.Parameter(torch.randn(70, 130, generator=gen).to(dtype)),
              torch.nn.Parameter(torch.randn(9, generator=gen).to(dtype)),
              torch.nn.Parameter(torch.randn(0, generator=gen).to(dtype))]
        opt = MaskedAdamW(ps, masks=[torch.rand(70, 130, generator=gen) < 0.3, None, None], lr=1e-2,
                          rounding=rounding, seed=3, grad_mode="compact" if compact else "dense")
        for step in range(3):
            sum((p.float() ** 2).sum() for p in ps).backward()
            opt.step()
            opt.zero_grad()
            if step == 1:
                opt.set_masks([torch.rand(70, 130, generator=gen) < 0.4, None, None])
    # the public op with non-contiguous params, GradScaler tensors, step_offsets
    p = torch.randn(40, 50, generator=gen).t()
    pb = ops.pack_bits((torch.rand(40, 50, generator=gen) < 0.5).t())
    d = ops.masked_adamw_chunk_offsets(pb, 2000)
    nnz = int(d[-1])
    offs = torch.randint(0, 3, (nnz,), generator=gen, dtype=torch.int32)
    ops.masked_adamw_([p], [torch.randn(50, 40, generator=gen)], [torch.zeros(nnz)], [torch.zeros(nnz)], [],
                      [torch.tensor(3.0)], [pb], [d], [offs], lr=1e-3, grad_scale=torch.tensor(4.0),
                      found_inf=torch.tensor(0.0), maximize=True)
    # gather_masked: allocate, accumulate, dense
    src = torch.randn(50, 40, generator=gen).t()
    out = ops.gather_masked(src, pb, d)
    ops.gather_masked(src.to(bf), pb, d, out=out, accumulate=True)


def test_python_layer_calls_pass_the_cuda_checks(contract, gen, monkeypatch):
    mode = Replay(contract)
    with mode:
        _public_paths(gen, monkeypatch)
    assert not mode.refused, "calls the CPU op accepted but the CUDA checks refuse:\n" + "\n".join(mode.refused)
    # every op with a CUDA binding was exercised
    bound = set(re.findall(r'm\.impl\("(\w+)"', open(os.path.join(CSRC, "cuda", "bindings.cpp")).read()))
    assert bound == set(CONTRACT), f"bindings.cpp registers {sorted(bound)}; update CONTRACT and the contract ops"
    missing = {n for n in CONTRACT if not mode.calls.get(n)}
    assert not missing, f"the public paths never called {sorted(missing)}"
    # the default scoring call has no histogram (finding 1), and a mixed-dtype call is widened (finding 2)
    score_plans = mode.results["attribution_score_out"]
    assert [0] == sorted({r[3] for r in score_plans})[:1], "no call without a histogram was replayed"
    assert any(r[1] == 1 and r[2] == 0 for r in score_plans), "bf16 weight + mixed grads not widened to fp32"
    # with offsets, the table covers only the steps they reach (finding 3): at most max offset + 1 rows
    tables = [r for r in mode.results["masked_adamw_"] if r[3] > 0]
    assert tables and all(r[3] <= 4 for r in tables), tables
    # master weights reached the plan with their rounding mode (1 nearest, 2 stochastic) and a key
    plans = mode.results["masked_adamw_master_"]
    assert {r[5] for r in plans} == {1, 2} and all((r[6] != 0) == (r[5] == 2) for r in plans if r[0]), plans


def _adamw_args(n, bits, d, m_numel, step, offs=None):
    e32 = torch.empty(0, dtype=torch.int32)
    return ([torch.randn(n)], [torch.randn(n)], [torch.zeros(m_numel)], [torch.zeros(m_numel)], [],
            [torch.tensor(float(step))], [bits], [d], [e32 if offs is None else offs])


KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
          weight_decay_mode="masked")


def _both_refuse(contract, cpu_fn, contract_fn, *args, match=None, **kw):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match) as e_cpu:
        cpu_fn(*args, **kw)
    with pytest.raises(type(e_cpu.value), match=match):
        contract_fn(*args, **kw)


def test_cuda_checks_refuse_what_the_cpu_op_refuses(contract, gen):
    contract.cache_clear()
    n = 9000
    bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.5)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    nnz = int(d[-1])
    cpu, con = torch.ops.wagle.masked_adamw_, contract.masked_adamw
    # finding 4: a uniformly shifted directory (dir[0] != 0), state longer than the popcount, a chunk mismatch
    _both_refuse(contract, cpu, con, *_adamw_args(n, bits, d + 1, nnz + 1, 1), match="chunk_offsets", **KW)
    longer = d.clone()
    longer[-1] += 1
    _both_refuse(contract, cpu, con, *_adamw_args(n, bits, longer, nnz + 1, 1), match="chunk_offsets", **KW)
    _both_refuse(contract, cpu, con, *_adamw_args(n, bits, d, nnz + 1, 1), match="exp_avg", **KW)
    mism = d.clone()
    mism[1] += 1
    mism[2:] += 1
    with pytest.raises(ValueError, match="chunk_offsets"):  # CPU: raised after the kernel; CUDA: before it
        con(*_adamw_args(n, bits, mism, nnz + 1, 1), **KW)
    # finding 6: offsets checked against their own tensor's step, not the largest step of the list
    offs = torch.zeros(nnz, dtype=torch.int32)
    offs[7] = 5
    _both_refuse(contract, cpu, con, *_adamw_args(n, bits, d, nnz, 3, offs), match="step_offsets", **KW)
    neg = torch.zeros(nnz, dtype=torch.int32)
    neg[3] = -1
    a1 = _adamw_args(n, bits, d, nnz, 2, neg)
    a2 = _adamw_args(n, bits, d, nnz, 50, torch.zeros(nnz, dtype=torch.int32))
    two = tuple(x + y for x, y in zip(a1, a2))  # tensor 1 has step 50: offset -1 still refused for tensor 0
    _both_refuse(contract, cpu, con, *two, match="step_offsets", **KW)
    _both_refuse(contract, torch.ops.wagle.topk_mask_bits, contract.topk_mask_bits, [torch.randn(10)], 5, True, [-2],
                 match="ties_take")
    # attribution_score: a histogram of the wrong size, a missing g_r
    w = torch.randn(10)
    _both_refuse(contract, torch.ops.wagle.attribution_score_out, contract.attribution_score_out, w, w, w, None,
                 "wagle", 1e-6, 0.0, torch.empty(10), torch.zeros(7, dtype=torch.int64), match="hist")
    _both_refuse(contract, torch.ops.wagle.attribution_score_out, contract.attribution_score_out, w, w, None, None,
                 "wagle", 1e-6, 0.0, torch.empty(10), torch.zeros(0, dtype=torch.int64), match="grad_retain")
    # masked_adamw_master_: a short master list, a master of the wrong size, fp32 params, seeds without
    # masters or of the wrong count -- refused by both
    cpu_m, con_m = torch.ops.wagle.masked_adamw_master_, contract.masked_adamw_master
    pb16 = ([torch.randn(n).to(torch.bfloat16)], [torch.randn(n).to(torch.bfloat16)]) + _adamw_args(n, bits, d, nnz, 1)[2:]
    _both_refuse(contract, cpu_m, con_m, *pb16, [torch.zeros(nnz), torch.zeros(nnz)], match="master_weights", **KW)
    _both_refuse(contract, cpu_m, con_m, *pb16, [torch.zeros(nnz + 1)], match="master_weights", **KW)
    _both_refuse(contract, cpu_m, con_m, *_adamw_args(n, bits, d, nnz, 1), [torch.zeros(nnz)], match="bfloat16",
                 **KW)
    _both_refuse(contract, cpu_m, con_m, *pb16, [], rounding_seeds=[1], match="rounding_seeds", **KW)
    _both_refuse(contract, cpu_m, con_m, *pb16, [torch.zeros(nnz)], rounding_seeds=[1, 2], match="rounding_seeds",
                 **KW)
    # gather_masked_: out shorter than the popcount
    _both_refuse(contract, torch.ops.wagle.gather_masked_, contract.gather_masked, torch.zeros(nnz - 1),
                 torch.randn(n), bits, d, False, match="out must")


def test_validation_is_cached_per_tensor_version(contract, gen):
    contract.cache_clear()
    n = 20000
    bits = ref.pack_bits(torch.rand(n, generator=gen) < 0.3)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    nnz = int(d[-1])
    offs = torch.randint(0, 4, (nnz,), generator=gen, dtype=torch.int32)
    r1 = contract.masked_adamw(*_adamw_args(n, bits, d, nnz, 5, offs), **KW)
    r2 = contract.masked_adamw(*_adamw_args(n, bits, d, nnz, 6, offs), **KW)
    assert r1[4] == 1 and r2[4] == 0, (r1, r2)  # the second call reads nothing back from the device
    assert r2[2:4] == [6 - int(offs.max()), int(offs.max()) - int(offs.min()) + 1]  # rows [step-max, step-min]
    d[1:] += 0  # an in-place op bumps the version: checked again
    assert contract.masked_adamw(*_adamw_args(n, bits, d, nnz, 7, offs), **KW)[4] == 1
    bits[0] ^= 1  # the mask changed behind the directory: refused, not trusted from the cache
    with pytest.raises(ValueError, match="do not match the mask bits"):
        contract.masked_adamw(*_adamw_args(n, bits, d, nnz, 8, offs), **KW)
    with torch.inference_mode():  # no version counter: validated every call
        bi, di, oi = bits.clone(), ops.masked_adamw_chunk_offsets(bits.clone(), n), offs.clone()
        k = int(di[-1])
        oi = oi[:k] if k <= nnz else torch.cat([oi, oi])[:k]
        args = _adamw_args(n, bi, di, k, 8, oi)
        assert contract.masked_adamw(*args, **KW)[4] == 1 and contract.masked_adamw(*args, **KW)[4] == 1


def test_step_table_rows_equal_adamw_coeffs(contract):
    for lr, b1, b2, lo, hi in ((1e-2, 0.9, 0.999, 1, 40), (3e-4, 0.5, 0.99, 995, 1010), (1e-3, 0.9, 0.999, 2, 2)):
        got = contract.step_table(lr, b1, b2, lo, hi)
        want = contract.adamw_coeff_rows(lr, b1, b2, lo, hi)
        assert got.shape == (hi - lo + 1, 2) and torch.equal(got.view(torch.int32), want.view(torch.int32))
    # a training loop: the window slides with the step, the pow() rows are rebuilt about once per 256 steps
    before = contract.table_rebuilds()
    for step in range(2000, 2300):
        contract.step_table(1e-3 * (1 + step % 7), 0.9, 0.999, step - 900, step)
    assert contract.table_rebuilds() - before <= 3
