"""Phases 4 and the perf half of 5 inside ``harness gate``: TTFT and TPOT samples, optionally judged
against the performance history (``--perf``) with the same decision as ``harness perf compare``.

Without ``--perf`` the samples are only measured and reported (status ``measured``): a first run has
nothing to compare with, and timing noise must never fail a correctness gate. With ``--perf`` each
series is compared with the pooled samples of its previous ``last`` runs (same model, deployment and
metric) and then recorded, so the next run compares against this one.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Any

import numpy as np

from harness.perf import stats
from harness.perf.benchjson import BenchFile, Series
from harness.perf.timing import time_decode
from harness.suites.phases import MEASURED, PASS, REGRESSION, Check

ROUNDS = 10  # samples per series: >= MIN_SAMPLES of the regression decision, as in the pytest suites
WARMUP = 1
DECODE_STEPS = 8  # timed decode steps per round; the first is excluded from TPOT (one-off costs)
# Without --perf nothing is decided on the timings, so their cost is bounded like pytest-benchmark's
# max_time: rounds stop once the timed ones took MEASURE_BUDGET_S, after at least MEASURE_MIN_ROUNDS
# (one when the warm-up alone overran the budget). A small model still gives its 10 rounds in well
# under a second; the emulator's qwen3-4b at 2048 tokens (a generation of over 20 minutes on 2 cores)
# gives a warm-up and one round instead of 11 generations.
MEASURE_BUDGET_S = 120.0
MEASURE_MIN_ROUNDS = 3


def measure(dep: Any, input_ids: np.ndarray, rounds: int = ROUNDS,
            budget_s: float | None = None) -> dict[str, list[float]]:
    """TTFT (s), TPOT (s) and decode tokens/s samples, ``rounds`` each after ``WARMUP`` warm-up rounds
    (with ``budget_s``: fewer once the timed rounds took that long, never under ``MEASURE_MIN_ROUNDS``;
    one when the warm-up alone took longer than the budget).

    Each round is one generation (``time_decode``): its prefill is the TTFT sample, its steady-state
    decode steps the TPOT sample.
    """
    ttft, tpot = [], []
    least = MEASURE_MIN_ROUNDS
    start = time.perf_counter()
    for r in range(WARMUP + rounds):
        if r == WARMUP:
            # A generation longer than the whole budget (the emulator's qwen3-4b at 2048 tokens: over 20
            # minutes) would make three rounds an hour of timing that decides nothing: one round then.
            if budget_s is not None and time.perf_counter() - start > budget_s:
                least = 1
            start = time.perf_counter()
        d = time_decode(dep, input_ids, DECODE_STEPS + 1)
        if r >= WARMUP:
            ttft.append(d.ttft)
            tpot.append(d.tpot)
        if budget_s is not None and len(ttft) >= least and time.perf_counter() - start > budget_s:
            break
    return {"ttft": ttft, "tpot": tpot, "decode_tps": [1.0 / t for t in tpot]}


UNITS = {"ttft": ("s", "lower"), "tpot": ("s", "lower"), "decode_tps": ("tok/s", "higher")}
PHASE_OF = {"ttft": 4, "tpot": 5, "decode_tps": 5}


def _check(metric: str, samples: list[float], comparison: stats.Comparison | None) -> Check:
    med = float(np.median(samples))
    unit = UNITS[metric][0]
    metrics: dict[str, Any] = {"median": med, "unit": unit, "n": len(samples), "samples": samples}
    if comparison is None:
        budget = f"; stopped at the {MEASURE_BUDGET_S:g} s budget of timings without --perf" \
            if len(samples) < ROUNDS else ""
        rounds = f"{len(samples)} round{'s' if len(samples) != 1 else ''}"
        return Check(f"perf/{metric}", True, f"{metric} median {med:.4g} {unit} over {rounds} "
                     f"(measured; no comparison{budget})", metrics)
    metrics["comparison"] = comparison.to_dict()
    ok = comparison.verdict is not stats.Verdict.REGRESSION
    return Check(f"perf/{metric}", ok, comparison.reason, metrics)


def judge(model: str, deployment: str, samples: dict[str, list[float]], *, compare: bool,
          db: str | None = None, last: int = 10) -> tuple[dict[int, list[Check]], dict[str, Any]]:
    """Per gate phase (4, 5) the perf checks; with ``compare`` against and then into the history."""
    comparisons: dict[str, stats.Comparison | None] = {m: None for m in samples}
    perf: dict[str, Any] = {"comparisons": []}
    if compare:
        from harness.perf.history import History
        from harness.perf.machine import machine_info

        with History(db) as hist:
            for metric, cand in samples.items():
                prior = hist.trend(model, metric=metric, deployment=deployment, last=last)
                base = [x for p in prior for x in p.samples]
                if base:
                    c = stats.compare(base, cand, UNITS[metric][1], label=f"{model}/{deployment}/{metric}")  # type: ignore[arg-type]
                    comparisons[metric] = c
                    perf["comparisons"].append({"model": model, "metric": metric, **c.to_dict()})
            series = tuple(Series(f"harness-gate::{metric}", model, deployment, metric, *UNITS[metric], tuple(s))
                           for metric, s in samples.items())
            now = dt.datetime.now(dt.timezone.utc).isoformat()
            perf["history_run"] = hist.record(BenchFile("harness gate", now, {"npu_harness": machine_info()}, {}, series))
    out: dict[int, list[Check]] = {4: [], 5: []}
    for metric, s in samples.items():
        out[PHASE_OF[metric]].append(_check(metric, s, comparisons[metric]))
    perf["samples"] = samples
    return out, perf


def status(checks: list[Check], compared: bool) -> str:
    """``regression`` when any check regressed, else ``pass`` when compared, else ``measured``."""
    if any(not c.passed for c in checks):
        return REGRESSION
    return PASS if compared and any("comparison" in c.metrics for c in checks) else MEASURED
