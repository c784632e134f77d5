"""The eight phases of the agent loop (docs/agent-loop.md) and the value objects a gate run produces.

A phase gate is a list of ``Check`` results (truthy, with metrics against thresholds). Phases 2, 3 and
5 are views of the same per-tap verdicts: one ``harness.check`` run per mode, filtered by
``gate_phase_of``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from harness.errors import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, EXIT_PERF  # noqa: F401  (re-exported)

PHASES: dict[int, tuple[str, str]] = {
    0: ("sanity", "reference sanity: golden integrity, HF self-consistency, decode vs longer prefill, bf16 top-1"),
    1: ("ops", "op-level kernel suites on the deployment's own op backend (n/a without one)"),
    2: ("block", "one decoder block, isolated: embed and every prefill tap of layer 0"),
    3: ("prefill", "full-model prefill, every layer, cumulative and isolated"),
    4: ("prefill-perf", "prefill performance: time to first token"),
    5: ("decode", "decode, every layer with the KV cache for N steps (both modes), and decode performance"),
    6: ("e2e", "end to end: 32 greedy tokens, top-k walk, near-tie-aware logprobs, teacher-forced KL, top-1"),
    7: ("recheck", "independent re-check: fresh seed and prompt length, golden integrity, nothing skipped"),
}
MAX_PHASE = 7

# Outcome of a phase: "pass" and "measured" (perf without a baseline) never fail a gate. "not run": the
# phase compared nothing (no decode step, a trace without decode) - never a pass, exit 3.
PASS, FAIL, ERROR, MEASURED, REGRESSION, NOT_APPLICABLE = "pass", "fail", "error", "measured", "regression", "n/a"
NOT_RUN = "not run"


def gate_phase_of(mode: str, phase: str, tap: str) -> int:
    """The earliest gate that requires the tap result: 2 (isolated layer 0 + embed), 3 (prefill), 5 (decode)."""
    if phase != "prefill":
        return 5
    if mode == "isolated" and (tap == "embed" or tap.startswith("layers.0.")):
        return 2
    return 3


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item"):
        return _finite(value.item())
    return value


@dataclass
class Check:
    """One named check of a phase gate; truthy when it passed. ``id`` is its pytest id and JUnit name."""

    id: str
    passed: bool
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return _finite({"id": self.id, "passed": self.passed, "message": self.message, "metrics": self.metrics})


@dataclass
class PhaseOutcome:
    """One phase's status (pass / fail / error / measured / regression / n/a / not run) and its checks."""

    phase: int
    status: str
    checks: list[Check] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return PHASES[self.phase][0]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "name": self.name, "status": self.status, "message": self.message,
                "seconds": round(self.seconds, 3), "checks": [c.to_dict() for c in self.checks]}


def outcome(phase: int, checks: list[Check], seconds: float = 0.0, message: str = "") -> PhaseOutcome:
    """``pass`` when every check passed, else ``fail`` naming the first failing check."""
    bad = [c for c in checks if not c.passed]
    if bad and not message:
        message = f"{len(bad)} of {len(checks)} checks failed; first: {bad[0].id}: {bad[0].message}"
    return PhaseOutcome(phase, FAIL if bad else PASS, checks, message, seconds)


@dataclass
class GateResult:
    """One model's gate: per-phase outcomes, the verdict dicts, elapsed time and the exit code."""

    model: str
    deployment: str
    phase: int
    outcomes: dict[int, PhaseOutcome] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)  # "cumulative", "isolated", "recheck/..."
    elapsed_s: float = 0.0
    deployment_s: float = 0.0  # seconds spent inside the deployment (prefill / decode / factory)
    error: str | None = None  # the check could not run (exit 3)
    recheck: dict[str, Any] | None = None  # the seed and prompt length phase 7 chose
    perf: dict[str, Any] | None = None
    e2e: dict[str, Any] | None = None  # phase 6: both generations and the first divergence

    @property
    def exit_code(self) -> int:
        """3 could not run (or compared nothing), 1 correctness failure, 2 perf regression, 0 pass."""
        statuses = {o.status for o in self.outcomes.values()}
        if self.error is not None or ERROR in statuses or NOT_RUN in statuses or not self.outcomes \
                or self.judged_nothing:
            return EXIT_ERROR
        if FAIL in statuses:
            return EXIT_FAIL
        if REGRESSION in statuses:
            return EXIT_PERF
        return EXIT_PASS

    @property
    def judged_nothing(self) -> bool:
        """Phases past 0 ran and every one was n/a (``--phase 1`` without an op backend): nothing of the
        deployment was judged, which is never a pass (phase 0 judges only the reference)."""
        later = [o for n, o in self.outcomes.items() if n > 0]
        return bool(later) and all(o.status == NOT_APPLICABLE for o in later)

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASS

    def __bool__(self) -> bool:
        return self.passed

    def first_failure(self) -> dict[str, Any] | None:
        """The earliest failing phase and, where it is a tap, the tap (phase, tap, metrics, hint)."""
        for n in sorted(self.outcomes):
            o = self.outcomes[n]
            if o.status not in (FAIL, ERROR, REGRESSION, NOT_RUN):
                continue
            out: dict[str, Any] = {"gate_phase": n, "gate_phase_name": o.name, "status": o.status,
                                   "message": o.message}
            if o.failed:
                out["check"] = o.failed[0].id
            ff = self._tap_failure(n)
            if ff is not None:
                out.update(ff)
            return out
        if self.judged_nothing:  # exit 3 without a failing phase: say why
            n = min(n for n in self.outcomes if n > 0)
            o = self.outcomes[n]
            return {"gate_phase": n, "gate_phase_name": o.name, "status": o.status,
                    "message": f"nothing of the deployment was judged: {o.message}"}
        return None

    def _tap_failure(self, gate_phase: int) -> dict[str, Any] | None:
        """The verdict first failure that belongs to ``gate_phase`` (isolated first: it localises)."""
        if gate_phase == 7:
            keys = sorted(k for k in self.verdicts if k.startswith("recheck"))
        elif gate_phase in (2, 3, 5):
            keys = ["isolated", "cumulative"]
        else:
            return None
        for key in keys:
            v = self.verdicts.get(key)
            ff = (v or {}).get("first_failure")
            if ff and (gate_phase == 7 or gate_phase_of(v["mode"], ff["phase"], ff["tap"]) == gate_phase):
                return {"mode": v["mode"], **ff}
        return None

    def first_failing_tap(self) -> dict[str, Any] | None:
        """The first failing tap of any per-tap verdict, isolated mode first (None when all taps passed)."""
        for key in ("isolated", "cumulative", *sorted(k for k in self.verdicts if k.startswith("recheck"))):
            v = self.verdicts.get(key)
            if v and v.get("first_failure"):
                return {"mode": v["mode"], "phase": v["first_failure"]["phase"], "tap": v["first_failure"]["tap"]}
        return None

    def to_dict(self) -> dict[str, Any]:
        return _finite({
            "model": self.model, "deployment": self.deployment, "phase": self.phase,
            "passed": self.passed, "exit_code": self.exit_code, "error": self.error,
            "elapsed_s": round(self.elapsed_s, 3), "deployment_s": round(self.deployment_s, 3),
            "first_failure": self.first_failure(), "first_failing_tap": self.first_failing_tap(),
            "phases": [self.outcomes[n].to_dict() for n in sorted(self.outcomes)],
            "recheck": self.recheck, "perf": self.perf, "e2e": self.e2e, "verdicts": self.verdicts,
        })


def overall_exit(results: list[GateResult]) -> int:
    """Several models: 3 if any could not run, else 1 if any failed, else 2 if any regressed, else 0."""
    codes = {r.exit_code for r in results}
    for code in (EXIT_ERROR, EXIT_FAIL, EXIT_PERF):
        if code in codes:
            return code
    return EXIT_PASS if results else EXIT_ERROR
