"""benchmarks/bench_build.py plumbing: a checkpoint directory it writes is one the harness and
transformers both read, and both of its measurements run from it."""
from __future__ import annotations

SCRIPT = "benchmarks/bench_build.py"


def test_a_checkpoint_written_for_the_benchmark_feeds_the_plain_run_and_the_build(load_file, tmp_path,
                                                                                   monkeypatch) -> None:
    import harness
    from harness.weights import WeightsSource, load_weights, weights_digest
    from harness.weights.synthetic import synthetic_weights

    bench = load_file(SCRIPT)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)  # the file's settling pause
    ckpt = tmp_path / "ckpt"
    bench.make_checkpoint("qwen2.5-0.5b", "tiny", str(ckpt))
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    read, want = load_weights(spec, WeightsSource(str(ckpt))), synthetic_weights(spec, 0)
    assert sorted(read) == sorted(want)
    assert all((read[k] == want[k]).all() for k in want)  # bf16 on disk, exact: the synthetic values
    digest = weights_digest(spec, WeightsSource(str(ckpt)), 0)
    bench.make_checkpoint("qwen2.5-0.5b", "tiny", str(ckpt))  # there already: left as it is
    assert weights_digest(spec, WeightsSource(str(ckpt)), 0) == digest

    plain = bench.plain("qwen2.5-0.5b", "tiny", 8, 2, str(ckpt))
    assert plain["gen"] < plain["construct"] and plain["fwd"] > 0
    built = bench.build("qwen2.5-0.5b", "tiny", 8, 2, "full", str(ckpt))
    assert built["build"] > 0 and built["disk_gb"] > 0


def test_every_part_of_the_build_runs_from_the_checkpoint(load_file, tmp_path, monkeypatch) -> None:
    bench = load_file(SCRIPT)
    parts = load_file("benchmarks/bench_build_parts.py")
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    ckpt = tmp_path / "ckpt"
    bench.make_checkpoint("qwen3-0.6b", "tiny", str(ckpt))
    for dtype in ("fp32", "bf16"):
        for row in parts.ROWS:
            r = parts.run_one(str(ckpt), "qwen3-0.6b", "tiny", 8, 2, "full", dtype, row)
            assert r["run"] > 0 and r["cpu"] > 0 and r["construct"] >= 0, (dtype, row)
    r = parts.run_one(str(ckpt), "qwen3-0.6b", "tiny", 300, 1, "sampled", "fp32", "streamed+written")
    assert r["run"] > 0  # a long prompt's sampled rows written, as its build writes them


def test_a_later_build_reads_the_digest_an_earlier_process_kept(tmp_path) -> None:
    """``--digest-cache kept``: the checkpoint is hashed once before the timed build, which reads it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / SCRIPT), "--scale", "tiny", "--prompt-len", "8",
                          "--decode-steps", "1", "--skip-plain", "--checkpoint", str(tmp_path),
                          "--digest-cache", "kept"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "checkpoint digest: kept" in out.stdout and "qwen2.5-0.5b   this" in out.stdout
    assert not list(tmp_path.glob("bench-digests-*"))  # its digest caches are removed


def test_the_plain_run_in_bounded_memory_offloads_what_does_not_fit(load_file, tmp_path, monkeypatch) -> None:
    """``--plain-memory``: the plain forwards run as transformers runs a model larger than its memory (layers
    offloaded to disk through accelerate), and each offload folder is removed after its run."""
    bench = load_file(SCRIPT)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    ckpt = tmp_path / "ckpt"
    bench.make_checkpoint("qwen3-0.6b", "tiny", str(ckpt))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(bench.tempfile, "tempdir", None)  # the offload folders go under tmp_path
    whole = bench.plain("qwen3-0.6b", "tiny", 8, 2, str(ckpt))
    bounded = bench.plain("qwen3-0.6b", "tiny", 8, 2, str(ckpt), memory="64KiB")
    assert whole["offloaded"] == 0 and bounded["offloaded"] > 0  # a tiny model's layers do not fit in 64 KiB
    assert bounded["fwd"] > 0 and bounded["construct"] > 0
    assert not list(tmp_path.glob("bench-offload-*"))  # each dtype's offload folder is removed


def test_plain_memory_is_refused_without_what_it_needs(load_file, capsys, monkeypatch) -> None:
    import importlib.util
    import sys

    import pytest

    bench = load_file(SCRIPT)

    def refused(argv: list[str]) -> str:
        monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
        with pytest.raises(SystemExit) as exc:
            bench.main()
        assert exc.value.code == 2
        return capsys.readouterr().err

    assert "needs --checkpoint" in refused(["--plain-memory", "4GiB"])
    assert "--skip-plain leaves out" in refused(["--plain-memory", "4GiB", "--checkpoint", "x", "--skip-plain"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    assert "pip install accelerate" in refused(["--plain-memory", "4GiB", "--checkpoint", "x"])
