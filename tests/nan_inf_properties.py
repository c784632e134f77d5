"""NaN/Inf properties of tap_metrics, run by tests/test_metrics.py in a child process: a crash in the
compiled pass (the segfault a NaN tap of 65k+ elements once caused) must fail that one test with its
exit code rather than kill pytest. Runnable alone: ``python tests/nan_inf_properties.py``.

Every tap, from one element to full-scale logits [128, 151936], with any fraction of NaN and Inf in
the dut (0-100%, mixed): the counts are exact, NaN propagates as numpy's does (max, p99), NaN
(or Inf) elements are the worst elements, the p99 is exact when no error is NaN, and the calibrated policy
(and every classic one) fails the tap whenever the dut has a special value where the golden is finite.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.compare.metrics import TAIL_QUANTILE, tap_metrics, ulp_error
from harness.compare.policies import CalibratedPolicy, parse_policy

FULL_SCALE = (128, 151936)              # qwen3's prefill logits: the largest tap of the nine models
POLICIES = [CalibratedPolicy(), parse_policy("iron"), parse_policy("cosine-0.99"), parse_policy("nmse-llamacpp")]


def _tap(shape: tuple[int, int], nan_frac: float, inf_frac: float, seed: int):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape, dtype=np.float32)
    b = (g * np.float32(1 + 2**-9)).astype(np.float32)
    d = (g * np.float32(1 + 2**-10)).astype(np.float32)
    pick = rng.random(shape, dtype=np.float32)
    d[pick < inf_frac] = np.inf
    d[(pick >= inf_frac) & (pick < inf_frac + nan_frac)] = np.nan
    d[(pick < inf_frac) & (rng.random(shape, dtype=np.float32) < 0.5)] *= -1
    return d, g, b


def _quantile_of(u: np.ndarray) -> float:
    """np.quantile's linear interpolation, defined for infinities (inf between inf and inf is inf)."""
    s = np.sort(u, axis=None)
    h = (s.size - 1) * TAIL_QUANTILE
    lo = int(math.floor(h))
    a, b = s[lo], s[min(lo + 1, s.size - 1)]
    return float(a if a == b else a + (b - a) * (h - lo))


def check(d: np.ndarray, g: np.ndarray, b: np.ndarray) -> None:
    """Every NaN/Inf property of one tap."""
    m = tap_metrics(d, g, b)
    n_nan, n_inf = int(np.isnan(d).sum()), int(np.isinf(d).sum())
    assert (m["nan"], m["inf"]) == (n_nan, n_inf), (m["nan"], m["inf"], n_nan, n_inf)
    assert math.isnan(m["max_abs"]) == (n_nan > 0)
    if n_nan:
        assert math.isnan(m["ulp_p99"]) and math.isnan(m["ulp_max"])
        t, f = m["worst_elements"][0][:2]
        assert not math.isfinite(d[t, f]), "a NaN (or, tied with it, an Inf) element is the worst element"
    else:
        want = _quantile_of(ulp_error(d, g))
        assert m["ulp_p99"] == want or math.isclose(m["ulp_p99"], want, rel_tol=1e-12), (m["ulp_p99"], want)
        if n_inf:
            assert m["ulp_max"] == math.inf and math.isinf(d[tuple(m["worst_elements"][0][:2])])
    for policy in POLICIES:
        verdict = policy.judge(d, g, b, m, kind="logits", phase="prefill", mode="isolated")
        if n_nan or n_inf:
            assert not verdict.passed and any(r.startswith(("nan ", "inf ")) for r in verdict.reasons), policy.name
        elif policy.name == "calibrated":
            assert verdict.passed, verdict.reasons      # the clean dut (half the baseline's error) passes


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(1, 64), st.integers(1, 4096), st.floats(0, 1), st.floats(0, 1), st.integers(0, 2**16))
def test_any_size_any_fraction(rows: int, features: int, nan_frac: float, inf_frac: float, seed: int) -> None:
    """Taps up to 262k elements (the threaded pass from 65k), NaN and Inf fractions 0-100%."""
    check(*_tap((rows, features), nan_frac, inf_frac * (1 - nan_frac), seed))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.sampled_from([1, 2, 3, 64]), st.sampled_from([65536, 70000, 151936]), st.sampled_from([0.0, 0.01, 0.5, 1.0]),
       st.sampled_from([0.0, 0.001, 0.3]))
def test_wide_rows(rows: int, features: int, nan_frac: float, inf_frac: float) -> None:
    """Vocabulary-wide rows (decode logits and a few prefill rows), where the segfault began."""
    check(*_tap((rows, features), nan_frac, inf_frac * (1 - nan_frac), 0))


def test_full_scale_logits() -> None:
    """Full-scale logits: all NaN, half NaN, all Inf, and a NaN/Inf mix."""
    for nan_frac, inf_frac in ((1.0, 0.0), (0.5, 0.0), (0.0, 1.0), (0.3, 0.3)):
        check(*_tap(FULL_SCALE, nan_frac, inf_frac, 1))


if __name__ == "__main__":
    test_any_size_any_fraction()
    test_wide_rows()
    test_full_scale_logits()
    print("ok")
