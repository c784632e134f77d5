"""The self-test scoreboard: three populations, each scored under our policy and the classic ones.

- **faults**: the emulator's fault catalogue and the clean emulator: detection, exact localisation
  and false alarms per policy, per fault (below);
- **validation**: independent correct deployments (harness.deployment.validation), each run a false
  alarm when it fails, reported per member with its split (``calibration``: its runs set the
  thresholds; ``heldout``: never seen by the calibration); an imprecise member must fail, at its
  expected tap;
- **shapes**: generic bug shapes (harness.selftest.bug_shapes) at their reference magnitude injected
  into one tap of the clean emulator: detection, exact localisation at the perturbed tap, and the
  hint the verdict gave (a column fed by whatever hint it has; scoring it is the hints' job).

Modes are combined as ``harness gate`` combines them (it runs both): a run *fails* when either mode's
check fails. Localisation is taken from the isolated run when it failed (teacher forcing pins each
tap's error on its own op), else from the cumulative run; it is *exact* when that first failure is the
fault's ``expected_tap``. The hint likewise comes from the run whose first failure is reported, and is
*right* when it names the fault's hint id. Rates:

- detection: fault runs (model, fault, seed) that fail;
- exact localisation: fault runs whose reported first failure is the fault's expected tap;
- false alarms: clean runs (model, seed) that fail.

Targets (``TARGETS``) apply to our policy: 100% detection, >= 95% exact localisation, no false alarm,
and strictly better than every classic policy: no worse on any rate and better on at least one.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.selftest.runner import CLASSIC, CLEAN, OURS, POLICIES, CaseResult

TARGETS = {"detection": 1.0, "localisation": 0.95, "false_alarms": 0.0}
SHAPE_TARGET = 0.995             # issue 11: every bug shape at 1% (or gross) detected on >= 99.5% of taps
POLICY_TEXT = {
    OURS: "calibrated R / tail / bias (default)",
    "torch-bf16": "allclose rtol 1.6e-2 atol 1e-5",
    "cosine-0.99": "cosine >= 0.99 per tap",
    "nmse-llamacpp": "NMSE <= 5e-4",
    "top5-walk": "top-5 walk (logits only)",
    "iron": "allclose rtol 0.04 atol 0.15",
}


def _combined(by_mode: dict[str, CaseResult], policy: str) -> tuple[bool, str | None]:
    """(failed, reported first failure) of one run over its modes."""
    iso, cum = by_mode.get("isolated"), by_mode.get("cumulative")
    for r in (iso, cum):
        if r is not None and not r.error and not r.outcomes[policy]["passed"]:
            return True, r.outcomes[policy]["first"]
    return False, None


def _hint(by_mode: dict[str, CaseResult]) -> str | None:
    for mode in ("isolated", "cumulative"):
        r = by_mode.get(mode)
        if r is not None and not r.error and not r.outcomes[OURS]["passed"]:
            return r.hint
    return None


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


@dataclass
class Row:
    """One policy's totals."""

    policy: str
    fault_runs: int = 0
    detected: int = 0
    localised: int = 0
    clean_runs: int = 0
    false_alarms: int = 0
    per_mode: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def detection(self) -> float:
        return _rate(self.detected, self.fault_runs)

    @property
    def localisation(self) -> float:
        return _rate(self.localised, self.fault_runs)

    @property
    def false_alarm_rate(self) -> float:
        return _rate(self.false_alarms, self.clean_runs)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "text": POLICY_TEXT.get(self.policy, self.policy),
                "fault_runs": self.fault_runs, "detected": self.detected, "localised": self.localised,
                "clean_runs": self.clean_runs, "false_alarms": self.false_alarms,
                "detection": self.detection, "localisation": self.localisation,
                "false_alarm_rate": self.false_alarm_rate, "per_mode": self.per_mode}


@dataclass
class Scoreboard:
    """Rows per policy, per-fault rows, the targets' outcome and the cases that could not run."""

    rows: dict[str, Row]
    faults: list[dict[str, Any]]
    misses: list[str]                      # our policy's undetected, mislocalised or false-alarm runs
    errors: list[str]
    counts: dict[str, int]
    seconds: float = 0.0
    # member -> {"member", "split", "expected", "runs", "policies": {policy: [failed, at expected]}, "first": [..]}
    validation: list[dict[str, Any]] = field(default_factory=list)
    # shape -> {"shape", "runs", "by_phase": {prefill|decode: [runs, detected, localised]},
    #           "policies": {policy: [detected, localised]}, "hints": {hint: count}}
    shapes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(cls, results: list[CaseResult], seconds: float = 0.0) -> Scoreboard:
        board = cls._build_faults([r for r in results if r.case.population == "faults"], seconds)
        board.validation, v_misses = _validation([r for r in results if r.case.population == "validation"])
        board.shapes, s_misses = _shapes([r for r in results if r.case.population == "shapes"])
        board.misses += v_misses + s_misses
        board.errors = [f"{r.case.id}: {r.error}" for r in results if r.error]
        board.counts["checks"] = len(results)
        board.counts["validation_runs"] = sum(v["runs"] for v in board.validation)
        board.counts["shape_runs"] = sum(v["runs"] for v in board.shapes)
        return board

    @classmethod
    def _build_faults(cls, results: list[CaseResult], seconds: float) -> Scoreboard:
        runs: dict[tuple[str, int, str], dict[str, CaseResult]] = defaultdict(dict)
        for r in results:
            runs[(r.case.model, r.case.seed, r.case.fault)][r.case.mode] = r
        rows = {p: Row(p) for p in POLICIES}
        per_fault: dict[str, dict[str, Any]] = {}
        misses: list[str] = []
        for (model, seed, fault), by_mode in runs.items():
            expected = next(iter(by_mode.values())).expected
            run_id = f"{model}/seed{seed}/{fault}"
            for p in POLICIES:
                row = rows[p]
                failed, first = _combined(by_mode, p)
                for mode, r in by_mode.items():
                    if r.error:
                        continue
                    pm = row.per_mode.setdefault(mode, {"fault_runs": 0, "detected": 0, "localised": 0,
                                                        "clean_runs": 0, "false_alarms": 0})
                    out = r.outcomes[p]
                    if fault == CLEAN:
                        pm["clean_runs"] += 1
                        pm["false_alarms"] += not out["passed"]
                    else:
                        pm["fault_runs"] += 1
                        pm["detected"] += not out["passed"]
                        pm["localised"] += out["first"] == expected
                if fault == CLEAN:
                    row.clean_runs += 1
                    row.false_alarms += failed
                    if p == OURS and failed:
                        misses.append(f"false alarm {run_id}: {first}")
                    continue
                row.fault_runs += 1
                row.detected += failed
                row.localised += failed and first == expected
                f = per_fault.setdefault(fault, {"fault": fault, "expected": [], "models": 0, "hint_right": 0,
                                                 "policies": {q: [0, 0] for q in POLICIES}})
                if expected not in f["expected"]:
                    f["expected"].append(expected)
                f["policies"][p][0] += failed
                f["policies"][p][1] += failed and first == expected
                if p == OURS:
                    f["models"] += 1
                    hint = _hint(by_mode)
                    f["hint_right"] += _hint_right(fault, hint)
                    if not failed or first != expected:
                        misses.append(f"{'missed' if not failed else 'mislocalised'} {run_id}: first failure "
                                      f"{first}, expected {expected}")
        errors = [f"{r.case.id}: {r.error}" for r in results if r.error]
        counts = {"checks": len(results), "fault_runs": rows[OURS].fault_runs, "clean_runs": rows[OURS].clean_runs,
                  "models": len({k[0] for k in runs}), "faults": len(per_fault),
                  "clean_seeds": len({k[1] for k in runs if k[2] == CLEAN})}
        return cls(rows, sorted(per_fault.values(), key=lambda f: f["fault"]), misses, errors, counts, seconds)

    # -- targets -----------------------------------------------------------------------------------
    def failures(self) -> list[str]:
        """Why our policy misses its targets (empty when it meets them all)."""
        ours, out = self.rows[OURS], []
        if ours.fault_runs == 0 or ours.clean_runs == 0:
            out.append("the population needs both fault runs and clean runs")
        for v in self.validation:
            failed, at = v["policies"][OURS]
            if v["expected"] is None and failed:
                out.append(f"validation member {v['member']} ({v['split']}): {failed} false alarm(s) in {v['runs']} runs")
            elif v["expected"] is not None and at < v["runs"]:
                out.append(f"imprecise member {v['member']}: failed at {v['expected']} in {at} of {v['runs']} runs")
        for sh in self.shapes:
            for phase_kind, (n, det, _loc) in sh["by_phase"].items():
                if n and det / n < SHAPE_TARGET:
                    out.append(f"shape {sh['shape']} ({phase_kind}): detected in {det}/{n} runs "
                               f"(< {SHAPE_TARGET:.1%})")
        if ours.detection < TARGETS["detection"]:
            out.append(f"detection {ours.detection:.1%} < {TARGETS['detection']:.0%}")
        if ours.localisation < TARGETS["localisation"]:
            out.append(f"exact localisation {ours.localisation:.1%} < {TARGETS['localisation']:.0%}")
        if ours.false_alarms:
            out.append(f"{ours.false_alarms} false alarm(s) in {ours.clean_runs} clean runs")
        for name in CLASSIC:
            if not dominates(ours, self.rows[name]):
                out.append(f"not strictly better than {name}")
        if self.errors:
            out.append(f"{len(self.errors)} case(s) could not run")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    # -- output ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": 1, "passed": self.passed, "targets": TARGETS, "target_failures": self.failures(),
                "combination": "a run fails when either mode fails (as harness gate); localisation and hint "
                               "from the isolated run when it failed, else the cumulative run",
                "counts": self.counts, "seconds": round(self.seconds, 1),
                "policies": [self.rows[p].to_dict() for p in POLICIES], "faults": self.faults,
                "validation": self.validation, "shapes": self.shapes, "shape_target": SHAPE_TARGET,
                "misses": self.misses, "errors": self.errors}

    def to_markdown(self) -> str:
        c = self.counts
        lines = [f"# Gate self-test: {'PASS' if self.passed else 'FAIL'}", "",
                 f"{c['checks']} checks: {c['fault_runs']} fault runs ({c['faults']} faults on {c['models']} models) "
                 f"and {c['clean_runs']} clean runs ({c['clean_seeds']} seeds), each in both modes; "
                 f"{self.seconds:.0f} s.", "",
                 "| policy | rule | detection | exact localisation | false alarms |",
                 "|---|---|---|---|---|"]
        for p in POLICIES:
            r = self.rows[p]
            lines.append(f"| {p} | {POLICY_TEXT.get(p, p)} | {r.detected}/{r.fault_runs} ({r.detection:.1%}) | "
                         f"{r.localised}/{r.fault_runs} ({r.localisation:.1%}) | "
                         f"{r.false_alarms}/{r.clean_runs} ({r.false_alarm_rate:.1%}) |")
        lines += ["", "Per mode (each mode alone; detected / exactly localised / false alarms):", "",
                  "| policy | cumulative | isolated |", "|---|---|---|"]
        for p in POLICIES:
            cells = []
            for mode in ("cumulative", "isolated"):
                m = self.rows[p].per_mode.get(mode)
                cells.append(f"{m['detected']} / {m['localised']} of {m['fault_runs']}; {m['false_alarms']} of "
                             f"{m['clean_runs']}" if m else "-")
            lines.append(f"| {p} | {cells[0]} | {cells[1]} |")
        lines += ["", "Per fault (detected / exactly localised runs; hint: right hint id):", "",
                  "| fault | models | hint | " + " | ".join(POLICIES) + " |",
                  "|---|---|---|" + "---|" * len(POLICIES)]
        for f in self.faults:
            cells = " | ".join(f"{d}/{l}" for d, l in (f["policies"][p] for p in POLICIES))
            lines.append(f"| {f['fault']} | {f['models']} | {f['hint_right']}/{f['models']} | {cells} |")
        lines += self._validation_markdown() + self._shapes_markdown()
        for title, items in (("Target failures", self.failures()), ("Our policy's misses", self.misses),
                             ("Cases that could not run", self.errors)):
            if items:
                lines += ["", f"{title}:", ""] + [f"- {x}" for x in items]
        return "\n".join(lines) + "\n"

    def _validation_markdown(self) -> list[str]:
        if not self.validation:
            return []
        lines = ["", "Validation deployments (independent implementations; a failing run of a correct member is a "
                 "false alarm, the imprecise one must fail at its expected tap; failed runs / at expected tap):", "",
                 "| member | split | runs | " + " | ".join(POLICIES) + " |", "|---|---|---|" + "---|" * len(POLICIES)]
        for v in self.validation:
            cells = " | ".join(f"{f}" if v["expected"] is None else f"{f} / {a}" for f, a in
                               (v["policies"][p] for p in POLICIES))
            lines.append(f"| {v['member']} | {v['split']} | {v['runs']} | {cells} |")
        return lines

    def _shapes_markdown(self) -> list[str]:
        if not self.shapes:
            return []
        lines = ["", "Generic bug shapes at their reference magnitude, one tap each (detected / exactly localised "
                 "runs; ours split by phase; hint: the verdict's hints, `-` none):", "",
                 "| shape | runs | ours prefill | ours decode | " + " | ".join(CLASSIC) + " | hints |",
                 "|---|---|---|---|" + "---|" * len(CLASSIC) + "---|"]
        for sh in self.shapes:
            phases = [f"{d}/{l} of {n}" for n, d, l in (sh["by_phase"].get(k, [0, 0, 0]) for k in ("prefill", "decode"))]
            cells = " | ".join(f"{d}/{l}" for d, l in (sh["policies"][p] for p in CLASSIC))
            hints = ", ".join(f"{h} x{c}" for h, c in sorted(sh["hints"].items(), key=lambda kv: -kv[1])[:3])
            lines.append(f"| {sh['shape']} | {sh['runs']} | {phases[0]} | {phases[1]} | {cells} | {hints} |")
        return lines

    def rich_table(self):
        """The policy table as a rich Table."""
        from rich.table import Table

        t = Table(title=f"gate self-test: {'PASS' if self.passed else 'FAIL'}")
        for col in ("policy", "rule", "detection", "exact localisation", "false alarms"):
            t.add_column(col)
        for p in POLICIES:
            r = self.rows[p]
            t.add_row(p, POLICY_TEXT.get(p, p), f"{r.detection:.1%} ({r.detected}/{r.fault_runs})",
                      f"{r.localisation:.1%} ({r.localised}/{r.fault_runs})",
                      f"{r.false_alarm_rate:.1%} ({r.false_alarms}/{r.clean_runs})", style="bold" if p == OURS else None)
        return t

    def write(self, json_path: str | Path, md_path: str | Path) -> None:
        """Write the JSON and Markdown reports (parent folders created)."""
        for path, text in ((Path(json_path), json.dumps(self.to_dict(), indent=1)), (Path(md_path), self.to_markdown())):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)


def _runs(results: list[CaseResult]) -> dict[str, dict[str, CaseResult]]:
    """Results grouped into runs (a case id without its mode) -> {mode: result}."""
    runs: dict[str, dict[str, CaseResult]] = defaultdict(dict)
    for r in results:
        runs[r.case.id.replace(f"/{r.case.mode}/", "/", 1)][r.case.mode] = r
    return runs


def _validation(results: list[CaseResult]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per member: runs, and per policy [failed runs, runs failing first at the expected tap]."""
    from harness.deployment.validation import member

    out: dict[str, dict[str, Any]] = {}
    misses = []
    for run_id, by_mode in _runs(results).items():
        case = next(iter(by_mode.values())).case
        m = member(case.deployment)
        expected = next(iter(by_mode.values())).expected
        v = out.setdefault(m.name, {"member": m.name, "split": m.split, "expected": expected, "runs": 0,
                                    "policies": {p: [0, 0] for p in POLICIES}, "first": []})
        v["runs"] += 1
        for p in POLICIES:
            failed, first = _combined(by_mode, p)
            v["policies"][p][0] += failed
            at_tap = expected is not None and first is not None and first.split("/", 1)[1] == expected.split("/", 1)[1]
            v["policies"][p][1] += failed and at_tap                # the imprecise member: at its tap, any phase
            if p == OURS and failed and expected is None:
                v["first"].append(f"{run_id}: {first}")
                misses.append(f"false alarm {run_id}: {first}")
            elif p == OURS and expected is not None and not (failed and at_tap):
                misses.append(f"imprecise {run_id}: first failure {first}, expected {expected}")
    order = {"calibration": 0, "heldout": 1}
    return sorted(out.values(), key=lambda v: (order.get(v["split"], 2), v["member"])), misses


def _shapes(results: list[CaseResult]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per shape: runs, ours by phase kind [runs, detected, localised], every policy's [detected,
    localised], and the hints our verdicts gave."""
    out: dict[str, dict[str, Any]] = {}
    misses = []
    for run_id, by_mode in _runs(results).items():
        case = next(iter(by_mode.values())).case
        expected = case.target
        sh = out.setdefault(case.shape, {"shape": case.shape, "runs": 0, "by_phase": {},
                                         "policies": {p: [0, 0] for p in POLICIES}, "hints": {}})
        sh["runs"] += 1
        for p in POLICIES:
            failed, first = _combined(by_mode, p)
            sh["policies"][p][0] += failed
            sh["policies"][p][1] += failed and first == expected
            if p == OURS:
                pk = "prefill" if expected.startswith("prefill") else "decode"
                cell = sh["by_phase"].setdefault(pk, [0, 0, 0])
                cell[0] += 1
                cell[1] += failed
                cell[2] += failed and first == expected
                if failed:
                    hint = (_hint(by_mode) or "-").split(":", 1)[0]
                    sh["hints"][hint] = sh["hints"].get(hint, 0) + 1
                if not failed or first != expected:
                    misses.append(f"shape {'missed' if not failed else 'mislocalised'} {run_id}: first failure {first}")
    return sorted(out.values(), key=lambda v: v["shape"]), misses


def dominates(a: Row, b: Row) -> bool:
    """``a`` no worse than ``b`` on detection, localisation and false alarms, and better on one."""
    no_worse = a.detection >= b.detection and a.localisation >= b.localisation and a.false_alarm_rate <= b.false_alarm_rate
    better = a.detection > b.detection or a.localisation > b.localisation or a.false_alarm_rate < b.false_alarm_rate
    return no_worse and better


def _hint_right(fault: str, hint: str | None) -> bool:
    from harness.deployment.emulator.faults import get

    return bool(hint) and hint.startswith(get(fault).hint + ":")
