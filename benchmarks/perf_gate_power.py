"""Detection power and false-alarm rate of perf regression rules on synthetic timing series.

Series: log-normal noise with a given coefficient of variation, plus occasional slow outliers (each
sample, with probability 3%, is multiplied by U(1.3, 2.0): a wake-up after idle, a page fault storm),
10 samples per side. Each cell is the fraction of trials a rule flags a regression: with a true 10%
slowdown that is the power, with no change the false-alarm rate. Rules, on the same series:

* ours (10 v 10)       harness.perf.stats.compare: median ratio >= 5% AND Mann-Whitney p < 0.01
* ours, 2-stage        as above; an "inconclusive" (suspected) result takes 10 more rounds per side
                       and is decided on 20 v 20, as the CLI's exit-3 message asks
* ours, history base   candidate 10 samples against the pooled 50 samples of 5 previous runs
                       (what ``harness perf compare --history`` does in a nightly job)
* pytest-benchmark     --benchmark-compare-fail=mean:5%: mean(cand)/mean(base) - 1 > 5%
* IRON                 change >= 5% and > 2 sigma (sigma: the baseline's sample std)

Run: ``python benchmarks/perf_gate_power.py [--trials 2000] [--seed 0]``. Target: power >= 95% at
CV <= 5%, false alarms <= 1%.
"""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np

from harness.perf.stats import Verdict, compare

N = 10
CVS = (0.03, 0.05, 0.10)
SLOWDOWN = 1.10
OUTLIER_P, OUTLIER_LO, OUTLIER_HI = 0.03, 1.3, 2.0


def draw(rng: np.random.Generator, cv: float, scale: float, n: int = N) -> np.ndarray:
    """n timings with median-ish 1.0 * scale, log-normal CV ``cv``, plus occasional slow outliers."""
    sigma = np.sqrt(np.log1p(cv * cv))
    x = np.exp(rng.normal(-sigma * sigma / 2, sigma, n)) * scale
    hit = rng.random(n) < OUTLIER_P
    return np.where(hit, x * rng.uniform(OUTLIER_LO, OUTLIER_HI, n), x)


def ours(rng, cv, scale) -> bool:
    return compare(draw(rng, cv, 1.0), draw(rng, cv, scale)).verdict is Verdict.REGRESSION


def ours_two_stage(rng, cv, scale) -> bool:
    base, cand = draw(rng, cv, 1.0), draw(rng, cv, scale)
    result = compare(base, cand)
    if result.verdict is Verdict.INCONCLUSIVE:
        result = compare(np.r_[base, draw(rng, cv, 1.0)], np.r_[cand, draw(rng, cv, scale)])
    return result.verdict is Verdict.REGRESSION


def ours_history(rng, cv, scale) -> bool:
    base = np.concatenate([draw(rng, cv, 1.0) for _ in range(5)])
    return compare(base, draw(rng, cv, scale)).verdict is Verdict.REGRESSION


def pytest_benchmark_rule(rng, cv, scale) -> bool:
    base, cand = draw(rng, cv, 1.0), draw(rng, cv, scale)
    return cand.mean() / base.mean() * 100 - 100 > 5  # PercentageRegressionCheck("mean", 5)


def iron_rule(rng, cv, scale) -> bool:
    base, cand = draw(rng, cv, 1.0), draw(rng, cv, scale)
    delta = cand.mean() - base.mean()
    return delta / base.mean() >= 0.05 and delta > 2 * base.std(ddof=1)


RULES: dict[str, Callable[[np.random.Generator, float, float], bool]] = {
    "ours (10 v 10)": ours,
    "ours, 2-stage": ours_two_stage,
    "ours, history base": ours_history,
    "pytest-benchmark mean:5%": pytest_benchmark_rule,
    "IRON >=5% & >2 sigma": iron_rule,
}


def table(trials: int = 2000, seed: int = 0) -> list[tuple[str, float, float, float]]:
    """Rows (rule, cv, power, false-alarm rate); every rule sees the same seeds per cell."""
    rows = []
    for name, rule in RULES.items():
        for cv in CVS:
            power = np.mean([rule(np.random.default_rng([seed, 1, t]), cv, SLOWDOWN) for t in range(trials)])
            alarm = np.mean([rule(np.random.default_rng([seed, 0, t]), cv, 1.0) for t in range(trials)])
            rows.append((name, cv, float(power), float(alarm)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000, help="trials per cell (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    args = ap.parse_args()
    rows = table(args.trials, args.seed)
    print(f"{N} samples per side, true slowdown {SLOWDOWN - 1:.0%}, outliers p={OUTLIER_P}, "
          f"{args.trials} trials per cell")
    print("| rule | " + " | ".join(f"CV {cv:.0%} power / false alarm" for cv in CVS) + " |")
    print("|---|" + "---|" * len(CVS))
    for name in RULES:
        cells = [f"{p:6.1%} / {a:5.1%}" for n, cv, p, a in rows if n == name]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
