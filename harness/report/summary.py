"""The console summary: at most 20 plain lines an agent (or a person) can act on.

``render_summary`` returns the text; ``print_summary`` prints the very same lines through rich with
colour. Long lists (failing taps, worst elements, unexposed taps) are cut with "+N more" so the line
count does not grow with the model: a verdict with thousands of failures still fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from rich.console import Console
from rich.text import Text

from harness.errors import HarnessError
from harness.report import reading
from harness.report.reading import fmt, one_line

MAX_LINES = 20
# Metrics where higher is better; every other metric (R, errors, ULPs) is better when lower.
_HIGHER_IS_BETTER = {"cosine", "snr_db", "top1_agreement", "topk_agreement"}
_METRIC_ORDER = ("r", "r_tail", "r_bias", "cosine", "rel_fro", "max_abs", "ulp_p99")
_STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "PERF REGRESSION": "bold yellow",
                 "NOTHING COMPARED": "bold magenta", "COULD NOT RUN": "bold magenta"}
_LOCALISATION = {"spike": "spike: the error returns to baseline downstream (a local fault in this op)",
                 "step": "step: the error stays high downstream (this op's error propagates)"}


@dataclass(frozen=True)
class Line:
    """A summary line; lower ``priority`` survives trimming longer (0 is never dropped)."""

    text: str
    priority: int = 0
    style: str = ""


def _listing(items: Iterable[Any], keep: int = 3) -> str:
    items = [str(i) for i in items]
    if not items:
        return "none"
    head = ", ".join(items[:keep])
    return head if len(items) <= keep else f"{head}, +{len(items) - keep} more"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _threshold_metric(key: str, metrics: dict[str, Any]) -> tuple[str | None, bool]:
    """Map a threshold key (``r``, ``r_max``, ``cosine_min``, ``min_cosine``) to (metric, higher_is_better)."""
    for name, higher in ((key, None), (key.removesuffix("_max"), False), (key.removeprefix("max_"), False),
                         (key.removesuffix("_min"), True), (key.removeprefix("min_"), True)):
        if name in metrics:
            return name, name in _HIGHER_IS_BETTER if higher is None else higher
    return None, False


def against_thresholds(metrics: dict[str, Any], thresholds: dict[str, Any]) -> str:
    """``r 4.21 > max 2; cosine 0.998 >= min 0.99`` with the failing comparisons first."""
    failing, holding, other = [], [], []
    for key, thr in thresholds.items():
        name, higher = _threshold_metric(key, metrics)
        val, thr = reading.num(metrics.get(name)) if name else None, reading.num(thr)
        if name is None or isinstance(thr, bool) or not isinstance(thr, (int, float)) \
                or isinstance(val, bool) or not isinstance(val, (int, float)):
            other.append(f"{key}={fmt(thr)}")
            continue
        if math.isnan(val):
            failing.append(f"{name} nan (limit {fmt(thr)})")
        elif higher:
            (holding if val >= thr else failing).append(
                f"{name} {fmt(val)} {'>=' if val >= thr else '<'} min {fmt(thr)}")
        else:
            (holding if val <= thr else failing).append(
                f"{name} {fmt(val)} {'<=' if val <= thr else '>'} max {fmt(thr)}")
    return "; ".join(failing + holding + other)


def _metrics_line(metrics: dict[str, Any]) -> str:
    keys = [k for k in _METRIC_ORDER if k in metrics]
    return " ".join(f"{k}={reading.fmt_cos(metrics[k]) if k == 'cosine' else fmt(metrics[k])}" for k in keys)


def _element(e: Any) -> str:
    """``[token, head, dim, dut, golden]`` -> ``t63 h2 d17 0.512 vs 0.498`` (``f17`` where there is no head)."""
    if not isinstance(e, (list, tuple)) or len(e) != 5:
        return one_line(e, 60)
    tok, head, dim, dut, gold = e
    where = f"t{tok} h{head} d{dim}" if head is not None else f"t{tok} f{dim}"
    return f"{where} {fmt(dut)} vs {fmt(gold)}"


def _first_failure_lines(ff: dict[str, Any], indent: str = "  ") -> list[Line]:
    lines = []
    loc = ff.get("localisation") or {}
    kind = loc.get("kind")
    head = f"first failure: {ff['phase']} {ff['tap']}"
    lines.append(Line(head + (f" ({kind})" if kind else ""), 0, "bold"))
    metrics = ff.get("metrics") or {}
    judgement = ff.get("judgement") or {}
    if judgement.get("thresholds"):
        policy = judgement.get("policy")
        # The policy's own values (after its denominator floors) take precedence over the raw metrics.
        text = against_thresholds({**metrics, **(judgement.get("measured") or {})}, judgement["thresholds"])
        lines.append(Line(f"{indent}judged{f' by {policy}' if policy else ''}: {one_line(text, 240)}", 1, "red"))
    if metrics:
        lines.append(Line(f"{indent}metrics: {_metrics_line(metrics)}", 3))
    if judgement.get("reasons"):
        lines.append(Line(f"{indent}why: {one_line('; '.join(map(str, judgement['reasons'])), 240)}", 4))
    elif ff.get("message"):  # not a numeric judgement (a wrong shape or dtype, a missing required tap): the reason
        lines.append(Line(f"{indent}why: {one_line(ff['message'], 240)}", 1, "red"))
    if ff.get("hint"):
        lines.append(Line(f"{indent}hint: {one_line(ff['hint'], 240)}", 1, "cyan"))
    if kind in _LOCALISATION:
        lines.append(Line(f"{indent}{_LOCALISATION[kind]}", 2))
    if loc.get("worst_tokens"):
        lines.append(Line(f"{indent}worst tokens: {_listing(loc['worst_tokens'], 8)}", 3))
    if loc.get("worst_elements"):
        items = [_element(e) for e in loc["worst_elements"]]
        lines.append(Line(f"{indent}worst elements (token head dim: dut vs golden): {_listing(items, 3)}", 3))
    return lines


def _perf_lines(comparisons: list[dict[str, Any]]) -> list[Line]:
    if not comparisons:
        return []
    regressions = [c for c in comparisons if c.get("verdict") == "regression"]
    shown = regressions or comparisons
    parts = []
    for c in shown[:3]:
        ratio = c.get("ratio")
        ratio_s = f"{fmt(ratio)}x" if ratio is not None else "-"
        who = " ".join(str(c[k]) for k in ("model", "metric") if c.get(k))
        parts.append(f"{who or 'perf'} {c.get('verdict', '?')} {ratio_s} (p={fmt(reading.perf_p(c))})")
    more = f", +{len(shown) - 3} more" if len(shown) > 3 else ""
    counts = f"{_n(len(regressions), 'regression')} in {_n(len(comparisons), 'comparison')}"
    text = f"perf: {counts}: {'; '.join(parts)}{more}"
    return [Line(text, 1, "yellow" if regressions else "")]


def summary_lines(verdict: dict[str, Any], *, elapsed_s: float | None = None) -> list[Line]:
    """Every line the summary can show, before trimming to the budget."""
    reading.validate(verdict)
    state = reading.status(verdict)
    results = verdict["results"]
    failed = reading.failed_by_phase(verdict)
    n_failed = sum(failed.values())
    counts = f"{n_failed} of {len(results)} taps failed" if n_failed else f"{len(results)} taps within policy"
    lines = [Line(f"{state} {reading.title(verdict)}: {counts}", 0, _STATUS_STYLE[state])]
    ff = verdict.get("first_failure")
    if ff:
        lines += _first_failure_lines(ff)
    if n_failed:
        per_phase = _listing((f"{p} {n}" for p, n in failed.items()), 4)
        lines.append(Line(f"failed: {_n(n_failed, 'tap')} in {_n(len(failed), 'phase')}: {per_phase}", 2))
    cov = verdict.get("coverage") or {}
    if cov:
        missing = cov.get("required_missing") or []
        not_exposed = cov.get("not_exposed") or []
        text = (f"coverage: compared {cov.get('compared', len(results))}; required missing: {_listing(missing)}; "
                f"not exposed: {len(not_exposed)}" + (f" ({_listing(not_exposed)})" if not_exposed else "")
                + (f"; observed only (not teacher-forced): {_listing(cov['observed'])}" if cov.get("observed") else ""))
        lines.append(Line(text, 2 if not missing else 0, "red" if missing else ""))
    lines += _perf_lines(reading.perf_comparisons(verdict))
    if ff:
        lines.append(Line(f"next: fix the op behind {ff['tap']} ({ff['phase']}); `harness explain {ff['tap']}` "
                          "says what it is", 4))
    if elapsed_s is None:  # harness.check records its own run time in the provenance
        elapsed_s = reading.as_float((verdict.get("provenance") or {}).get("elapsed_s"))
        elapsed_s = elapsed_s if math.isfinite(elapsed_s) else None
    if elapsed_s is not None:
        lines.append(Line(f"time: {elapsed_s:.1f} s", 2))
    return lines


def trim(lines: list[Line], budget: int) -> list[Line]:
    """Drop the lowest-priority lines (last first) until at most ``budget`` remain; order is kept."""
    if budget < 1:
        raise HarnessError(f"summary line budget must be >= 1, got {budget}")
    keep = list(lines)
    for prio in range(max((ln.priority for ln in lines), default=0), 0, -1):
        while len(keep) > budget and any(ln.priority == prio for ln in keep):
            idx = max(i for i, ln in enumerate(keep) if ln.priority == prio)
            del keep[idx]
    return keep[:budget]


def render_summary(verdict: dict[str, Any], *, elapsed_s: float | None = None) -> str:
    """At most 20 lines: verdict, first failure against thresholds, hint, localisation, coverage, perf, time."""
    return "\n".join(ln.text for ln in trim(summary_lines(verdict, elapsed_s=elapsed_s), MAX_LINES))


def gate_lines(verdicts: list[dict[str, Any]], elapsed_s: float | None = None, *,
               states: list[str] | None = None, headline: Line | None = None) -> list[Line]:
    """One line per model (passing models folded when they do not fit) and the first failing model's detail.

    ``states`` overrides each model's status (default: its verdict's), ``headline`` the first line: a
    gate that judged more than the tap verdicts (phases 0, 1, 6, 7) passes its own outcome, so the
    headline never says PASS above a failing exit code.
    """
    if not verdicts:
        raise HarnessError("gate summary: no verdicts to summarise")
    for i, v in enumerate(verdicts):
        reading.validate(v, source=f"verdicts[{i}]")
    if states is not None and len(states) != len(verdicts):
        raise HarnessError(f"gate summary: {len(states)} states for {len(verdicts)} verdicts")
    states = list(states) if states is not None else [reading.status(v) for v in verdicts]
    bad = [i for i, s in enumerate(states) if s != "PASS"]
    overall = "PASS" if not bad else ("FAIL" if any(states[i] in ("FAIL", "NOTHING COMPARED") for i in bad)
                                      else "COULD NOT RUN" if any(states[i] == "COULD NOT RUN" for i in bad)
                                      else "PERF REGRESSION")
    took = f" in {elapsed_s:.1f} s" if elapsed_s is not None else ""
    if headline is None:
        headline = Line(f"{overall} gate: {len(verdicts) - len(bad)} of {len(verdicts)} models passed{took}", 0,
                        _STATUS_STYLE[overall])
    lines = [headline]
    rows = []
    for v, s in zip(verdicts, states):
        ff = v.get("first_failure")
        if ff:
            r = (ff.get("metrics") or {}).get("r")
            detail = f"{ff['phase']} {ff['tap']}" + (f" r={fmt(r)}" if r is not None else "")
        else:
            detail = f"{len(v['results'])} taps"
        rows.append(Line(f"  {s} {reading.title(v)}: {detail}", 0, _STATUS_STYLE.get(s, "")))
    half = MAX_LINES // 2
    if len(rows) > half:  # fold the passing models into one line so the failing ones and the detail fit
        passing = [reading.title(v) for v, s in zip(verdicts, states) if s == "PASS"]
        failing = [r for r, s in zip(rows, states) if s != "PASS"]
        room = half - (1 if passing else 0)
        if len(failing) > room:
            failing = failing[: room - 1] + [Line(f"  +{len(failing) - room + 1} more models not passing", 0)]
        rows = failing + ([Line(f"  PASS ({len(passing)}): {_listing(passing, 4)}", 0, "green")] if passing else [])
    lines += rows
    if bad:
        first = verdicts[bad[0]]
        detail = summary_lines(first)[1:]  # its headline is already a model row
        budget = MAX_LINES - len(lines) - 1
        if budget > 0 and detail:
            lines.append(Line(f"-- {first['model']} (first model not passing) --", 0, "bold"))
            lines += trim(detail, budget)
    return lines


def render_gate_summary(verdicts: list[dict[str, Any]], elapsed_s: float | None = None) -> str:
    """The multi-model summary (``harness gate --all``), at most 20 lines."""
    return "\n".join(ln.text for ln in trim(gate_lines(verdicts, elapsed_s), MAX_LINES))


def _print(lines: list[Line], console: Console) -> None:
    for ln in trim(lines, MAX_LINES):
        # Text, not markup: tap names and hints hold brackets rich would read as tags.
        # soft_wrap keeps one printed line per summary line whatever the terminal width.
        console.print(Text(ln.text, style=ln.style), soft_wrap=True)


def print_summary(verdict: dict[str, Any], console: Console | None = None, *,
                  elapsed_s: float | None = None) -> None:
    """Print ``render_summary``'s lines with colour (default: a console on stdout)."""
    _print(summary_lines(verdict, elapsed_s=elapsed_s), console or Console())


def print_gate_summary(verdicts: list[dict[str, Any]], console: Console | None = None,
                       elapsed_s: float | None = None) -> None:
    """Print ``render_gate_summary``'s lines with colour (default: a console on stdout)."""
    _print(gate_lines(verdicts, elapsed_s), console or Console())
