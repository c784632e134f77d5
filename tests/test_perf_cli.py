"""``harness perf`` (harness.cli.perf.perf_app) through typer's CliRunner, and end to end with pytest-benchmark."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli.perf import parse_fraction, perf_app
from harness.errors import HarnessError

runner = CliRunner()


def bench_json(path, scale: float, seed: int, n: int = 10, with_data: bool = True, when: str | None = None):
    rng = np.random.default_rng(seed)
    ttft = (0.2 * scale * np.exp(rng.normal(0, 0.01, n))).tolist()
    tpot = (0.01 * scale * np.exp(rng.normal(0, 0.01, n))).tolist()
    stats = {"mean": float(np.mean(ttft)), "rounds": n}
    if with_data:
        stats["data"] = ttft
    doc = {"machine_info": {"node": "t"}, "commit_info": {"id": "abc", "dirty": False},
           "datetime": when or "2026-05-01T00:00:00+00:00",
           "benchmarks": [
               {"name": "test_ttft", "fullname": "m.py::test_ttft", "params": None, "stats": stats,
                "extra_info": {"model": "qwen3-0.6b", "deployment": "emulator", "metric": "ttft", "unit": "s"}},
               {"name": "test_tpot", "fullname": "m.py::test_tpot", "params": None, "stats": {"data": [1.0] * n},
                "extra_info": {"model": "qwen3-0.6b", "deployment": "emulator", "metric": "tpot", "unit": "s",
                               "samples": tpot,
                               "metrics": {"decode_tps": {"unit": "tok/s", "samples": [1 / t for t in tpot]}}}},
           ]}
    path.write_text(json.dumps(doc))
    return str(path)


def test_compare_regression_exits_2_and_writes_json(tmp_path):
    base, cand = bench_json(tmp_path / "b.json", 1.0, 0), bench_json(tmp_path / "c.json", 1.15, 1)
    out = tmp_path / "out" / "perf.json"
    res = runner.invoke(perf_app, ["compare", base, cand, "--json", str(out)])
    assert res.exit_code == 2, res.output
    assert "regression" in res.output
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "regression" and doc["exit_code"] == 2 and doc["threshold"] == 0.05
    verdicts = {r["metric"]: r["verdict"] for r in doc["results"]}
    assert verdicts == {"ttft": "regression", "tpot": "regression", "decode_tps": "regression"}
    tps = next(r for r in doc["results"] if r["metric"] == "decode_tps")
    assert tps["direction"] == "higher" and tps["slowdown"] == pytest.approx(0.15, abs=0.03)


def test_compare_unchanged_exits_0_and_improvement_too(tmp_path):
    base, same = bench_json(tmp_path / "b.json", 1.0, 0), bench_json(tmp_path / "s.json", 1.0, 1)
    assert runner.invoke(perf_app, ["compare", base, same]).exit_code == 0
    faster = bench_json(tmp_path / "f.json", 0.8, 2)
    res = runner.invoke(perf_app, ["compare", base, faster, "--json", str(tmp_path / "j.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "j.json").read_text())["verdict"] == "improvement"


def test_threshold_option(tmp_path):
    base, cand = bench_json(tmp_path / "b.json", 1.0, 0), bench_json(tmp_path / "c.json", 1.15, 1)
    assert runner.invoke(perf_app, ["compare", base, cand, "--threshold", "20%"]).exit_code == 0
    assert runner.invoke(perf_app, ["compare", base, cand, "--threshold", "0.1", "--alpha", "0.001"]).exit_code == 2
    res = runner.invoke(perf_app, ["compare", base, cand, "--threshold", "five"])
    assert res.exit_code == 3 and "--threshold" in res.output


def test_too_few_samples_is_inconclusive_exit_3(tmp_path):
    base, cand = bench_json(tmp_path / "b.json", 1.0, 0, n=5), bench_json(tmp_path / "c.json", 2.0, 1, n=5)
    res = runner.invoke(perf_app, ["compare", base, cand])
    assert res.exit_code == 3 and "more samples" in res.output


@pytest.mark.parametrize("problem", ["missing", "not-json", "no-data"])
def test_unusable_files_exit_3_naming_the_file(tmp_path, problem):
    base = bench_json(tmp_path / "b.json", 1.0, 0)
    bad = tmp_path / "bad.json"
    if problem == "not-json":
        bad.write_text("{")
    elif problem == "no-data":
        bench_json(bad, 1.0, 0, with_data=False)
    res = runner.invoke(perf_app, ["compare", base, str(bad)])
    assert res.exit_code == 3 and "bad.json" in res.output
    if problem == "no-data":
        assert "--benchmark-save-data" in res.output


def test_usage_errors_exit_3_not_2(tmp_path):
    assert runner.invoke(perf_app, ["compare", "--no-such-option"]).exit_code == 3
    assert runner.invoke(perf_app, ["compare"]).exit_code == 3
    assert runner.invoke(perf_app, ["history"]).exit_code == 3  # --model is required


def test_nothing_matched_exits_3(tmp_path):
    base = bench_json(tmp_path / "b.json", 1.0, 0)
    other = json.loads((tmp_path / "b.json").read_text())
    for b in other["benchmarks"]:
        b["extra_info"]["model"] = "llama-3.2-1b"
    (tmp_path / "o.json").write_text(json.dumps(other))
    res = runner.invoke(perf_app, ["compare", base, str(tmp_path / "o.json")])
    assert res.exit_code == 3 and "nothing compared" in res.output


def test_record_history_and_compare_history(tmp_path):
    db = f"sqlite:///{tmp_path / 'h.sqlite'}"
    files = [bench_json(tmp_path / f"r{i}.json", s, i, when=f"2026-05-{i + 1:02d}T00:00:00+00:00")
             for i, s in enumerate([1.0, 1.0, 1.0, 1.0])]
    res = runner.invoke(perf_app, ["record", *files, "--db", db])
    assert res.exit_code == 0 and res.output.count("recorded run") == 4
    assert runner.invoke(perf_app, ["compare", "--history", "--model", "qwen3-0.6b", "--db", db]).exit_code == 0
    slow = bench_json(tmp_path / "slow.json", 1.25, 9, when="2026-05-09T00:00:00+00:00")
    assert runner.invoke(perf_app, ["record", slow, "--db", db]).exit_code == 0
    res = runner.invoke(perf_app, ["history", "--model", "qwen3-0.6b", "--metric", "ttft", "--db", db])
    assert res.exit_code == 0, res.output
    assert "regression" in res.output and "change point emulator/ttft: at run 5" in res.output
    res = runner.invoke(perf_app, ["compare", "--history", "--model", "qwen3-0.6b", "--db", db,
                                   "--json", str(tmp_path / "h.json")])
    assert res.exit_code == 2, res.output
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["base"] == "history" and {r["n_base"] for r in doc["results"]} == {40}


def test_history_errors_exit_3(tmp_path):
    db = f"sqlite:///{tmp_path / 'h.sqlite'}"
    res = runner.invoke(perf_app, ["history", "--model", "qwen3-0.6b", "--db", db])
    assert res.exit_code == 3 and "no history" in res.output
    assert runner.invoke(perf_app, ["compare", "--history", "--model", "x", "--db", db]).exit_code == 3
    assert runner.invoke(perf_app, ["compare", "--history", "--db", db]).exit_code == 3  # no --model
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    res = runner.invoke(perf_app, ["record", str(bad), "--db", db])
    assert res.exit_code == 3 and "bad.json" in res.output


def test_parse_fraction():
    assert parse_fraction("5%", "--threshold") == pytest.approx(0.05)
    assert parse_fraction("0.01", "--alpha") == 0.01
    with pytest.raises(HarnessError, match="--alpha"):
        parse_fraction("1.5", "--alpha")


VCLOCK = '''
"""A virtual clock: timings independent of machine load, so the end-to-end test cannot flake."""
now = 0.0

def clock():
    global now
    now += 1e-9  # every read moves a little, as a real clock does
    return now
'''

SUITE = '''
import os
import numpy as np
import vclock
from harness.perf.timing import bench_decode, bench_prefill

class Slow:
    """A contract deployment whose cost is virtual time with 2% log-normal noise; DELAY scales it
    like the emulator's delay knob."""
    scale = float(os.environ["DELAY"])
    rng = np.random.default_rng(int(os.environ["SEED"]))
    def _spend(self, secs):
        vclock.now += secs * self.scale * float(np.exp(self.rng.normal(0, 0.02)))
    def prefill(self, input_ids, tap):
        self._spend(0.010)
        return np.zeros((len(input_ids), 16))
    def decode(self, token_id, tap):
        self._spend(0.005)
        return np.zeros((1, 16))

def test_ttft(benchmark):
    bench_prefill(benchmark, Slow(), np.arange(8), model="qwen3-0.6b", deployment="slow")

def test_tpot(benchmark):
    bench_decode(benchmark, Slow(), np.arange(8), steps=3, model="qwen3-0.6b", deployment="slow")
'''


def run_suite(tmp_path, delay: float, name: str, seed: int) -> str:
    (tmp_path / "vclock.py").write_text(textwrap.dedent(VCLOCK))
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    out = tmp_path / name
    # Drop PYTEST_XDIST_WORKER & co: pytest-benchmark disables itself when it sees them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(DELAY=str(delay), SEED=str(seed), PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:npu_harness", "-p", "no:xdist",
         "--rootdir", str(tmp_path), "-c", "/dev/null", "test_suite.py", "--benchmark-timer=vclock.clock",
         f"--benchmark-json={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(out)


def test_end_to_end_with_pytest_benchmark(tmp_path):
    base = run_suite(tmp_path, 1.0, "base.json", seed=0)
    slow = run_suite(tmp_path, 1.15, "slow.json", seed=1)
    res = runner.invoke(perf_app, ["compare", base, slow, "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 2, res.output
    metrics = {r["metric"]: r["verdict"] for r in json.loads((tmp_path / "v.json").read_text())["results"]}
    assert metrics["ttft"] == "regression" and metrics["decode_tps"] == "regression"
    same = run_suite(tmp_path, 1.0, "same.json", seed=2)
    res = runner.invoke(perf_app, ["compare", base, same])
    assert res.exit_code == 0, res.output
