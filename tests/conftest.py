"""Shared pytest fixtures and helpers.

Backends under test: every back end that can run an op on CPU tensors here. ``cpp`` needs the
compiled extension; ``triton`` needs triton and runs under TRITON_INTERPRET=1 (set in that test
module before the kernels are imported).
"""
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
