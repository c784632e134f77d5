"""Localisation: the first failure in execution order, spike versus step, worst positions and elements."""
from __future__ import annotations

from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec
from harness.verdict.verdict import FirstFailure, TapResult


def execution_key(spec: ModelSpec, phases: list[str]):
    """Sort key: phase order, then canonical tap order within the phase."""
    order = {name: i for i, name in enumerate(tapspec.tap_names(spec))}
    phase_order = {p: i for i, p in enumerate(phases)}
    return lambda r: (phase_order.get(r.phase, len(phases)), order.get(r.tap, len(order)))


def _downstream(spec: ModelSpec, tap: str) -> list[str]:
    """The residual-stream taps after ``tap`` in the same phase (each later layer's out, final norm, logits)."""
    parsed = tapspec.parse(tap)
    if parsed.kind in ("final_norm",):
        return ["logits"]
    if parsed.kind == "logits":
        return []
    first = 0 if parsed.layer is None else parsed.layer + (1 if parsed.kind == "out" else 0)
    return [*(f"layers.{j}.out" for j in range(first, spec.num_layers)), "final_norm", "logits"]


def spike_or_step(spec: ModelSpec, first: TapResult, results: list[TapResult]) -> str:
    """``spike`` when the error returns to baseline downstream, ``step`` when it stays, ``end`` at the last tap.

    As in Neuron's fault-localisation stage: a spike points at one op (or a transient), a step at a
    fault whose error propagates (wrong weights, a layout bug), and tells an agent whether later
    failures are consequences of this one.
    """
    later = {r.tap: r for r in results if r.phase == first.phase}
    seen = [later[t] for t in _downstream(spec, first.tap) if t in later]
    if not seen:
        return "end"
    return "step" if any(not r.passed for r in seen) else "spike"


def decode_elements(spec: ModelSpec, tap: str, metrics: dict) -> list[list]:
    """``worst_elements`` [token, feature, dut, golden] -> [token, head, dim, dut, golden]."""
    kind = tapspec.parse(tap).kind
    out = []
    for token, feature, dut, golden in metrics.get("worst_elements", []):
        head, dim = tapspec.head_of(spec, kind, int(feature))
        out.append([int(token), head, int(dim), dut, golden])
    return out


def first_failure(spec: ModelSpec, results: list[TapResult], phases: list[str]) -> FirstFailure | None:
    """The first failing result in execution order, localised; None when everything passed."""
    ordered = sorted(results, key=execution_key(spec, phases))
    for r in ordered:
        if not r.passed:
            loc = {
                "kind": spike_or_step(spec, r, ordered),
                "worst_tokens": list(r.metrics.get("worst_tokens", [])),
                "worst_elements": decode_elements(spec, r.tap, r.metrics),
                "failing_taps": sum(1 for x in results if not x.passed),
            }
            return FirstFailure(phase=r.phase, tap=r.tap, metrics=r.metrics, judgement=r.judgement,
                                localisation=loc, message=r.message)
    return None
