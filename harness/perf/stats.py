"""The performance regression decision: an effect-size gate AND a significance test, direction-aware.

Rule (``compare``): with at least ``min_samples`` (default 6) samples per side,

* ``ratio`` = the Hodges-Lehmann ratio cand/base: exp(median over all pairs of log(cand_j / base_i));
  ``slowdown`` = ratio - 1 for latency-like metrics (``direction="lower"``: lower is better) and
  1/ratio - 1 for throughput (``"higher"``), so a drop from 64.1 to 42.5 tok/s is a 51% slowdown, the
  same number the per-token latency shows;
* **regression** when ``slowdown >= threshold`` (default 5%) and a one-sided Mann-Whitney U test
  says the candidate is worse with p < ``alpha`` (default 0.01);
* **improvement** symmetrically (speed-up >= threshold and the opposite one-sided p < alpha);
* **inconclusive** when a side has fewer than ``min_samples`` samples (never "pass"), or when the
  estimate is past the threshold but p only reaches ``suspect_alpha`` (default 0.1): a suspected
  regression that 10 more rounds per side settles (benchmarks/perf_gate_power.py measures that
  two-stage use); otherwise **unchanged**.

Why Hodges-Lehmann rather than the plain ratio of medians: it is the shift estimate that the
Mann-Whitney test inverts, so the two gates judge the same quantity, and it is markedly less noisy
than a ratio of two 10-sample medians (the median's efficiency is 64% of the mean's, H-L's 95%) while
as robust to outliers. Measured: at CV 5% the two-stage power rose from 94.8% to 96.3% with the same
false-alarm rate. The medians stay in the result for display.

Why both gates: the threshold alone (pytest-benchmark's ``mean:5%``) fires on noise, 15-20% of the
time at CV 5%; the test alone flags 1% changes nobody cares about. Rank statistics shrug off
the occasional 2x outlier (the NPU's ~150 ms wake-up after idle) that drags a mean.

Change points (``change_points``): binary segmentation with a Mann-Whitney split scan. Within a
segment of runs every split is scored by a two-sided Mann-Whitney U test on the pooled samples of
the two sides; the best split counts when its Bonferroni-adjusted p (p x number of splits scanned)
is below alpha AND the ratio of the two sides' pooled medians passes the same threshold; then both
halves are scanned again. Chosen over PELT because it needs no penalty constant and no noise model, gives a p-value per
change, and the threshold keeps run-to-run drift (pooled samples ignore between-run variance) from
being reported.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Literal, Sequence

import numpy as np

from harness.errors import HarnessError

Direction = Literal["lower", "higher"]
DEFAULT_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.01
# 0.1, measured with benchmarks/perf_gate_power.py (10 samples per side): the two-stage use then
# reaches 96.5% power at CV 5% (95.0% with 0.05); the price is a rerun request on unchanged code
# 1.8% of the time at CV 5% and 8% at CV 10% (an exit 3, never a false "regression").
DEFAULT_SUSPECT_ALPHA = 0.1
MIN_SAMPLES = 6


class Verdict(str, Enum):
    """Outcome of one comparison."""

    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    UNCHANGED = "unchanged"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """One metric's decision with everything needed to retune it; truthy when it may pass a gate."""

    verdict: Verdict
    direction: Direction
    base_median: float
    cand_median: float
    ratio: float  # Hodges-Lehmann cand/base ratio, raw (not direction-adjusted)
    slowdown: float  # direction-adjusted: > 0 means worse, 0.10 = 10% slower
    p_worse: float  # one-sided Mann-Whitney p that the candidate is worse (nan when not tested)
    p_better: float  # one-sided p that it is better
    n_base: int
    n_cand: int
    threshold: float
    alpha: float
    reason: str

    def __bool__(self) -> bool:
        return self.verdict in (Verdict.UNCHANGED, Verdict.IMPROVEMENT)

    def to_dict(self) -> dict:
        """JSON-ready dict (nan p-values become null)."""
        d = asdict(self)
        d["verdict"] = self.verdict.value
        for key in ("p_worse", "p_better"):
            d[key] = None if math.isnan(d[key]) else d[key]
        return d


def _as_samples(values: Sequence[float], label: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    if arr.ndim != 1:
        raise HarnessError(f"{label}: samples must be a flat list of numbers")
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr <= 0)):
        raise HarnessError(f"{label}: samples must be finite and > 0 (got {arr.tolist()[:8]}...)")
    return arr


def _check_direction(direction: str) -> Direction:
    if direction not in ("lower", "higher"):
        raise HarnessError(f"direction must be 'lower' or 'higher', not {direction!r}")
    return direction  # type: ignore[return-value]


def change_words(slowdown: float) -> str:
    """A direction-adjusted change in words: 0.095 -> "slower by 9.5%", -0.095 -> "faster by 9.5%"."""
    if not math.isfinite(slowdown):
        return "change unknown"
    if abs(slowdown) < 0.0005:
        return "unchanged"
    return f"{'slower' if slowdown > 0 else 'faster'} by {abs(slowdown):.1%}"


def _slowdown(ratio: float, direction: Direction) -> float:
    return ratio - 1.0 if direction == "lower" else 1.0 / ratio - 1.0


def _mwu_greater(x: np.ndarray, y: np.ndarray) -> float:
    """One-sided Mann-Whitney p that x tends to exceed y; 1.0 when every value ties (no evidence)."""
    if np.all(x == x[0]) and np.all(y == x[0]):
        return 1.0
    from scipy.stats import mannwhitneyu  # here, not at import: scipy.stats costs ~1 s of every CLI start

    p = float(mannwhitneyu(x, y, alternative="greater").pvalue)
    return 1.0 if math.isnan(p) else p


def hodges_lehmann_ratio(base: np.ndarray, cand: np.ndarray) -> float:
    """exp(median of all pairwise log(cand_j / base_i)): the shift estimate Mann-Whitney's test inverts."""
    return float(np.exp(np.median(np.subtract.outer(np.log(cand), np.log(base)))))


def compare(
    base: Sequence[float],
    cand: Sequence[float],
    direction: Direction = "lower",
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    min_samples: int = MIN_SAMPLES,
    suspect_alpha: float = DEFAULT_SUSPECT_ALPHA,
    label: str = "metric",
) -> Comparison:
    """Decide whether ``cand`` regressed against ``base`` (defaults: 5%, alpha 0.01, >= 6 samples)."""
    direction = _check_direction(direction)
    if not 0 < threshold < 1 or not 0 < alpha < 1 or not alpha <= suspect_alpha < 1:
        raise HarnessError(
            f"{label}: need 0 < threshold < 1, 0 < alpha <= suspect_alpha < 1 "
            f"(got threshold={threshold}, alpha={alpha}, suspect_alpha={suspect_alpha})"
        )
    b, c = _as_samples(base, f"{label} (base)"), _as_samples(cand, f"{label} (candidate)")
    nan = float("nan")
    common = dict(direction=direction, n_base=b.size, n_cand=c.size, threshold=threshold, alpha=alpha)
    if b.size == 0 or c.size == 0:
        return Comparison(Verdict.INCONCLUSIVE, base_median=nan, cand_median=nan, ratio=nan,
                          slowdown=nan, p_worse=nan, p_better=nan,
                          reason=f"{label}: no samples on one side (base {b.size}, candidate {c.size})",
                          **common)
    mb, mc = float(np.median(b)), float(np.median(c))
    ratio = hodges_lehmann_ratio(b, c)
    slow = _slowdown(ratio, direction)
    if b.size < min_samples or c.size < min_samples:
        return Comparison(Verdict.INCONCLUSIVE, base_median=mb, cand_median=mc, ratio=ratio,
                          slowdown=slow, p_worse=nan, p_better=nan,
                          reason=(f"{label}: need >= {min_samples} samples per side, have base {b.size}, "
                                  f"candidate {c.size}; rerun with more rounds (harness gate --perf --rounds N, pytest --rounds N)"), **common)
    # "worse" is cand > base for latency, cand < base for throughput.
    p_worse = _mwu_greater(c, b) if direction == "lower" else _mwu_greater(b, c)
    p_better = _mwu_greater(b, c) if direction == "lower" else _mwu_greater(c, b)
    speedup = _slowdown(1.0 / ratio, direction)
    where = f"{label}: median {mb:.6g} -> {mc:.6g} ({change_words(slow)})"
    if slow >= threshold and p_worse < alpha:
        verdict, why = Verdict.REGRESSION, f"regression: {where}, p={p_worse:.2g} < {alpha}"
    elif speedup >= threshold and p_better < alpha:
        verdict, why = Verdict.IMPROVEMENT, f"improvement: {where}, p={p_better:.2g} < {alpha}"
    elif slow >= threshold and p_worse < suspect_alpha:
        verdict, why = Verdict.INCONCLUSIVE, (
            f"suspected regression: {where} but p={p_worse:.2g} >= {alpha}; "
            "more samples needed (rerun both sides with more rounds: --rounds N)")
    elif slow >= threshold:
        verdict, why = Verdict.UNCHANGED, f"unchanged: {where} is noise (p={p_worse:.2g})"
    else:
        verdict, why = Verdict.UNCHANGED, f"unchanged: {where}, below the {threshold:.0%} threshold"
    return Comparison(verdict, base_median=mb, cand_median=mc, ratio=ratio, slowdown=slow,
                      p_worse=p_worse, p_better=p_better, reason=why, **common)


@dataclass(frozen=True)
class ChangePoint:
    """A level shift between run ``index - 1`` and run ``index`` (0-based, oldest first)."""

    index: int
    before_median: float
    after_median: float
    slowdown: float  # direction-adjusted, > 0 is worse
    p_adjusted: float  # Bonferroni-adjusted two-sided Mann-Whitney p
    verdict: Verdict  # REGRESSION or IMPROVEMENT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d


def _best_split(runs: list[np.ndarray], lo: int, hi: int, direction: Direction, threshold: float,
                min_samples: int) -> tuple[float, ChangePoint] | None:
    """Scan splits of runs[lo:hi]; return (raw p, change) of the best split passing the threshold."""
    from scipy.stats import mannwhitneyu  # here, not at import (see _mwu_greater)

    best: tuple[float, ChangePoint] | None = None
    splits = 0
    for k in range(lo + 1, hi):
        left, right = np.concatenate(runs[lo:k]), np.concatenate(runs[k:hi])
        if left.size < min_samples or right.size < min_samples:
            continue
        splits += 1
        ml, mr = float(np.median(left)), float(np.median(right))
        slow = _slowdown(mr / ml, direction)
        if slow < threshold and _slowdown(ml / mr, direction) < threshold:
            continue
        if np.all(left == left[0]) and np.all(right == left[0]):
            continue
        p = float(mannwhitneyu(right, left, alternative="two-sided").pvalue)
        if best is None or p < best[0]:
            verdict = Verdict.REGRESSION if slow > 0 else Verdict.IMPROVEMENT
            best = (p, ChangePoint(k, ml, mr, slow, p, verdict))
    if best is None:
        return None
    p, cp = best
    adjusted = min(1.0, p * splits)
    return p, ChangePoint(cp.index, cp.before_median, cp.after_median, cp.slowdown, adjusted, cp.verdict)


def change_points(
    runs: Sequence[Sequence[float]],
    direction: Direction = "lower",
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    min_samples: int = MIN_SAMPLES,
) -> list[ChangePoint]:
    """Level shifts in a history series (one sample list per run, oldest first), by binary segmentation."""
    direction = _check_direction(direction)
    arrays = [_as_samples(r, f"run {i}") for i, r in enumerate(runs)]
    found: list[ChangePoint] = []
    stack = [(0, len(arrays))]
    while stack:
        lo, hi = stack.pop()
        if hi - lo < 2:
            continue
        best = _best_split(arrays, lo, hi, direction, threshold, min_samples)
        if best is None or best[1].p_adjusted >= alpha:
            continue
        cp = best[1]
        found.append(cp)
        stack += [(lo, cp.index), (cp.index, hi)]
    return sorted(found, key=lambda c: c.index)
