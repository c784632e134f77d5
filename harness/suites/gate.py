"""``run_gate``: the phase gates 0..N of one model against one deployment, as ``harness gate`` runs them.

One ``harness.check`` run per mode serves phases 2, 3 and 5 (its results filtered per phase); phase 6
runs the deployment against a golden of ``E2E_STEPS`` decode steps; phase 7 draws a fresh seed and prompt
length (recorded, so a failure reproduces with ``--seed`` / ``--prompt-len``), verifies every golden it
used and fails when any earlier phase was skipped or could not run.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.deployment.loader import summarise_exception
from harness.errors import HarnessError
from harness.suites import perfgate
from harness.suites.e2e import E2E_STEPS, e2e_checks
from harness.suites.phases import (ERROR, MAX_PHASE, MEASURED, NOT_APPLICABLE, PASS, REGRESSION, Check,
                                   GateResult, PhaseOutcome, gate_phase_of, outcome)

MODES = ("cumulative", "isolated")


def deployment_with_faults(deployment: str | Callable | None, faults: list[str] | tuple[str, ...]) -> Any:
    """``deployment`` as given, or the emulator with the named ``faults`` switched on (``--fault``)."""
    if not faults:
        return deployment
    from harness.deployment.loader import BUILTIN, DEFAULT_DEPLOYMENT

    if deployment not in (None, "emulator", DEFAULT_DEPLOYMENT, BUILTIN["emulator"]):
        raise HarnessError(f"--fault needs the emulator deployment, not --deployment {deployment!r}")
    from harness.deployment.emulator import make_factory

    factory = make_factory(tuple(faults))
    factory.name = f"emulator+{'+'.join(faults)}"  # type: ignore[attr-defined]
    factory.spawn_target = f"emulator[faults={'+'.join(faults)}]"  # type: ignore[attr-defined]  # rebuilt in the child
    return factory


def modes_of(mode: str) -> tuple[str, ...]:
    """``both`` (default) -> both modes; else the one named; HarnessError naming --mode otherwise."""
    if mode == "both":
        return MODES
    if mode not in MODES:
        raise HarnessError(f"--mode {mode!r}: expected cumulative, isolated or both")
    return (mode,)


def tap_checks(verdict: Any, gate_phase: int, as_mode: str | None = None) -> list[Check]:
    """The verdict's TapResults that belong to ``gate_phase``, as Checks (id ``mode:phase/tap``)."""
    mode = verdict.mode
    out = []
    for r in verdict.results:
        if gate_phase_of(as_mode or mode, r.phase, r.tap) != gate_phase:
            continue
        why = r.message or "; ".join(map(str, (r.judgement or {}).get("reasons", []))) or "within policy"
        out.append(Check(f"{mode}:{r.phase}/{r.tap}", r.passed, why, r.to_dict()["metrics"]))
    if gate_phase in (3, 5):  # the contract's required taps, per phase of this gate
        missing = [m for m in verdict.coverage.required_missing
                   if (m.split(":", 1)[0] == "prefill") == (gate_phase == 3)]
        out.append(Check(f"{mode}:coverage", not missing,
                         f"required taps not exposed: {', '.join(missing[:5])}" if missing else
                         f"{verdict.coverage.compared} taps compared, every required tap exposed",
                         {"required_missing": missing}))
    return out


@dataclass
class GateOptions:
    """Everything ``run_gate`` takes besides the model; defaults as the CLI's."""

    deployment: str | Callable | None = None
    phase: int = MAX_PHASE
    scale: str = "tiny"
    seed: int = 0
    weights: str | Path | None = None
    mode: str = "both"
    golden_dir: str | Path | None = None
    perf: bool = False
    perf_db: str | None = None
    decode_steps: int = 4
    prompt_len: int | None = None
    trace: str | Path | None = None
    recheck_seed: int | None = None  # phase 7: None draws one at run time
    recheck_prompt_len: int | None = None
    isolation: Any = "process"  # where the deployment runs: a child process, inline (debugging), or a DeploymentHost
    timeout: float | None = None  # seconds per deployment call; None: derived from the work
    progress: Callable | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Run:
    """State of one model's gate run: goldens, check verdicts, deployment time."""

    def __init__(self, model: str, opts: GateOptions):
        from harness.spec.model_spec import get
        from harness.store import GoldenStore

        self.model, self.opts = model, opts
        self.spec = get(model, opts.scale)
        self.store = GoldenStore(opts.golden_dir)
        # isolation: one deployment host (one child process) serves every deployment of this run.
        from harness.deployment.isolation import DeploymentHost, spawn_target
        from harness.deployment.loader import describe, load_factory, refuse_golden_access

        self.target = opts.deployment
        if opts.trace is None:
            refuse_golden_access(load_factory(self.target), self.target)
        self.name = describe(self.target)
        # A host passed in (harness gate over several models) is the caller's to close; one made here is ours.
        self.owns_host = not isinstance(opts.isolation, DeploymentHost)
        self.host = DeploymentHost(opts.isolation, opts.timeout) if self.owns_host else opts.isolation
        if opts.trace is None and spawn_target(self.target)[1] is None:
            self.host.start()  # the child starts up while phases 0-1 run (not for a factory that runs inline)
        self.seconds0 = self.host.seconds  # a shared host also counts other models' deployments
        self.verdicts: dict[str, Any] = {}
        self.goldens: list[Any] = []

    def golden(self, seed: int, steps: int, prompt_len: int | None):
        from harness.store import GoldenRequest
        from harness.weights import WeightsSource

        source = WeightsSource(str(self.opts.weights) if self.opts.weights else None)
        g = self.store.get(GoldenRequest(self.model, self.opts.scale, seed, steps, prompt_len, source),
                           progress=self.opts.progress)
        self.goldens.append(g)
        return g

    def weights(self, seed: int):
        from harness.weights import WeightsSource, load_weights

        return load_weights(self.spec, WeightsSource(str(self.opts.weights) if self.opts.weights else None), seed)

    def check(self, mode: str, key: str | None = None, seed: int | None = None, prompt_len: int | None = None):
        """The verdict of ``mode`` (cached under ``key``; the trace's when ``--trace`` was given)."""
        import harness

        key = key or mode
        if key not in self.verdicts:
            o = self.opts
            if o.trace is not None:
                v = harness.check_trace(o.trace, golden_dir=o.golden_dir, progress=o.progress)
                if v.model != self.model or v.scale != o.scale:
                    raise HarnessError(f"--trace {o.trace}: records {v.model}/{v.scale}, not {self.model}/{o.scale}")
            else:
                v = harness.check(self.model, self.target, scale=o.scale, seed=o.seed if seed is None else seed,
                                  decode_steps=o.decode_steps, mode=mode, weights=o.weights,
                                  prompt_len=o.prompt_len if seed is None else prompt_len,
                                  golden_dir=o.golden_dir, progress=o.progress, isolation=self.host)
            self.verdicts[key] = v
        return self.verdicts[key]

    def deployment(self, golden):
        """A fresh deployment on this run's host (never handed the golden); close it after use."""
        from harness.weights import WeightsSource

        source = WeightsSource(str(self.opts.weights) if self.opts.weights else None)
        return self.host.open(self.target, self.spec, source, golden.manifest["seed"])


def _guard(phase: int, fn: Callable[[], PhaseOutcome]) -> PhaseOutcome:
    """Run one phase; a HarnessError or any exception becomes an ``error`` outcome (exit 3)."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except HarnessError as exc:
        out = PhaseOutcome(phase, ERROR, message=str(exc))
    except Exception as exc:  # a deployment raising outside harness.check, or a harness bug
        out = PhaseOutcome(phase, ERROR, message=f"could not run: {summarise_exception(exc)}")
    out.seconds = time.perf_counter() - t0
    return out


def _phase0(run: _Run) -> PhaseOutcome:
    from harness.suites.sanity import sanity_checks

    o = run.opts
    golden = run.golden(o.seed, o.decode_steps, o.prompt_len)
    return outcome(0, sanity_checks(golden, run.weights(o.seed)))


def _phase1(run: _Run) -> PhaseOutcome:
    from harness.suites import ops_phase

    checks = ops_phase.run_ops(run.spec, run.opts.deployment)
    if not checks:
        return PhaseOutcome(1, NOT_APPLICABLE, message="no op cases for this deployment")
    return outcome(1, checks)


def _tap_phase(run: _Run, gate_phase: int, modes: tuple[str, ...]) -> PhaseOutcome:
    if run.opts.trace is not None:
        modes = ("cumulative",)
    checks: list[Check] = []
    for mode in sorted(modes, key=lambda m: m != "isolated"):  # isolated first: it localises
        # Without isolated mode, phase 2 judges the block's cumulative results (as isolated ones would be).
        as_mode = "isolated" if gate_phase == 2 else None
        checks += tap_checks(run.check(mode), gate_phase, as_mode)
    return outcome(gate_phase, checks)


def _perf(run: _Run, result: GateResult) -> dict[int, PhaseOutcome]:
    o = run.opts
    golden = run.golden(o.seed, o.decode_steps, o.prompt_len)  # only its prompt is used
    dep = run.deployment(golden)
    t0 = time.perf_counter()
    try:  # timed where the deployment runs (in its child process: no pipe in the timings)
        rounds = (perfgate.WARMUP + perfgate.ROUNDS) * (perfgate.DECODE_STEPS + 2)
        samples = dep.run(perfgate.measure, golden.input_ids, phase="phase 4-5 timing",
                          tokens=len(golden.input_ids), calls=rounds)
    finally:
        dep.close()
    by_phase, perf = perfgate.judge(run.model, run.name, samples, compare=o.perf, db=o.perf_db)
    result.perf = perf
    secs = time.perf_counter() - t0
    return {n: PhaseOutcome(n, perfgate.status(cs, o.perf), cs,
                            "; ".join(c.message for c in cs), secs / 2) for n, cs in by_phase.items()}


def _phase6(run: _Run, result: GateResult) -> PhaseOutcome:
    o = run.opts
    golden = run.golden(o.seed, E2E_STEPS, o.prompt_len)
    opened: list[Any] = []
    try:
        checks, details = e2e_checks(golden, lambda: opened.append(run.deployment(golden)) or opened[-1])
    finally:
        for dep in opened:
            dep.close()
    result.e2e = details
    return outcome(6, checks)


def _phase7(run: _Run, result: GateResult, modes: tuple[str, ...]) -> PhaseOutcome:
    from harness.store.golden import verify_dir

    o = run.opts
    base_len = o.prompt_len or run.spec.default_prompt_len
    seed = o.recheck_seed if o.recheck_seed is not None else secrets.randbelow(2**31 - 1) + 1
    # A fresh length around the default: off the tiling grid more often than not.
    plen = o.recheck_prompt_len or (max(8, base_len // 2) + secrets.randbelow(base_len))
    result.recheck = {"seed": seed, "prompt_len": plen,
                      "reproduce": f"--seed {seed} --prompt-len {plen}"}
    checks: list[Check] = []
    for mode in modes:
        v = run.check(mode, key=f"recheck/{mode}", seed=seed, prompt_len=plen)
        v.provenance["recheck"] = dict(result.recheck)
        failed = v.failures
        first = v.first_failure
        checks.append(Check(f"recheck:{mode}", v.passed,
                            f"seed {seed}, prompt {plen}: " + (
                                f"first failure {first.phase} {first.tap}; {len(failed)} taps failed" if first else
                                f"{len(v.results)} taps within policy"),
                            {"seed": seed, "prompt_len": plen, "compared": len(v.results), "failed": len(failed)}))
    for g in {id(g): g for g in run.goldens}.values():
        problems = verify_dir(g.path)
        checks.append(Check(f"integrity:{g.path.name}", not problems,
                            "; ".join(problems) or f"{g.path}: every file matches its sha256"))
    skipped = [f"{n} {oc.name}: {oc.status} ({oc.message})" for n, oc in sorted(result.outcomes.items())
               if oc.status not in (PASS, MEASURED)]
    checks.append(Check("nothing_skipped", not any(s.split(": ")[1].startswith((NOT_APPLICABLE, ERROR))
                                                   for s in skipped),
                        "phases not run: " + "; ".join(skipped) if skipped else "every earlier phase ran",
                        {"phases": len(result.outcomes)}))
    return outcome(7, checks)


def run_gate(model: str, opts: GateOptions | None = None, **kwargs: Any) -> GateResult:
    """The gates of phases 0..``opts.phase`` for ``model`` (keyword arguments override GateOptions fields).

    Never raises for a check that cannot run: the GateResult carries ``error`` / error outcomes and exit
    code 3. Defaults: the emulator, phase 7, tiny scale, seed 0, synthetic weights, both modes.
    """
    opts = opts or GateOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"run_gate: unknown option {k!r}")
        setattr(opts, k, v)
    t0 = time.perf_counter()
    name = opts.deployment if isinstance(opts.deployment, str) else getattr(opts.deployment, "name", None)
    result = GateResult(model=model, deployment=str(name or "emulator"), phase=opts.phase)
    try:
        if not 0 <= opts.phase <= MAX_PHASE:
            raise HarnessError(f"--phase {opts.phase}: expected 0..{MAX_PHASE}")
        modes = modes_of(opts.mode)
        if opts.trace is not None and opts.phase > 5:
            raise HarnessError(f"--trace {opts.trace}: a trace records one cumulative run; it can gate phases "
                               f"0-5, not {opts.phase} (phases 6-7 need a live deployment)")
        run = _Run(model, opts)
        result.deployment = run.name if opts.trace is None else f"trace:{opts.trace}"
    except HarnessError as exc:
        result.error = str(exc)
        result.elapsed_s = time.perf_counter() - t0
        return result
    live = opts.trace is None
    steps: list[tuple[int, Callable[[], Any]]] = [
        (0, lambda: _phase0(run)),
        (1, lambda: _phase1(run) if live else PhaseOutcome(1, NOT_APPLICABLE, message="a trace has no kernels")),
        (2, lambda: _tap_phase(run, 2, modes)),
        (3, lambda: _tap_phase(run, 3, modes)),
    ]
    for n, fn in steps:
        if n <= opts.phase:
            result.outcomes[n] = _guard(n, fn)
    perf5: PhaseOutcome | None = None
    if opts.phase >= 4:
        if live:
            t1 = time.perf_counter()
            try:
                outs = _perf(run, result)
            except Exception as exc:  # timing runs the deployment outside harness.check
                why = str(exc) if isinstance(exc, HarnessError) else f"could not run: {summarise_exception(exc)}"
                outs = {4: PhaseOutcome(4, ERROR, message=why, seconds=time.perf_counter() - t1),
                        5: PhaseOutcome(5, ERROR, message=why)}
            result.outcomes[4], perf5 = outs[4], outs[5]
        else:
            result.outcomes[4] = PhaseOutcome(4, NOT_APPLICABLE, message="a trace has no timings")
    if opts.phase >= 5:
        dec = _guard(5, lambda: _tap_phase(run, 5, modes))
        if perf5 is not None:
            dec.checks += perf5.checks
            dec.seconds += perf5.seconds
            if perf5.status == ERROR:
                dec.status, dec.message = ERROR, perf5.message
            elif dec.status == PASS and perf5.status == REGRESSION:
                dec.status, dec.message = REGRESSION, perf5.message
        result.outcomes[5] = dec
    if opts.phase >= 6:
        result.outcomes[6] = _guard(6, lambda: _phase6(run, result))
    if opts.phase >= 7:
        result.outcomes[7] = _guard(7, lambda: _phase7(run, result, modes))
    if run.owns_host:
        run.host.close()  # the deployment's child ends with the run (phases never raise; a daemon child dies with us)
    result.verdicts = {k: v.to_dict() for k, v in run.verdicts.items()}
    result.deployment_s = run.host.seconds - run.seconds0
    result.elapsed_s = time.perf_counter() - t0
    return result
