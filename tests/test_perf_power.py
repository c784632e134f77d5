"""Smoke test of benchmarks/perf_gate_power.py: it runs, and its rows mean what the table says."""
from __future__ import annotations

import numpy as np

SCRIPT = "benchmarks/perf_gate_power.py"


def test_power_table_runs_and_our_rule_is_quieter_than_the_mean_rule(load_file):
    bench = load_file(SCRIPT)
    rows = bench.table(trials=40, seed=3)
    assert {r[0] for r in rows} == set(bench.RULES) and len(rows) == len(bench.RULES) * len(bench.CVS)
    assert all(0.0 <= p <= 1.0 and 0.0 <= a <= 1.0 for _, _, p, a in rows)
    by = {(name, cv): (p, a) for name, cv, p, a in rows}
    assert by[("ours (10 v 10)", 0.03)][0] >= 0.8  # a 10% slowdown at CV 3% is plain to see
    alarms_ours = sum(by[("ours (10 v 10)", cv)][1] for cv in bench.CVS)
    alarms_mean = sum(by[("pytest-benchmark mean:5%", cv)][1] for cv in bench.CVS)
    assert alarms_ours < alarms_mean


def test_synthetic_series_have_the_requested_noise(load_file):
    bench = load_file(SCRIPT)
    rng = np.random.default_rng(0)
    x = np.concatenate([bench.draw(rng, 0.05, 1.0) for _ in range(2000)])
    clean = x[x < 1.25]  # drop the injected outliers
    assert abs(np.std(np.log(clean)) - 0.05) < 0.005
    assert 0.01 < np.mean(x > 1.25) < 0.05
