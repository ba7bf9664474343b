"""Shared pytest fixtures and helpers.

Backends under test: every back end that can run an op on CPU tensors here. ``cpp`` needs the
compiled extension; ``triton`` needs triton and runs under TRITON_INTERPRET=1 (set in that test
module before the kernels are imported).
"""
import os

import pytest
import torch

import wagle_ext
from wagle_ext import ops


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
