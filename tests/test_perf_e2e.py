"""End to end: the per-model perf suite under pytest-benchmark, then `harness perf compare`.

A deployment made 10x slower by the emulator's slowdown knob must exit 2. The 15% case is measured in
docs/performance.md on an idle machine; here the other xdist worker's load can move the base run's own
times by 2-3x between the two runs, so only a wide margin keeps the test meaningful and stable.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    # pytest-benchmark disables itself under xdist, which it detects through these variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["NPU_HARNESS_GOLDEN_DIR"] = str(tmp_path / "golden")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", str(ROOT / "models" / "qwen3_0_6b"),
                          "-m", "perf", "--benchmark-save-data", f"--benchmark-json={out}", *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return out


def test_slowed_deployment_is_a_regression(tmp_path):
    base = _bench(tmp_path, "base")
    slow = _bench(tmp_path, "slow", "--deployment", "emulator[slowdown=10.0]")
    harness_bin = Path(sys.executable).with_name("harness")
    res = subprocess.run([str(harness_bin), "perf", "compare", str(base), str(slow)], capture_output=True, text=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "regression" in res.stdout and "ttft" in res.stdout and "tpot" in res.stdout
