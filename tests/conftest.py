"""Fixtures shared by all tests; Triton kernels run in its interpreter (on CPU tensors)."""

import os

import pytest

# Triton decides at decoration time whether a kernel is compiled or interpreted, so this must
# come before maskrcnn's kernel modules are imported. The kernels' tests (named *triton*) run
# them on CPU tensors, at small sizes, so interpreted also where a GPU is present (the compiled
# kernels are checked on the GPU by maskrcnn-check, in its own process; tools/compile_kernels.py
# compiles them for GPUs without one).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One synthetic-data cache for the session (MASKRCNN_CACHE)."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MASKRCNN_CACHE")
    os.environ["MASKRCNN_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["MASKRCNN_CACHE"]
    else:
        os.environ["MASKRCNN_CACHE"] = old
