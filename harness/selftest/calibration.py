"""Calibrate the default policy's thresholds on clean runs, and verify them on held-out runs.

The calibrated rule (harness.compare.policies.CalibratedPolicy) passes a tap while R, r_tail and
r_bias stay under a threshold per family (attention taps: limits of their own): (cumulative | isolated) x (prefill | decode). Here: those
statistics of every tap of clean runs of correct deployments (the clean emulator and the validation
population's calibration members; the floors of ``CALIBRATED_THRESHOLDS`` applied, exact-baseline taps
left out) -> count, max and p99.9 per family -> thresholds = ``margin`` x max, rounded up (``derive``)
-> every held-out run (seeds and members the calibration never saw, plus the fault and bug-shape
runs) re-judged offline under them (``rejudge``), scored with the self-test's own scoreboard.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from harness.compare.policies import CALIBRATED_THRESHOLDS, CalibratedPolicy, kind_prefix, threshold_prefix
from harness.selftest.runner import CLEAN, OURS, CaseResult
from harness.spec import taps as tapspec
from harness.spec.model_spec import get

# A family is a (mode, phase kind) pair: each has its own limits, named by its key prefix.
FAMILIES = {"prefill": ("cumulative", "prefill"), "decode": ("cumulative", "decode.0"),
            "isolated_prefill": ("isolated", "prefill"), "isolated_decode": ("isolated", "decode.0")}
STATS = {"r": "r", "tail": "r_tail", "bias": "r_bias"}    # summary key -> CalibratedPolicy statistic
ROUNDING = {"r": 0.25, "tail": 0.5, "bias": 0.5}           # thresholds are rounded up to these steps
PER_KIND = ("r", "tail", "bias")   # the attention taps have limits of their own (policies.kind_prefix)
KEYS = {"r": "r_max", "tail": "tail_max", "bias": "bias_max"}  # threshold key after the family prefix


def _family(phase: str, mode: str) -> str:
    return ("isolated_" if mode == "isolated" else "") + ("decode" if phase.startswith("decode") else "prefill")


def ratios(results: list[CaseResult], floors: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """R, r_tail and r_bias of every compared tap of the *clean* results of correct
    deployments, per family, with where each was and whether the tap has limits of its own (attention)."""
    policy = CalibratedPolicy(**{**CALIBRATED_THRESHOLDS, **(floors or {})})
    out: dict[str, dict[str, Any]] = {k: {**{s: [] for s in STATS}, "where": [], "own": []} for k in FAMILIES}
    for res in results:
        # clean runs of correct deployments only: no fault, no bug shape, not the imprecise member
        if res.case.fault != CLEAN or res.case.shape or res.expected is not None or res.error:
            continue
        for phase, tap, kind, metrics, _passed in res.taps:
            if metrics["baseline_rel_fro"] == 0.0:   # exact baseline (embedding lookup): judged exactly
                continue
            fam = out[_family(phase, res.case.mode)]
            stats = policy.statistics(metrics, phase, res.case.mode)
            for key, name in STATS.items():
                fam[key].append(stats[name])
            fam["where"].append(f"{res.case.id} {phase}/{tap}")
            fam["own"].append(bool(kind_prefix(kind)))
    return {k: {**{s: np.asarray(v[s]) for s in STATS}, "where": v["where"], "own": np.asarray(v["own"], bool)}
            for k, v in out.items()}


def summarise(data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Count, max (and where) and p99.9 of each statistic per family; for the statistics with
    per-kind limits (``PER_KIND``), ``{key}_*`` cover the shared-limit taps and ``attn_{key}_*`` the
    attention taps."""
    out = {}
    for fam, d in data.items():
        if not len(d["r"]):
            continue
        row: dict[str, Any] = {"count": int(len(d["r"]))}
        own = d.get("own", np.zeros(len(d["r"]), bool))
        for key in STATS:
            groups = [("", ~own), ("attn_", own)] if key in PER_KIND else [("", np.ones(len(own), bool))]
            for pre, mask in groups:
                if not mask.any():
                    continue
                vals, where = d[key][mask], [w for w, m in zip(d["where"], mask) if m]
                i = int(np.argmax(vals))
                row[f"{pre}{key}_max"] = float(vals[i])
                row[f"{pre}{key}_p999"] = float(np.quantile(vals, 0.999))
                row[f"{pre}{key}_max_at"] = where[i]
        out[fam] = row
    return out


def _round_up(x: float, step: float) -> float:
    return math.ceil(x / step - 1e-9) * step


# The emulator-only calibration before issue 11 (clean emulator, seeds 100-139, 720 checks; its
# maxima are in docs/policies.md): the recalibration reruns only seeds 100-119 of the emulator, so
# these thresholds stay the least a recalibration may ship (``derive(..., at_least=...)``).
EMULATOR_SEEDS_100_139 = {
    "r_max": 1.75, "tail_max": 2.0, "decode_r_max": 4.0, "decode_tail_max": 12.0, "isolated_r_max": 2.0,
    "isolated_tail_max": 4.0, "isolated_decode_r_max": 3.25, "isolated_decode_tail_max": 7.0, "bias_max": 4.5,
    "decode_bias_max": 3.5, "isolated_bias_max": 5.5, "isolated_decode_bias_max": 3.5,
}


# Limits a recalibration may not exceed, each with its reason: at 1.5 x flash attention's 3.466 the
# isolated decode attention R limit (5.25) let the catalogue's stale KV cache through at its own tap
# (qwen3-4b decode.0 layers.0.attn, R 5.03): capped at 4.5, between that fault and the largest correct
# attention seen (HF eager, held out, 3.93; flash with bf16 statistics 3.47).
CAPS = {"attn_isolated_decode_r_max": 4.5}


def derive(summary: dict[str, dict[str, Any]], margin: float = 1.5,
           at_least: dict[str, float] | None = None) -> dict[str, float]:
    """Thresholds = ``margin`` x the clean maximum per family, rounded up (``ROUNDING``); the
    attention taps' own R / r_tail limits likewise from their own maxima, never below the shared
    limit; floors unchanged. A family without data keeps its current thresholds. ``at_least``: lower
    bounds per key (an attention key is bounded by its shared key's bound too); ``CAPS`` bound them
    from above."""
    th = dict(CALIBRATED_THRESHOLDS)
    for fam, (mode, phase) in FAMILIES.items():
        prefix = threshold_prefix(phase, mode)
        if fam in summary:
            for key, step in ROUNDING.items():
                if f"{key}_max" in summary[fam]:
                    th[prefix + KEYS[key]] = _round_up(margin * summary[fam][f"{key}_max"], step)
            for key in PER_KIND:
                if f"attn_{key}_max" in summary[fam]:
                    th["attn_" + prefix + KEYS[key]] = max(th[prefix + KEYS[key]], _round_up(
                        margin * summary[fam][f"attn_{key}_max"], ROUNDING[key]))
    for key, low in (at_least or {}).items():
        for k in (key, "attn_" + key):
            if k in th:
                th[k] = max(th[k], low)
    for key, high in CAPS.items():
        th[key] = min(th[key], high)
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


# Per-kind limits of isolated mode (policies.KIND_LIMITS): the statistics, each from its metric, and
# the step its limit is rounded up to; a lean limit is never below the lean floor (no sub-quarter-ULP
# lean may fail a tap, however consistent).
KIND_STATS = {"kind_r": None, "row_r": "row_r", "row_gain_free_r": "row_gain_free_r", "head_r": "head_r",
              "head_gain_free_r": "head_gain_free_r", "row_med_r": "row_med_r", "head_med_r": "head_med_r",
              "lean": "ulp_bias"}
# (gain_free_r, the tap-wide gain-free R, is reported by the metrics but not judged: on the shapes it
# caught nothing the others miss, and every judged statistic is one more way to a false alarm.)
# Judged in prefill only: a decode row's row_r is its R; a decode row's mean ULP error is noisy (HF
# bf16's own single rows lean up to 0.8 ULP: a tap-wide lean limit there failed the fp32 members).
PREFILL_ONLY = ("row_r", "lean")
# Kinds left to their tap-wide limits (kind_r) and the lean: attention is where correct implementations differ
# most, and by more at full scale than the tiny population shows (HF eager attention, full-scale
# qwen3-0.6b isolated decode: one head's error 11x SDPA's, where the tiny calibration's maximum was
# 6.5); the structure statistics caught little there anyway (a 1% bug is inside the flash member's spread).
KIND_EXCLUDE = {"attn"}
KIND_STEP = {"lean": 0.05}
KIND_FLOOR = {"lean": 0.25}
KIND_FAMILIES = {"isolated_kind": "prefill", "isolated_decode_kind": "decode.0"}


def kind_maxima(results: list[CaseResult]) -> dict[str, dict[str, dict[str, tuple[float, str]]]]:
    """family -> statistic -> kind -> (clean maximum, where) over the clean isolated results of correct
    deployments (exact-baseline taps out); ``PREFILL_ONLY`` statistics in prefill only."""
    policy = CalibratedPolicy()
    out: dict[str, dict[str, dict[str, tuple[float, str]]]] = {f: {s: {} for s in KIND_STATS} for f in KIND_FAMILIES}
    for res in results:
        if (res.case.fault != CLEAN or res.case.shape or res.expected is not None or res.error
                or res.case.mode != "isolated"):
            continue
        for phase, tap, kind, metrics, _passed in res.taps:
            if metrics["baseline_rel_fro"] == 0.0:
                continue
            decode = phase.startswith("decode")
            fam = out["isolated_decode_kind" if decode else "isolated_kind"]
            for stat, name in KIND_STATS.items():
                if stat in PREFILL_ONLY and decode:
                    continue
                if name is None:
                    value = policy.statistics(metrics, phase, "isolated")["r"]
                elif stat == "lean" and name in metrics:
                    value = abs(metrics["ulp_bias"]) - abs(metrics["baseline_ulp_bias"])
                elif name in metrics:
                    value = abs(metrics[name])
                else:
                    continue
                best = fam[stat].get(kind)
                if best is None or not value <= best[0]:
                    fam[stat][kind] = (value, f"{res.case.id} {phase}/{tap}")
    return out


def derive_kind_limits(maxima: dict, margin: float = 1.5) -> dict[str, dict[str, dict[str, float]]]:
    """policies.KIND_LIMITS from ``kind_maxima``: margin x the clean maximum per (family, statistic,
    kind), rounded up (0.25, lean 0.05), a lean never below 0.25 ULP; ``KIND_EXCLUDE`` kinds get kind_r and lean only."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for fam, stats in maxima.items():
        for stat, kinds in stats.items():
            step, floor = KIND_STEP.get(stat, 0.25), KIND_FLOOR.get(stat, 0.0)
            limits = {k: max(floor, _round_up(margin * v, step)) for k, (v, _w) in sorted(kinds.items())
                      if math.isfinite(v) and (stat in ("kind_r", "lean") or k not in KIND_EXCLUDE)}
            if limits:
                out.setdefault(fam, {})[stat] = limits
    return out
