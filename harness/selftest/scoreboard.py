"""The self-test scoreboard: detection, exact localisation and false alarms per policy, per fault.

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

    @classmethod
    def build(cls, results: list[CaseResult], seconds: float = 0.0) -> Scoreboard:
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
        for title, items in (("Target failures", self.failures()), ("Our policy's misses", self.misses),
                             ("Cases that could not run", self.errors)):
            if items:
                lines += ["", f"{title}:", ""] + [f"- {x}" for x in items]
        return "\n".join(lines) + "\n"

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


def dominates(a: Row, b: Row) -> bool:
    """``a`` no worse than ``b`` on detection, localisation and false alarms, and better on one."""
    no_worse = a.detection >= b.detection and a.localisation >= b.localisation and a.false_alarm_rate <= b.false_alarm_rate
    better = a.detection > b.detection or a.localisation > b.localisation or a.false_alarm_rate < b.false_alarm_rate
    return no_worse and better


def _hint_right(fault: str, hint: str | None) -> bool:
    from harness.deployment.emulator.faults import get

    return bool(hint) and hint.startswith(get(fault).hint + ":")
