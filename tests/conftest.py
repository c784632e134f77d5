"""Shared fixtures of the harness's own tests: one golden store per test session, a module of broken deployments."""
from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_file():
    """Import a Python file as a module by its path from the repository root (a benchmarks/ script, or
    another test file's helpers): --import-mode=importlib leaves tests no sibling imports."""
    def load(relative: str):
        path = REPO / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module

    return load


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
