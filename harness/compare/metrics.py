"""Error metrics of one tap: the device under test against the fp32 golden and the bf16 baseline.

``tap_metrics(dut, golden, baseline)`` computes every metric in one streamed pass over row blocks
(two threads, block temporaries stay in cache), accumulating sums in float64. All values are plain
python floats / ints / lists, ready for JSON.

ULP error: each golden element's bf16 spacing, ``2^(floor(log2|x|) - 7)``, measured at
``max(|x|, ULP_FLOOR_RMS_FRACTION * rms(row))`` so near-zero references (a gate projection crossing
zero) do not turn a tiny absolute error into thousands of ULPs; an all-zero row is measured at 1.0.
The spacing never goes below ``2^-126`` (values under ``ULP_MIN_MAGNITUDE`` count as that magnitude),
which keeps its inverse a normal float32.

R = ||dut - golden||_F / ||baseline - golden||_F: how many times the bf16 reference's own error the
deployment makes. Its denominator is floored at ``R_FLOOR_ROUNDINGS`` times the error of rounding the
golden to bf16 once (relative rms ``BF16_ROUNDING_REL_RMS``), so an exact baseline (the embedding
lookup) does not make R infinite; a numerator of zero gives R = 0. ``r_tail`` is the same ratio on
the p99 ULP error, floored at ``TAIL_FLOOR_ULP``.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

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
TOP = 5                             # worst_tokens / worst_elements length

_BLOCK = 128                        # float32 partial sums over 128 elements, combined in float64
_CHUNK_ELEMENTS = 1 << 18           # elements per streamed row block (~1 MiB per float32 temporary)
_SMALL = 1 << 15                    # up to this many elements every element is a quantile candidate
_SAMPLE = 1 << 14                   # at most this many sampled elements set the candidate threshold
_SAMPLE_SIGMAS = 5.0                # threshold this many standard errors below the sampled p99
_THREADED = 1 << 20                 # from this many elements the block pass uses two threads
_THREADS = max(1, min(2, os.cpu_count() or 1))
_EXP_MASK = np.uint32(0x7F800000)
# float32 bits of 1/ulp(x) = 2^(7 - e) for exponent field E = e + 127: field 134 - e = 261 - E.
_INV_ULP_BASE = np.uint32(261 << 23)


def _as_2d(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise TapError(f"{what}: expected a 2-D [tokens, features] array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TapError(f"{what}: expected a floating-point array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row dot product of two [r, f] float32 arrays: float32 over blocks of 128, float64 across."""
    r, f = a.shape
    nb = f // _BLOCK
    out = np.zeros(r, dtype=np.float64)
    if nb:
        main = np.einsum("ijk,ijk->ij", a[:, : nb * _BLOCK].reshape(r, nb, _BLOCK),
                         b[:, : nb * _BLOCK].reshape(r, nb, _BLOCK))
        out += main.sum(axis=1, dtype=np.float64)
    if nb * _BLOCK < f:
        out += np.einsum("ij,ij->i", a[:, nb * _BLOCK:].astype(np.float64), b[:, nb * _BLOCK:].astype(np.float64))
    return out


def _rowsum(a: np.ndarray) -> np.ndarray:
    """Per-row sum of an [r, f] float32 array, float64 across blocks of 128."""
    r, f = a.shape
    nb = f // _BLOCK
    out = np.zeros(r, dtype=np.float64)
    if nb:
        out += (a[:, : nb * _BLOCK].reshape(r, nb, _BLOCK) @ np.ones(_BLOCK, np.float32)).sum(axis=1, dtype=np.float64)
    if nb * _BLOCK < f:
        out += a[:, nb * _BLOCK:].sum(axis=1, dtype=np.float64)
    return out


def _floor_bits(gg_rows: np.ndarray, features: int) -> np.ndarray:
    """Per-row exponent bits of the ULP floor magnitude (see module docstring)."""
    rms = np.sqrt(gg_rows / features)
    mag = np.where(rms > 0, rms * ULP_FLOOR_RMS_FRACTION, 1.0)
    mag = np.where(np.isfinite(mag), np.maximum(mag, ULP_MIN_MAGNITUDE), 1.0)
    return (mag.astype(np.float32).view(np.uint32) & _EXP_MASK).astype(np.uint32)


def inv_ulp(golden: np.ndarray, floor_bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (bf16 ULP) of each element of a 2-D float32 ``golden``, floored per row (float32 view)."""
    bits = np.bitwise_and(golden.view(np.uint32), _EXP_MASK, out=out)
    np.maximum(bits, floor_bits[:, None], out=bits)
    np.subtract(_INV_ULP_BASE, bits, out=bits)
    return bits.view(np.float32)


def ulp_error(dut: Any, golden: Any) -> np.ndarray:
    """Element-wise |dut - golden| in bf16 ULPs of the golden, with the row-RMS floor (float32)."""
    d, g = _as_2d(dut, "dut"), _as_2d(golden, "golden")
    fb = _floor_bits(_rowdot(g, g), g.shape[1])
    return np.abs(d - g) * inv_ulp(g, fb)


@dataclass
class _Part:
    """Partial results of one row block: float64 row sums, scalars, quantile candidates."""

    dd: np.ndarray
    gd: np.ndarray
    bb: np.ndarray
    abs_sum: float
    max_abs: float
    ulp_sum: float
    beyond: int                                     # -1: count it from the candidates
    cand_d: np.ndarray                              # dut ULP errors > t_d, and their flat indices
    cand_idx: np.ndarray
    cand_b: np.ndarray                              # baseline ULP errors > t_b


class _Scratch:
    """Block temporaries, kept per thread across calls: fresh ones page-fault on every use."""

    def __init__(self, elements: int) -> None:
        self.size = elements
        self.d = np.empty(elements, np.float32)
        self.bd = np.empty(elements, np.float32)
        self.bits = np.empty(elements, np.uint32)
        self.mask = np.empty(elements, np.bool_)


_local = threading.local()


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """One persistent helper thread: its scratch survives between calls."""
    return ThreadPoolExecutor(1, thread_name_prefix="tap-metrics")


def _scratch(elements: int) -> _Scratch:
    sc = getattr(_local, "scratch", None)
    if sc is None or sc.size < elements:
        sc = _local.scratch = _Scratch(elements)
    return sc


def _block(dut: np.ndarray, g: np.ndarray, base: np.ndarray, fb: np.ndarray, rows: slice,
           t_d: float, t_b: float, sc: _Scratch) -> _Part:
    g_ = g[rows]
    shape, size = g_.shape, g_.size
    d = np.subtract(dut[rows], g_, out=sc.d[:size].reshape(shape))
    bd = np.subtract(base[rows], g_, out=sc.bd[:size].reshape(shape))
    mask = sc.mask[:size].reshape(shape)
    dd, gd, bb = _rowdot(d, d), _rowdot(g_, d), _rowdot(bd, bd)
    inv = inv_ulp(g_, fb[rows], out=sc.bits[:size].reshape(shape))
    np.abs(d, out=d)
    abs_sum = float(_rowsum(d).sum())
    max_abs = float(d.max()) if size else 0.0
    np.multiply(d, inv, out=d)                      # d now holds the dut's ULP errors
    ulp_sum = float(_rowsum(d).sum())
    # ulp_max and (when t_d <= ULP_BEYOND) beyond come from the candidates: two passes saved.
    beyond = int(np.count_nonzero(np.greater(d, ULP_BEYOND, out=mask))) if t_d > ULP_BEYOND else -1
    idx = np.flatnonzero(np.greater(d, t_d, out=mask))
    cand_d = d.ravel()[idx]
    np.abs(bd, out=bd)
    np.multiply(bd, inv, out=bd)
    cand_b = bd[np.greater(bd, t_b, out=mask)]
    return _Part(dd, gd, bb, abs_sum, max_abs, ulp_sum, beyond, cand_d, idx + rows.start * g.shape[1], cand_b)


def _run(dut: np.ndarray, g: np.ndarray, base: np.ndarray, fb: np.ndarray,
         t_d: float, t_b: float) -> list[_Part]:
    """All row blocks in order, split over up to two threads (numpy releases the GIL in ufuncs)."""
    rows, f = g.shape
    step = max(1, _CHUNK_ELEMENTS // max(f, 1))
    blocks = [slice(r, min(r + step, rows)) for r in range(0, rows, step)]
    workers = min(_THREADS, len(blocks)) if g.size >= _THREADED else 1

    def work(share: list[slice]) -> list[_Part]:
        sc = _scratch(step * f)
        return [_block(dut, g, base, fb, s, t_d, t_b, sc) for s in share]

    if workers == 1:
        return work(blocks)
    cut = (len(blocks) + 1) // 2
    other = _pool().submit(work, blocks[cut:])       # this thread takes the first half
    first = work(blocks[:cut])
    return first + other.result()


def _sample_inv(gs: np.ndarray, fb: np.ndarray) -> np.ndarray:
    bits = np.maximum(gs.view(np.uint32) & _EXP_MASK, fb)
    return (_INV_ULP_BASE - bits).view(np.float32)


@functools.lru_cache(maxsize=64)
def _sample_idx(n: int) -> np.ndarray:
    """Seeded sample positions for an n-element tensor (cached: taps repeat their sizes)."""
    m = min(_SAMPLE, max(1024, n // 64))
    idx = np.random.default_rng(0).integers(0, n, m)
    idx.setflags(write=False)
    return idx


def _thresholds(dut: np.ndarray, g: np.ndarray, base: np.ndarray, fb: np.ndarray) -> tuple[float, float]:
    """Quantile candidate thresholds for dut and baseline ULP errors; -1 keeps every element.

    A seeded sample's quantile ``_SAMPLE_SIGMAS`` standard errors below the p99 leaves ~1.5-2% of
    the elements above it, which almost always hold the p99; when they do not, ``_quantile`` says
    so and the block pass reruns keeping everything. The result is exact either way.
    """
    n = g.size
    if n <= _SMALL:
        return -1.0, -1.0
    idx = _sample_idx(n)
    q = TAIL_QUANTILE - _SAMPLE_SIGMAS * math.sqrt(TAIL_QUANTILE * (1 - TAIL_QUANTILE) / idx.size)
    gs = g.ravel()[idx]
    inv = _sample_inv(gs, fb[idx // g.shape[1]])
    out = []
    for x in (dut, base):
        u = np.abs(x.ravel()[idx] - gs) * inv
        k = min(max(int(q * (u.size - 1)), 0), u.size - 1)
        t = float(np.partition(u, k)[k])
        out.append(t if math.isfinite(t) else -1.0)
    return out[0], out[1]


def _quantile(cand: np.ndarray, t: float, n: int, q: float = TAIL_QUANTILE) -> float | None:
    """``np.quantile(all, q)`` (linear method) from the candidates ``> t`` of ``n`` finite values >= 0.

    Returns None when the candidates do not cover the two order statistics needed.
    """
    h = (n - 1) * q
    lo = int(math.floor(h))
    hi = min(lo + 1, n - 1)
    c = cand.size
    below = n - c                                   # sorted positions < below hold values <= t
    if lo < below and t != 0.0:                     # t == 0: those values are exactly 0
        return None
    if hi < below:
        return 0.0
    if lo < below:                                  # lo is a zero below every candidate
        v_lo, v_hi = 0.0, float(cand.min())
    else:
        k = lo - below
        s = np.partition(cand, k)                   # one selection; hi is the minimum above it
        v_lo = float(s[k])
        v_hi = float(s[k + 1:].min()) if hi > lo else v_lo
    return v_lo + (v_hi - v_lo) * (h - lo)


def _top(values: np.ndarray, k: int = TOP) -> np.ndarray:
    """Indices of the k largest values, largest first (argpartition: candidates can be many)."""
    if values.size > k:
        sel = np.argpartition(values, values.size - k)[values.size - k:]
    else:
        sel = np.arange(values.size)
    return sel[np.argsort(-values[sel], kind="stable")]


@dataclass
class _Raw:
    """Everything the metric dict is assembled from (per-row sums are float64)."""

    gg: np.ndarray
    dd: np.ndarray
    gd: np.ndarray
    bb: np.ndarray
    abs_sum: float
    max_abs: float
    ulp_sum: float
    ulp_max: float
    beyond: int
    p99_d: float
    p99_b: float
    worst: list[int]                                # flat indices, worst first


def _fast(dut: np.ndarray, g: np.ndarray, base: np.ndarray, gg: np.ndarray) -> _Raw | None:
    """Streamed block pass; None when a sum is not finite (NaN/Inf or overflow)."""
    fb = _floor_bits(gg, g.shape[1])
    t_d, t_b = _thresholds(dut, g, base, fb)
    for attempt in range(2):
        parts = _run(dut, g, base, fb, t_d, t_b)
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        dd, gd, bb = cat("dd"), cat("gd"), cat("bb")
        ulp_sum = sum(p.ulp_sum for p in parts)
        if not all(math.isfinite(float(x.sum())) for x in (gg, dd, gd, bb)) or not math.isfinite(ulp_sum):
            return None
        cand_d, cand_b = cat("cand_d"), cat("cand_b")
        p99_d, p99_b = _quantile(cand_d, t_d, g.size), _quantile(cand_b, t_b, g.size)
        if p99_d is None or p99_b is None:
            t_d = t_b = -1.0                        # the sample misjudged: keep every element
            continue
        idx = cat("cand_idx")
        top = _top(cand_d)
        worst = [int(idx[i]) for i in top if cand_d[i] > 0]
        ulp_max = float(cand_d.max()) if cand_d.size else 0.0   # covered: the max is a candidate
        beyond = (sum(p.beyond for p in parts) if t_d > ULP_BEYOND
                  else int(np.count_nonzero(cand_d > ULP_BEYOND)))
        return _Raw(gg, dd, gd, bb, sum(p.abs_sum for p in parts), max(p.max_abs for p in parts),
                    ulp_sum, ulp_max, beyond, p99_d, p99_b, worst)
    raise AssertionError("unreachable: a pass keeping every element always covers the quantile")


def _slow(dut: np.ndarray, g: np.ndarray, base: np.ndarray) -> _Raw:
    """Plain float64 evaluation over whole arrays: for NaN/Inf and magnitudes float32 sums overflow."""
    d64, g64, b64 = (x.astype(np.float64) for x in (dut, g, base))
    with np.errstate(all="ignore"):
        d, bd = d64 - g64, b64 - g64
        gg = np.einsum("ij,ij->i", g64, g64)
        fb = _floor_bits(gg, g.shape[1])
        inv = _sample_inv(g.ravel(), np.repeat(fb, g.shape[1])).astype(np.float64).reshape(g.shape)
        u, ub = np.abs(d) * inv, np.abs(bd) * inv
        key = np.where(np.isnan(u), np.inf, u).ravel()  # NaN elements are the worst of all
        top = np.argsort(-key, kind="stable")[: TOP]
        return _Raw(gg, np.einsum("ij,ij->i", d, d), np.einsum("ij,ij->i", g64, d), np.einsum("ij,ij->i", bd, bd),
                    float(np.abs(d).sum()), float(np.abs(d).max()) if d.size else 0.0, float(u.sum()),
                    float(u.max()) if u.size else 0.0, int(np.count_nonzero(u > ULP_BEYOND)),
                    float(np.quantile(u, TAIL_QUANTILE)), float(np.quantile(ub, TAIL_QUANTILE)),
                    [int(i) for i in top if not key[i] <= 0])


def _pow2_scale(g: np.ndarray) -> float:
    """A power of two bringing the golden's RMS near 1 when it is extreme (float32 sums would over- or
    underflow); 1.0 otherwise. Exact: ULP and relative metrics are unchanged by it."""
    flat = g.ravel()
    s = flat if flat.size <= _SMALL else flat[_sample_idx(flat.size)]
    s = s[np.isfinite(s)].astype(np.float64)
    rms = math.sqrt(float(np.mean(s * s))) if s.size else 0.0
    if rms == 0.0 or 2.0 ** -20 <= rms <= 2.0 ** 20:
        return 1.0
    return 2.0 ** min(max(-round(math.log2(rms)), -100), 100)    # stays a finite float32


def _snr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf for no noise, -inf for no signal, NaN for NaN."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    ratio = signal / noise
    return 10.0 * math.log10(ratio) if ratio > 0 else -math.inf


def _ratio(num: float, den: float) -> float:
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def tap_metrics(dut: Any, golden: Any, baseline: Any) -> dict[str, Any]:
    """Every metric of ``dut`` against ``golden`` (fp32 reference) with ``baseline`` (bf16 reference).

    Inputs are 2-D ``[tokens, features]`` arrays of one shape (converted to float32). Keys: max_abs,
    mean_abs, rmse, rel_fro, nmse, cosine, snr_db, ulp_mean, ulp_p99, ulp_max, beyond_4ulp, nan, inf,
    n, r, r_tail, baseline_rel_fro, baseline_ulp_p99, token_rel_err, token_r, worst_tokens,
    worst_elements ([token, feature, dut, golden], worst ULP error first).
    """
    d0, g0, b0 = _as_2d(dut, "dut"), _as_2d(golden, "golden"), _as_2d(baseline, "baseline")
    if d0.shape != g0.shape or b0.shape != g0.shape:
        raise TapError(f"shape mismatch: dut {d0.shape}, golden {g0.shape}, baseline {b0.shape}")
    scale = _pow2_scale(g0)
    with np.errstate(over="ignore", under="ignore"):    # overflow shows as Inf: the slow path takes it
        d, g, b = (d0, g0, b0) if scale == 1.0 else (d0 * np.float32(scale), g0 * np.float32(scale),
                                                      b0 * np.float32(scale))
        raw = _fast(d, g, b, _rowdot(g, g))
    nan = inf = 0
    if raw is None:
        raw, scale = _slow(d0, g0, b0), 1.0     # float64 over the unscaled inputs
        fin = np.isfinite(g0)
        nan, inf = int(np.count_nonzero(np.isnan(d0) & fin)), int(np.count_nonzero(np.isinf(d0) & fin))
    return _assemble(raw, d0, g0, scale, nan, inf)


def _assemble(raw: _Raw, d0: np.ndarray, g0: np.ndarray, scale: float, nan: int, inf: int) -> dict[str, Any]:
    n = g0.size
    rows, feats = g0.shape
    gg, dd, bb = float(raw.gg.sum()), float(raw.dd.sum()), float(raw.bb.sum())
    dg = gg + float(raw.gd.sum())                  # <dut, golden> = <g, g> + <g, d>
    dut2 = max(gg + 2.0 * float(raw.gd.sum()) + dd, 0.0)
    floor_rel = R_FLOOR_ROUNDINGS * BF16_ROUNDING_REL_RMS
    with np.errstate(all="ignore"):
        tok_err = np.where(raw.dd == 0, 0.0, np.sqrt(raw.dd) / np.sqrt(raw.gg))
        tok_den = np.maximum(np.sqrt(raw.bb), floor_rel * np.sqrt(raw.gg))
        tok_r = np.where(raw.dd == 0, 0.0, np.sqrt(raw.dd) / tok_den)
    if gg == 0.0 and dut2 == 0.0:
        cosine = 1.0
    elif gg == 0.0 or dut2 == 0.0:
        cosine = 0.0
    else:
        cosine = min(1.0, dg / math.sqrt(gg * dut2)) if math.isfinite(dg) else math.nan
    key = np.where(np.isnan(tok_err), np.inf, tok_err)
    order = np.argsort(-key, kind="stable")[: TOP]
    return {
        "n": n,
        "max_abs": raw.max_abs / scale,
        "mean_abs": raw.abs_sum / scale / n if n else 0.0,
        "rmse": math.sqrt(dd / n) / scale if n else 0.0,
        "rel_fro": _ratio(math.sqrt(dd), math.sqrt(gg)),
        "nmse": _ratio(dd, gg),
        "cosine": cosine,
        "snr_db": _snr_db(gg, dd),
        "ulp_mean": raw.ulp_sum / n if n else 0.0,
        "ulp_p99": raw.p99_d,
        "ulp_max": raw.ulp_max,
        f"beyond_{ULP_BEYOND}ulp": raw.beyond,
        "nan": nan,
        "inf": inf,
        "r": _ratio(math.sqrt(dd), max(math.sqrt(bb), floor_rel * math.sqrt(gg))),
        "r_tail": _ratio(raw.p99_d, max(raw.p99_b, TAIL_FLOOR_ULP)),
        "baseline_rel_fro": _ratio(math.sqrt(bb), math.sqrt(gg)),
        "baseline_ulp_p99": raw.p99_b,
        "token_rel_err": [float(x) for x in tok_err],
        "token_r": [float(x) for x in tok_r],
        "worst_tokens": [int(i) for i in order if not key[i] <= 0],
        "worst_elements": [[i // feats, i % feats, float(d0.flat[i]), float(g0.flat[i])] for i in raw.worst],
    }


def exact_match(dut: Any, golden: Any) -> bool:
    """True when ``dut`` equals ``golden`` element for element (same shape; NaN never matches)."""
    d, g = _as_2d(dut, "dut"), _as_2d(golden, "golden")
    return d.shape == g.shape and bool(np.array_equal(d, g))
