"""Metrics of one tap: values against plain numpy, and hypothesis properties (identity, scaling,
NaN/Inf, zeros, extreme magnitudes, bf16 ULP)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.compare import metrics as M
from harness.compare.metrics import exact_match, tap_metrics, ulp_error
from harness.errors import TapError

FAST = settings(max_examples=40, deadline=None)


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _triple(seed: int, shape: tuple[int, int], scale: float = 1.0, noise: float = 3e-3):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(shape) * scale).astype(np.float32)
    d = (g * (1 + noise * rng.standard_normal(shape))).astype(np.float32)
    return d, g, _bf16(g)


finite_rows = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                         elements=st.floats(-1e3, 1e3, width=32))


def test_keys_and_json_ready() -> None:
    d, g, b = _triple(0, (4, 300))
    m = tap_metrics(d, g, b)
    for key in ("max_abs", "mean_abs", "rmse", "rel_fro", "nmse", "cosine", "snr_db", "ulp_mean", "ulp_p99",
                "ulp_max", "beyond_4ulp", "nan", "inf", "n", "r", "r_tail", "baseline_rel_fro",
                "baseline_ulp_p99", "token_rel_err", "token_r", "worst_tokens", "worst_elements"):
        assert key in m, key
    assert json.loads(json.dumps(m)) == m
    assert m["n"] == 1200 and len(m["token_rel_err"]) == 4 and len(m["worst_elements"]) == 5


@pytest.mark.parametrize("shape", [(3, 200), (1, 151936 // 4), (64, 4864)])
def test_matches_plain_numpy(shape: tuple[int, int]) -> None:
    """The streamed, sampled pass agrees with a direct float64 evaluation (the (64, 4864) case takes
    the sampled-candidate quantile path and the threaded block pass). Every other row is scaled by
    0.4% (a lean of ~0.7 ULP, over the lean floor), so r_bias has rows to count and rows to skip."""
    d, g, b = _triple(1, shape)
    d[::2] *= np.float32(1.004)
    m = tap_metrics(d, g, b)
    e = d.astype(np.float64) - g
    assert m["max_abs"] == pytest.approx(np.abs(e).max(), rel=1e-6)
    assert m["mean_abs"] == pytest.approx(np.abs(e).mean(), rel=1e-6)
    assert m["rmse"] == pytest.approx(np.sqrt((e * e).mean()), rel=1e-5)
    assert m["rel_fro"] == pytest.approx(np.linalg.norm(e) / np.linalg.norm(g.astype(np.float64)), rel=1e-5)
    cos = float(np.dot(d.ravel().astype(np.float64), g.ravel()) / np.linalg.norm(d.astype(np.float64)) /
                np.linalg.norm(g.astype(np.float64)))
    assert m["cosine"] == pytest.approx(cos, abs=1e-9)
    u, ub = ulp_error(d, g), ulp_error(b, g)
    assert m["ulp_p99"] == pytest.approx(float(np.quantile(u, 0.99)), rel=1e-6)
    assert m["baseline_ulp_p99"] == pytest.approx(float(np.quantile(ub, 0.99)), rel=1e-6)
    assert m["ulp_max"] == pytest.approx(float(u.max()), rel=1e-6)
    assert m["beyond_4ulp"] == int((u > M.ULP_BEYOND).sum())
    t, f = divmod(int(np.argmax(u)), shape[1])
    assert m["worst_elements"][0][:2] == [t, f]
    r = np.linalg.norm(e) / np.linalg.norm(b.astype(np.float64) - g)
    assert m["r"] == pytest.approx(r, rel=1e-5)
    g64, eb = g.astype(np.float64), b.astype(np.float64) - g
    assert m["gain"] == pytest.approx(float((e * g64).sum() / (g64 * g64).sum()), rel=1e-9)
    assert m["baseline_gain"] == pytest.approx(float((eb * g64).sum() / (g64 * g64).sum()), rel=1e-9)
    signed_d, signed_b = u * np.sign(e) * np.where(g >= 0, 1, -1), ub * np.sign(eb) * np.where(g >= 0, 1, -1)
    assert m["ulp_bias"] == pytest.approx(float(signed_d.mean()), rel=1e-9, abs=1e-12)
    assert m["baseline_ulp_bias"] == pytest.approx(float(signed_b.mean()), rel=1e-9, abs=1e-12)
    t_d, t_b = _t_rows(signed_d), _t_rows(signed_b)
    lean = signed_d.mean(axis=1)
    per_row = np.where(np.abs(lean) >= M.BIAS_LEAN_FLOOR_ULP, np.abs(t_d) / np.maximum(np.abs(t_b), 3.0), 0.0)
    worst = int(np.argmax(per_row))
    assert per_row[worst] > 0 and np.all(np.abs(lean[1::2]) < M.BIAS_LEAN_FLOOR_ULP)
    assert m["r_bias"] == pytest.approx(float(per_row[worst]), rel=1e-7)
    assert (m["bias_t"], m["baseline_bias_t"]) == (pytest.approx(t_d[worst], rel=1e-7), pytest.approx(t_b[worst], rel=1e-7))
    assert m["bias_lean_ulp"] == pytest.approx(lean[worst], rel=1e-9)
    assert m["baseline_bias_lean_ulp"] == pytest.approx(signed_b[worst].mean(), rel=1e-9, abs=1e-12)


def _t_rows(e: np.ndarray) -> np.ndarray:
    """Per-row one-sample t statistic (scipy's definition: mean over the standard error)."""
    from scipy import stats

    return stats.ttest_1samp(e, 0.0, axis=1).statistic


@pytest.mark.parametrize("shape", [(2, 70000), (64, 4864), (128, 896)])
def test_parallel_and_serial_kernels_agree(shape: tuple[int, int]) -> None:
    """The two-block kernel gives the one-block kernel's result (sums to rounding, the rest exactly)."""
    from harness.compare import kernel

    d, g, b = _triple(6, shape)
    ptr, cols, k = M._sample(shape)
    args = (d, g, b, ptr, cols, k, M.TAIL_QUANTILE, M.ULP_FLOOR_RMS_FRACTION, M.ULP_MIN_MAGNITUDE, 4.0)
    s_rows, s_scalars, s_worst = kernel.tap_pass_serial(*args)
    p_rows, p_scalars, p_worst = kernel.tap_pass_parallel(*args)
    assert s_worst.tolist() == p_worst.tolist()
    np.testing.assert_allclose(p_rows, s_rows, rtol=1e-12, atol=0)
    np.testing.assert_allclose(p_scalars, s_scalars, rtol=1e-12, atol=0)
    assert p_scalars[5:].tolist() == s_scalars[5:].tolist()        # the p99s are selected, not summed


def test_sample_threshold_too_low_overflows_and_reruns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A threshold far below the p99 keeps more candidates than the buffers hold: the pass reruns
    keeping every element, with the same result."""
    d, g, b = _triple(7, (64, 4864))
    want = tap_metrics(d, g, b)
    monkeypatch.setattr(M, "_SAMPLE_SIGMAS", 1000.0)
    M._sample.cache_clear()
    try:
        assert M._sample(g.shape)[2] == 0               # the threshold: the sample's minimum
        got = tap_metrics(d, g, b)
    finally:
        M._sample.cache_clear()
    assert got["ulp_p99"] == want["ulp_p99"] and got["worst_elements"] == want["worst_elements"]
    assert got["beyond_4ulp"] == want["beyond_4ulp"]


@FAST
@given(st.floats(0.002, 0.05), st.integers(0, 2**32 - 1), st.sampled_from([64, 256, 896, 4864]))
def test_scaling_shows_as_ulp_bias(e: float, seed: int, f: int) -> None:
    """Scaling a row by (1 + e) puts e / (relative ULP) in every element's signed ULP error, so
    ulp_bias is that mean however the row's energy is spread (one outlier channel here), and its t
    statistic stands far above a bf16 rounding's, which stays at the floor against itself."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((1, f)).astype(np.float32)
    g[0, int(rng.integers(f))] *= 50                      # an outlier channel dominates the norm
    b = _bf16(g)
    m = tap_metrics((g * np.float32(1 + e)).astype(np.float32), g, b)
    ulp = 1.0 / M._inv_ulp_f32(g, M._floor_bits(np.einsum("ij,ij->i", g.astype(np.float64), g), f)[:, None])
    expected = float(np.mean(np.abs((g * np.float32(1 + e)).astype(np.float64) - g) / ulp))
    assert m["ulp_bias"] == pytest.approx(expected, rel=1e-9)
    assert m["bias_t"] > 10 and m["r_bias"] == pytest.approx(m["bias_t"] / max(abs(m["baseline_bias_t"]), 3.0))
    assert tap_metrics(b, g, b)["r_bias"] <= 1.0 + 1e-12     # the baseline against itself


@FAST
@given(hnp.arrays(np.float64, st.integers(1, 3000), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0])
                  | st.floats(0, 100)), st.data())
def test_kth_pair_is_a_sorted_pair(a: np.ndarray, data: st.DataObject) -> None:
    """The selection behind the exact p99: repeated values, runs and near-top ranks included."""
    from harness.compare import kernel

    k = data.draw(st.integers(0, a.size - 1))
    s = np.sort(a)
    assert kernel._kth_pair(a.copy(), k) == (s[k], s[min(k + 1, a.size - 1)])


@FAST
@given(hnp.arrays(np.float64, st.integers(1, 3000), elements=st.sampled_from([0.0, 1.0, np.inf, np.nan])
                  | st.floats(0, 100)), st.data())
def test_kth_pair_ranks_nan_last(a: np.ndarray, data: st.DataObject) -> None:
    """NaN ranks above Inf (as np.sort; reported as Inf): the partition's scans once ran off the
    array on NaN."""
    from harness.compare import kernel

    k = data.draw(st.integers(0, a.size - 1))
    s = np.where(np.isnan(np.sort(a)), np.inf, np.sort(a))
    assert kernel._kth_pair(a.copy(), k) == (s[k], s[min(k + 1, a.size - 1)])


def test_nan_inf_properties_in_a_child_process() -> None:
    """Any size up to full-scale logits, NaN and Inf fractions 0-100% (tests/nan_inf_properties.py,
    hypothesis): run in a child process, so a crash of the compiled pass (a NaN tap of 65k+ elements
    once died with SIGSEGV, rc 139) fails this test instead of killing pytest."""
    script = Path(__file__).with_name("nan_inf_properties.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent.parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.returncode, res.stderr[-3000:])


@pytest.mark.parametrize("shape", [(3, 5), (2, 70000)])
def test_serial_and_parallel_agree_on_nan(shape: tuple[int, int]) -> None:
    from harness.compare import kernel

    d, g, b = _triple(8, shape)
    d[0, ::2] = np.nan
    d[-1, 1] = -np.inf
    ptr, cols, k = M._sample(shape)
    args = (d, g, b, ptr, cols, k, M.TAIL_QUANTILE, M.ULP_FLOOR_RMS_FRACTION, M.ULP_MIN_MAGNITUDE, 4.0)
    (s_rows, s_scalars, s_worst), (p_rows, p_scalars, p_worst) = (kernel.tap_pass_serial(*args),
                                                                  kernel.tap_pass_parallel(*args))
    np.testing.assert_array_equal(np.isnan(s_rows), np.isnan(p_rows))
    assert s_scalars[7:].tolist() == p_scalars[7:].tolist() == [d[0, ::2].size, 1]
    assert math.isnan(s_scalars[5]) and math.isnan(p_scalars[5]) and s_worst.tolist() == p_worst.tolist()


def test_sample_miss_falls_back_to_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A threshold above the true p99 (forced here) must not change the result."""
    d, g, b = _triple(2, (64, 4864))
    want = tap_metrics(d, g, b)
    monkeypatch.setattr(M, "_SAMPLE_SIGMAS", -200.0)
    M._sample.cache_clear()                         # the sample's threshold rank is cached per shape
    try:
        assert M._sample(g.shape)[2] == M._sample(g.shape)[1].size - 1    # the threshold: the sample maximum
        got = tap_metrics(d, g, b)
    finally:
        M._sample.cache_clear()
    assert got["ulp_p99"] == want["ulp_p99"] and got["worst_elements"] == want["worst_elements"]


@FAST
@given(finite_rows)
def test_identical_is_zero_error(g: np.ndarray) -> None:
    m = tap_metrics(g, g, _bf16(g))
    assert m["max_abs"] == 0 and m["rel_fro"] == 0 and m["r"] == 0 and m["r_tail"] == 0 and m["ulp_max"] == 0
    assert m["cosine"] == 1.0 and m["worst_elements"] == [] and m["worst_tokens"] == []
    assert exact_match(g, g)


@FAST
@given(finite_rows, st.integers(-30, 30), st.integers(0, 2**32 - 1))
def test_relative_metrics_scale_invariant(g: np.ndarray, k: int, seed: int) -> None:
    """Power-of-two scaling is exact in float32, so every relative and ULP metric is unchanged
    (for values that stay normal and above the ULP floor's 2^-119 after scaling)."""
    g = np.where(np.abs(g) < 2.0 ** -60, 0, g).astype(np.float32)
    assume(np.abs(g).max() > 1e-3)
    rng = np.random.default_rng(seed)
    d = (g * (1 + 1e-2 * rng.standard_normal(g.shape))).astype(np.float32)
    b = _bf16(g)
    s = np.float32(2.0 ** k)
    m1, m2 = tap_metrics(d, g, b), tap_metrics(d * s, g * s, b * s)
    for key in ("rel_fro", "nmse", "cosine", "snr_db", "r", "r_tail", "ulp_p99", "ulp_max", "beyond_4ulp"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6, abs=1e-12), key
    assert m2["max_abs"] == pytest.approx(m1["max_abs"] * 2.0 ** k, rel=1e-6)


@FAST
@given(finite_rows, st.integers(0, 2**32 - 1))
def test_r_nonnegative_and_cosine_bounded(g: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = (g + rng.standard_normal(g.shape)).astype(np.float32)
    m = tap_metrics(d, g, _bf16(g))
    assert m["r"] >= 0 and m["r_tail"] >= 0 and -1.0 <= m["cosine"] <= 1.0
    assert all(x >= 0 for x in m["token_r"])


@FAST
@given(finite_rows, st.data())
def test_nan_inf_counted(g: np.ndarray, data: st.DataObject) -> None:
    d = g.copy()
    n_nan = data.draw(st.integers(0, min(3, g.size - 1)))
    pos = data.draw(st.permutations(range(g.size)))[: n_nan + 1]
    d.flat[pos[:n_nan]] = np.nan
    d.flat[pos[n_nan]] = np.inf
    m = tap_metrics(d, g, _bf16(g))
    assert m["nan"] == n_nan and m["inf"] == 1
    t, f = divmod(int(pos[0]), g.shape[1])
    assert [t, f] in [w[:2] for w in m["worst_elements"]]


def test_nan_in_golden_not_counted() -> None:
    g = np.ones((2, 4), np.float32)
    g[0, 0] = np.nan
    d = g.copy()
    assert tap_metrics(d, g, g)["nan"] == 0


def test_all_zero() -> None:
    z = np.zeros((3, 8), np.float32)
    m = tap_metrics(z, z, z)
    assert m["r"] == 0 and m["cosine"] == 1.0 and m["rel_fro"] == 0 and m["ulp_p99"] == 0
    d = z.copy()
    d[1, 2] = 1e-3
    m = tap_metrics(d, z, z)
    assert m["rel_fro"] == math.inf and m["cosine"] == 0.0 and m["worst_elements"][0][:2] == [1, 2]
    assert m["ulp_max"] == pytest.approx(1e-3 / 2**-7, rel=1e-3)     # all-zero rows measured at 1.0


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_extreme_magnitudes(mag: float) -> None:
    d, g, b = _triple(3, (4, 500), scale=mag)
    m = tap_metrics(d, g, b)
    ref = tap_metrics(*_triple(3, (4, 500)))
    assert all(math.isfinite(m[k]) for k in ("rmse", "rel_fro", "r", "ulp_p99", "snr_db"))
    assert m["rel_fro"] == pytest.approx(ref["rel_fro"], rel=1e-3)
    assert m["rmse"] == pytest.approx(ref["rmse"] * mag, rel=1e-3)


@FAST
@given(st.integers(-110, 120), st.integers(0, 127), st.booleans())
def test_ulp_of_bf16_values(e: int, mant: int, neg: bool) -> None:
    """Moving a bf16 value to its neighbour is exactly one ULP (away from the row-RMS floor)."""
    x = np.float32((-1 if neg else 1) * (1 + mant / 128) * 2.0 ** e)
    nxt = np.float32(x + np.float32(np.sign(x)) * np.float32(2.0 ** (e - 7)))
    assert _bf16(np.array([nxt]))[0] == nxt                      # the neighbour is bf16 too
    g = np.full((1, 4), x, np.float32)
    d = g.copy()
    d[0, 0] = nxt
    assert ulp_error(d, g)[0, 0] == 1.0


def test_ulp_floor_near_zero() -> None:
    g = np.array([[1.0, -1.0, 1.0, 1e-6]], np.float32)
    d = g + np.float32(2**-12)
    u = ulp_error(d, g)[0]
    assert u[3] == pytest.approx(1.0, rel=1e-6)  # measured at rms/16 = 0.054, in [2^-5, 2^-4): ULP 2^-12


def test_exact_baseline_floor() -> None:
    """An exact baseline (embedding lookup) keeps R finite; an equally exact dut scores 0."""
    g = _bf16(np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32))
    assert tap_metrics(g, g, g)["r"] == 0.0
    m = tap_metrics(_bf16(g * np.float32(1.01)), g, g)
    assert math.isfinite(m["r"]) and m["r"] > 1 and math.isfinite(m["r_tail"])


def test_token_profile_localises_rows() -> None:
    d, g, b = _triple(5, (6, 128), noise=0.0)
    d[4] += 0.5
    m = tap_metrics(d, g, b)
    assert m["worst_tokens"][0] == 4 and m["token_rel_err"][4] > 0.1 and m["token_r"][4] > 10


def test_bad_input_names_argument() -> None:
    g = np.zeros((2, 3), np.float32)
    with pytest.raises(TapError, match="baseline"):
        tap_metrics(g, g, np.zeros(3, np.float32))
    with pytest.raises(TapError, match=r"\(2, 4\)"):
        tap_metrics(np.zeros((2, 4), np.float32), g, g)
    with pytest.raises(TapError, match="dut"):
        tap_metrics(np.zeros((2, 3), np.int32), g, g)
    assert not exact_match(np.zeros((2, 4), np.float32), g)
