"""Error metrics of one tap: the device under test against the fp32 golden and the bf16 baseline.

``tap_metrics(dut, golden, baseline)`` computes every metric in one compiled pass over the three
arrays (``harness.compare.kernel``; two threads on large taps), accumulating in float64; any mix of
NaN and Inf, at any size, goes through the same pass: ``nan`` / ``inf`` count the dut's special values
where the golden is finite, sums and maxima propagate NaN as numpy's do, a NaN ULP error makes the p99
NaN, and NaN elements are the worst elements. All values are plain python floats / ints / lists,
ready for JSON.

ULP error: each golden element's bf16 spacing, ``2^(floor(log2|x|) - 7)``, measured at
``max(|x|, ULP_FLOOR_RMS_FRACTION * rms(row))`` so near-zero references (a gate projection crossing
zero) do not turn a tiny absolute error into thousands of ULPs; an all-zero row is measured at 1.0.
The spacing never goes below ``2^-126`` (values under ``ULP_MIN_MAGNITUDE`` count as that magnitude),
which keeps its inverse a normal float32. ``ulp_p99`` is exact: a seeded sample sets a threshold a
little below the p99, the kernel keeps the elements above it, and a selection among those gives the
quantile (or, when the sample misjudged, a second pass keeps every element).

R = ||dut - golden||_F / ||baseline - golden||_F: how many times the bf16 reference's own error the
deployment makes. Its denominator is floored at ``R_FLOOR_ROUNDINGS`` times the error of rounding the
golden to bf16 once (relative rms ``BF16_ROUNDING_REL_RMS``), so an exact baseline (the embedding
lookup) does not make R infinite; a numerator of zero gives R = 0. ``r_tail`` is the same ratio on
the p99 ULP error, floored at ``TAIL_FLOOR_ULP``.

gain = <dut - golden, golden> / <golden, golden>: the part of the error that scales the golden (a
wrong factor, a mis-scaled output), signed; ``baseline_gain`` the same for the bf16 baseline.
Weighted by magnitude, gain follows a row's few outlier channels, whose one rounding can be as
large as a 1% scaling; so the policy judges ULP errors signed along the golden, sign(golden) x
(dut - golden) / ulp, in which every element counts alike: a scaling by (1 + e) adds e / (relative
ULP), 1.3-2.6 ULP per 1%, to every element, while rounding noise averages out. ``ulp_bias`` is
their mean over the tap (``baseline_ulp_bias`` the baseline's). Per row, their one-sample t
statistic says how surely the errors lean along the golden; ``r_bias`` is the worst row's |t| of
the dut over the baseline's own (at least ``kernel.BIAS_T_FLOOR``), with that row's ``bias_t`` and
``baseline_bias_t``: a scaled output scores t >= 13 per 1% on the nine models' decode rows, where
clean rows stay near the baseline's t. A lean must also be large enough to matter: only rows whose
mean signed ULP error (``bias_lean_ulp``, the baseline's there ``baseline_bias_lean_ulp``) is at
least ``BIAS_LEAN_FLOOR_ULP`` count, since a t statistic grows with the row's consistency, not its
size: an fp32 implementation leaning 4.5e-5 ULP scored r_bias 17 (docs/policies.md, "The lean floor").

``r_ulp`` is the worst row's RMS ULP error over the baseline's (its denominator floored at
``ULP_RMS_FLOOR``, one correct rounding's): R with every element weighted alike, so a row's few
outlier channels, whose one rounding can be as large as a 1% error elsewhere, do not hide an error
spread over the others (``ulp_rms`` / ``baseline_ulp_rms``: the same over the whole tap). Reported,
not judged: on the validation population clean taps reach r_ulp 4.7-6.5 (flash attention with bf16
statistics, RoPE outputs), as high as 1% relative noise scores (docs/policies.md).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from harness.compare import kernel
from harness.errors import TapError

ULP_BEYOND = 4                      # beyond_4ulp counts elements whose error exceeds this many ULP
ULP_FLOOR_RMS_FRACTION = 1 / 16     # ULP measured at no less than rms(row)/16 (~5% of a Gaussian row)
ULP_MIN_MAGNITUDE = 2.0 ** -119     # smallest magnitude whose ULP (2^-126) has a normal float32 inverse
# rms of the relative error of one round-to-nearest into bf16: uniform in +-ulp/2 (rms ulp/sqrt(12)),
# ulp/|x| between 2^-8 and 2^-7 (geometric middle 2^-7.5).
BF16_ROUNDING_REL_RMS = 2.0 ** -7.5 / math.sqrt(12.0)
R_FLOOR_ROUNDINGS = 0.5             # R's denominator >= half of one bf16 rounding of the golden
TAIL_FLOOR_ULP = 0.5                # r_tail's denominator >= 0.5 ULP, the worst error of one rounding
TAIL_QUANTILE = 0.99
# r_bias counts a row only when its mean signed ULP error is at least this (docs/policies.md, "The
# lean floor"): fp32 and float64 implementations lean <= 4.5e-5 ULP, a 1% scaling >= 1.68 ULP,
# round-toward-zero 0.5 ULP, the RMSNorm with bf16 statistics >= 0.5 ULP in the rows that fail it.
BIAS_LEAN_FLOOR_ULP = 0.25
# r_bias_drift (judged in cumulative mode) counts a row only when its lean is also at least this many
# times the RMS over rows of the baseline's own lean: end to end, a correct run drifts, and its rows
# lean by as much as the bf16 baseline's own (docs/policies.md, "Cumulative mode: a lean relative to
# the drift").
BIAS_DRIFT_MULTIPLE = 4.0
MEDIAN_ULP_FLOOR = 0.25            # median ratios' denominator >= the median |error| of one correct rounding
ULP_RMS_FLOOR = 0.5 / math.sqrt(3.0)  # r_ulp's denominator >= the rms ULP error of one correct rounding
TOP = kernel.TOP                    # worst_tokens / worst_elements length (the kernel selects them)

_SMALL = 1 << 11                    # up to this many elements every element is a quantile candidate
_SAMPLE = 1 << 14                   # at most this many sampled elements set the candidate threshold
_SAMPLE_SIGMAS = 5.0                # threshold this many standard errors below the sampled p99
_THREADED = 1 << 16                 # from this many elements (and two rows) the kernels use two threads
_NO_SAMPLE = np.zeros(0, np.int64)
_NO_SAMPLE.setflags(write=False)
_EXP_MASK = np.uint32(0x7F800000)
# float32 bits of 1/ulp(x) = 2^(7 - e) for exponent field E = e + 127: field 134 - e = 261 - E.
_INV_ULP_BASE = np.uint32(261 << 23)


def _as_2d(x: Any, what: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous:
        return x                                    # the usual case, checked cheaply (decode taps are tiny)
    a = np.asarray(x)
    if a.ndim != 2:
        raise TapError(f"{what}: expected a 2-D [tokens, features] array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TapError(f"{what}: expected a floating-point array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _floor_bits(gg_rows: np.ndarray, features: int) -> np.ndarray:
    """Per-row exponent bits of the ULP floor magnitude (see module docstring)."""
    rms = np.sqrt(gg_rows / features)
    mag = np.where(rms > 0, rms * ULP_FLOOR_RMS_FRACTION, 1.0)
    mag = np.where(np.isfinite(mag), np.maximum(mag, ULP_MIN_MAGNITUDE), 1.0)
    return (mag.astype(np.float32).view(np.uint32) & _EXP_MASK).astype(np.uint32)


def ulp_error(dut: Any, golden: Any) -> np.ndarray:
    """Element-wise |dut - golden| in bf16 ULPs of the golden, with the row-RMS floor (float64)."""
    d, g = _as_2d(dut, "dut"), _as_2d(golden, "golden")
    return np.abs(d.astype(np.float64) - g.astype(np.float64)) * _inv_ulp(g).astype(np.float64)


def _inv_ulp(g: np.ndarray) -> np.ndarray:
    """1 / ULP of each element of a 2-D float32 golden, with its row's RMS floor (float32)."""
    g64 = g.astype(np.float64)
    return _inv_ulp_f32(g, _floor_bits(np.einsum("ij,ij->i", g64, g64), g.shape[1])[:, None])


def _inv_ulp_f32(gs: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """1 / ULP of each golden value, its exponent bits raised to the floor bits ``fb`` (float32)."""
    bits = np.maximum(gs.view(np.uint32) & _EXP_MASK, fb)
    return (_INV_ULP_BASE - bits).view(np.float32)


@functools.lru_cache(maxsize=64)
def _sample(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Seeded sample positions of a tap shape, by row (row i's columns are
    ``cols[ptr[i]:ptr[i + 1]]``), and the order statistic of the sample that sets the candidate
    threshold; cached, since taps repeat their shapes. The threshold, ``_SAMPLE_SIGMAS`` standard
    errors below the sample's p99, keeps ~1.5-2% of the elements as quantile candidates, which
    almost always hold the p99 (the kernel checks, and reruns keeping every element if not)."""
    rows_, f = shape
    n = rows_ * f
    if n <= _SMALL:
        ptr = np.zeros(rows_ + 1, np.int64)
        ptr.setflags(write=False)  # as the sampled ones: one compiled specialisation of the kernels, not two
        return ptr, _NO_SAMPLE, 0
    m = min(_SAMPLE, max(1024, n // 64))
    flat = np.sort(np.random.default_rng(0).integers(0, n, m))
    q = TAIL_QUANTILE - _SAMPLE_SIGMAS * math.sqrt(TAIL_QUANTILE * (1 - TAIL_QUANTILE) / m)
    rows, cols = np.divmod(flat, f)
    ptr = np.searchsorted(rows, np.arange(rows_ + 1)).astype(np.int64)
    for a in (ptr, cols):
        a.setflags(write=False)
    return ptr, cols, min(max(int(q * (m - 1)), 0), m - 1)


@dataclass
class _Raw:
    """Everything the metric dict is assembled from."""

    rows: np.ndarray                                # [9, tokens] float64 sums, kernel.ROW_SUMS order
    abs_sum: float
    max_abs: float
    ulp_sum: float
    ulp_max: float
    beyond: int
    p99_d: float
    p99_b: float
    worst: list[int]                                # flat indices, worst first
    nan: int                                        # dut NaN / Inf where the golden is finite
    inf: int


def _fast(dut: np.ndarray, g: np.ndarray, base: np.ndarray) -> _Raw:
    """The compiled pass (harness.compare.kernel), NaN and Inf included."""
    ptr, cols, k = _sample(g.shape)
    threaded = g.size >= _THREADED and g.shape[0] >= 2 and numba.get_num_threads() > 1
    run = kernel.tap_pass_parallel if threaded else kernel.tap_pass_serial
    sums, s, worst = run(dut, g, base, ptr, cols, k, TAIL_QUANTILE, ULP_FLOOR_RMS_FRACTION, ULP_MIN_MAGNITUDE,
                         float(ULP_BEYOND))
    return _Raw(sums, float(s[0]), float(s[1]), float(s[2]), float(s[3]), int(s[4]), float(s[5]), float(s[6]),
                worst.tolist(), int(s[7]), int(s[8]))


def _empty(g: np.ndarray) -> _Raw:
    """A tap with no element (a [tokens, 0] or [0, features] array)."""
    return _Raw(np.zeros((len(kernel.ROW_SUMS), g.shape[0])), 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, [], 0, 0)


def _snr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf for no noise, -inf for no signal, NaN for NaN."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    ratio = signal / noise
    return 10.0 * math.log10(ratio) if ratio > 0 else -math.inf


def _ratio(num: float, den: float) -> float:
    """num / den for den >= 0: 0 when num is 0, signed inf when den is 0."""
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.copysign(math.inf, num)


def tap_metrics(dut: Any, golden: Any, baseline: Any, *, block: int = 0, medians: bool = False) -> dict[str, Any]:
    """Every metric of ``dut`` against ``golden`` (fp32 reference) with ``baseline`` (bf16 reference).

    Inputs are 2-D ``[tokens, features]`` arrays of one shape (converted to float32). Keys: max_abs,
    mean_abs, rmse, rel_fro, nmse, cosine, snr_db, ulp_mean, ulp_p99, ulp_max, beyond_4ulp, nan, inf,
    n, r, r_tail, baseline_rel_fro, baseline_ulp_p99, gain, baseline_gain, ulp_bias, baseline_ulp_bias,
    bias_t, baseline_bias_t, r_bias, bias_lean_ulp, baseline_bias_lean_ulp, r_bias_drift, drift_bias_t,
    drift_baseline_bias_t, drift_bias_lean_ulp, drift_lean_floor_ulp, r_ulp, ulp_rms, baseline_ulp_rms,
    token_rel_err, token_r, worst_tokens, worst_elements ([token,
    feature, dut, golden], worst ULP error first), row_r, gain_free_r, and with ``block`` (a head's
    width, for head-structured taps) head_r and head_gain_free_r (``structure_metrics``); with ``medians``
    (isolated mode, where they are judged) row_med_r and head_med_r (``median_metrics``).
    """
    d, g, b = _as_2d(dut, "dut"), _as_2d(golden, "golden"), _as_2d(baseline, "baseline")
    if d.shape != g.shape or b.shape != g.shape:
        raise TapError(f"shape mismatch: dut {d.shape}, golden {g.shape}, baseline {b.shape}")
    raw = _fast(d, g, b) if g.size else _empty(g)
    out = _assemble(raw, d, g)
    if block:
        out.update(structure_metrics(d, g, b, block))
    if medians and g.size:
        out.update(median_metrics(d, g, b, block))
    return out


def _floored_ratio(num2: float, den2: float, gg: float, floor_rel: float) -> float:
    """sqrt(num2) / max(sqrt(den2), floor_rel sqrt(gg)), 0 for a zero numerator, NaN-propagating."""
    return float(kernel._ratio_floored(num2, den2, gg, floor_rel))


def structure_metrics(d: np.ndarray, g: np.ndarray, b: np.ndarray, block: int = 0) -> dict[str, Any]:
    """Statistics that see structure inside a tap (docs/policies.md, "Structure inside a tap"):

    - ``row_r``: the worst row's R (``token_r``'s maximum): one token's row corrupted in a 64-row
      prefill moves the tap-wide R by 1/8 of its own.
    - ``gain_free_r``: R of the errors once each row's (or, with ``block``, each row's head slice's)
      best gain along the golden is removed, dut over baseline (denominators floored as R's): a flash
      attention with bf16 running statistics errs by one factor per head and row, which this removes,
      while element-wise noise stays.
    - ``row_gain_free_r`` (with ``block``): the worst row's gain-free R (attention rows of a flash
      kernel with bf16 statistics reach row R ~3-4 by their per-head gains alone).
    - ``head_r``, ``head_gain_free_r`` (with ``block``: a head's width on a head-structured tap): the
      worst column block's R over every row (one head's slice corrupted), and its gain-free form.
    NaN-safe: NaN in the dut makes them NaN (the tap fails on its NaN count anyway)."""
    if not (block and g.shape[1] % block == 0 and g.shape[1] > block and g.size):
        return {}
    total, row_free, head, head_free = kernel.head_summary(d, g, b, block, R_FLOOR_ROUNDINGS * BF16_ROUNDING_REL_RMS)
    return {"gain_free_r": float(total), "row_gain_free_r": float(row_free), "head_r": float(head),
            "head_gain_free_r": float(head_free)}


def median_metrics(d: np.ndarray, g: np.ndarray, b: np.ndarray, block: int = 0) -> dict[str, float]:
    """Typical-element statistics (docs/policies.md, "Structure inside a tap"): ``row_med_r``, the worst
    row's median ULP error over the baseline's median there, and with ``block`` (dividing the features)
    ``head_med_r``, the same per (row, block of ``block`` columns); denominators floored at
    ``MEDIAN_ULP_FLOOR``. R and r_tail are ruled by a row's largest errors, where correct kernels differ
    most (outlier channels, a multi-step SiLU); a bug that moves every element of a row or a head's slice
    by ~1% moves the median, which a few large legitimate errors leave alone. Rows go in chunks of ~1M
    elements, ULP errors in float32. NaN in the dut makes both NaN (it fails on its NaN count anyway)."""
    rows, feats = g.shape
    width = block if block and feats % block == 0 and feats > block else 0
    keys = ("row_med_r", "head_med_r") if width else ("row_med_r",)
    if np.isnan(d).any():
        return dict.fromkeys(keys, math.nan)
    row_worst, head_worst = 0.0, 0.0
    step = max(1, (1 << 20) // feats)
    for lo in range(0, rows, step):
        gs = g[lo:lo + step]
        inv_ulp = _inv_ulp(gs)  # the ULPs of ulp_error, in float32 (a median needs no more)
        ed = np.abs(d[lo:lo + step] - gs)
        ed *= inv_ulp
        eb = np.abs(b[lo:lo + step] - gs)
        eb *= inv_ulp
        row_worst = max(row_worst, float(np.max(_median(ed, 1) / np.maximum(_median(eb, 1), MEDIAN_ULP_FLOOR))))
        if width:
            n = ed.shape[0]
            med_d, med_b = _median(ed.reshape(n, -1, width), 2), _median(eb.reshape(n, -1, width), 2)
            head_worst = max(head_worst, float(np.max(med_d / np.maximum(med_b, MEDIAN_ULP_FLOOR))))
    return dict(zip(keys, (row_worst, head_worst)))


def _median(x: np.ndarray, axis: int) -> np.ndarray:
    """np.median along ``axis`` (no NaN: the caller checks) by one partition: the upper middle value, and
    for an even count the largest value below it for the lower one."""
    n = x.shape[axis]
    k = n // 2
    part = np.partition(x, k, axis=axis)
    upper = part.take(k, axis=axis)
    if n % 2:
        return upper
    lower = part[(slice(None),) * axis + (slice(0, k),)].max(axis=axis)
    return 0.5 * (lower + upper)


def _assemble(raw: _Raw, d0: np.ndarray, g0: np.ndarray) -> dict[str, Any]:
    n = g0.size
    feats = g0.shape[1]
    floor_rel = R_FLOOR_ROUNDINGS * BF16_ROUNDING_REL_RMS
    (tok_err, tok_r, (r_bias, bias_t, baseline_bias_t, lean, baseline_lean), drift, r_ulp, (res_d, res_b),
     worst_tokens, totals) = kernel.row_summary(raw.rows, feats, floor_rel, BIAS_LEAN_FLOOR_ULP, ULP_RMS_FLOOR,
                                  BIAS_DRIFT_MULTIPLE)
    gg, dd, gd, bb, gb, ud, ub = (float(x) for x in totals[:7])
    dg = gg + gd                                    # <dut, golden> = <g, g> + <g, d>
    dut2 = max(gg + 2.0 * gd + dd, 0.0)
    if gg == 0.0 and dut2 == 0.0:
        cosine = 1.0
    elif gg == 0.0 or dut2 == 0.0:
        cosine = 0.0
    else:
        cosine = min(1.0, dg / math.sqrt(gg * dut2)) if math.isfinite(dg) else math.nan
    return {
        "n": n,
        "max_abs": raw.max_abs,
        "mean_abs": raw.abs_sum / n if n else 0.0,
        "rmse": math.sqrt(dd / n) if n else 0.0,
        "rel_fro": _ratio(math.sqrt(dd), math.sqrt(gg)),
        "nmse": _ratio(dd, gg),
        "cosine": cosine,
        "snr_db": _snr_db(gg, dd),
        "ulp_mean": raw.ulp_sum / n if n else 0.0,
        "ulp_p99": raw.p99_d,
        "ulp_max": raw.ulp_max,
        f"beyond_{ULP_BEYOND}ulp": raw.beyond,
        "nan": raw.nan,
        "inf": raw.inf,
        "r": _ratio(math.sqrt(dd), max(math.sqrt(bb), floor_rel * math.sqrt(gg))),
        "r_tail": _ratio(raw.p99_d, max(raw.p99_b, TAIL_FLOOR_ULP)),
        "baseline_rel_fro": _ratio(math.sqrt(bb), math.sqrt(gg)),
        "baseline_ulp_p99": raw.p99_b,
        "gain": _ratio(gd, gg),
        "baseline_gain": _ratio(gb, gg),
        "ulp_bias": ud / n if n else 0.0,
        "baseline_ulp_bias": ub / n if n else 0.0,
        "bias_t": bias_t,
        "baseline_bias_t": baseline_bias_t,
        "r_bias": r_bias,
        "r_ulp": r_ulp,
        "ulp_rms": math.sqrt(totals[7] / n) if n else 0.0,
        "baseline_ulp_rms": math.sqrt(totals[8] / n) if n else 0.0,
        "bias_lean_ulp": lean,
        "baseline_bias_lean_ulp": baseline_lean,
        "r_bias_drift": drift[0],
        "drift_bias_t": drift[1],
        "drift_baseline_bias_t": drift[2],
        "drift_bias_lean_ulp": drift[3],
        "drift_lean_floor_ulp": drift[5],
        # structure inside the tap (docs/policies.md, "Structure inside a tap")
        "row_r": float(tok_r.max()) if tok_r.size else 0.0,
        "gain_free_r": _floored_ratio(float(res_d), float(res_b), gg, floor_rel),
        "token_rel_err": tok_err.tolist(),
        "token_r": tok_r.tolist(),
        "worst_tokens": worst_tokens.tolist(),
        "worst_elements": [[i // feats, i % feats, float(d0.flat[i]), float(g0.flat[i])] for i in raw.worst],
    }


def exact_match(dut: Any, golden: Any) -> bool:
    """True when ``dut`` equals ``golden`` element for element (same shape; NaN never matches)."""
    d, g = _as_2d(dut, "dut"), _as_2d(golden, "golden")
    return d.shape == g.shape and bool(np.array_equal(d, g))
