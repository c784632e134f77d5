"""Shared fixtures of the harness's own tests: one golden store per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def golden_root(tmp_path_factory):
    """A session-wide golden store directory, so each golden is built once per test run."""
    return tmp_path_factory.mktemp("golden")


@pytest.fixture(scope="session")
def store(golden_root):
    from harness.store import GoldenStore

    return GoldenStore(golden_root)
