"""The installed wheel works outside the repository: build it, install it non-editable into a fresh venv,
and run ``harness gate`` there from a directory that is not the repository.

To avoid reinstalling torch, the fresh venv sees this venv's site-packages through a ``.pth`` line
(a directory added by a ``.pth`` line is not a site dir: its own ``.pth`` files - the editable install's
finder among them - are not run), so ``harness`` itself can only come from the wheel; the test asserts
that ``harness.__file__`` lies inside the fresh venv.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import harness

REPO = Path(harness.__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_non_editable_and_gates_outside_the_repo(tmp_path: Path, golden_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NPU_HARNESS_GOLDEN_DIR")}
    env["COLUMNS"] = "200"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "harness", src / "harness", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], tmp_path, env)
    wheel = next(dist.glob("npu_harness-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp_path, env)
    fresh_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           tmp_path, env).stdout.strip())
    (fresh_site / "zz_shared_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import harness, harness.models as m; print(harness.__file__); "
                                 "print(m.get('qwen3-0.6b').hidden_size)"], elsewhere, env).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(venv.resolve()), where
    assert int(where[1]) == 1024  # the packaged config, not "model config missing"
    cache_env = dict(env, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    root = _run([str(py), "-c", "from harness.store.golden import default_root; print(default_root())"],
                elsewhere, cache_env).stdout.strip()
    assert Path(root) == tmp_path / "xdg" / "npu-harness" / "golden"  # never inside the venv

    # What a wheel's user runs after installing it (scripts/setup.sh does it for a checkout): the kernels
    # compile into the installed package's own cache (tests/test_warmup.py checks that a gate after it
    # compiles nothing more).
    warm = _run([str(py), "-m", "harness.warmup"], elsewhere, env, timeout=600)
    assert "kernels ready" in warm.stdout, warm.stdout + warm.stderr

    out = tmp_path / "gate.json"
    proc = subprocess.run([str(venv / "bin" / "harness"), "gate", "--model", "qwen3-0.6b", "--scale", "tiny",
                           "--phase", "3", "--golden-dir", str(golden_root), "--json", str(out)],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["passed"] and [p["status"] for p in doc["models"][0]["phases"]] == ["pass"] * 4
    assert not (elsewhere / "golden").exists()  # nothing written next to the caller
