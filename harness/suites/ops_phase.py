"""Phase 1 in the gate and the suites: the op registry's cases judged on the deployment's OWN op backend.

A deployment is judged op by op when its factory offers ``op_backend(spec)`` returning an OpBackend
(``harness.suites.op_registry``): the emulator's factories do (their kernels with their knobs and
faults), a pyxrt deployment returns ``NpuOpBackend(registry)``. Without one, phase 1 is "not
applicable: no op backend": nothing is run, nothing passes, and the gate says so (console, JSON,
JUnit); phase 7 lists it as not run without failing for it (docs/suites.md). Cases the backend does not
support (``supports(case)`` False) are not run and listed. GEMM-like cases also get the exact
small-integer probe, which catches a bf16 accumulator deterministically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from harness.deployment.loader import load_factory
from harness.spec.model_spec import ModelSpec
from harness.suites.phases import NOT_APPLICABLE, Check, PhaseOutcome, outcome

NO_OP_BACKEND = "not applicable: no op backend"
NOT_SUPPORTED = "not supported by the op backend"


def op_backend_of(deployment: str | Callable | None, spec: ModelSpec) -> Any | None:
    """The deployment's own op backend for ``spec``, or None when its factory offers none."""
    make = getattr(load_factory(deployment), "op_backend", None)
    return make(spec) if callable(make) else None


def op_ids(spec: ModelSpec) -> list[str]:
    """The phase-1 check ids of ``spec`` without running anything: case ids, then ``probe:`` ids."""
    from harness.suites.op_registry import cases_for

    cases = cases_for(spec)
    return [c.id for c in cases] + [f"probe:{c.id}" for c in cases if c.definition.probe]


@dataclass
class OpRun:
    """Phase 1's results: judged checks, and the ids not run with the reason (every id when no backend)."""

    checks: list[Check] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)
    has_backend: bool = True

    def outcome(self) -> PhaseOutcome:
        """n/a without a backend or with no case run; else pass / fail, naming the cases not run."""
        if not self.has_backend:
            return PhaseOutcome(1, NOT_APPLICABLE, message=f"{NO_OP_BACKEND}: the deployment's factory offers no "
                                "op_backend(spec), so no kernel was judged op by op (docs/suites.md)")
        if not self.checks:
            return PhaseOutcome(1, NOT_APPLICABLE, message=f"not applicable: every op case {NOT_SUPPORTED} ({len(self.not_run)})")
        out = outcome(1, self.checks)
        if self.not_run:
            ids = sorted(self.not_run)
            note = f"{len(ids)} checks not run, {NOT_SUPPORTED}: {', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}"
            out.message = f"{out.message}; {note}" if out.message else note
        return out


def run_ops(spec: ModelSpec, deployment: str | Callable | None, only: set[str] | None = None) -> OpRun:
    """Judge every op case of ``spec`` (or the ids in ``only``) on the deployment's own op backend."""
    from harness.suites.op_registry import R_LIMIT, cases_for, exact_probe, judge, supports

    backend = op_backend_of(deployment, spec)
    if backend is None:
        return OpRun(not_run={i: NO_OP_BACKEND for i in op_ids(spec) if only is None or i in only},
                     has_backend=False)
    run = OpRun()
    for case in cases_for(spec):
        ids = [case.id] + ([f"probe:{case.id}"] if case.definition.probe else [])
        ids = [i for i in ids if only is None or i in only]
        if not supports(backend, case):
            run.not_run.update({i: NOT_SUPPORTED for i in ids})
            continue
        if case.id in ids:
            r = judge(case, backend)
            run.checks.append(Check(case.id, r.passed, f"r {r.metrics.get('r', float('nan')):.3g} "
                                    f"{'<=' if r.passed else '>'} max {R_LIMIT:g} (vs torch bf16)", r.metrics))
        if f"probe:{case.id}" in ids:
            p = exact_probe(case, backend)
            run.checks.append(Check(f"probe:{case.id}", p.passed, f"{p.metrics['mismatches']} of "
                                    f"{p.metrics['elements']} exact-integer outputs differ (must be 0)", p.metrics))
    return run
