"""Run the self-test population: one ``harness.check`` per (model, seed, mode, fault), every policy judged
on that same trace.

Each case runs the gate exactly as ``harness gate`` does (the calibrated default, hints included) while a
thin wrapper records the deployment's taps; the classic policies then judge those recorded taps offline
with the metrics the check already computed, so every policy sees the very same trace and the emulator
runs once per case. Cases run in worker processes (spawn context) with one torch thread each: at tiny
scale torch's own threading costs more than it gains (measured: 0.15 s per check single-threaded, 1.7 s
with two threads on 2 busy cores).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from harness.errors import HarnessError
from harness.selftest.recording import Recording

# The classic policies scored next to ours: the anchors' own gates (harness.compare.policies.PRESETS).
CLASSIC: tuple[str, ...] = ("torch-bf16", "cosine-0.99", "nmse-llamacpp", "top5-walk", "iron")
OURS = "calibrated"
POLICIES: tuple[str, ...] = (OURS, *CLASSIC)
MODES: tuple[str, ...] = ("cumulative", "isolated")
CLEAN = "clean"


EMULATOR = "emulator"


@dataclass(frozen=True)
class Case:
    """One check: ``fault`` is an emulator fault name or ``clean``; ``deployment`` is ``emulator`` or a
    validation member (harness.deployment.validation: an independent correct implementation, always
    clean, or an imprecise one the gate must fail)."""

    model: str
    seed: int
    mode: str
    fault: str = CLEAN
    deployment: str = EMULATOR
    shape: str = ""                  # a generic bug shape (harness.selftest.bug_shapes) at its reference ...
    target: str = ""                 # ... magnitude, injected into this "phase/tap" of the clean deployment

    @property
    def id(self) -> str:
        """``[member:]model/seed/mode/fault[/shape@phase/tap]``: the case's identity in rows and logs."""
        head = "" if self.deployment == EMULATOR else f"{self.deployment}:"
        tail = f"/{self.shape}@{self.target}" if self.shape else ""
        return f"{head}{self.model}/seed{self.seed}/{self.mode}/{self.fault}{tail}"

    @property
    def population(self) -> str:
        """``faults`` (the emulator and its fault catalogue), ``validation`` (the independent members) or
        ``shapes`` (generic bug shapes injected into the clean emulator)."""
        return "shapes" if self.shape else "validation" if self.deployment != EMULATOR else "faults"


# The metrics the calibrated policy's statistics are computed from (CalibratedPolicy.statistics).
CALIBRATION_KEYS = ("rel_fro", "baseline_rel_fro", "ulp_p99", "baseline_ulp_p99", "r_bias", "bias_t",
                    "baseline_bias_t", "bias_lean_ulp", "r_ulp", "ulp_rms", "baseline_ulp_rms", "r_bias_drift",
                    "drift_bias_t", "drift_baseline_bias_t", "drift_bias_lean_ulp", "drift_lean_floor_ulp",
                    "row_r", "gain_free_r", "head_r", "head_gain_free_r", "row_gain_free_r", "row_med_r", "head_med_r",
                    "ulp_bias", "baseline_ulp_bias")


@dataclass
class CaseResult:
    """What one case produced: per policy ``{"passed": bool, "first": "phase/tap" | None}``, the gate's
    hint, the fault's expected tap, and (``taps``) the calibration metrics of every tap."""

    case: Case
    expected: str | None
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    hint: str | None = None
    error: str | None = None
    seconds: float = 0.0
    # (phase, tap, kind, {CALIBRATION_KEYS: value}, passed), for calibration only
    taps: list[tuple] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["case"] = asdict(self.case)
        out.pop("taps")
        return out


def _recording_factory(case: Case, store: dict) -> Callable:
    if case.deployment == EMULATOR:
        from harness.deployment.emulator import make_factory

        inner = make_factory(faults=() if case.fault == CLEAN else (case.fault,))
        name = f"emulator[{case.fault}]"
    else:
        from harness.deployment.validation import member

        inner, name = member(case.deployment).factory, case.deployment

    if case.shape:
        from harness.selftest.bug_shapes import inject

        phase, _, tap = case.target.partition("/")
        inner = inject(inner, phase, tap, case.shape, None, case.seed)
        name = f"{name}+{case.shape}@{case.target}"

    def factory(spec, weights):
        return Recording(inner(spec, weights), store)
    factory.name = name  # type: ignore[attr-defined]
    return factory


def classic_policies() -> dict[str, Any]:
    """Preset name -> PolicySet applying that one policy to every tap kind and phase."""
    from harness.compare.policy_config import PolicySet

    return {name: PolicySet().merged({"default": name}, f"selftest preset {name}") for name in CLASSIC}


def _first(results: list, order: Callable) -> str | None:
    failing = sorted((r for r in results if not r.passed), key=order)
    return f"{failing[0].phase}/{failing[0].tap}" if failing else None


def run_case(case: Case, *, golden_dir: str | Path | None = None, decode_steps: int = 4,
             keep_taps: bool = False, policy: Any = None) -> CaseResult:
    """Run one case and judge its trace under every policy in ``POLICIES``.

    ``policy`` (default: the model's PolicySet, as the gate uses) is the calibrated row's policy;
    ``keep_taps`` stores the per-tap calibration metrics. A check that cannot run gives ``error``.
    """
    import time

    import harness
    from harness.deployment.emulator.faults import get as get_fault
    from harness.spec import model_spec
    from harness.spec.taps import parse
    from harness.store import GoldenRequest, GoldenStore
    from harness.verdict.localise import execution_key
    from harness.verdict.verdict import TapResult

    t0 = time.perf_counter()
    spec = model_spec.get(case.model, "tiny")
    expected = None
    if case.shape:
        expected = case.target
    elif case.fault != CLEAN:
        phase, tap = get_fault(case.fault).expected_tap(spec)
        expected = f"{phase}/{tap}"
    elif case.deployment != EMULATOR:
        from harness.deployment.validation import member

        tap = member(case.deployment).expected_failure
        expected = f"prefill/{tap}" if tap else None
    out = CaseResult(case, expected)
    recorded: dict[str, dict[str, np.ndarray]] = {}
    try:
        verdict = harness.check(case.model, _recording_factory(case, recorded), scale="tiny", seed=case.seed,
                                decode_steps=decode_steps, mode=case.mode, policy=policy, golden_dir=golden_dir,
                                isolation="inline")  # the recording wrapper keeps taps in this process
    except HarnessError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        out.seconds = time.perf_counter() - t0
        return out
    ff = verdict.first_failure
    out.outcomes[OURS] = {"passed": verdict.passed, "first": f"{ff.phase}/{ff.tap}" if ff else None}
    out.hint = ff.hint if ff else None

    golden = GoldenStore(golden_dir).get(GoldenRequest(case.model, "tiny", case.seed, decode_steps))
    baseline = "local" if case.mode == "isolated" else "bf16"
    order = execution_key(spec, golden.phases)
    judged: dict[str, list] = {name: [] for name in CLASSIC}
    sets = classic_policies()
    for r in verdict.results:
        kind = parse(r.tap).kind
        if keep_taps and r.metrics:
            m = r.metrics
            out.taps.append((r.phase, r.tap, kind, {k: m[k] for k in CALIBRATION_KEYS if k in m}, r.passed))
        if r.judgement is None:  # a contract problem (shape, dtype): a failure whatever the policy
            for name in CLASSIC:
                judged[name].append(r)
            continue
        dut = recorded[r.phase][r.tap]
        g, base = golden.tensor(r.phase, r.tap, "fp32"), golden.tensor(r.phase, r.tap, baseline)
        for name in CLASSIC:
            ok = sets[name].lookup(kind, r.phase).judge(dut, g, base, r.metrics, kind=kind, phase=r.phase,
                                                             mode=case.mode).passed
            judged[name].append(TapResult(r.phase, r.tap, bool(ok)))
    missing = bool(verdict.coverage.required_missing)
    for name in CLASSIC:
        first = _first(judged[name], order)
        out.outcomes[name] = {"passed": first is None and not missing, "first": first}
    out.seconds = time.perf_counter() - t0
    return out


def population(models: Iterable[str], seeds: Iterable[int], faults: Iterable[str] | None = None,
               fault_seeds: Iterable[int] = (0,), modes: Iterable[str] = MODES) -> list[Case]:
    """Clean cases for every (model, seed, mode) and fault cases for every applicable (fault, model,
    fault seed, mode). ``faults`` None: every registered fault."""
    from harness.deployment.emulator.faults import FAULTS, get as get_fault
    from harness.spec import model_spec

    models, modes = list(models), list(modes)
    names = list(FAULTS) if faults is None else list(faults)
    for name in names:
        get_fault(name)  # HarnessError naming an unknown fault now, not in a worker
    cases = [Case(m, s, mode) for m in models for s in seeds for mode in modes]
    for name in names:
        fault = FAULTS[name]
        for m in models:
            if fault.applies(model_spec.get(m, "tiny")):
                cases.extend(Case(m, s, mode, name) for s in fault_seeds for mode in modes)
    return cases


def member_population(models: Iterable[str], seeds: Iterable[int], members: Iterable[str],
                      modes: Iterable[str] = MODES) -> list[Case]:
    """Clean cases of validation members (harness.deployment.validation) for every (model, seed, mode)."""
    from harness.deployment.validation import member

    members, models, modes = list(members), list(models), list(modes)
    for name in members:
        member(name)  # KeyError naming an unknown member now, not in a worker
    return [Case(m, s, mode, CLEAN, name) for name in members for m in models for s in seeds for mode in modes]


def shape_population(models: Iterable[str], seeds: Iterable[int], shapes: Iterable[str] | None = None,
                     targets: int = 2, decode_steps: int = 4, modes: Iterable[str] = MODES) -> list[Case]:
    """Every generic bug shape (default: all) at its reference magnitude on ``targets`` taps per (shape,
    model, seed): alternately a prefill tap and a decode step's, each tap drawn by a generator seeded
    from (shape, model, seed), so the population covers every tap kind across models and seeds."""
    import zlib

    from harness.selftest import bug_shapes
    from harness.spec import model_spec, taps as tapspec

    names = list(bug_shapes.SHAPES) if shapes is None else list(shapes)
    for name in names:
        bug_shapes.get(name)  # HarnessError naming an unknown shape now
    cases = []
    for m in models:
        taps = tapspec.tap_names(model_spec.get(m, "tiny"))
        for s in seeds:
            for name in names:
                rng = np.random.default_rng([int(s), zlib.crc32(f"{name}/{m}".encode())])
                for k in range(targets):
                    phase = "prefill" if k % 2 == 0 else f"decode.{int(rng.integers(decode_steps))}"
                    target = f"{phase}/{taps[int(rng.integers(len(taps)))]}"
                    cases.extend(Case(m, s, mode, CLEAN, EMULATOR, name, target) for mode in modes)
    return cases


def _init_worker() -> None:
    from harness.threads import use_one_thread

    use_one_thread()


def _run_one(args: tuple) -> CaseResult:
    case, kwargs = args
    return run_case(case, **kwargs)


def run_cases(cases: list[Case], *, jobs: int | None = None, golden_dir: str | Path | None = None,
              decode_steps: int = 4, keep_taps: bool = False,
              progress: Callable[[int, int], None] | None = None) -> list[CaseResult]:
    """Run ``cases`` on ``jobs`` worker processes (default: every core; 1 runs in this process),
    in the order given. The golden store's lock makes concurrent builds of one golden safe."""
    jobs = jobs or os.cpu_count() or 1
    kwargs = {"golden_dir": str(golden_dir) if golden_dir else None, "decode_steps": decode_steps, "keep_taps": keep_taps}
    results: list[CaseResult] = []
    if jobs == 1:
        _init_worker()
        for i, case in enumerate(cases):
            results.append(run_case(case, **kwargs))
            if progress:
                progress(i + 1, len(cases))
        return results
    # Cases of one (model, seed) run next to each other (in chunks of 4) so a worker reuses the weights
    # and golden it just loaded; results come back in the caller's order.
    order = sorted(range(len(cases)), key=lambda i: (cases[i].model, cases[i].seed, cases[i].deployment, cases[i].fault,
                                                     cases[i].mode))
    ctx = multiprocessing.get_context("spawn")
    done: dict[int, CaseResult] = {}
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        for i, res in zip(order, pool.map(_run_one, [(cases[i], kwargs) for i in order], chunksize=4)):
            done[i] = res
            if progress:
                progress(len(done), len(cases))
    return [done[i] for i in range(len(cases))]


def quick_population(models: Iterable[str] | None = None, seeds: Iterable[int] = (0, 1),
                     members: Iterable[str] | None = None, shapes: Iterable[str] | None = None) -> list[Case]:
    """The CI subset: every fault once, on applicable models taken in turn (so every model carries
    faults), and the clean emulator on ``seeds`` (default 0, 1) of every model, both modes; every
    validation member (default: all, the imprecise one included) and every bug shape (default: all,
    one tap each) once, on the models taken in turn, seed 0."""
    from harness.deployment.emulator.faults import FAULTS
    from harness.deployment.validation import IMPRECISE, MEMBERS
    from harness.selftest.bug_shapes import SHAPES
    from harness.spec import model_spec

    models = list(models) if models is not None else model_spec.names()
    cases = [Case(m, s, mode) for m in models for s in seeds for mode in MODES]
    turn = 0
    for name, fault in FAULTS.items():
        fits = [m for m in models if fault.applies(model_spec.get(m, "tiny"))]
        if fits:
            model = fits[turn % len(fits)]
            turn += 1
            cases.extend(Case(model, 0, mode, name) for mode in MODES)
    names = list(MEMBERS) + list(IMPRECISE) if members is None else list(members)
    for i, name in enumerate(names):
        cases.extend(member_population([models[i % len(models)]], [0], [name]))
    for i, name in enumerate(list(SHAPES) if shapes is None else list(shapes)):
        cases.extend(shape_population([models[i % len(models)]], [0], [name], targets=1 + i % 2)[-2:])
    return cases


def save_results(results: list[CaseResult], path: str | Path) -> None:
    """Append ``results`` (per-tap calibration metrics included) to a JSON-lines file, one case a line,
    so that calibration and re-judging reuse runs instead of recomputing them."""
    import json
    import math

    def clean(x: Any) -> Any:
        return str(x) if isinstance(x, float) and not math.isfinite(x) else x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for r in results:
            line = r.to_dict()
            line["taps"] = [[ph, tap, kind, {k: clean(v) for k, v in m.items()}, passed]
                            for ph, tap, kind, m, passed in r.taps]
            fh.write(json.dumps(line) + "\n")


def load_results(path: str | Path) -> list[CaseResult]:
    """The CaseResults of ``save_results`` files (later lines of the same case replace earlier ones)."""
    import json

    def num(x: Any) -> Any:
        return float(x) if x in ("nan", "inf", "-inf") else x

    out: dict[str, CaseResult] = {}
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        case = Case(**d["case"])
        taps = [(ph, tap, kind, {k: num(v) for k, v in m.items()}, passed) for ph, tap, kind, m, passed in d["taps"]]
        out[case.id] = CaseResult(case, d["expected"], d["outcomes"], d["hint"], d["error"], d["seconds"], taps)
    return list(out.values())

