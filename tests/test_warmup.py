"""``python -m harness.warmup`` (run by scripts/setup.sh) compiles every numba kernel variant a gate runs,
so a fresh install's first gate - and every process a clean checkout's tests start - compiles none."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CODE = """
import json, sys
import numba
from harness.compare import kernel
from harness.deployment.emulator import kernels as emulator_kernels
from harness.warmup import compile_kernels

def compiled():
    out = set()
    for module in (kernel, emulator_kernels):
        for name in dir(module):
            fn = getattr(module, name)
            if isinstance(fn, numba.core.registry.CPUDispatcher):
                out.update((name, str(sig)) for sig in fn.overloads)
    return out

compile_kernels()
warmed = compiled()
import harness
verdict = harness.check("qwen3-0.6b", "emulator", decode_steps=2, mode="isolated", golden_dir=sys.argv[1],
                        isolation="inline")
print(json.dumps({"passed": verdict.passed, "warmed": len(warmed), "new": sorted(map(list, compiled() - warmed))}))
"""


def test_a_gate_after_the_warm_up_compiles_no_kernel(golden_root: Path) -> None:
    # A process of its own: this worker's dispatchers already hold whatever earlier tests compiled.
    out = subprocess.run([sys.executable, "-c", CODE, str(golden_root)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["passed"] and result["warmed"] >= 5  # the entry points (callees are compiled into them)
    assert result["new"] == []  # every specialisation the check needed was compiled by the warm-up


def test_the_warm_up_never_fails_the_set_up(monkeypatch, capsys) -> None:
    """Set-up must not fail because the warm-up could not run: the first gate then compiles instead."""
    from harness import warmup

    def broken() -> float:
        raise OSError("read-only package directory")

    monkeypatch.setattr(warmup, "compile_kernels", broken)
    assert warmup.main() == 0
    assert "read-only package directory" in capsys.readouterr().err
