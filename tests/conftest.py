"""Shared fixtures of the harness's own tests: one golden store per test session, a module of broken deployments."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def golden_root(tmp_path_factory):
    """A session-wide golden store directory, so each golden is built once per test run."""
    return tmp_path_factory.mktemp("golden")


@pytest.fixture(scope="session")
def store(golden_root):
    from harness.store import GoldenStore

    return GoldenStore(golden_root)


@pytest.fixture
def bad_deployments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of broken deployments on sys.path: raising, tapping nothing, failing to import."""
    (tmp_path / "bad_deps.py").write_text(textwrap.dedent("""
        import numpy as np

        class Raises:
            def prefill(self, ids, tap):
                raise RuntimeError("kernel timed out")
            def decode(self, tok, tap):
                raise RuntimeError("kernel timed out")

        class Silent:
            def __init__(self, spec):
                self.v = spec.vocab_size
            def prefill(self, ids, tap):
                return np.zeros((len(ids), self.v), np.float32)
            def decode(self, tok, tap):
                return np.zeros((1, self.v), np.float32)

        def raises(spec, weights):
            return Raises()

        def silent(spec, weights):
            return Silent(spec)
    """))
    (tmp_path / "broken_dep.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_deps"
