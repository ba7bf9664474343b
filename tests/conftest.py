"""Shared pytest fixtures and helpers.

Back ends under test (docs/architecture.md, Testing): every op test module runs its op on each back
end available here, against the pure-PyTorch reference --

* ``reference``: always;
* ``cpp``: the compiled C++ CPU kernels (skipped when the extension is not built);
* ``triton``: on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1; keep those inputs
  small, about 0.5 ms per program); skipped when triton does not import;
* ``cuda``: the CUDA kernels, marked ``cuda`` and skipped without a GPU.

``backend_params(op, names)`` gives the pytest parameters; a test takes ``backend`` and calls
``use_backend(backend)`` so that the ``wagle_ext.ops`` entry points it calls run that back end,
``op_impl(op, backend)`` for the raw op of a back end, and ``backend_device(backend)`` for the device
its tensors must be on. GPU comparisons use the ``gpu_backend`` fixture (cuda and compiled Triton
on CUDA tensors, against the CPU result) and are marked ``cuda`` and ``cuda_only``.
"""
import json
import os

import torch

# Without a GPU, Triton only runs in its CPU interpreter. triton.jit picks interpreted vs compiled
# at decoration time -- including Triton's own standard library (tl.zeros, ...) when triton is
# first imported -- so the mode must be set before anything imports triton (transformers,
# accelerate or torch may, during collection). CPU back ends never pick Triton unless forced.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import wagle_ext  # noqa: E402
from wagle_ext import ops  # noqa: E402


GPU = torch.cuda.is_available()
ALL_BACKENDS = ("reference", "cpp", "triton", "cuda")


def _triton_kernels():
    from wagle_ext.kernels import triton as tk

    return tk


def backend_params(op: str, names=ALL_BACKENDS) -> list:
    """One ``pytest.param`` per back end in ``names`` (ids = the names), with a skip mark where the
    back end cannot run ``op`` here and the ``cuda`` mark on ``cuda``. Use as
    ``@pytest.mark.parametrize("backend", backend_params("radix_histogram", ("cpp", "triton")))``."""
    params = []
    for name in names:
        marks = []
        if name == "cpp" and not ops._backend_has("cpp", op, torch.device("cpu")):
            marks.append(pytest.mark.skip(reason=f"C++ extension not built ({ops._CPP_ERROR})"))
        elif name == "triton":
            tk = _triton_kernels()
            if not tk.AVAILABLE or not hasattr(tk, op):
                marks.append(pytest.mark.skip(reason=f"no Triton kernel for {op} ({tk.IMPORT_ERROR})"))
        elif name == "cuda":
            marks.append(pytest.mark.cuda)
            if not GPU or not ops._backend_has("cuda", op, torch.device("cuda")):
                marks.append(pytest.mark.skip(reason=f"no CUDA device or no CUDA kernel for {op}"))
        elif name not in ALL_BACKENDS:
            raise ValueError(f"unknown back end {name!r}")
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def backend_device(backend: str) -> torch.device:
    """Device of the tensors a back-end-parametrised test uses: CUDA for ``cuda``, else the CPU
    (``triton`` then runs in the interpreter; compiled Triton is covered by ``gpu_backend`` tests)."""
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")


def op_impl(op: str, backend: str):
    """The raw op of one back end (same positional signature everywhere, see csrc/ops.cpp)."""
    if backend == "reference":
        from wagle_ext.kernels import reference

        return getattr(reference, op)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.wagle, op)
    if backend == "triton":
        return getattr(_triton_kernels(), op)
    raise ValueError(f"unknown back end {backend!r}")


cuda_only = pytest.mark.skipif(not GPU, reason="no CUDA device: GPU tests skipped")


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request, monkeypatch):
    """A back end that runs on CUDA tensors (forced through WAGLE_BACKEND); skipped when unusable."""
    name = request.param
    if not GPU or not ops._backend_has(name, "attribution_score", torch.device("cuda")):
        pytest.skip(f"back end {name!r} not available for CUDA tensors here ({ops.backend_info()})")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WAGLE_BACKEND", name)
    return name


def run_on_cpu(fn, *args, **kwargs):
    """Run a public wagle_ext function on the CPU back end chosen by default (cpp, else reference)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("WAGLE_BACKEND", raising=False)
    try:
        return fn(*args, **kwargs)
    finally:
        mp.undo()


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors on any devices (NaN == NaN, -0.0 != +0.0)."""
    return a.shape == b.shape and torch.equal(a.detach().cpu().contiguous().view(torch.int32),
                                              b.detach().cpu().contiguous().view(torch.int32))


def cpu_backends(op: str) -> list:
    """Back ends that can run ``op`` on CPU tensors in this process (reference always)."""
    names = ["reference"]
    if ops._backend_has("cpp", op, torch.device("cpu")):
        names.append("cpp")
    return names


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("cpp") forces WAGLE_BACKEND for the rest of the test (Triton on the CPU: in the
    interpreter)."""

    def _set(name: str):
        monkeypatch.setenv("WAGLE_BACKEND", name)
        if name == "triton":  # CPU tensors: the interpreter (lazy_jit decides per launch)
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    return _set


# ------------------------------------------------------------------------------------------------
# Statistical tests (outcome depends on training dynamics): seeds, threads, recorded statistics
# ------------------------------------------------------------------------------------------------

def test_seed(offset: int = 0) -> int:
    """Seed of a statistical test's fixtures: ``WAGLE_TEST_SEED`` (default 0) plus ``offset``.

    CI runs seed 0; ``tools/stress_tests.sh`` reruns the statistical tests with other seeds and CPU
    configurations, and ``tools/calibrate_stats.py`` summarises the statistics they record."""
    return int(os.environ.get("WAGLE_TEST_SEED", "0")) + offset


test_seed.__test__ = False  # not a test, despite the name


def test_threads() -> int:
    """Threads for statistical fixtures: ``OMP_NUM_THREADS`` when set, else 2. Pinned so that a
    many-core CI machine runs the same reduction orders as the 2-core machines the bounds were
    calibrated on."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "2")))


test_threads.__test__ = False


@pytest.fixture(scope="module")
def pinned_threads():
    """``torch.set_num_threads(test_threads())`` for a module's statistical fixtures, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(test_threads())
    yield test_threads()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models, restored after: threads only add
    synchronisation there, and on a shared 2-core machine spinning OpenMP workers made such modules
    ~10x slower under load. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def record_stat(request):
    """record_stat(name, value): keep a statistic that a threshold bounds.

    It is attached to the test report (printed with the seed when the test fails) and, when
    ``WAGLE_STATS_FILE`` is set, appended as one JSON line with the seed and CPU configuration, for
    tools/calibrate_stats.py to summarise across seeds and configurations."""
    assert request.node.get_closest_marker("statistical") is not None, (
        "a test that records bounded statistics must be marked @pytest.mark.statistical, so the stress "
        "script reruns it for every seed")
    request.node.user_properties.append(("seed", test_seed()))

    def _record(name: str, value: float) -> None:
        value = float(value)
        request.node.user_properties.append((name, value))
        path = os.environ.get("WAGLE_STATS_FILE")
        if path:
            row = {"test": request.node.nodeid, "stat": name, "value": value, "seed": test_seed(),
                   "threads": test_threads(), "aten_cpu": os.environ.get("ATEN_CPU_CAPABILITY", ""),
                   "wagle_isa": os.environ.get("WAGLE_CPU_ISA", "")}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return _record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test prints the seeds and statistics it recorded (``gen``, ``record_stat``)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.user_properties:
        report.sections.append(("seeds and statistics", "\n".join(f"{k} = {v}" for k, v in item.user_properties)))


@pytest.fixture
def gen(request):
    """A torch.Generator seeded freshly per test (seed printed on failure via the test id)."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    g = torch.Generator().manual_seed(seed)
    return g


def pytest_report_header(config):
    return f"wagle_ext backends: {wagle_ext.backend_info()}"


def require_cpp():
    if not ops.HAS_CPP:
        if os.environ.get("CI") == "true" and os.environ.get("WAGLE_NO_EXT") != "1":
            pytest.fail("the C++ extension did not load in CI: " + str(ops._CPP_ERROR))
        pytest.skip("C++ extension not built")


def run_triton_compile_script(script: str):
    """Run ``script`` (argv[1] = the repository root) in a fresh interpreter without
    TRITON_INTERPRET, so Triton compiles for a GPU target (its bundled ptxas; no GPU needed). Skips
    when Triton cannot compile for CUDA here; returns the CompletedProcess otherwise."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", script, root], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip(f"Triton cannot compile for CUDA here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return r
