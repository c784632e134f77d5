"""Metrics of one tap: values against plain numpy, and hypothesis properties (identity, scaling,
NaN/Inf, zeros, extreme magnitudes, bf16 ULP)."""
from __future__ import annotations

import json
import math

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
    the sampled-candidate quantile path and the threaded block pass)."""
    d, g, b = _triple(1, shape)
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


def test_sample_miss_falls_back_to_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A threshold above the true p99 (forced here) must not change the result."""
    d, g, b = _triple(2, (64, 4864))
    want = tap_metrics(d, g, b)
    monkeypatch.setattr(M, "_SAMPLE_SIGMAS", -200.0)
    assert tap_metrics(d, g, b)["ulp_p99"] == want["ulp_p99"]


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
    assert u[3] == 1.0                  # measured at rms/16 = 0.054, in [2^-5, 2^-4): ULP 2^-12


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
