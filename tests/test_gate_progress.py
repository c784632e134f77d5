"""harness gate --progress: a line on stderr per phase start and end and per golden-build stage; stdout
keeps the verdict alone; off when stderr is not a terminal unless asked for."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from harness.cli.progress import GateProgress
from harness.suites.gate import run_gate
from harness.suites.phases import FAIL, PhaseOutcome

MODEL = "qwen3-0.6b"
LINE = re.compile(r"^\[\d+:\d\d:\d\d\] ")


def _gate(golden_dir: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("harness")
    return subprocess.run([str(exe), "gate", "--model", MODEL, "--golden-dir", str(golden_dir), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


def test_progress_names_every_phase_and_the_build_on_stderr(tmp_path: Path) -> None:
    proc = _gate(tmp_path / "store", "--phase", "5", "--decode-steps", "1", "--progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if LINE.match(ln)]
    said = [LINE.sub("", ln) for ln in lines]
    # The fresh store builds the golden inside phase 0, stage by stage.
    assert f"{MODEL} golden build: fp32 reference (1/4)" in said and f"{MODEL} golden build: done (4/4)" in said
    events = [s for s in said if " phase " in s]
    for n, name in enumerate(("sanity", "ops", "block", "prefill", "prefill-perf", "decode")):
        start = events.index(f"{MODEL} phase {n} {name}: started")
        end = next(i for i, s in enumerate(events) if s.startswith(f"{MODEL} phase {n} {name}: ") and i > start)
        assert re.fullmatch(rf"{MODEL} phase {n} {name}: (pass|measured) in \d+ s(: .+)?", events[end]), events[end]
        assert end == start + 1  # phases run one after the other
    assert "PASS gate" in proc.stdout  # the verdict stays on stdout
    assert not any(LINE.match(ln) for ln in proc.stdout.splitlines())


def test_no_progress_when_stderr_is_not_a_terminal(golden_root: Path) -> None:
    proc = _gate(golden_root, "--phase", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started" not in proc.stderr and not any(LINE.match(ln) for ln in proc.stderr.splitlines())


def test_a_failing_phase_ends_with_its_status_and_cause(golden_root: Path) -> None:
    events: list[tuple[int, str | None]] = []
    result = run_gate(MODEL, phase=3, faults=("skipped_residual",), golden_dir=golden_root, isolation="inline",
                      on_phase=lambda model, n, out: events.append((n, None if out is None else out.status)))
    assert result.exit_code == 1
    assert [n for n, _ in events] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s is None for _, s in events] == [True, False] * 4  # each phase starts, then ends
    assert events[1] == (0, "pass") and events[5] == (2, "fail") and events[7] == (3, "fail")
    assert {n: s for n, s in events if s} == {n: o.status for n, o in result.outcomes.items()}


def test_reporter_lines() -> None:
    clock = iter([100.0, 100.0, 3825.4, 3900.0]).__next__
    out = io.StringIO()
    rep = GateProgress(out, clock=clock)
    rep.phase("qwen3-4b", 3, None)
    rep.phase("qwen3-4b", 3, PhaseOutcome(3, FAIL, message="x" * 500, seconds=3725.4))
    rep.build("local bf16 baseline", 0, 2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[0:00:00] qwen3-4b phase 3 prefill: started"
    assert lines[1] == "[1:02:05] qwen3-4b phase 3 prefill: fail in 3725 s: " + "x" * 200
    assert lines[2] == "[1:03:20] qwen3-4b golden build: local bf16 baseline (0/2)"
