"""Performance history in SQLite (harness.perf.history)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.perf import history
from harness.perf.benchjson import BenchFile, Series


def bench_file(scale: float, seed: int, when: str, model: str = "qwen3-0.6b") -> BenchFile:
    rng = np.random.default_rng(seed)
    ttft = tuple(float(x) for x in 0.2 * scale * np.exp(rng.normal(0, 0.01, 10)))
    tps = tuple(float(x) for x in 60.0 / scale * np.exp(rng.normal(0, 0.01, 10)))
    return BenchFile(f"run{seed}.json", when, {"cpu_model": "test"}, {"id": "feed", "dirty": True}, (
        Series("t::ttft", model, "emulator", "ttft", "s", "lower", ttft),
        Series("t::decode", model, "emulator", "decode_tps", "tok/s", "higher", tps),
    ))


def fill(hist: history.History, scales: list[float]) -> list[int]:
    return [hist.record(bench_file(s, i, f"2026-05-{i + 1:02d}T00:00:00+00:00"), commit=f"c{i}", dirty=False)
            for i, s in enumerate(scales)]


def test_round_trip_and_verdicts(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    with history.History(url) as hist:
        ids = fill(hist, [1.0, 1.0, 1.0, 1.3])
    with history.History(url) as hist:  # a fresh connection reads what the first wrote
        points = hist.trend("qwen3-0.6b")
    assert [p.run_id for p in points if p.metric == "ttft"] == ids
    ttft = [p for p in points if p.metric == "ttft"]
    assert ttft[0].verdict is None  # nothing to compare the first run with
    assert [p.verdict for p in ttft[1:]] == ["unchanged", "unchanged", "regression"]
    tps = [p for p in points if p.metric == "decode_tps"]
    assert tps[-1].verdict == "regression" and tps[-1].unit == "tok/s" and tps[-1].direction == "higher"
    assert ttft[0].commit == "c0" and ttft[0].dirty is False and len(ttft[0].samples) == 10
    assert ttft[0].time.year == 2026 and ttft[0].time.tzinfo is not None


def test_trend_filters(tmp_path):
    with history.History(f"sqlite:///{tmp_path / 'h.sqlite'}") as hist:
        fill(hist, [1.0] * 5)
        hist.record(bench_file(1.0, 9, "2026-06-01T00:00:00", model="llama-3.2-1b"))
        assert {p.metric for p in hist.trend("qwen3-0.6b", metric="ttft")} == {"ttft"}
        last = hist.trend("qwen3-0.6b", last=2)
        assert len(last) == 4 and {p.commit for p in last} == {"c3", "c4"}
        assert hist.trend("qwen3-0.6b", deployment="npu") == []
        assert [p.model for p in hist.trend("llama-3.2-1b")] == ["llama-3.2-1b"] * 2


def test_default_url_env_and_postgres_driver(monkeypatch):
    monkeypatch.delenv(history.ENV_URL, raising=False)
    assert history.resolve_url() == "sqlite:///reports/history.sqlite"
    monkeypatch.setenv(history.ENV_URL, "sqlite:///x.db")
    assert history.resolve_url() == "sqlite:///x.db"
    assert history.resolve_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert history.resolve_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_default_location_is_under_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(history.ENV_URL, raising=False)
    with history.History() as hist:
        hist.record(bench_file(1.0, 0, "2026-05-01T00:00:00"), commit="x", dirty=False)
    assert (tmp_path / "reports" / "history.sqlite").is_file()


def test_bad_url_is_a_harness_error_naming_it():
    with pytest.raises(HarnessError, match="nosuchdialect"):
        history.History("nosuchdialect://x")
    with pytest.raises(HarnessError, match=r"\*\*\*"):  # the password is masked
        history.History("postgresql://u:secret@127.0.0.1:1/db?connect_timeout=2")


def test_git_state(tmp_path):
    assert history.git_state(tmp_path) == (None, None)
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f").write_text("1")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    commit, dirty = history.git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "f").write_text("2")
    assert history.git_state(tmp_path) == (commit, True)


def test_record_takes_commit_from_git_then_the_file(tmp_path):
    with history.History(f"sqlite:///{tmp_path / 'h.sqlite'}") as hist:
        hist.record(bench_file(1.0, 0, "2026-05-01T00:00:00"), cwd=tmp_path)  # not a git checkout
        (p, *_) = hist.trend("qwen3-0.6b")
    assert (p.commit, p.dirty) == ("feed", True)
