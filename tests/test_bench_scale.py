"""benchmarks/bench_scale.py plumbing: the process tree's peak memory, the commands it runs, the table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPT = "benchmarks/bench_scale.py"


def test_peak_memory_counts_the_child_processes(load_file) -> None:
    """A parent holding ~100 MB that starts a child holding ~100 MB peaks at their sum, not at either."""
    bench = load_file(SCRIPT)
    hold = "import numpy, time; a = numpy.ones(13_000_000); time.sleep({})"
    code = (f"import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', {hold.format(1.0)!r}]); "
            f"exec({hold.format(0)!r}); c.wait()")
    out = bench.run_measured([sys.executable, "-c", code], timeout=60)
    assert out["exit"] == 0 and out["peak_gb"] >= 0.19, out


def test_peak_memory_counts_a_shared_segment_once(load_file) -> None:
    """A 200 MB shared-memory segment touched by a parent and its child (how a large tap crosses) is
    physical memory once: the tree's PSS sum, not the RSS sum that counted it in both."""
    bench = load_file(SCRIPT)
    child = ("import sys, time, numpy; from multiprocessing import shared_memory; "
             "s = shared_memory.SharedMemory(name=sys.argv[1]); numpy.frombuffer(s.buf, numpy.uint8).sum(); "
             "time.sleep(1.5); s.close()")
    code = ("import subprocess, sys, numpy; from multiprocessing import shared_memory; "
            "s = shared_memory.SharedMemory(create=True, size=200_000_000); "
            "numpy.frombuffer(s.buf, numpy.uint8)[:] = 1; "
            f"subprocess.run([sys.executable, '-c', {child!r}, s.name]); s.close()")  # the child's tracker unlinks it
    out = bench.run_measured([sys.executable, "-c", code], timeout=60)
    assert out["exit"] == 0 and 0.2 <= out["peak_gb"] < 0.36, out


def test_commands_options_and_table(load_file, tmp_path, monkeypatch, capsys) -> None:
    bench = load_file(SCRIPT)
    calls: list[list[str]] = []

    def fake_run(cmd, timeout, log=None):
        calls.append(cmd)
        if "gate" in cmd:  # the gate's --json document: 80 of its 100 s inside the deployment's calls
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(
                {"models": [{"elapsed_s": 100.0, "deployment_s": 80.0}]}))
        return {"seconds": 12.5, "peak_gb": 3.25, "exit": 0}

    monkeypatch.setattr(bench, "run_measured", fake_run)
    monkeypatch.setattr(bench, "plain_seconds", lambda *a, **k: (10.0, 25.0))
    rows = bench.main(["--models", "qwen3-0.6b,llama-3.2-1b", "--prompt-lens", "128,2048", "--decode-steps", "32",
                       "--rows", "sampled", "--golden-dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert [(r["model"], r["tokens"]) for r in rows] == [("qwen3-0.6b", 128), ("qwen3-0.6b", 2048),
                                                         ("llama-3.2-1b", 128), ("llama-3.2-1b", 2048)]
    build, gate = calls[0], calls[1]
    assert build[build.index("golden"):build.index("golden") + 8] == [
        "golden", "build", "--model", "qwen3-0.6b", "--scale", "full", "--prompt-len", "128"]
    for cmd in (build, gate):
        assert ["--rows", "sampled"] == cmd[cmd.index("--rows"):cmd.index("--rows") + 2]
        assert cmd[cmd.index("--decode-steps") + 1] == "32" and cmd[cmd.index("--golden-dir") + 1] == str(tmp_path)
    assert "gate" in gate and gate[gate.index("--phase") + 1] == "5" and "cumulative" in gate
    assert rows[0]["ratio"] == 1.25 and rows[0]["ratio_run"] == 0.5 and rows[0]["gate_gb"] == 3.25
    assert rows[0]["gate_own"] == 0.2 and not list(tmp_path.glob(".bench-gate-*"))
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    printed = capsys.readouterr().out
    assert "model | tokens | build GB" in printed and "llama-3.2-1b | 2048 | 3.25 | 12.5 | 1.25 | 0.5 | 3.25 | 12.5 | 0.2 | 0" in printed


def test_plain_forwards_skipped_when_they_would_not_fit(load_file, tmp_path, monkeypatch) -> None:
    bench = load_file(SCRIPT)
    monkeypatch.setattr(bench, "run_measured", lambda cmd, timeout, log=None: {"seconds": 1.0, "peak_gb": 1.0, "exit": 0})
    monkeypatch.setattr(bench, "plain_seconds", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    rows = bench.main(["--models", "qwen3-4b", "--prompt-lens", "128", "--plain-max-gb", "12",
                       "--golden-dir", str(tmp_path)])
    # 16 GB of fp32 weights: skipped
    assert rows[0]["plain_s"] is None and rows[0]["ratio"] is None and rows[0]["ratio_run"] is None


def test_the_tree_is_read_from_children_files_and_pss_only_near_the_peak(load_file, monkeypatch) -> None:
    """The poller lists the tree from /proc/PID/task/*/children and reads the costly PSS only when the RSS
    sum (an upper bound) could beat the peak so far."""
    import os
    import subprocess

    bench = load_file(SCRIPT)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        assert child.pid in bench._children_of(me)
        assert child.pid in bench.process_tree(me)
        reads: list[int] = []
        real = bench._pss_bytes
        monkeypatch.setattr(bench, "_pss_bytes", lambda pid: reads.append(pid) or real(pid))
        first = bench.peak_step(me, 0)
        assert first > 0 and child.pid in reads
        reads.clear()
        assert bench.peak_step(me, 1 << 50) == 1 << 50 and reads == []  # RSS under the peak: no PSS read
    finally:
        child.kill()
        child.wait()
