"""Test setup shared by every package.

Without a GPU the Triton kernels run under the Triton interpreter, which must be switched on before
triton is first imported; tests marked ``gpu`` need CUDA and are skipped without it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _environ_is_not_replaced():
    """``datasets``' ``map(num_proc=...)`` replaces ``os.environ`` with a copy of itself. A test's
    ``monkeypatch.setenv``/``delenv`` then restores into the old object, and the change outlives the
    test (a removed TRITON_INTERPRET made later tests refuse flash on the CPU). Put the original back."""
    original = os.environ
    yield
    if os.environ is not original:
        os.environ = original
