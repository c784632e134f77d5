"""``run_gate``: the phase gates 0..N of one model against one deployment, as ``harness gate`` runs them.

One ``harness.check`` run per mode serves phases 2, 3 and 5 (its results filtered per phase); phase 6
runs the deployment against a golden of ``E2E_STEPS`` decode steps; phase 7 re-checks with a seed and
prompt length derived from the deployment and the golden key (or given: ``--recheck-seed`` /
``--recheck-prompt-len``), prints the command that reruns it exactly, verifies every golden it used and
fails when any earlier phase was skipped or could not run. A phase in which nothing was compared is
"not run" (exit 3), never a pass. Inputs (seed, prompt length, decode steps) are checked against the
model and the machine before anything runs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from harness.deployment.loader import identity, summarise_exception
from harness.errors import HarnessError
from harness.memory import release
from harness.suites import perfgate
from harness.suites.e2e import E2E_STEPS
from harness.suites.phases import (ERROR, MAX_PHASE, MEASURED, NOT_APPLICABLE, NOT_RUN, PASS, REGRESSION, Check,
                                   GateResult, PhaseOutcome, gate_phase_of, outcome)

# One run state for the gate and the pytest plugin (harness.suites.run); re-exported for callers.
from harness.suites.run import MODES, ModelRun, RunOptions, deployment_with_faults, modes_of  # noqa: E402,F401

GateOptions = RunOptions  # the gate's name for the shared options
_Run = ModelRun  # the gate's run state is the shared one


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


def _announce(run: _Run, phase: int, out: PhaseOutcome | None = None) -> None:
    if run.opts.on_phase is not None:
        run.opts.on_phase(run.model, phase, out)


def _guard(phase: int, fn: Callable[[], PhaseOutcome], run: _Run | None = None) -> PhaseOutcome:
    """Run one phase; a HarnessError or any exception becomes an ``error`` outcome (exit 3)."""
    if run is not None:
        _announce(run, phase)
    t0 = time.perf_counter()
    try:
        out = fn()
    except HarnessError as exc:
        out = PhaseOutcome(phase, ERROR, message=str(exc))
    except Exception as exc:  # a deployment raising outside harness.check, or a harness bug
        out = PhaseOutcome(phase, ERROR, message=f"could not run: {summarise_exception(exc)}")
    release()  # a phase's freed working memory (GBs at full scale) back to the OS before the next one
    out.seconds = time.perf_counter() - t0
    if run is not None:
        _announce(run, phase, out)
    return out


def _phase0(run: _Run) -> PhaseOutcome:
    return outcome(0, run.sanity())


def _phase1(run: _Run) -> PhaseOutcome:
    return run.ops().outcome()


def _tap_phase(run: _Run, gate_phase: int, modes: tuple[str, ...]) -> PhaseOutcome:
    if run.opts.trace is not None:
        modes = ("cumulative",)
    if run.opts.rows != "full" and "isolated" in modes:  # a sampled golden cannot teacher-force
        from harness.checker import SAMPLED_ISOLATED

        modes = tuple(m for m in modes if m != "isolated")
        if gate_phase == 2 or not modes:
            return PhaseOutcome(gate_phase, NOT_APPLICABLE, message=SAMPLED_ISOLATED)
    checks: list[Check] = []
    for mode in sorted(modes, key=lambda m: m != "isolated"):  # isolated first: it localises
        # Without isolated mode, phase 2 judges the block's cumulative results (as isolated ones would be).
        as_mode = "isolated" if gate_phase == 2 else None
        checks += tap_checks(run.check(mode), gate_phase, as_mode)
    compared = [c for c in checks if not c.id.endswith(":coverage")]
    if not compared:  # nothing judged is not a pass (e.g. --decode-steps 0, a trace without decode)
        why = ("no decode step was compared (--decode-steps 0, or a trace without decode steps)"
               if gate_phase == 5 else "no tap of this phase was compared")
        return PhaseOutcome(gate_phase, NOT_RUN, checks, why)
    return outcome(gate_phase, checks)


def _perf(run: _Run, result: GateResult) -> dict[int, PhaseOutcome]:
    o = run.opts
    golden = run.golden(o.seed, o.decode_steps, o.prompt_len)  # only its prompt is used
    dep = run.deployment(golden)
    t0 = time.perf_counter()
    try:  # timed where the deployment runs (in its child process: no pipe in the timings)
        calls = (perfgate.WARMUP + o.rounds) * (perfgate.DECODE_STEPS + 2)
        budget = None if o.perf else perfgate.MEASURE_BUDGET_S  # only a comparison needs every round
        samples = dep.run(perfgate.measure, golden.input_ids, o.rounds, budget, phase="phase 4-5 timing",
                          tokens=len(golden.input_ids), calls=calls)
    finally:
        dep.close()
    by_phase, perf = perfgate.judge(run.model, identity(run.target), samples, compare=o.perf, db=o.perf_db)
    result.perf = perf
    secs = time.perf_counter() - t0
    return {n: PhaseOutcome(n, perfgate.status(cs, o.perf), cs,
                            "; ".join(c.message for c in cs), secs / 2) for n, cs in by_phase.items()}


def _phase6(run: _Run, result: GateResult) -> PhaseOutcome:
    checks, details = run.e2e()
    result.e2e = details
    return outcome(6, checks)


def _phase7(run: _Run, result: GateResult, modes: tuple[str, ...]) -> PhaseOutcome:
    from harness.store.eviction import remember_rechecks
    from harness.store.golden import verify_dir
    from harness.suites.run import rerun_command

    seed, plen = run.recheck_params()
    result.recheck = {"seed": seed, "prompt_len": plen,
                      "derived": run.opts.recheck_seed is None or run.opts.recheck_prompt_len is None,
                      "reproduce": rerun_command(run.model, run.opts, seed, plen, str(run.name))}
    checks: list[Check] = []
    recheck_paths = []
    for mode in modes:
        v = run.recheck(mode)
        recheck_paths.append(Path(v.provenance["golden"]["path"]))
        failed = v.failures
        first = v.first_failure
        checks.append(Check(f"recheck:{mode}", v.passed,
                            f"seed {seed}, prompt {plen}: " + (
                                f"first failure {first.phase} {first.tap}; {len(failed)} taps failed" if first else
                                f"{len(v.results)} taps within policy"),
                            {"seed": seed, "prompt_len": plen, "compared": len(v.results), "failed": len(failed)}))
    used = {g.path for g in run.goldens} | {Path(v.provenance["golden"]["path"]) for v in run.verdicts.values()
                                            if "golden" in v.provenance}
    for path in sorted(used):
        problems = verify_dir(path)
        checks.append(Check(f"integrity:{path.name}", not problems,
                            "; ".join(problems) or f"{path}: every file matches its sha256"))
    # Re-check goldens are kept up to a bound per store; the oldest beyond it are evicted (never one in use).
    result.recheck["evicted"] = remember_rechecks(run.store, recheck_paths, protect=used)
    skipped = [f"{n} {oc.name}: {oc.status} ({oc.message})" for n, oc in sorted(result.outcomes.items())
               if oc.status not in (PASS, MEASURED)]
    # Phase 1 n/a (no op backend) is listed but does not fail: such a deployment is still judged tap by
    # tap in phases 2-6 (docs/suites.md); any other phase not run fails the re-check.
    not_run = [oc for n, oc in result.outcomes.items()
               if oc.status in (ERROR, NOT_RUN) or (oc.status == NOT_APPLICABLE and n != 1)]
    checks.append(Check("nothing_skipped", not not_run,
                        "phases not run: " + "; ".join(skipped) if skipped else "every earlier phase ran",
                        {"phases": len(result.outcomes)}))
    return outcome(7, checks)


def _check_inputs(run: _Run) -> None:
    """Seed, prompt length and decode steps against the model and the machine, before anything runs."""
    from harness.store.bounds import check_machine, check_request

    o, spec = run.opts, run.spec
    check_request(spec, o.seed, o.prompt_len, o.decode_steps)
    steps = o.decode_steps
    if o.trace is None and o.phase >= 4:  # timing and phase 6 use the end-to-end golden
        check_request(spec, o.seed, o.prompt_len, E2E_STEPS)
        steps = max(steps, E2E_STEPS)
    if o.trace is None and o.phase >= 7 and (o.recheck_seed is not None or o.recheck_prompt_len is not None):
        check_request(spec, 0 if o.recheck_seed is None else o.recheck_seed, o.recheck_prompt_len, o.decode_steps)
        if o.recheck_prompt_len is not None:
            check_machine(spec, o.recheck_prompt_len, o.decode_steps, run.store.root, o.rows)
    # Room is needed for the goldens still to build: a full-scale golden already in the store (the
    # 2048-token qwen3-4b one is 16 GB) must not be refused for the disk it already occupies.
    if not all(run.has_golden(steps=s) for s in {o.decode_steps, steps}):
        check_machine(spec, o.prompt_len or spec.default_prompt_len, steps, run.store.root, o.rows)


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
        if opts.trace is not None:  # refuse another model before any golden is built; judge the trace's golden
            from dataclasses import replace

            from harness.deployment.trace import gate_settings

            opts = replace(opts, **gate_settings(opts.trace, model, opts.scale, opts.weights))
        run = _Run(model, opts)
        result.deployment = run.name if opts.trace is None else f"trace:{opts.trace}"
        _check_inputs(run)
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
            result.outcomes[n] = _guard(n, fn, run)
    perf5: PhaseOutcome | None = None
    if opts.phase >= 4:
        if live:
            _announce(run, 4)
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
        _announce(run, 4, result.outcomes[4])
    if opts.phase >= 5:
        _announce(run, 5)
        dec = _guard(5, lambda: _tap_phase(run, 5, modes))
        if perf5 is not None:
            dec.checks += perf5.checks
            dec.seconds += perf5.seconds
            if perf5.status == ERROR:
                dec.status, dec.message = ERROR, perf5.message
            elif dec.status == PASS and perf5.status == REGRESSION:
                dec.status, dec.message = REGRESSION, perf5.message
        result.outcomes[5] = dec
        _announce(run, 5, dec)
    if opts.phase >= 6:
        result.outcomes[6] = _guard(6, lambda: _phase6(run, result), run)
    if opts.phase >= 7:
        result.outcomes[7] = _guard(7, lambda: _phase7(run, result, modes), run)
    result.verdicts = {k: v.to_dict() for k, v in run.verdicts.items()}
    run.close()  # the deployment's child ends with the run (phases never raise; a daemon child dies with us)
    result.deployment_s = run.deployment_seconds
    result.elapsed_s = time.perf_counter() - t0
    return result
