"""The worked examples under examples/ stay green through `harness gate`, as a user runs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gate(tmp_path: Path, deployment: str, model: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness", "gate", "--model", model, "--deployment", deployment,
           "--phase", "3", "--golden-dir", str(tmp_path / "golden"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model", ["llama-3.2-1b", "qwen3-0.6b"])
def test_torch_functions_adapter_passes_the_gate(tmp_path: Path, model: str) -> None:
    res = _gate(tmp_path, "examples/torch_functions_adapter.py:factory", model)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout


def test_factory_keyword_arguments_reach_the_factory(tmp_path: Path) -> None:
    res = _gate(tmp_path, "examples/torch_functions_adapter.py:factory[dtype=float32]", "qwen2.5-0.5b")
    assert res.returncode == 0, res.stdout + res.stderr
    bad = _gate(tmp_path, "examples/torch_functions_adapter.py:factory[colour=red]", "qwen2.5-0.5b")
    assert bad.returncode == 3 and "colour" in bad.stdout + bad.stderr


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "qwen3-0.6b"])
def test_numpy_decoder_passes_the_gate(tmp_path: Path, model: str) -> None:
    res = _gate(tmp_path, "examples/numpy_decoder.py:factory", model)
    assert res.returncode == 0, res.stdout + res.stderr
