"""Shared pytest fixtures and helpers.

Backends under test: every back end that can run an op on CPU tensors here. ``cpp`` needs the
compiled extension; ``triton`` needs triton and runs under TRITON_INTERPRET=1 (set in that test
module before the kernels are imported).
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


def cpu_backends(op: str) -> list:
    """Back ends that can run ``op`` on CPU tensors in this process (reference always)."""
    names = ["reference"]
    if ops._backend_has("cpp", op, torch.device("cpu")):
        names.append("cpp")
    return names


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("cpp") forces WAGLE_BACKEND for the rest of the test."""

    def _set(name: str):
        monkeypatch.setenv("WAGLE_BACKEND", name)

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
