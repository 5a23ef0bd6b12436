"""Fixtures shared by all tests."""

import os

import pytest


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
