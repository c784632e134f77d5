"""Verdict value objects: truthy, serialisable (schema 1, docs/contract.md), rich enough to retune from."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
# Scalar metrics kept for every result in the JSON; failing results keep everything (per-token lists too).
# unforced_inputs: only on taps judged against a chain baseline (isolated mode; docs/policies.md).
SUMMARY_METRICS = ("r", "r_tail", "r_bias", "cosine", "rel_fro", "max_abs", "ulp_p99", "nmse", "snr_db", "nan", "inf",
                   "unforced_inputs")


def _json_safe(value: Any) -> Any:
    """NaN / inf become strings so the JSON stays standard."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return value


@dataclass
class TapResult:
    """The judgement of one tap of one phase. Truthy when it passed."""

    phase: str
    tap: str
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    judgement: dict[str, Any] | None = None  # policy name, reasons, thresholds
    message: str | None = None  # contract problems: wrong shape / dtype, NaN

    def __bool__(self) -> bool:
        return self.passed

    @property
    def id(self) -> str:
        """``phase/tap``: the identity used as pytest id, report row and filter."""
        return f"{self.phase}/{self.tap}"

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        metrics = self.metrics if (full or not self.passed) else {
            k: v for k, v in self.metrics.items() if k in SUMMARY_METRICS
        }
        out: dict[str, Any] = {"phase": self.phase, "tap": self.tap, "passed": self.passed, "metrics": metrics}
        if self.judgement is not None and not self.passed:
            out["judgement"] = self.judgement
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class FirstFailure:
    """Where the deployment first went wrong, in execution order, and what that looks like."""

    phase: str
    tap: str
    metrics: dict[str, Any]
    hint: str = "no known signature"
    judgement: dict[str, Any] | None = None
    localisation: dict[str, Any] = field(default_factory=dict)
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"phase": self.phase, "tap": self.tap, "metrics": self.metrics, "hint": self.hint}
        if self.judgement is not None:
            out["judgement"] = self.judgement
        if self.localisation:
            out["localisation"] = self.localisation
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class Coverage:
    compared: int
    required_missing: list[str]
    not_exposed: list[str]
    observed: list[str] = field(default_factory=list)  # observe-only taps: judged, not teacher-forced

    def to_dict(self) -> dict[str, Any]:
        return {"compared": self.compared, "required_missing": self.required_missing, "not_exposed": self.not_exposed,
                "observed": self.observed}


@dataclass
class Verdict:
    """The outcome of one check. Truthy when it passed; ``to_dict()`` follows schema 1."""

    model: str
    scale: str
    seed: int
    mode: str
    results: list[TapResult]
    coverage: Coverage
    first_failure: FirstFailure | None
    perf: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.first_failure is None and not self.coverage.required_missing

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> list[TapResult]:
        return [r for r in self.results if not r.passed]

    def result(self, phase: str, tap: str) -> TapResult | None:
        for r in self.results:
            if r.phase == phase and r.tap == tap:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({
            "schema": SCHEMA,
            "model": self.model,
            "scale": self.scale,
            "seed": self.seed,
            "mode": self.mode,
            "passed": self.passed,
            "first_failure": self.first_failure.to_dict() if self.first_failure else None,
            "coverage": self.coverage.to_dict(),
            "results": [r.to_dict() for r in self.results],
            "perf": self.perf,
            "provenance": self.provenance,
        })

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self, elapsed_s: float | None = None) -> str:
        """At most 20 lines for people and agents (see harness.report.summary)."""
        from harness.report.summary import render_summary

        return render_summary(self.to_dict(), elapsed_s=elapsed_s)
