"""Phase 1 in the gate and the suites: the model's op cases (``harness.suites.ops``) run and judged.

The backend is the deployment's own when its factory offers ``op_backend()`` (compiled NPU kernels:
``ShapeKeyedBackend(NpuOpBackend(registry))``); otherwise the emulator's kernels with the factory's
kernel knobs (``make_factory(...).config``), else the clean defaults. GEMM and GEMV cases also get the
exact small-integer probe, which catches a bf16 accumulator deterministically.
"""
from __future__ import annotations

from typing import Any, Callable

from harness.deployment.loader import load_factory
from harness.spec.model_spec import ModelSpec
from harness.suites.phases import Check


def backend_for(deployment: str | Callable | None) -> Any:
    """The OpBackend phase 1 runs for ``deployment`` (see the module docstring)."""
    from harness.suites.ops import EmulatorOpBackend

    factory = load_factory(deployment)
    inner = getattr(factory, "inner", factory)  # a RecordingFactory wraps the real one
    if callable(getattr(inner, "op_backend", None)):
        return inner.op_backend()
    return EmulatorOpBackend(getattr(inner, "config", None))


def op_ids(spec: ModelSpec) -> list[str]:
    """The phase-1 check ids of ``spec`` without running anything: case ids, then ``probe:`` ids."""
    from harness.suites.ops import op_cases_for

    cases = op_cases_for(spec)
    return [c.check_id() for c in cases] + [f"probe:{c.check_id()}" for c in cases if c.gemm_dims()]


def run_ops(spec: ModelSpec, deployment: str | Callable | None, only: set[str] | None = None) -> list[Check]:
    """Judge every op case of ``spec`` (or the ids in ``only``) on the deployment's backend."""
    from harness.suites.ops import R_LIMIT, exact_probe, judge, op_cases_for

    backend = backend_for(deployment)
    # The cases carry the accumulator under test: the emulator backend's own knob, so a factory built
    # with acc_dtype="bf16" is judged as the bf16-accumulating design it is (check ids leave it out).
    acc = getattr(getattr(backend, "cfg", None), "acc_dtype", "fp32")
    checks: list[Check] = []
    for case in op_cases_for(spec, acc=acc):
        cid = case.check_id()
        if only is None or cid in only:
            r = judge(case, backend)
            checks.append(Check(cid, r.passed, f"r {r.metrics.get('r', float('nan')):.3g} "
                                f"{'<=' if r.passed else '>'} max {R_LIMIT:g} (vs torch bf16)", r.metrics))
        if case.gemm_dims() and (only is None or f"probe:{cid}" in only):
            p = exact_probe(case, backend)
            checks.append(Check(f"probe:{cid}", p.passed, f"{p.metrics['mismatches']} of {p.metrics['elements']} "
                                "exact-integer outputs differ (must be 0)", p.metrics))
    return checks
