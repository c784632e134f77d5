"""Calibrate the default policy's thresholds on clean emulator runs, and verify them on held-out runs.

The calibrated rule (harness.compare.policies.CalibratedPolicy) passes a tap while R and r_tail stay
under a threshold per family: (cumulative | isolated) x (prefill | decode). Here: R and r_tail of every tap of clean runs (the floors of
``CALIBRATED_THRESHOLDS`` applied, exact-baseline taps left out) -> count, max and p99.9 per family
-> thresholds = ``margin`` x max, rounded up (``derive``) -> every held-out run (clean seeds the
calibration never saw, plus the fault runs) re-judged offline under them (``rejudge``), scored with the
self-test's own scoreboard.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harness.compare.metrics import BF16_ROUNDING_REL_RMS
from harness.compare.policies import CALIBRATED_THRESHOLDS, CalibratedPolicy, threshold_prefix
from harness.selftest.runner import CLEAN, OURS, CaseResult
from harness.spec import taps as tapspec
from harness.spec.model_spec import get

# A family is a (mode, phase kind) pair: each has its own limits, named by its key prefix.
FAMILIES = {"prefill": ("cumulative", "prefill"), "decode": ("cumulative", "decode.0"),
            "isolated_prefill": ("isolated", "prefill"), "isolated_decode": ("isolated", "decode.0")}
ROUNDING = {"r": 0.25, "tail": 0.5}     # thresholds are rounded up to these steps


def _family(phase: str, mode: str) -> str:
    return ("isolated_" if mode == "isolated" else "") + ("decode" if phase.startswith("decode") else "prefill")


def ratios(results: list[CaseResult], floors: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """R and r_tail of every compared tap of the *clean* results, per phase kind, with where each was."""
    f = {**CALIBRATED_THRESHOLDS, **(floors or {})}
    out: dict[str, dict[str, Any]] = {k: {"r": [], "tail": [], "where": []} for k in FAMILIES}
    for res in results:
        if res.case.fault != CLEAN or res.error:
            continue
        for phase, tap, _kind, rel, base_rel, ulp, base_ulp, _passed in res.taps:
            if base_rel == 0.0:           # exact baseline (embedding lookup): judged exactly, no threshold
                continue
            fam = _family(phase, res.case.mode)
            decode = phase.startswith("decode")
            r_floor = (f["decode_r_floor"] if decode else f["r_floor"]) * BF16_ROUNDING_REL_RMS
            t_floor = f["decode_tail_floor"] if decode else f["tail_floor"]
            out[fam]["r"].append(0.0 if rel == 0 else rel / max(base_rel, r_floor))
            out[fam]["tail"].append(0.0 if ulp == 0 else ulp / max(base_ulp, t_floor))
            out[fam]["where"].append(f"{res.case.id} {phase}/{tap}")
    return {k: {"r": np.asarray(v["r"]), "tail": np.asarray(v["tail"]), "where": v["where"]} for k, v in out.items()}


def summarise(data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Count, max (and where) and p99.9 of R and r_tail per family."""
    out = {}
    for fam, d in data.items():
        if not len(d["r"]):
            continue
        row: dict[str, Any] = {"count": int(len(d["r"]))}
        for key in ("r", "tail"):
            i = int(np.argmax(d[key]))
            row[f"{key}_max"] = float(d[key][i])
            row[f"{key}_p999"] = float(np.quantile(d[key], 0.999))
            row[f"{key}_max_at"] = d["where"][i]
        out[fam] = row
    return out


def _round_up(x: float, step: float) -> float:
    return math.ceil(x / step - 1e-9) * step


def derive(summary: dict[str, dict[str, Any]], margin: float = 1.5) -> dict[str, float]:
    """Thresholds = ``margin`` x the clean maximum per family, rounded up (R to 0.25, tail to 0.5);
    floors unchanged. A family without data keeps its current thresholds."""
    th = dict(CALIBRATED_THRESHOLDS)
    for fam, (mode, phase) in FAMILIES.items():
        prefix = threshold_prefix(phase, mode)
        if fam in summary:
            th[f"{prefix}r_max"] = _round_up(margin * summary[fam]["r_max"], ROUNDING["r"])
            th[f"{prefix}tail_max"] = _round_up(margin * summary[fam]["tail_max"], ROUNDING["tail"])
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
        for phase, tap, kind, rel, base_rel, ulp, base_ulp, passed in res.taps:
            if base_rel != 0.0:
                m = {"rel_fro": rel, "baseline_rel_fro": base_rel, "ulp_p99": ulp, "baseline_ulp_p99": base_ulp}
                passed = not policy._judge(None, None, None, m, kind=kind, phase=phase, mode=res.case.mode)[1]
            if not passed:
                step = -1 if phase == "prefill" else int(phase.split(".")[1])
                failing.append((step, order[tap], f"{phase}/{tap}"))
        first = min(failing)[2] if failing else None
        outcomes = {**res.outcomes, OURS: {"passed": first is None, "first": first}}
        out.append(dataclasses.replace(res, outcomes=outcomes))
    return out
