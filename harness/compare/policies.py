"""Tolerance policies: how one tap of the device under test is judged against the golden.

Every policy has a ``name``, a ``spec()`` that round-trips through ``parse_policy`` and
``judge(dut, golden, baseline, metrics, *, kind, phase) -> Judgement``; ``metrics`` is the dict of
``harness.compare.metrics.tap_metrics``, computed once per tap. NaN or Inf in the dut where the golden
is finite fails under every policy. One text syntax serves the API, the CLI and TOML:
``name`` or ``name:param=value,param=value`` (``calibrated``, ``allclose:rtol=0.04,atol=0.15``,
``cosine:min=0.99``, ``nmse:max=5e-4``, ``topk:k=5``) or a preset name (``PRESETS``).
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from harness.compare.metrics import BF16_ROUNDING_REL_RMS, BIAS_DRIFT_MULTIPLE, exact_match
from harness.errors import HarnessError

# The calibrated rule's thresholds, in one place, per family: mode (cumulative: the end-to-end HF
# bf16 run is the baseline; isolated: the teacher-forced one, each op's own rounding) x phase kind
# (prefill; decode, a one-row tensor whose baseline error, the denominator, is noisy); the attention
# tap has limits of its own (prefix attn_).
# Derivation (docs/policies.md, "Calibration"; reproduce with `python benchmarks/calibrate_policy.py`):
# clean runs of correct deployments on all nine models at tiny scale, both modes, prefill and 4
# decode steps, every tap judged against the fp32 golden (floors applied, exact-baseline taps out):
# the XDNA 2 emulator on seeds 100-109 and the validation population's calibration members
# (numpy-fp32, numpy-bf16-pairwise, hf-bf16-sdpa, numpy-flash-bf16stats) on seeds 100-104: 540 checks.
# Maxima (shared limits / attention):
#   cumulative prefill: 13,230 taps, R 1.146 / 1.137, r_tail 1.227 / 1.121, r_bias 2.902 / 2.611
#   cumulative decode:  52,920 taps, R 2.678 / 2.523, r_tail 10.10 / 3.664, r_bias 2.414 / 1.377
#   isolated prefill:   13,230 taps, R 1.169 / 1.644, r_tail 2.399 / 1.725, r_bias 3.446 / 4.586
#   isolated decode:    52,920 taps, R 2.149 / 3.466, r_tail 4.057 / 5.856, r_bias 1.864 / 1.811
#   (attention's excess: numpy-flash-bf16stats, an online softmax with bf16 running statistics;
#    cumulative decode r_tail 10.1: the same member's drifting k in decode)
# Margin rule: threshold = 1.5 x the calibration maximum, rounded up to 0.25 (R) or 0.5 (tail, bias),
# attention's never below the shared one, none below the emulator-only calibration of seeds 100-139
# (calibration.EMULATOR_SEEDS_100_139, the previous table: its seeds 110-139 were not rerun), and
# isolated decode attention R capped at 4.5 (calibration.CAPS: 5.25 let a catalogue fault through).
# Held out (docs/policies.md): seeds 0-9 of every member, held-out members never seen, the fault
# catalogue, the imprecise member and the generic bug shapes, re-judged under these thresholds.
CALIBRATED_THRESHOLDS: dict[str, float] = {
    "r_max": 1.75,                    # cumulative prefill R: 1.146 x 1.5
    "tail_max": 2.0,                  # cumulative prefill r_tail: 1.227 x 1.5 (emulator k)
    "decode_r_max": 4.25,             # cumulative decode R: 2.678 x 1.5 (flash-bf16stats k_norm)
    "decode_tail_max": 15.5,          # cumulative decode r_tail: 10.10 x 1.5 (flash-bf16stats k)
    "isolated_r_max": 2.0,            # isolated prefill R: 1.169 x 1.5 (emulator act)
    "isolated_tail_max": 4.0,         # isolated prefill r_tail: 2.399 x 1.5 (emulator act)
    "isolated_decode_r_max": 3.25,    # isolated decode R: 2.149 x 1.5 (emulator and bf16-pairwise out)
    "isolated_decode_tail_max": 7.0,  # isolated decode r_tail: 4.057 x 1.5 -> 6.5; seeds 100-139: 7.0
    # r_bias (the worst row's t statistic of the dut's ULP errors signed along the golden, over the
    # baseline's, at least 3, among rows leaning at least 0.25 ULP; tap_metrics) catches a scaled output
    # where R cannot: on decode rows ruled by a few outlier channels one rounding is ~0.35% of the
    # norm, so a 1% scaling scores R ~3, inside the clean maximum, while its t is >= 13 and a clean
    # row's stays near the baseline's.
    "bias_max": 4.5,                  # cumulative prefill r_bias: 2.902 x 1.5 (flash-bf16stats logits)
    "decode_bias_max": 4.0,           # cumulative decode r_bias: 2.414 x 1.5 (flash-bf16stats logits)
    "isolated_bias_max": 5.5,         # isolated prefill r_bias: 3.446 x 1.5 (bf16-pairwise ffn_norm)
    "isolated_decode_bias_max": 3.5,  # isolated decode r_bias: 1.864 x 1.5 -> 3.0; seeds 100-139: 3.5
    # The attention tap's own limits (prefix attn_): attention is where correct implementations
    # differ most (online softmax, bf16 running statistics, eager vs SDPA), so the validation
    # population widens its allowance there, and only there.
    "attn_r_max": 1.75,               # 1.137 x 1.5 -> the shared 1.75
    "attn_tail_max": 2.0,             # 1.121 x 1.5 -> the shared 2.0
    "attn_decode_r_max": 4.25,        # 2.523 x 1.5 -> the shared 4.25
    "attn_decode_tail_max": 15.5,     # 3.664 x 1.5 -> the shared 15.5
    "attn_isolated_r_max": 2.5,       # 1.644 x 1.5 (flash-bf16stats)
    "attn_isolated_tail_max": 4.0,    # 1.725 x 1.5 -> the shared 4.0
    "attn_isolated_decode_r_max": 4.5,      # 3.466 x 1.5 = 5.25, capped (calibration.CAPS): stale KV at 5.03
    "attn_isolated_decode_tail_max": 9.0,   # 5.856 x 1.5 (flash-bf16stats)
    "attn_bias_max": 4.5,             # 2.611 x 1.5 -> the shared 4.5
    "attn_decode_bias_max": 4.0,      # 1.377 x 1.5 -> the shared 4.0
    "attn_isolated_bias_max": 7.0,    # 4.586 x 1.5 (flash-bf16stats: its bf16 softmax sum scales rows)
    "attn_isolated_decode_bias_max": 3.5,   # 1.811 x 1.5 -> the shared 3.5
    # Denominator floors, in units of one bf16 rounding of the golden (R) and ULP (tail). Prefill
    # keeps the metric's own floor (half a rounding); a decode row's baseline can land well below
    # one rounding by chance (the 2-in-18 false alarms of a plain R <= 2 rule), so decode floors it
    # at one full rounding, the least error any bf16 output carries.
    "r_floor": 0.5,
    "decode_r_floor": 1.0,
    "tail_floor": 0.5,          # ULP: the worst error of one correct rounding
    "decode_tail_floor": 1.0,
}


@dataclass(frozen=True)
class Judgement:
    """A policy's decision on one tap: truthy when passed; ``reasons`` explain a failure."""

    passed: bool
    policy: str
    reasons: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # the values the policy compared, after floors

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        out = {"passed": self.passed, "policy": self.policy, "reasons": list(self.reasons),
               "thresholds": dict(self.thresholds)}
        if self.measured:
            out["measured"] = dict(self.measured)
        return out


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _over(metric: str, value: float, allowed: float) -> str:
    return f"{metric} {_fmt(value)} (up to {_fmt(allowed)} allowed)"


def _non_finite(metrics: dict[str, Any]) -> list[str]:
    """NaN / Inf in the dut where the golden is finite: a failure under every policy."""
    out = []
    for key in ("nan", "inf"):
        if metrics.get(key, 0):
            out.append(f"{key} {metrics[key]} element(s) where the golden is finite (up to 0 allowed)")
    return out


class Policy(abc.ABC):
    """Base of the policies: dataclass parameters, ``spec()`` text, the shared NaN/Inf rule."""

    name: ClassVar[str]
    aliases: ClassVar[dict[str, str]] = {}         # short text name -> field name

    def judge(self, dut: np.ndarray, golden: np.ndarray, baseline: np.ndarray, metrics: dict[str, Any],
              *, kind: str, phase: str, mode: str = "cumulative") -> Judgement:
        """Judge one tap; ``mode`` (cumulative | isolated) says which baseline ``baseline`` is."""
        reasons = _non_finite(metrics)
        thresholds, more, *measured = self._judge(dut, golden, baseline, metrics, kind=kind, phase=phase, mode=mode)
        return Judgement(not (reasons or more), self.name, reasons + more, thresholds, *measured)

    @abc.abstractmethod
    def _judge(self, dut: np.ndarray, golden: np.ndarray, baseline: np.ndarray, metrics: dict[str, Any],
               *, kind: str, phase: str, mode: str) -> tuple[dict[str, float], list[str]] | tuple[dict, list, dict]:
        """(thresholds, failure reasons[, measured values when they differ from the metrics])."""

    def spec(self) -> str:
        """Canonical policy text: ``name:param=value,...`` with every parameter."""
        back = {v: k for k, v in self.aliases.items()}
        params = ",".join(f"{back.get(f.name, f.name)}={getattr(self, f.name)!r}"
                          for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{self.name}:{params}" if params else self.name


@dataclass(frozen=True)
class CalibratedPolicy(Policy):
    """The default: R, the tail ratio and the bias ratio under ``CALIBRATED_THRESHOLDS``, with limits
    per mode (cumulative: the end-to-end bf16 baseline; isolated: the teacher-forced one, far sharper)
    and per phase kind (prefill; decode, whose one-row baselines are noisier); exact when the baseline
    error is exactly zero (the embedding lookup)."""

    name: ClassVar[str] = "calibrated"
    r_max: float = CALIBRATED_THRESHOLDS["r_max"]
    tail_max: float = CALIBRATED_THRESHOLDS["tail_max"]
    decode_r_max: float = CALIBRATED_THRESHOLDS["decode_r_max"]
    decode_tail_max: float = CALIBRATED_THRESHOLDS["decode_tail_max"]
    isolated_r_max: float = CALIBRATED_THRESHOLDS["isolated_r_max"]
    isolated_tail_max: float = CALIBRATED_THRESHOLDS["isolated_tail_max"]
    isolated_decode_r_max: float = CALIBRATED_THRESHOLDS["isolated_decode_r_max"]
    isolated_decode_tail_max: float = CALIBRATED_THRESHOLDS["isolated_decode_tail_max"]
    bias_max: float = CALIBRATED_THRESHOLDS["bias_max"]
    decode_bias_max: float = CALIBRATED_THRESHOLDS["decode_bias_max"]
    isolated_bias_max: float = CALIBRATED_THRESHOLDS["isolated_bias_max"]
    isolated_decode_bias_max: float = CALIBRATED_THRESHOLDS["isolated_decode_bias_max"]
    attn_r_max: float = CALIBRATED_THRESHOLDS["attn_r_max"]
    attn_tail_max: float = CALIBRATED_THRESHOLDS["attn_tail_max"]
    attn_decode_r_max: float = CALIBRATED_THRESHOLDS["attn_decode_r_max"]
    attn_decode_tail_max: float = CALIBRATED_THRESHOLDS["attn_decode_tail_max"]
    attn_isolated_r_max: float = CALIBRATED_THRESHOLDS["attn_isolated_r_max"]
    attn_isolated_tail_max: float = CALIBRATED_THRESHOLDS["attn_isolated_tail_max"]
    attn_isolated_decode_r_max: float = CALIBRATED_THRESHOLDS["attn_isolated_decode_r_max"]
    attn_isolated_decode_tail_max: float = CALIBRATED_THRESHOLDS["attn_isolated_decode_tail_max"]
    attn_bias_max: float = CALIBRATED_THRESHOLDS["attn_bias_max"]
    attn_decode_bias_max: float = CALIBRATED_THRESHOLDS["attn_decode_bias_max"]
    attn_isolated_bias_max: float = CALIBRATED_THRESHOLDS["attn_isolated_bias_max"]
    attn_isolated_decode_bias_max: float = CALIBRATED_THRESHOLDS["attn_isolated_decode_bias_max"]
    kind_scale: float = 1.0           # multiplies every per-kind limit of isolated mode (KIND_LIMITS)
    r_floor: float = CALIBRATED_THRESHOLDS["r_floor"]
    decode_r_floor: float = CALIBRATED_THRESHOLDS["decode_r_floor"]
    tail_floor: float = CALIBRATED_THRESHOLDS["tail_floor"]
    decode_tail_floor: float = CALIBRATED_THRESHOLDS["decode_tail_floor"]

    def _judge(self, dut, golden, baseline, metrics, *, kind, phase, mode):  # type: ignore[no-untyped-def]
        if metrics["baseline_rel_fro"] == 0.0:
            return ExactPolicy()._judge(dut, golden, baseline, metrics, kind=kind, phase=phase, mode=mode)
        limits = self.limits(phase, mode, kind)
        stats = self.statistics(metrics, phase, mode)
        reasons = []
        if not stats["r"] <= limits["r"]:
            reasons.append(_over("R", stats["r"], limits["r"]) + f": rel_fro {_fmt(metrics['rel_fro'])} vs bf16 "
                           f"baseline {_fmt(metrics['baseline_rel_fro'])}")
        if not stats["r_tail"] <= limits["r_tail"]:
            reasons.append(_over("r_tail", stats["r_tail"], limits["r_tail"]) + f": p99 error "
                           f"{_fmt(metrics['ulp_p99'])} ULP vs bf16 baseline {_fmt(metrics['baseline_ulp_p99'])} ULP")
        if not stats["r_bias"] <= limits["r_bias"]:
            drift = mode != "isolated" and "r_bias_drift" in metrics
            pre = "drift_" if drift else ""
            lean = metrics.get(pre + "bias_lean_ulp")
            by = f" by {_fmt(lean)} ULP on average" if lean is not None else ""
            floor = (f", more than {_fmt(metrics['drift_lean_floor_ulp'])} ULP, {_fmt(BIAS_DRIFT_MULTIPLE)}x the "
                     "baseline's typical row lean" if drift else "")
            reasons.append(_over("r_bias", stats["r_bias"], limits["r_bias"]) + f": the errors lean along the "
                           f"golden{by}{floor} (t {_fmt(metrics[pre + 'bias_t'])} vs bf16 baseline t "
                           f"{_fmt(metrics[pre + 'baseline_bias_t'])}): a scaled output")
        for key, (value, limit) in self.structure(metrics, phase, mode, kind).items():
            if not value <= limit:
                reasons.append(_over(key, value, limit) + STRUCTURE_REASONS[key])
            stats[key] = value
            limits[key] = limit
        return {f"{k}_max": v for k, v in limits.items()}, reasons, stats

    def structure(self, metrics: dict[str, Any], phase: str, mode: str, kind: str = "") -> dict[str, tuple[float, float]]:
        """{statistic: (value, limit)} of the per-kind limits a tap has in isolated mode (``KIND_LIMITS``,
        times ``kind_scale``), for the statistics its metrics hold: kind_r (R against the kind's own
        limit), row_r, row_gain_free_r, head_r, head_gain_free_r, row_med_r, head_med_r, lean
        (|ulp_bias| - |baseline_ulp_bias|: how much more the whole tap leans along the golden than the
        baseline, ULP; never positive for a dut that leans less than the baseline)."""
        if mode != "isolated":
            return {}
        table = KIND_LIMITS.get(threshold_prefix(phase, mode) + "kind", {})
        # A GEMM whose input the deployment kept to itself (metrics["unforced_inputs"], judged against a
        # chain baseline): its structure holds that upstream op's rounding pattern, which the upstream
        # kind's own limits allow and the GEMM spreads through a few outlier elements, so only the lean
        # is judged here; an element-wise op or a norm keeps each element's error in place.
        deferred = bool(metrics.get("unforced_inputs")) and kind in GEMM_KINDS
        out = {}
        for key, by_kind in table.items():
            limit = by_kind.get(kind)
            if limit is None or (deferred and key not in DEFERRED_STRUCTURE):
                continue
            if key == "kind_r":
                value = self.statistics(metrics, phase, mode)["r"]
            elif key == "lean":
                if "ulp_bias" not in metrics:
                    continue
                value = abs(metrics["ulp_bias"]) - abs(metrics["baseline_ulp_bias"])
            else:
                if key not in metrics:
                    continue
                value = abs(metrics[key])
            out[key] = (value, limit * self.kind_scale)
        return out

    def statistics(self, metrics: dict[str, Any], phase: str, mode: str = "cumulative") -> dict[str, float]:
        """The judged statistics of one tap in a mode, denominators floored: R (relative Frobenius error
        over the baseline's), r_tail (p99 ULP error over the baseline's) and r_bias (the worst row's t
        statistic of ULP errors signed along the golden over the baseline's, at least 3: tap_metrics;
        in cumulative mode among the rows leaning beyond the baseline's drift, ``r_bias_drift``)."""
        decode = phase.startswith("decode")
        r_floor = (self.decode_r_floor if decode else self.r_floor) * BF16_ROUNDING_REL_RMS
        base_rel = max(metrics["baseline_rel_fro"], r_floor)
        tail_floor = self.decode_tail_floor if decode else self.tail_floor
        return {"r": _div(metrics["rel_fro"], base_rel),
                "r_tail": _div(metrics["ulp_p99"], max(metrics["baseline_ulp_p99"], tail_floor)),
                "r_bias": metrics["r_bias"] if mode == "isolated" else metrics.get("r_bias_drift", metrics["r_bias"])}

    def limits(self, phase: str, mode: str = "cumulative", kind: str = "") -> dict[str, float]:
        """The limits of a tap kind in a phase (``prefill`` / ``decode.N``) and mode: {"r", "r_tail",
        "r_bias"}; an ``ATTENTION_KINDS`` tap has keys of its own (attn_...)."""
        prefix = threshold_prefix(phase, mode)
        own = kind_prefix(kind) + prefix
        return {"r": getattr(self, own + "r_max"), "r_tail": getattr(self, own + "tail_max"),
                "r_bias": getattr(self, own + "bias_max")}


ATTENTION_KINDS = frozenset({"attn"})
# The per-kind statistics judged on a tap downstream of one the deployment kept to itself
# (docs/policies.md, "Taps downstream of an unexposed one").
DEFERRED_STRUCTURE = ("lean",)
GEMM_KINDS = frozenset({"q", "k", "v", "o", "gate", "up", "down", "logits"})  # the projections, lm_head

# Isolated mode's per-kind limits (docs/policies.md, "Structure inside a tap"): family
# ("isolated_kind" prefill, "isolated_decode_kind") -> statistic -> tap kind -> limit. A kind a
# statistic does not list is not judged on it. Calibrated (harness.selftest.calibration.derive_kind_limits)
# on the same population as CALIBRATED_THRESHOLDS: 1.5 x the clean maximum of the kind, rounded up.
KIND_LIMITS: dict[str, dict[str, dict[str, float]]] = {
    "isolated_kind": {
        "kind_r": {"act": 2, "attn": 2.5, "attn_norm": 1.5, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 1.5, "final_norm": 1.5, "gate": 1.75, "k": 1.75, "k_norm": 1.5, "k_rope": 1.75, "logits": 1.75, "o": 1.75, "out": 1.5, "q": 1.75, "q_norm": 1.5, "q_rope": 1.75, "up": 1.75, "v": 1.75},
        "row_r": {"act": 3, "attn_norm": 2, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 2, "final_norm": 2, "gate": 1.75, "k": 1.75, "k_norm": 2, "k_rope": 3, "logits": 1.75, "o": 1.75, "out": 3, "q": 1.75, "q_norm": 1.75, "q_rope": 2, "up": 1.75, "v": 1.75},
        "row_gain_free_r": {"act": 3.25, "attn_norm": 2, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 2, "final_norm": 2, "gate": 1.75, "k": 2, "k_norm": 2.5, "k_rope": 2.75, "logits": 1.75, "o": 1.75, "out": 2.25, "q": 1.75, "q_norm": 1.75, "q_rope": 2, "up": 1.75, "v": 1.75},
        "head_r": {"act": 2.75, "attn_norm": 1.5, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 1.5, "final_norm": 1.5, "gate": 1.75, "k": 1.75, "k_norm": 1.5, "k_rope": 1.75, "logits": 1.75, "o": 1.75, "out": 1.75, "q": 1.75, "q_norm": 1.5, "q_rope": 1.75, "up": 1.75, "v": 1.75},
        "head_gain_free_r": {"act": 2.5, "attn_norm": 1.5, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 1.5, "final_norm": 1.5, "gate": 1.75, "k": 1.75, "k_norm": 1.5, "k_rope": 1.75, "logits": 1.75, "o": 1.75, "out": 1.75, "q": 1.75, "q_norm": 1.5, "q_rope": 1.75, "up": 1.75, "v": 1.75},
        "row_med_r": {"act": 2.75, "attn_norm": 2, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 1.75, "final_norm": 1.75, "gate": 1.75, "k": 1.75, "k_norm": 2, "k_rope": 2.25, "logits": 1.75, "o": 1.75, "out": 2, "q": 1.75, "q_norm": 1.75, "q_rope": 1.75, "up": 1.75, "v": 1.75},
        "head_med_r": {"act": 7, "attn_norm": 4.5, "attn_residual": 1.5, "down": 2.25, "ffn_norm": 4, "final_norm": 3.5, "gate": 2.5, "k": 2, "k_norm": 2.5, "k_rope": 2.75, "logits": 3, "o": 2, "out": 4.5, "q": 2.25, "q_norm": 2.75, "q_rope": 3.25, "up": 2.75, "v": 1.75},
        "lean": {"act": 0.25, "attn": 0.25, "attn_norm": 0.25, "attn_residual": 0.25, "down": 0.25, "ffn_norm": 0.25, "final_norm": 0.25, "gate": 0.25, "k": 0.25, "k_norm": 0.25, "k_rope": 0.25, "logits": 0.25, "o": 0.25, "out": 0.25, "q": 0.25, "q_norm": 0.25, "q_rope": 0.25, "up": 0.25, "v": 0.25},
    },
    "isolated_decode_kind": {
        "kind_r": {"act": 2.5, "attn": 5.25, "attn_norm": 1.75, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 2, "final_norm": 1.75, "gate": 1.75, "k": 1.75, "k_norm": 2, "k_rope": 3, "logits": 1.75, "o": 1.75, "out": 3.25, "q": 1.75, "q_norm": 1.75, "q_rope": 1.75, "up": 1.75, "v": 1.75},
        "row_gain_free_r": {"act": 2.25, "attn_norm": 1.75, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 2, "final_norm": 1.75, "gate": 1.75, "k": 1.75, "k_norm": 2, "k_rope": 2.5, "logits": 1.75, "o": 1.75, "out": 2, "q": 1.75, "q_norm": 1.5, "q_rope": 1.75, "up": 1.75, "v": 1.75},
        "head_r": {"act": 17, "attn_norm": 5.5, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 5.25, "final_norm": 4.25, "gate": 1.75, "k": 1.75, "k_norm": 2.25, "k_rope": 6, "logits": 1.75, "o": 1.75, "out": 7, "q": 1.75, "q_norm": 3, "q_rope": 3.75, "up": 1.75, "v": 1.75},
        "head_gain_free_r": {"act": 13.75, "attn_norm": 3.75, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 4.5, "final_norm": 4.75, "gate": 1.75, "k": 1.75, "k_norm": 2.25, "k_rope": 3.5, "logits": 1.75, "o": 1.75, "out": 4.25, "q": 1.75, "q_norm": 3, "q_rope": 3.25, "up": 1.75, "v": 1.75},
        "row_med_r": {"act": 2.5, "attn_norm": 1.75, "attn_residual": 1.5, "down": 1.75, "ffn_norm": 1.75, "final_norm": 1.75, "gate": 1.75, "k": 1.5, "k_norm": 1.75, "k_rope": 1.75, "logits": 1.75, "o": 1.75, "out": 1.75, "q": 1.75, "q_norm": 1.5, "q_rope": 1.75, "up": 1.75, "v": 1.75},
        "head_med_r": {"act": 6.25, "attn_norm": 3, "attn_residual": 1.5, "down": 2.25, "ffn_norm": 4, "final_norm": 3, "gate": 2.25, "k": 1.75, "k_norm": 2, "k_rope": 2.25, "logits": 1.75, "o": 1.5, "out": 3.75, "q": 1.75, "q_norm": 2.25, "q_rope": 3, "up": 1.75, "v": 1.75},
    },
}

# What each per-kind statistic's failure says (CalibratedPolicy.structure), and its metric
STRUCTURE_REASONS = {
    "kind_r": ": the error exceeds what correct implementations of this tap kind reach",
    "row_r": ": one row (token) errs far beyond the bf16 baseline's error in that row",
    "head_r": ": one head's slice errs far beyond the bf16 baseline's error there",
    "gain_free_r": ": element-wise error beyond the baseline's once each row's (head's) gain is removed",
    "row_gain_free_r": ": one row errs element-wise beyond the baseline's once each head's gain is removed",
    "head_gain_free_r": ": one head errs element-wise beyond the baseline's once each row's gain is removed",
    "row_med_r": ": one row's typical (median) element errs beyond the bf16 baseline's there: the whole row "
                 "is off, not a few outliers",
    "head_med_r": ": one head's slice of a row has its typical (median) element err beyond the bf16 baseline's "
                  "there: the whole slice is off, not a few outliers",
    "lean": " ULP: the whole tap leans along the golden (mean signed ULP error) more than the bf16 baseline "
            "does: a rounding mode or a scale",
}


def kind_prefix(kind: str) -> str:
    """'attn_' for a tap kind with its own R / r_tail limits, else ''."""
    return "attn_" if kind in ATTENTION_KINDS else ""


def threshold_prefix(phase: str, mode: str) -> str:
    """The key prefix of a (phase, mode) family in CALIBRATED_THRESHOLDS: '', 'decode_', 'isolated_' ..."""
    return ("isolated_" if mode == "isolated" else "") + ("decode_" if phase.startswith("decode") else "")


def _div(num: float, den: float) -> float:
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


@dataclass(frozen=True)
class ExactPolicy(Policy):
    """Bit-exact equality with the golden (what the calibrated rule becomes for an exact baseline)."""

    name: ClassVar[str] = "exact"

    def _judge(self, dut, golden, baseline, metrics, *, kind, phase, mode):  # type: ignore[no-untyped-def]
        if exact_match(dut, golden):
            return {"mismatched": 0}, []
        d, g = np.asarray(dut, np.float32), np.asarray(golden, np.float32)
        bad = int(np.count_nonzero(~(d == g)))
        return {"mismatched": 0}, [f"not exact: {bad} / {g.size} elements differ, max_abs "
                                   f"{_fmt(metrics['max_abs'])} (up to 0 allowed)"]


@dataclass(frozen=True)
class AllClosePolicy(Policy):
    """``|dut - golden| <= atol + rtol * |golden|`` element-wise, at most ``max_mismatch_frac`` missing
    (default 0), as torch.testing / IRON judge tensors."""

    name: ClassVar[str] = "allclose"
    rtol: float = 1.6e-2
    atol: float = 1e-5
    max_mismatch_frac: float = 0.0

    def _judge(self, dut, golden, baseline, metrics, *, kind, phase, mode):  # type: ignore[no-untyped-def]
        d, g = np.asarray(dut, np.float32), np.asarray(golden, np.float32)
        diff = np.abs(d.astype(np.float64) - g)
        allowed = self.atol + self.rtol * np.abs(g.astype(np.float64))
        bad = ~(diff <= allowed)                       # NaN differences are mismatches
        n_bad, n = int(np.count_nonzero(bad)), g.size
        thresholds = {"rtol": self.rtol, "atol": self.atol, "max_mismatch_frac": self.max_mismatch_frac}
        if n_bad <= self.max_mismatch_frac * n:
            return thresholds, []
        with np.errstate(all="ignore"):
            rel = np.where(diff == 0, 0.0, diff / np.abs(g))
        i_abs = np.unravel_index(int(np.argmax(np.where(np.isnan(diff), np.inf, diff))), g.shape)
        i_rel = np.unravel_index(int(np.argmax(np.where(np.isnan(rel), np.inf, rel))), g.shape)
        return thresholds, [
            f"Mismatched elements: {n_bad} / {n} ({100 * n_bad / n:.1f}%) "
            f"(up to {100 * self.max_mismatch_frac:.3g}% allowed)",
            f"Greatest absolute difference: {_fmt(float(diff[i_abs]))} at index {tuple(map(int, i_abs))} "
            f"(up to {_fmt(self.atol)} allowed)",
            f"Greatest relative difference: {_fmt(float(rel[i_rel]))} at index {tuple(map(int, i_rel))} "
            f"(up to {_fmt(self.rtol)} allowed)",
        ]


@dataclass(frozen=True)
class CosinePolicy(Policy):
    """Cosine similarity of the whole tap with the golden at least ``min_cosine`` (text: ``min``)."""

    name: ClassVar[str] = "cosine"
    aliases: ClassVar[dict[str, str]] = {"min": "min_cosine"}
    min_cosine: float = 0.99

    def _judge(self, dut, golden, baseline, metrics, *, kind, phase, mode):  # type: ignore[no-untyped-def]
        c = metrics["cosine"]
        reasons = [] if c >= self.min_cosine else [f"cosine {_fmt(c)} (at least {_fmt(self.min_cosine)} required)"]
        return {"min_cosine": self.min_cosine}, reasons


@dataclass(frozen=True)
class NmsePolicy(Policy):
    """Normalised MSE ``||dut - golden||^2 / ||golden||^2`` at most ``max_nmse`` (text: ``max``), as
    llama.cpp's test-backend-ops."""

    name: ClassVar[str] = "nmse"
    aliases: ClassVar[dict[str, str]] = {"max": "max_nmse"}
    max_nmse: float = 1e-7

    def _judge(self, dut, golden, baseline, metrics, *, kind, phase, mode):  # type: ignore[no-untyped-def]
        v = metrics["nmse"]
        return {"max_nmse": self.max_nmse}, ([] if v <= self.max_nmse else [_over("nmse", v, self.max_nmse)])


@dataclass(frozen=True)
class TopKWalkPolicy(Policy):
    """On ``logits`` only (other kinds pass): in every row where the argmaxes differ, each side's
    argmax must be in the other's top-k (the vLLM / ``make verify`` walk on teacher-forced rows)."""

    name: ClassVar[str] = "topk"
    k: int = 5

    def _judge(self, dut, golden, baseline, metrics, *, kind, phase, mode):  # type: ignore[no-untyped-def]
        if kind != "logits":
            return {"k": self.k}, []
        d, g = np.asarray(dut, np.float32), np.asarray(golden, np.float32)
        k = min(self.k, g.shape[1])
        am_d, am_g = d.argmax(axis=1), g.argmax(axis=1)
        reasons = []
        for row in np.flatnonzero(am_d != am_g):
            top_g = np.argpartition(-g[row], k - 1)[:k]
            top_d = np.argpartition(-d[row], k - 1)[:k]
            if am_d[row] not in top_g or am_g[row] not in top_d:
                reasons.append(f"row {row}: dut token {am_d[row]} vs golden token {am_g[row]}, not both in "
                               f"the other's top-{k} (top-{k} walk)")
        return {"k": self.k}, reasons[:5] + ([f"... {len(reasons) - 5} more rows"] if len(reasons) > 5 else [])


REGISTRY: dict[str, type[Policy]] = {
    cls.name: cls for cls in (CalibratedPolicy, ExactPolicy, AllClosePolicy, CosinePolicy, NmsePolicy, TopKWalkPolicy)
}

# The anchors' own gates (torch.testing, IRON, the paper, llama.cpp, vLLM) as named presets.
PRESETS: dict[str, str] = {
    "torch-bf16": "allclose:rtol=1.6e-2,atol=1e-5",   # torch.testing's bf16 defaults
    "iron": "allclose:rtol=0.04,atol=0.15",           # IRON's MHA operator test
    "cosine-0.99": "cosine:min=0.99",                 # the paper's phase-2 block gate
    "nmse-llamacpp": "nmse:max=5e-4",                 # llama.cpp matmul / flash attention
    "top5-walk": "topk:k=5",                          # vLLM / the paper's `make verify`
}


def make_policy(name: str, params: dict[str, Any] | None = None, *, where: str = "policy") -> Policy:
    """Build a registered policy (or preset, further parameterised) from a name and parameters;
    HarnessError naming ``where`` for an unknown name, unknown parameter or bad value."""
    params = dict(params or {})
    if name in PRESETS:
        base = parse_policy(PRESETS[name], where=where)
        name, params = base.name, {**_params(base), **params}
    cls = REGISTRY.get(name)
    if cls is None:
        raise HarnessError(f"{where}: unknown policy {name!r}; known: {', '.join(sorted(REGISTRY) + sorted(PRESETS))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        fname = cls.aliases.get(key, key)
        if fname not in fields:
            known = sorted({*fields, *cls.aliases} - set(cls.aliases.values())) or ["none"]
            raise HarnessError(f"{where}: policy {name!r} has no parameter {key!r}; parameters: {', '.join(known)}")
        want = int if fields[fname].type in ("int", int) else float
        try:
            v = want(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            v = None
        if v is None or (want is int and float(value) != v) or not math.isfinite(v) or v < 0:
            raise HarnessError(f"{where}: policy {name!r} parameter {key!r}: expected a non-negative "
                               f"{want.__name__}, got {value!r}")
        kwargs[fname] = v
    return cls(**kwargs)


def _params(p: Policy) -> dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}  # type: ignore[arg-type]


def parse_policy(text: str, *, where: str = "policy") -> Policy:
    """``"calibrated"``, ``"allclose:rtol=0.04,atol=0.15"``, a preset such as ``"iron"``... -> Policy.

    Errors are HarnessError naming ``where`` (e.g. the file and key the text came from)."""
    if not isinstance(text, str) or not text.strip():
        raise HarnessError(f"{where}: expected a policy text such as 'calibrated' or 'cosine:min=0.99', got {text!r}")
    name, _, rest = text.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise HarnessError(f"{where}: bad parameter {item!r} in {text!r}; expected name=value")
        params[key.strip()] = value.strip()
    return make_policy(name.strip(), params, where=where)
