"""Hint precision: how often a named cause is wrong, over failing cases of any population.

A case is one failing check (or one failing perturbed tap) with the cause that is right for it:
``expected`` is a hint id of harness.verdict.hints.CATALOGUE (an emulator fault's ``hint``, the precision
cause of a less precise deployment, ``round_toward_zero`` for truncation) or None when no signature
describes the failure (random noise, sparse corruption, a corrupted row / head / channel, an offset, a
sign flip, a false alarm of a correct deployment). The hint given is then

- *right*: it names the expected id;
- *wrong*: it names another id, or any id where None was expected - the error this module bounds
  (target: at most ``TARGET_WRONG`` of failures);
- *no signature*: "no known signature" (a *miss* when an id was expected, never wrong).

``score_hints(cases)`` totals them, per population too; ``cases_from_selftest`` turns the self-test's
CaseResults into cases; ``perturbed_tap_cases`` perturbs a recorded clean run's taps one at a time and
judges each as the gate does in isolated mode, with the generic bug shapes of
harness.selftest.bug_shapes (used by benchmarks/hint_precision.py).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from harness.selftest.recording import Recording

TARGET_WRONG = 0.01   # a wrong named cause on at most 1% of failures


@dataclass(frozen=True)
class HintCase:
    """One failure and its hint. ``hint`` None: the case did not fail (it is not counted)."""

    name: str
    population: str
    expected: str | None
    hint: str | None


def hint_id(hint: str | None) -> str | None:
    """The catalogue id a hint names (``"<id>: ..."``), or None for "no known signature" and the like."""
    from harness.verdict.hints import CATALOGUE

    if not hint:
        return None
    head = hint.split(":", 1)[0].strip()
    return head if head in CATALOGUE else None


@dataclass
class HintScore:
    """Totals over failing cases: named = right + wrong; failures = named + no_signature."""

    failures: int = 0
    right: int = 0
    wrong: int = 0
    no_signature: int = 0
    missed: int = 0          # no signature where an id was expected (counted in no_signature too)
    wrong_cases: list[str] = field(default_factory=list)
    populations: dict[str, "HintScore"] = field(default_factory=dict)

    @property
    def named(self) -> int:
        return self.right + self.wrong

    @property
    def wrong_rate(self) -> float:
        """Wrong named causes per failure: the figure held to ``TARGET_WRONG``."""
        return self.wrong / self.failures if self.failures else 0.0

    @property
    def precision(self) -> float:
        """Right among named hints (1.0 when none was named)."""
        return self.right / self.named if self.named else 1.0

    @property
    def ok(self) -> bool:
        return self.wrong_rate <= TARGET_WRONG

    def add(self, case: HintCase) -> None:
        if case.hint is None:
            return
        self.failures += 1
        named = hint_id(case.hint)
        if named is None:
            self.no_signature += 1
            self.missed += case.expected is not None
        elif named == case.expected:
            self.right += 1
        else:
            self.wrong += 1
            self.wrong_cases.append(f"{case.name}: expected {case.expected or 'no known signature'}, "
                                    f"got {case.hint}")

    def row(self) -> str:
        """One line: failures, named, right, wrong (rate), no signature."""
        return (f"{self.failures} failures: {self.named} hints named, {self.right} right, {self.wrong} wrong "
                f"({100 * self.wrong_rate:.2f}% of failures; target <= {100 * TARGET_WRONG:g}%), "
                f"{self.no_signature} no known signature ({self.missed} where a cause was expected)")

    def to_dict(self) -> dict[str, Any]:
        return {"failures": self.failures, "named": self.named, "right": self.right, "wrong": self.wrong,
                "wrong_rate": self.wrong_rate, "precision": self.precision, "no_signature": self.no_signature,
                "missed": self.missed, "ok": self.ok, "wrong_cases": list(self.wrong_cases),
                "populations": {k: v.to_dict() for k, v in self.populations.items()}}


def score_hints(cases: Iterable[HintCase]) -> HintScore:
    """Totals over ``cases`` (passing cases ignored), with one sub-score per population."""
    total = HintScore()
    for case in cases:
        total.add(case)
        total.populations.setdefault(case.population, HintScore()).add(case)
    return total


# Less precise validation members and the precision cause their hint must name.
EXPECTED_MEMBER_HINT = {"numpy-bf16-rmsnorm-stats": "bf16_rmsnorm_stats"}


def expected_hint(fault: str | None = None, shape: str | None = None, deployment: str | None = None) -> str | None:
    """The right hint id for a failing case: a bug shape's (only ``rtz`` has one), a less precise
    member's precision cause, an emulator fault's ``hint``; None (no known signature) otherwise."""
    from harness.deployment.emulator.faults import FAULTS

    if shape:
        return expected_for_shape(shape)
    if deployment in EXPECTED_MEMBER_HINT:
        return EXPECTED_MEMBER_HINT[deployment]
    return FAULTS[fault].hint if fault in FAULTS else None


def cases_from_selftest(results: Iterable[Any], population: str | None = None) -> list[HintCase]:
    """HintCases from self-test CaseResults (harness.selftest.runner): one per run (deployment, model,
    seed, fault, shape and its target: every mode of one run), the hint taken as the scoreboard takes it
    (the isolated run's when it failed, else the cumulative run's); ``expected_hint`` says what is right.
    ``population`` default: the case's own (``Case.population``, else "faults")."""
    from harness.selftest.runner import OURS

    runs: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in results:
        c = r.case
        key = (getattr(c, "deployment", None), c.model, c.seed, c.fault, getattr(c, "shape", ""), getattr(c, "target", ""))
        runs[key][c.mode] = r
    cases = []
    for (deployment, model, seed, fault, shape, target), by_mode in runs.items():
        hint = None
        for mode in ("isolated", "cumulative"):
            r = by_mode.get(mode)
            if r is not None and not r.error and not r.outcomes[OURS]["passed"]:
                hint = r.hint or "no known signature"
                break
        case = next(iter(by_mode.values())).case
        name = "/".join(str(p) for p in (deployment, model, f"seed{seed}", fault, shape and f"{shape}@{target}") if p)
        cases.append(HintCase(name, population or getattr(case, "population", "faults"),
                              expected_hint(fault, shape, deployment), hint))
    return cases


def record_isolated(model: str, factory: Any, *, seed: int = 0, decode_steps: int = 2,
                    golden_dir: Any = None) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
    """Run ``factory`` on ``model`` (tiny) in isolated mode; (verdict, {phase: {tap: value}})."""
    import harness
    from harness.deployment.loader import load_factory

    build = load_factory(factory)
    holder: dict[str, Recording] = {}

    def recording(spec, weights):
        holder["dep"] = Recording(build(spec, weights))
        return holder["dep"]
    recording.name = getattr(build, "name", getattr(build, "__name__", "deployment"))  # type: ignore[attr-defined]
    verdict = harness.check(model, recording, scale="tiny", seed=seed, decode_steps=decode_steps, mode="isolated",
                            golden_dir=golden_dir)
    return verdict, holder["dep"].taps


def expected_for_shape(shape: str) -> str | None:
    """The right hint for a generic bug shape: only truncation has a signature."""
    return "round_toward_zero" if shape == "rtz" else None


def perturbed_tap_cases(model: str, taps: dict[str, dict[str, np.ndarray]], *, population: str, deployment: str,
                        shapes: Iterable[str] | None = None, magnitude: Callable[[str], float] | None = None,
                        seed: int = 0, decode_steps: int = 2, golden_dir: Any = None,
                        select: Callable[[str, str], bool] = lambda phase, tap: True) -> list[HintCase]:
    """Perturb each recorded tap (``select``-ed) by each generic bug shape (harness.selftest.bug_shapes;
    ``shapes`` default: all, at ``magnitude(shape)`` default: the shape's reference magnitude), judge it
    as the gate's isolated mode does (teacher forcing: only that tap changes) and, when it fails, take
    the cause hint there. The right hint is ``expected_for_shape``."""
    from harness.checker import judge_tap, policies_for
    from harness.selftest import bug_shapes
    from harness.spec.taps import parse
    from harness.store import GoldenRequest, GoldenStore
    from harness.verdict.hints import diagnose
    from harness.verdict.verdict import FirstFailure
    from harness.weights import load_weights

    store = GoldenStore(golden_dir)
    golden = store.ensure_local(store.get(GoldenRequest(model, "tiny", seed, decode_steps)))
    spec = golden.spec
    policies, weights = policies_for(spec), load_weights(spec, seed=seed)
    names = list(bug_shapes.SHAPES) if shapes is None else list(shapes)
    cases = []
    previous: dict[str, np.ndarray] = {}
    for phase in golden.phases:
        for tap, value in taps.get(phase, {}).items():
            before, previous[tap] = previous.get(tap), value
            if tap == "embed" or not select(phase, tap):
                continue
            gold, base = golden.tensor(phase, tap, "fp32"), golden.tensor(phase, tap, "local")
            ctx = bug_shapes.ShapeContext(spec, phase, tap, before)
            for name in names:
                m = bug_shapes.get(name).reference if magnitude is None else magnitude(name)
                dut = bug_shapes.perturb(value, ctx, name, m, seed)
                result = judge_tap(policies, phase, tap, parse(tap).kind, dut, gold, base, "isolated", spec.head_dim)
                hint = None
                if not result.passed:
                    first = FirstFailure(phase=phase, tap=tap, metrics=result.metrics)
                    hint = diagnose(spec, golden, first, mode="isolated", weights=weights, dut=dut)
                cases.append(HintCase(f"{deployment}/{model}/{phase}/{tap}/{name}({m:g})", population,
                                      expected_for_shape(name), hint))
    return cases
