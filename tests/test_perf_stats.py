"""The regression decision (harness.perf.stats): unit and property tests."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import HarnessError
from harness.perf.stats import Verdict, change_points, compare


def lognormal(rng: np.random.Generator, n: int, scale: float = 1.0, cv: float = 0.01) -> np.ndarray:
    return scale * np.exp(rng.normal(0.0, cv, n))


samples = st.lists(st.floats(min_value=1e-4, max_value=10.0, allow_nan=False), min_size=6, max_size=30)


@settings(max_examples=60, deadline=None)
@given(samples, st.sampled_from(["lower", "higher"]))
def test_identical_samples_are_never_a_regression(xs, direction):
    result = compare(xs, list(xs), direction)
    assert result.verdict is Verdict.UNCHANGED
    assert result.slowdown == 0.0 and bool(result)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_30_percent_slowdown_with_10_low_noise_samples_is_a_regression(seed):
    rng = np.random.default_rng(seed)
    result = compare(lognormal(rng, 10), lognormal(rng, 10, 1.3))
    assert result.verdict is Verdict.REGRESSION, result.reason
    assert not result and 0.25 < result.slowdown < 0.35 and result.p_worse < 0.01


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_throughput_direction(seed):
    rng = np.random.default_rng(seed)
    base, lower = lognormal(rng, 10, 64.1), lognormal(rng, 10, 42.5)
    drop = compare(base, lower, "higher")
    assert drop.verdict is Verdict.REGRESSION
    assert drop.slowdown == pytest.approx(64.1 / 42.5 - 1, abs=0.06)  # time-like: 51% slower
    assert compare(lower, base, "higher").verdict is Verdict.IMPROVEMENT
    # The same numbers read as latencies: going up from 42.5 to 64.1 is the regression.
    assert compare(lower, base, "lower").verdict is Verdict.REGRESSION


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5), st.integers(0, 30), st.integers(0, 2**32 - 1))
def test_fewer_than_six_samples_is_inconclusive_never_pass(n_small, n_other, seed):
    rng = np.random.default_rng(seed)
    small, other = lognormal(rng, n_small, 2.0), lognormal(rng, n_other)
    for base, cand in ((small, other), (other, small)):
        result = compare(base, cand)
        assert result.verdict is Verdict.INCONCLUSIVE and not result
        assert "samples" in result.reason


def test_small_change_is_unchanged_even_when_significant():
    rng = np.random.default_rng(0)
    result = compare(lognormal(rng, 50, cv=0.001), lognormal(rng, 50, 1.02, cv=0.001))
    assert result.p_worse < 1e-6
    assert result.verdict is Verdict.UNCHANGED and "threshold" in result.reason


def test_suspected_slowdown_is_inconclusive_and_asks_for_more_samples():
    base = [1.00, 1.02, 0.98, 1.05, 0.95, 1.01, 0.99, 1.03]
    cand = [1.10, 0.97, 1.12, 1.04, 1.09, 0.96, 1.15, 1.08]
    result = compare(base, cand)
    assert 0.01 <= result.p_worse < 0.1 and result.slowdown >= 0.05
    assert result.verdict is Verdict.INCONCLUSIVE and "more samples" in result.reason


def test_outlier_does_not_make_a_regression():
    base = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0]
    cand = list(base[:-1]) + [3.0]  # one wake-up spike triples one sample
    assert compare(base, cand).verdict is Verdict.UNCHANGED


def test_comparison_to_dict_is_json_ready():
    d = compare([1.0] * 3, [1.0] * 3).to_dict()
    assert d["verdict"] == "inconclusive" and d["p_worse"] is None and d["n_base"] == 3


@pytest.mark.parametrize("bad", [[1.0, float("nan")], [1.0, -2.0], [0.0, 1.0]])
def test_bad_samples_raise_naming_the_label(bad):
    with pytest.raises(HarnessError, match="ttft"):
        compare(bad * 4, [1.0] * 8, label="ttft")


def test_bad_options_raise():
    with pytest.raises(HarnessError, match="direction"):
        compare([1.0] * 8, [1.0] * 8, direction="up")  # type: ignore[arg-type]
    with pytest.raises(HarnessError, match="threshold"):
        compare([1.0] * 8, [1.0] * 8, threshold=5)


def test_change_point_found_at_the_shift():
    rng = np.random.default_rng(1)
    runs = [lognormal(rng, 10) for _ in range(6)] + [lognormal(rng, 10, 1.2) for _ in range(4)]
    cps = change_points(runs)
    assert [c.index for c in cps] == [6]
    assert cps[0].verdict is Verdict.REGRESSION and cps[0].p_adjusted < 0.01
    assert cps[0].slowdown == pytest.approx(0.2, abs=0.03)


def test_two_change_points_and_throughput_direction():
    rng = np.random.default_rng(2)
    runs = ([lognormal(rng, 10, 42.5) for _ in range(4)] + [lognormal(rng, 10, 64.1) for _ in range(4)]
            + [lognormal(rng, 10, 50.0) for _ in range(4)])
    cps = change_points(runs, "higher")
    assert [(c.index, c.verdict) for c in cps] == [(4, Verdict.IMPROVEMENT), (8, Verdict.REGRESSION)]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 12))
def test_no_change_points_in_a_flat_series(seed, n_runs):
    rng = np.random.default_rng(seed)
    assert change_points([lognormal(rng, 10, cv=0.02) for _ in range(n_runs)]) == []


def test_change_points_need_enough_samples():
    assert change_points([[1.0], [2.0], [2.0]]) == []
    assert not math.isnan(change_points([[1.0] * 6, [2.0] * 6])[0].after_median)
