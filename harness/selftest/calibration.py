"""Calibrate the default policy's thresholds on clean emulator runs, and verify them on held-out runs.

The calibrated rule (harness.compare.policies.CalibratedPolicy) passes a tap while R, r_tail and
r_bias stay under a threshold per family: (cumulative | isolated) x (prefill | decode). Here: those
statistics of every tap of clean runs (the floors of ``CALIBRATED_THRESHOLDS`` applied, exact-baseline
taps left out) -> count, max and p99.9 per family -> thresholds = ``margin`` x max, rounded up
(``derive``) -> every held-out run (clean seeds the calibration never saw, plus the fault runs)
re-judged offline under them (``rejudge``), scored with the self-test's own scoreboard.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harness.compare.policies import CALIBRATED_THRESHOLDS, CalibratedPolicy, threshold_prefix
from harness.selftest.runner import CLEAN, OURS, CaseResult
from harness.spec import taps as tapspec
from harness.spec.model_spec import get

# A family is a (mode, phase kind) pair: each has its own limits, named by its key prefix.
FAMILIES = {"prefill": ("cumulative", "prefill"), "decode": ("cumulative", "decode.0"),
            "isolated_prefill": ("isolated", "prefill"), "isolated_decode": ("isolated", "decode.0")}
STATS = {"r": "r", "tail": "r_tail", "bias": "r_bias"}    # summary key -> CalibratedPolicy statistic
ROUNDING = {"r": 0.25, "tail": 0.5, "bias": 0.5}           # thresholds are rounded up to these steps
KEYS = {"r": "r_max", "tail": "tail_max", "bias": "bias_max"}  # threshold key after the family prefix


def _family(phase: str, mode: str) -> str:
    return ("isolated_" if mode == "isolated" else "") + ("decode" if phase.startswith("decode") else "prefill")


def ratios(results: list[CaseResult], floors: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """R, r_tail and r_bias of every compared tap of the *clean* results, per family, with where each was."""
    policy = CalibratedPolicy(**{**CALIBRATED_THRESHOLDS, **(floors or {})})
    out: dict[str, dict[str, Any]] = {k: {**{s: [] for s in STATS}, "where": []} for k in FAMILIES}
    for res in results:
        if res.case.fault != CLEAN or res.error:
            continue
        for phase, tap, _kind, metrics, _passed in res.taps:
            if metrics["baseline_rel_fro"] == 0.0:   # exact baseline (embedding lookup): judged exactly
                continue
            fam = out[_family(phase, res.case.mode)]
            stats = policy.statistics(metrics, phase)
            for key, name in STATS.items():
                fam[key].append(stats[name])
            fam["where"].append(f"{res.case.id} {phase}/{tap}")
    return {k: {**{s: np.asarray(v[s]) for s in STATS}, "where": v["where"]} for k, v in out.items()}


def summarise(data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Count, max (and where) and p99.9 of each statistic per family."""
    out = {}
    for fam, d in data.items():
        if not len(d["r"]):
            continue
        row: dict[str, Any] = {"count": int(len(d["r"]))}
        for key in STATS:
            i = int(np.argmax(d[key]))
            row[f"{key}_max"] = float(d[key][i])
            row[f"{key}_p999"] = float(np.quantile(d[key], 0.999))
            row[f"{key}_max_at"] = d["where"][i]
        out[fam] = row
    return out


def _round_up(x: float, step: float) -> float:
    return math.ceil(x / step - 1e-9) * step


def derive(summary: dict[str, dict[str, Any]], margin: float = 1.5) -> dict[str, float]:
    """Thresholds = ``margin`` x the clean maximum per family, rounded up (``ROUNDING``); floors
    unchanged. A family without data keeps its current thresholds."""
    th = dict(CALIBRATED_THRESHOLDS)
    for fam, (mode, phase) in FAMILIES.items():
        prefix = threshold_prefix(phase, mode)
        if fam in summary:
            for key, step in ROUNDING.items():
                th[prefix + KEYS[key]] = _round_up(margin * summary[fam][f"{key}_max"], step)
    return th


def rejudge(results: list[CaseResult], thresholds: dict[str, float]) -> list[CaseResult]:
    """Copies of ``results`` whose calibrated outcome is re-judged under ``thresholds`` from the stored
    per-tap metrics (taps with an exact baseline keep their original judgement)."""
    policy = CalibratedPolicy(**thresholds)
    out = []
    for res in results:
        if res.error:
            out.append(res)
            continue
        spec = get(res.case.model, "tiny")
        order = {name: i for i, name in enumerate(tapspec.tap_names(spec))}
        failing = []
        for phase, tap, kind, m, passed in res.taps:
            if m["baseline_rel_fro"] != 0.0:
                passed = not policy._judge(None, None, None, m, kind=kind, phase=phase, mode=res.case.mode)[1]
            if not passed:
                step = -1 if phase == "prefill" else int(phase.split(".")[1])
                failing.append((step, order[tap], f"{phase}/{tap}"))
        first = min(failing)[2] if failing else None
        outcomes = {**res.outcomes, OURS: {"passed": first is None, "first": first}}
        out.append(dataclasses.replace(res, outcomes=outcomes))
    return out
