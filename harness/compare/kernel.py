"""The compiled metrics pass: every sum, maximum and quantile of one tap in one call.

Compiled with numba (cached on disk after the first compilation; the parallel variant splits rows over
the cores) so that a tap costs about one read of its three arrays plus a few microseconds: numpy
needed ~20 passes over temporaries and ~60 calls per tap, and that fixed cost dominated the 1,452
one-row decode taps of a golden set.

Numerics: sums are float64 (float32 inputs cannot overflow them, so no rescaling is needed). The
loops vectorise: ``fastmath`` reassociates the sums (changing only their last bits) but keeps IEEE
NaN/Inf semantics (no ``nnan``/``ninf``: measured no slower), so any mix of NaN and Inf at any size
goes through this same pass: sums propagate NaN as numpy's do, each row's norm pass detects special
values from the exponent bits, and such rows get one more exact pass that counts the dut's NaN/Inf
(where the golden is finite) and makes NaN errors the worst candidates; a tap with a NaN ULP error has
a NaN p99 (as np.quantile), so it never needs the keep-everything rerun. Maxima are integer maxima of
the float bits (non-negative floats, NaN above Inf, order as their bits do) because LLVM does not
vectorise a floating-point max.

ULP of a golden element: its bf16 spacing 2^(E - 134) for float32 exponent field E, with E raised to
the row's floor field (the exponent of ``max(rms * floor_fraction, min_magnitude)`` rounded to
float32; harness.compare.metrics explains the floor), built from the exponent bits.

The p99 ULP errors are exact: a seeded sample gives a threshold a little below them, the main pass
keeps the elements above it as candidates (scanning only the 8-element words it flagged), and a
selection among the candidates gives the quantile; when the sample misjudged (or more candidates
came than the buffers hold), a second pass keeps every element. Small taps keep every element from
the start.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# rows[k, i]: <g,g>, <d,d>, <g,d>, <b,b>, <g,b> over row i (d = dut - g, b = baseline - g), then the sums
# and sums of squares of the ULP errors signed along the golden, sign(g) d / ulp and sign(g) b / ulp
# (a scaling of g adds up in them, rounding noise cancels)
ROW_SUMS = ("gg", "dd", "gd", "bb", "gb", "ud", "ub", "ud2", "ub2")
BIAS_T_FLOOR = 3.0                  # r_bias: the baseline's t counts from this (below it: no evidence of bias)
# scalars[k]: sum |d|, max |d|, sum ULP error, max ULP error, elements beyond `beyond_ulp` ULP, p99 dut
# ULP error, p99 baseline ULP error
SCALARS = ("abs_sum", "max_abs", "ulp_sum", "ulp_max", "beyond", "p99_d", "p99_b", "nan", "inf")
# a block's partials (accs columns): the first five scalars, candidate counts (dut, baseline), rows with
# NaN/Inf, the dut's NaN and Inf where the golden is finite, NaN ULP errors (dut, baseline)
_ACC = 12
TOP = 5
_CHUNK = 2048                       # columns per scratch chunk of a row (multiple of 8)

_FAST = {"nsz", "reassoc", "contract"}          # no nnan/ninf: NaN and Inf keep their IEEE meaning
_JIT = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
# Helpers that must compare NaN exactly (the selection, the conclusion, the row profile) say so
# explicitly: numba makes a callee without a fastmath setting inherit its caller's, and the fastmath
# entry points call them; under ``nnan`` a NaN compared both "<" and ">=" its pivot, the quickselect's
# scans ran past their sentinels and off the array (the segfault of a NaN tap of 65k+ elements).
_EXACT = {**_JIT, "fastmath": False}


@intrinsic
def _f64_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The bits of a float64 as an int64 (a register reinterpretation)."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _bits_f64(typingctx, x):  # type: ignore[no-untyped-def]
    """The float64 whose bits are an int64."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _ctz(typingctx, x):  # type: ignore[no-untyped-def]
    """Count of trailing zero bits of a non-zero uint64."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))
    return types.uint64(types.uint64), codegen


@numba.njit(fastmath=_FAST, inline="always", **_JIT)
def _floor_exponent(gg, f, floor_fraction, min_magnitude):  # type: ignore[no-untyped-def]
    """The float32 exponent field of the row's ULP floor magnitude."""
    rms = math.sqrt(gg / f)
    mag = max(rms * floor_fraction, min_magnitude) if rms > 0.0 else 1.0
    return np.int64(math.frexp(np.float64(np.float32(mag)))[1] + 126)


@numba.njit(fastmath=_FAST, inline="always", **_JIT)
def _inv_ulp(gbits, e_floor):  # type: ignore[no-untyped-def]
    """1 / ulp = 2^(134 - E) for the element's exponent field E (at least the row's floor)."""
    e = max(np.int64((gbits >> np.uint32(23)) & np.uint32(0xFF)), e_floor)
    return _bits_f64((1157 - e) << 52)                  # float64 exponent field 1023 + 134 - E


@numba.njit(fastmath=_FAST, **_JIT)
def _row_norm(dbits, g, gbits, bbits, i):  # type: ignore[no-untyped-def]
    """(<g, g> of row i, 1 when any element of the row in the three inputs is NaN or Inf)."""
    special = np.uint32(0)
    exp_mask = np.uint32(0xFF)
    sh = np.uint32(23)
    one = np.uint32(1)
    s = 0.0
    gr, gbr, dbr, bbr = g[i], gbits[i], dbits[i], bbits[i]
    for j in range(gr.size):
        x = np.float64(gr[j])
        s += x * x
        # an all-ones exponent field (NaN or Inf) in any input sets bit 8
        special |= (((gbr[j] >> sh) & exp_mask) + one) | (((dbr[j] >> sh) & exp_mask) + one) | (
            ((bbr[j] >> sh) & exp_mask) + one)
    return s, np.int64((special >> np.uint32(8)) & one)


@numba.njit(fastmath=_FAST, **_JIT)
def _sample_errors(dut, g, base, sample_ptr, sample_cols, floor_fraction, min_magnitude):  # type: ignore[no-untyped-def]  # noqa: E501
    """ULP errors (dut, baseline) of the sampled elements (row i's columns are
    sample_cols[sample_ptr[i]:sample_ptr[i + 1]]), each row's floor estimated from its sampled
    values (from all of them when a row has fewer than 8): only a candidate threshold comes from
    these, and a misjudged one is caught and costs a second pass, so reading the sample alone
    spares a pass over the tap."""
    n_s = sample_cols.size
    u_d = np.empty(n_s)
    u_b = np.empty(n_s)
    if n_s == 0:
        return u_d, u_b
    gbits = g.view(np.uint32)
    f = g.shape[1]
    total = 0.0
    for i in range(g.shape[0]):
        for p in range(sample_ptr[i], sample_ptr[i + 1]):
            x = np.float64(g[i, sample_cols[p]])
            total += x * x
    e_all = _floor_exponent(total / n_s * f, f, floor_fraction, min_magnitude)
    for i in range(g.shape[0]):
        p0, p1 = sample_ptr[i], sample_ptr[i + 1]
        e_floor = e_all
        if p1 - p0 >= 8:
            s = 0.0
            for p in range(p0, p1):
                x = np.float64(g[i, sample_cols[p]])
                s += x * x
            e_floor = _floor_exponent(s / (p1 - p0) * f, f, floor_fraction, min_magnitude)
        for p in range(p0, p1):
            j = sample_cols[p]
            x = np.float64(g[i, j])
            inv = _inv_ulp(gbits[i, j], e_floor)
            u_d[p] = abs(np.float64(dut[i, j]) - x) * inv
            u_b[p] = abs(np.float64(base[i, j]) - x) * inv
    return u_d, u_b


@numba.njit(**_EXACT)
def _special_row(dut, g, base, i, e_floor, t_d, keep_all, k_row, k_d, end, cand_d, cand_idx, counts):  # type: ignore[no-untyped-def]  # noqa: E501
    """Row i holds NaN or Inf: count the dut's NaN and Inf where the golden is finite (counts[0:2]) and
    the NaN ULP errors of dut and baseline (counts[2:4]), and make every NaN dut error a candidate
    valued +inf, worst of all (kept already when keeping all: its value is replaced; else appended
    from position k_d, as is an infinite error the threshold missed). Returns the new k_d."""
    f = g.shape[1]
    gbits = g.view(np.uint32)
    for j in range(f):
        x = np.float64(g[i, j])
        dv = np.float64(dut[i, j])
        if math.isfinite(x):
            counts[0] += 1 if math.isnan(dv) else 0
            counts[1] += 1 if math.isinf(dv) else 0
        inv = _inv_ulp(gbits[i, j], e_floor)
        u = abs(dv - x) * inv
        counts[3] += 1 if math.isnan(abs(np.float64(base[i, j]) - x) * inv) else 0
        if math.isnan(u):
            counts[2] += 1
            if keep_all:
                cand_d[k_row + j] = np.inf
                continue
        elif keep_all or not (math.isinf(u) and not u > t_d):
            continue
        if k_d < end:
            cand_d[k_d] = np.inf
            cand_idx[k_d] = i * f + j
        k_d += 1
    return k_d


@numba.njit(fastmath=_FAST, **_JIT)
def _rows(dut, g, base, r0, r1, floor_fraction, min_magnitude, beyond_ulp, t_d, t_b,  # type: ignore[no-untyped-def]  # noqa: C901,E501
          rows, acc, cand_d, cand_idx, cand_b, start, end):
    """Every sum of rows r0:r1 into rows[:, r0:r1] and acc[:5], and their quantile candidates (dut ULP
    errors > t_d with their flat indices, baseline ULP errors > t_b) from position ``start`` of the
    candidate buffers up to ``end``; acc[5], acc[6] = how many there were (more than fit: the caller
    reruns); acc[7] = 1 when an input holds NaN or Inf, acc[8:12] then the dut's NaN and Inf where the
    golden is finite and the NaN ULP errors of dut and baseline (``_special_row``). Each row is read
    from memory once: its norm pass (which sets its ULP floor) brings it into cache."""
    f = g.shape[1]
    dbits, gbits, bbits = dut.view(np.uint32), g.view(np.uint32), base.view(np.uint32)
    special = 0
    counts = np.zeros(4, np.int64)                      # _special_row's counts over the block
    width = min(_CHUNK, (f + 7) // 8 * 8)               # a chunk of a row: its scratch stays in cache
    su = np.empty(width)                                # ULP errors of the chunk
    sb = np.empty(width)
    flag_d = np.zeros(width, np.bool_)                 # its candidates, read 8 at a time
    flag_b = np.zeros(width, np.bool_)
    words_d = flag_d.view(np.uint64)
    words_b = flag_b.view(np.uint64)
    k_d = start
    k_b = start
    abs_sum = 0.0
    ulp_sum = 0.0
    max_abs_bits = 0
    ulp_max_bits = 0
    beyond = 0
    keep_all = t_d < 0.0 and t_b < 0.0
    for i in range(r0, r1):
        gg, bad = _row_norm(dbits, g, gbits, bbits, i)
        rows[0, i] = gg
        special |= bad
        k_row = k_d
        e_floor = _floor_exponent(gg, f, floor_fraction, min_magnitude)
        s_dd = 0.0
        s_gd = 0.0
        s_bb = 0.0
        s_gb = 0.0
        s_ud = 0.0
        s_ub = 0.0
        s_ud2 = 0.0
        s_ub2 = 0.0
        for c0 in range(0, f, _CHUNK):
            c1 = min(c0 + _CHUNK, f)
            # views from column 0: indices known non-negative, so numba adds no wraparound and LLVM vectorises
            gr, dr, br, gbr = g[i, c0:c1], dut[i, c0:c1], base[i, c0:c1], gbits[i, c0:c1]  # noqa: E501
            for j in range(c1 - c0):
                x = np.float64(gr[j])
                d = np.float64(dr[j]) - x
                b = np.float64(br[j]) - x
                s_dd += d * d
                s_gd += x * d
                s_bb += b * b
                s_gb += x * b
                inv = _inv_ulp(gbr[j], e_floor)
                along = inv if x >= 0.0 else -inv
                e_d = d * along
                e_b = b * along
                s_ud += e_d
                s_ub += e_b
                s_ud2 += e_d * e_d
                s_ub2 += e_b * e_b
                ad = abs(d)
                abs_sum += ad
                u = ad * inv
                ub = abs(b) * inv
                ulp_sum += u
                max_abs_bits = max(max_abs_bits, _f64_bits(ad))
                ulp_max_bits = max(ulp_max_bits, _f64_bits(u))
                beyond += 1 if u > beyond_ulp else 0
                su[j] = u
                sb[j] = ub
                flag_d[j] = u > t_d
                flag_b[j] = ub > t_b
            flat0 = i * f + c0
            m = c1 - c0
            if keep_all:
                for j in range(m):
                    cand_d[k_d + j] = su[j]
                    cand_idx[k_d + j] = flat0 + j
                    cand_b[k_b + j] = sb[j]
                k_d += m
                k_b += m
                continue
            flag_d[m:] = False                          # a short last chunk: clear the rest of its word
            flag_b[m:] = False
            for w in range((m + 7) // 8):               # set flags are 0x01 bytes: visit each by its bit
                x = words_d[w]
                while x:
                    j = 8 * w + np.int64(_ctz(x) >> np.uint64(3))
                    if k_d < end:
                        cand_d[k_d] = su[j]
                        cand_idx[k_d] = flat0 + j
                    k_d += 1
                    x &= x - np.uint64(1)
                x = words_b[w]
                while x:
                    if k_b < end:
                        cand_b[k_b] = sb[8 * w + np.int64(_ctz(x) >> np.uint64(3))]
                    k_b += 1
                    x &= x - np.uint64(1)
        if bad:
            k_d = _special_row(dut, g, base, i, e_floor, t_d, keep_all, k_row, k_d, end, cand_d, cand_idx, counts)
        rows[1, i] = s_dd
        rows[2, i] = s_gd
        rows[3, i] = s_bb
        rows[4, i] = s_gb
        rows[5, i] = s_ud
        rows[6, i] = s_ub
        rows[7, i] = s_ud2
        rows[8, i] = s_ub2
    acc[0] = abs_sum
    acc[1] = _bits_f64(max_abs_bits)
    acc[2] = ulp_sum
    acc[3] = _bits_f64(ulp_max_bits)
    acc[4] = beyond
    acc[5] = k_d - start
    acc[6] = k_b - start
    acc[7] = special
    acc[8:12] = counts


@numba.njit(**_EXACT)
def _select(a, k):  # type: ignore[no-untyped-def]
    """The k-th smallest value of ``a`` (0-based); ``a`` is reordered in place so that a[:k] <= a[k]
    <= a[k + 1:]. Quickselect with a median-of-three pivot and Hoare partitioning, which stays
    balanced on repeated values (ULP errors repeat often: a bf16 spacing holds only 2^16 float32
    steps)."""
    lo, hi = 0, a.size - 1
    while hi > lo + 1:
        mid = (lo + hi) // 2
        a[mid], a[lo + 1] = a[lo + 1], a[mid]
        if a[lo] > a[hi]:
            a[lo], a[hi] = a[hi], a[lo]
        if a[lo + 1] > a[hi]:
            a[lo + 1], a[hi] = a[hi], a[lo + 1]
        if a[lo] > a[lo + 1]:
            a[lo], a[lo + 1] = a[lo + 1], a[lo]
        i, j, pivot = lo + 1, hi, a[lo + 1]             # a[lo] <= pivot <= a[hi] stop both scans
        while True:
            i += 1
            while a[i] < pivot:
                i += 1
            j -= 1
            while a[j] > pivot:
                j -= 1
            if j < i:
                break
            a[i], a[j] = a[j], a[i]
        a[lo + 1], a[j] = a[j], pivot
        if j >= k:
            hi = j - 1
        if j <= k:
            lo = i
    if hi == lo + 1 and a[hi] < a[lo]:
        a[lo], a[hi] = a[hi], a[lo]
    return a[k]


@numba.njit(**_EXACT)
def _sorted_copy(a):  # type: ignore[no-untyped-def]
    """``a`` sorted ascending, as a new array: insertion sort, for the 256-value samples of ``_kth_pair``.
    np.sort gives the same values but compiles numba's quicksort, ~2 s of a fresh install's first gate."""
    s = a.copy()
    for i in range(1, s.size):
        v = s[i]
        j = i - 1
        while j >= 0 and s[j] > v:
            s[j + 1] = s[j]
            j -= 1
        s[j + 1] = v
    return s


@numba.njit(**_EXACT)
def _kth_pair(a, k):  # type: ignore[no-untyped-def]
    """(k-th, (k+1)-th) smallest values of ``a`` (0-based; the k-th twice when k is the last), ``a``
    being reordered. Near the top (the p99 of a small tap), one pass keeps the largest values.
    Otherwise quickselect, which mispredicts a branch on every other element of random data, so
    large arrays first narrow the search: a strided sample of 256 brackets the k-th value with a
    window of +-4 standard deviations of its sample rank, one branch-free pass counts the elements
    below the window and copies those inside, and quickselect runs on the window alone (on the
    whole array when the window missed)."""
    n = a.size
    for i in range(n):                                  # NaN ranks above everything, as in np.sort: the
        if a[i] != a[i]:                                # partition's sentinels need a total order
            a[i] = np.inf
    top_m = n - k                                       # the k-th smallest is the top_m-th largest
    if top_m <= 32:                                     # near the top (a p99 of a small tap): keep the
        top = np.full(top_m, -np.inf)                   # largest values, descending; inserts are rare
        for i in range(n):
            v = a[i]
            if v > top[top_m - 1]:
                p = top_m - 1
                while p > 0 and top[p - 1] < v:
                    top[p] = top[p - 1]
                    p -= 1
                top[p] = v
        return top[top_m - 1], top[top_m - 2] if top_m >= 2 else top[0]
    if n > 1024:
        m = 256
        sample = _sorted_copy(a[:: n // m][:m])
        p = (k + 0.5) / n
        half = 4.0 * math.sqrt(m * p * (1.0 - p)) + 2.0
        i1, i2 = int(p * m - half), int(p * m + half)
        lo_v = sample[i1] if i1 > 0 else -np.inf
        hi_v = sample[i2] if i2 < m - 1 else np.inf
        window = np.empty(n)
        below = 0
        w = 0
        above_min = np.inf
        for i in range(n):
            v = a[i]
            below += 1 if v < lo_v else 0
            window[w] = v
            w += 1 if lo_v <= v <= hi_v else 0
            above_min = min(above_min, v if v > hi_v else np.inf)
        kk = k - below
        if 0 <= kk < w:
            win = window[:w]
            v_k = _select(win, kk)
            if kk + 1 < w:
                return v_k, win[kk + 1:].min()
            return v_k, (above_min if k + 1 < n else v_k)
    v_k = _select(a, k)
    return v_k, (a[k + 1:].min() if k + 1 < n else v_k)


@numba.njit(**_EXACT)
def _quantile(cand, t, n, q):  # type: ignore[no-untyped-def]
    """(np.quantile(all, q) with linear interpolation, True) from the candidates > t of n values >= 0;
    (0, False) when the candidates do not hold the two order statistics it needs."""
    h = (n - 1) * q
    lo = int(math.floor(h))
    hi = min(lo + 1, n - 1)
    below = n - cand.size                               # sorted positions < below hold values <= t
    if lo < below and t != 0.0:                         # t == 0: the values below are exactly 0
        return 0.0, False
    if hi < below:
        return 0.0, True
    if lo < below:                                      # lo is a zero below every candidate
        v_lo = 0.0
        v_hi = cand.min()
    else:
        v_lo, v_hi = _kth_pair(cand.copy(), lo - below)  # a copy: the candidates keep their order for _top
        if hi == lo:
            v_hi = v_lo
    if v_hi == v_lo:                                    # also inf between inf and inf (not inf - inf = NaN)
        return v_lo, True
    return v_lo + (v_hi - v_lo) * (h - lo), True


@numba.njit(**_EXACT)
def _top(values, index):  # type: ignore[no-untyped-def]
    """Flat indices of the TOP largest positive values, largest first (ties: lower index first)."""
    best_v = np.zeros(TOP)
    best_i = np.full(TOP, -1, np.int64)
    for k in range(values.size):
        v = values[k]
        if not v > 0.0 or (best_i[TOP - 1] >= 0 and v <= best_v[TOP - 1]):
            continue
        p = TOP - 1
        while p > 0 and (v > best_v[p - 1] or best_i[p - 1] < 0):
            best_v[p] = best_v[p - 1]
            best_i[p] = best_i[p - 1]
            p -= 1
        best_v[p] = v
        best_i[p] = index[k]
    return best_i[best_i >= 0]


@numba.njit(**_EXACT)
def _nanmax(a):  # type: ignore[no-untyped-def]
    """max(a), NaN when any value is NaN (as np.max)."""
    m = -np.inf
    for v in a:
        if not v <= m:
            m = v
    return m


@numba.njit(**_EXACT)
def _conclude(accs, starts, ends, cand_d, cand_idx, cand_b, t_d, t_b, n, q, scalars):  # type: ignore[no-untyped-def]  # noqa: E501
    """Combine the blocks into scalars (SCALARS order) and the worst flat indices: (True, worst); (False,
    -) when the candidates overflowed their buffers or do not hold the quantiles (the caller reruns
    keeping every element). A NaN ULP error makes that side's p99 NaN (as np.quantile): its
    candidates then only serve the worst elements, and their overflow needs no rerun."""
    nb = starts.size
    none = np.zeros(0, np.int64)
    nan_d, nan_b = accs[:, 10].sum() > 0, accs[:, 11].sum() > 0
    for blk in range(nb):
        cap = ends[blk] - starts[blk]
        if (accs[blk, 5] > cap and not nan_d) or (accs[blk, 6] > cap and not nan_b):
            return False, none
    s0, cap0 = starts[0], ends[0] - starts[0]
    k_d0, k_b0 = min(int(accs[0, 5]), cap0), min(int(accs[0, 6]), cap0)
    cd, ci, cb = cand_d[s0:s0 + k_d0], cand_idx[s0:s0 + k_d0], cand_b[s0:s0 + k_b0]
    if nb == 2:                                         # the second block's candidates follow
        s1, cap1 = starts[1], ends[1] - starts[1]
        k_d1, k_b1 = min(int(accs[1, 5]), cap1), min(int(accs[1, 6]), cap1)
        cd = np.concatenate((cd, cand_d[s1:s1 + k_d1]))
        ci = np.concatenate((ci, cand_idx[s1:s1 + k_d1]))
        cb = np.concatenate((cb, cand_b[s1:s1 + k_b1]))
    p99_d, ok_d = (math.nan, True) if nan_d else _quantile(cd, t_d, n, q)
    p99_b, ok_b = (math.nan, True) if nan_b else _quantile(cb, t_b, n, q)
    if not (ok_d and ok_b):
        return False, none
    scalars[0] = accs[:, 0].sum()
    scalars[1] = _nanmax(accs[:, 1])
    scalars[2] = accs[:, 2].sum()
    scalars[3] = _nanmax(accs[:, 3])
    scalars[4] = accs[:, 4].sum()
    scalars[5] = p99_d
    scalars[6] = p99_b
    scalars[7] = accs[:, 8].sum()
    scalars[8] = accs[:, 9].sum()
    return True, _top(cd, ci)


@numba.njit(**_EXACT)
def _thresholds(dut, g, base, sample_ptr, sample_cols, k, floor_fraction, min_magnitude):  # type: ignore[no-untyped-def]  # noqa: E501
    """Candidate thresholds (dut, baseline): the k-th smallest sampled ULP errors; with no sample,
    (-1, -1), which keeps every element."""
    if sample_cols.size == 0:
        return -1.0, -1.0
    u_d, u_b = _sample_errors(dut, g, base, sample_ptr, sample_cols, floor_fraction, min_magnitude)
    return _kth_pair(u_d, k)[0], _kth_pair(u_b, k)[0]


@numba.njit(**_EXACT)
def _buffers(bounds, f, keep_all):  # type: ignore[no-untyped-def]
    """Candidate buffers for the row blocks ``bounds`` and each block's [start, end) in them (every
    element when keeping all, else 4% of them plus 1024: the sampled threshold keeps ~1.5-2%, and
    more means the sample misjudged, so the pass reruns keeping all; sized to need, because touching
    a buffer the size of a large tap costs more than the pass), and the blocks' partials."""
    nb = bounds.size - 1
    starts = np.zeros(nb, np.int64)
    ends = np.zeros(nb, np.int64)
    pos = 0
    for blk in range(nb):
        elements = (bounds[blk + 1] - bounds[blk]) * f
        starts[blk] = pos
        pos += elements if keep_all else min(elements, elements // 25 + 1024)
        ends[blk] = pos
    return starts, ends, np.empty(pos), np.empty(pos, np.int64), np.empty(pos), np.zeros((nb, _ACC))


@numba.njit(fastmath=_FAST, parallel=True, **_JIT)
def tap_pass_parallel(dut, g, base, sample_ptr, sample_cols, k, q, floor_fraction, min_magnitude,  # type: ignore[no-untyped-def]  # noqa: E501
                      beyond_ulp):
    """(rows, scalars, worst flat indices) of one tap, rows split in two blocks over the
    cores. The sample (row i's sampled columns: sample_cols[sample_ptr[i]:sample_ptr[i + 1]]; none:
    keep every element as a candidate) sets the candidate threshold at its ``k``-th smallest ULP
    error; ``q`` is the quantile. Any mix of NaN and Inf is measured, never assumed away."""
    r, f = g.shape
    rows = np.zeros((len(ROW_SUMS), r))
    scalars = np.zeros(len(SCALARS))
    t_d, t_b = _thresholds(dut, g, base, sample_ptr, sample_cols, k, floor_fraction, min_magnitude)
    bounds = np.array([0, r // 2, r])
    for _attempt in range(2):
        starts, ends, cand_d, cand_idx, cand_b, accs = _buffers(bounds, f, t_d < 0.0)
        for blk in numba.prange(2):
            _rows(dut, g, base, bounds[blk], bounds[blk + 1], floor_fraction, min_magnitude, beyond_ulp, t_d,
                  t_b, rows, accs[blk], cand_d, cand_idx, cand_b, starts[blk], ends[blk])
        done, worst = _conclude(accs, starts, ends, cand_d, cand_idx, cand_b, t_d, t_b, r * f, q, scalars)
        if done:
            return rows, scalars, worst
        t_d = t_b = -1.0                                # the sample misjudged: keep every element
    raise AssertionError("a pass keeping every element always covers the quantile")


@numba.njit(fastmath=_FAST, **_JIT)
def tap_pass_serial(dut, g, base, sample_ptr, sample_cols, k, q, floor_fraction, min_magnitude,  # type: ignore[no-untyped-def]  # noqa: E501
                    beyond_ulp):
    """``tap_pass_parallel`` in one block on this thread: for small taps, where starting threads
    costs more than it saves."""
    r, f = g.shape
    rows = np.zeros((len(ROW_SUMS), r))
    scalars = np.zeros(len(SCALARS))
    t_d, t_b = _thresholds(dut, g, base, sample_ptr, sample_cols, k, floor_fraction, min_magnitude)
    bounds = np.array([0, r])
    for _attempt in range(2):
        starts, ends, cand_d, cand_idx, cand_b, accs = _buffers(bounds, f, t_d < 0.0)
        _rows(dut, g, base, 0, r, floor_fraction, min_magnitude, beyond_ulp, t_d, t_b, rows, accs[0], cand_d,
              cand_idx, cand_b, 0, ends[0])
        done, worst = _conclude(accs, starts, ends, cand_d, cand_idx, cand_b, t_d, t_b, r * f, q, scalars)
        if done:
            return rows, scalars, worst
        t_d = t_b = -1.0                                # the sample misjudged: keep every element
    raise AssertionError("a pass keeping every element always covers the quantile")

@numba.njit(**_EXACT)
def _t(total, squares, f):  # type: ignore[no-untyped-def]
    """One-sample t statistic of f values from their sum and sum of squares (0 for a zero sum)."""
    if total == 0.0 or f < 2:
        return 0.0
    mean = total / f
    var = max(squares - f * mean * mean, 0.0) / (f - 1)
    return mean / math.sqrt(var / f) if var > 0.0 else math.copysign(math.inf, mean)


@numba.njit(**_EXACT)
def _worst_bias(rows, features, lean_floor):  # type: ignore[no-untyped-def]
    """(r_bias, t_dut, t_baseline, lean_dut, lean_baseline) of the worst row among those whose mean ULP
    error along the golden (the lean) is at least ``lean_floor`` (NaN-safe: a NaN lean counts, NaN wins)."""
    r_bias, t_d_worst, t_b_worst, lean_d, lean_b = 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(rows.shape[1]):
        lean = rows[5, i] / features
        if abs(lean) < lean_floor:                      # too small to matter, however significant (NaN counts)
            continue
        t_d = _t(rows[5, i], rows[7, i], features)
        if t_d != 0.0:
            t_b = _t(rows[6, i], rows[8, i], features)
            ratio = abs(t_d) / max(abs(t_b), BIAS_T_FLOOR)
            if not ratio <= r_bias:                     # NaN wins
                r_bias, t_d_worst, t_b_worst, lean_d, lean_b = ratio, t_d, t_b, lean, rows[6, i] / features
    return r_bias, t_d_worst, t_b_worst, lean_d, lean_b


@numba.njit(**_EXACT)
def baseline_lean_rms(rows, features):  # type: ignore[no-untyped-def]
    """RMS over rows of the baseline's lean (its mean ULP error along the golden per row): how far a
    correct run's rows lean by themselves (NaN-safe: NaN propagates)."""
    r = rows.shape[1]
    if r == 0:
        return 0.0
    s = 0.0
    for i in range(r):
        lean = rows[6, i] / features
        s += lean * lean
    return math.sqrt(s / r)


@numba.njit(**_EXACT)
def row_summary(rows, features, floor_rel, lean_floor, ulp_rms_floor, drift_multiple):  # type: ignore[no-untyped-def]
    """Per-row profile from the row sums (NaN-safe): (relative error per row; R per row, its
    denominator floored at ``floor_rel`` times the golden's norm; r_bias, the worst row's |t| of the
    dut's ULP errors along the golden over the baseline's (at least BIAS_T_FLOOR) among the rows
    whose mean such error (the lean, in ULP) is at least ``lean_floor``, with that row's two t values
    and two leans; the same among the rows whose lean is also at least ``drift_multiple`` times the
    baseline's RMS row lean (the drift-relative r_bias of cumulative mode), followed by that lean
    floor; r_ulp, the worst row's RMS ULP error over the baseline's (floored at ``ulp_rms_floor``
    ULP); the squared errors of dut and baseline once each row's best gain along the golden is removed,
    summed over rows (|d|^2 - <g, d>^2 / |g|^2; NaN propagates: max() keeps a NaN first argument);
    the TOP rows with the largest relative error (NaN first); the sums over rows, ROW_SUMS order)."""
    r = rows.shape[1]
    tok_err = np.zeros(r)
    tok_r = np.zeros(r)
    key = np.zeros(r)
    r_ulp = 0.0
    res_d = 0.0                                         # errors with each row's best gain removed
    res_b = 0.0
    for i in range(r):
        res_d += _gain_free(rows[0, i], rows[1, i], rows[2, i])
        res_b += _gain_free(rows[0, i], rows[3, i], rows[4, i])
        if rows[7, i] != 0.0:                           # sum of squared ULP errors (signs square away)
            ratio = math.sqrt(rows[7, i] / max(rows[8, i], ulp_rms_floor * ulp_rms_floor * features))
            if not ratio <= r_ulp:                      # NaN wins
                r_ulp = ratio
        gg, dd, bb = rows[0, i], rows[1, i], rows[3, i]
        if dd != 0.0:
            ng = math.sqrt(gg)
            tok_err[i] = math.sqrt(dd) / ng if ng > 0.0 else math.inf
            den = max(math.sqrt(bb), floor_rel * ng)
            tok_r[i] = math.sqrt(dd) / den if den > 0.0 else math.inf
        key[i] = math.inf if math.isnan(tok_err[i]) or math.isnan(dd) else tok_err[i]
    bias = _worst_bias(rows, features, lean_floor)
    drift_floor = drift_multiple * baseline_lean_rms(rows, features)
    drift_floor = drift_floor if not drift_floor <= lean_floor else lean_floor    # NaN stays NaN
    if drift_floor == lean_floor:
        drift = bias
    else:                                               # a NaN floor counts every row (NaN wins in them)
        drift = _worst_bias(rows, features, drift_floor if drift_floor == drift_floor else 0.0)
    totals = np.zeros(rows.shape[0])
    for k in range(rows.shape[0]):
        totals[k] = rows[k].sum()
    return (tok_err, tok_r, bias, (drift[0], drift[1], drift[2], drift[3], drift[4], drift_floor), r_ulp,
            (res_d, res_b), _top(key, np.arange(r)), totals)


@numba.njit(**_EXACT)
def _ratio_floored(num2, den2, gg, floor_rel):  # type: ignore[no-untyped-def]
    """sqrt(num2) / max(sqrt(den2), floor_rel sqrt(gg)): 0 for a zero numerator, NaN propagating."""
    if num2 == 0.0:
        return 0.0
    if math.isnan(num2) or math.isnan(den2) or math.isnan(gg):
        return math.nan
    den = max(math.sqrt(den2), floor_rel * math.sqrt(gg))
    return math.sqrt(num2) / den if den > 0.0 else math.inf


@numba.njit(**_EXACT)
def _gain_free(gg, dd, gd):  # type: ignore[no-untyped-def]
    """|d|^2 - <g, d>^2 / |g|^2 (the error once its best gain along g is removed), at least 0; a zero g
    keeps the whole error; NaN propagates."""
    if not gg > 0.0:
        return dd if not math.isnan(gg) else math.nan
    v = dd - gd * gd / gg
    return v if not v < 0.0 else 0.0


@numba.njit(fastmath=_FAST, **_JIT)
def _block_sums(dut, g, base, block):  # type: ignore[no-untyped-def]
    """[5, rows, blocks]: <g,g>, <d,d>, <g,d>, <b,b>, <g,b> over each aligned block of ``block`` columns
    of each row (d = dut - g, b = baseline - g), float64."""
    r, f = g.shape
    nb = f // block
    out = np.zeros((5, r, nb))
    for i in range(r):
        for h in range(nb):
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            s4 = 0.0
            gr, dr, br = g[i, h * block:(h + 1) * block], dut[i, h * block:(h + 1) * block], base[i, h * block:(h + 1) * block]
            for j in range(block):
                x = np.float64(gr[j])
                d = np.float64(dr[j]) - x
                b = np.float64(br[j]) - x
                s0 += x * x
                s1 += d * d
                s2 += x * d
                s3 += b * b
                s4 += x * b
            out[0, i, h] = s0
            out[1, i, h] = s1
            out[2, i, h] = s2
            out[3, i, h] = s3
            out[4, i, h] = s4
    return out


@numba.njit(**_EXACT)
def head_summary(dut, g, base, block, floor_rel):  # type: ignore[no-untyped-def]
    """(gain_free_r, row_gain_free_r, head_r, head_gain_free_r) of a head-structured tap whose rows are
    ``block``-wide heads (harness.compare.metrics.structure_metrics says what each is). NaN wins every
    maximum."""
    s = _block_sums(dut, g, base, block)
    r, nb = s.shape[1], s.shape[2]
    res_d = np.zeros((r, nb))
    res_b = np.zeros((r, nb))
    for i in range(r):
        for h in range(nb):
            res_d[i, h] = _gain_free(s[0, i, h], s[1, i, h], s[2, i, h])
            res_b[i, h] = _gain_free(s[0, i, h], s[3, i, h], s[4, i, h])
    total = _ratio_floored(res_d.sum(), res_b.sum(), s[0].sum(), floor_rel)
    row_free = 0.0
    for i in range(r):
        v = _ratio_floored(res_d[i].sum(), res_b[i].sum(), s[0, i].sum(), floor_rel)
        if math.isnan(v) or v > row_free:       # NaN wins and stays
            row_free = v
    head = 0.0
    head_free = 0.0
    for h in range(nb):
        v = _ratio_floored(s[1, :, h].sum(), s[3, :, h].sum(), s[0, :, h].sum(), floor_rel)
        if math.isnan(v) or v > head:
            head = v
        v = _ratio_floored(res_d[:, h].sum(), res_b[:, h].sum(), s[0, :, h].sum(), floor_rel)
        if math.isnan(v) or v > head_free:
            head_free = v
    return total, row_free, head, head_free
