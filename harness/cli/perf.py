"""``harness perf``: record pytest-benchmark runs, show a model's trend, gate on regressions.

Exit codes (as ``harness gate``): 0 no regression (unchanged or improved), 2 a regression,
3 could not decide: a bad or raw-data-less file, an unreadable database, nothing to compare, or an
*inconclusive* comparison (too few samples, or a suspected slowdown that is not yet significant:
rerun with more rounds). Usage errors also exit 3, so 2 always means "slower".
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import click
import typer
from rich.console import Console
from rich.text import Text
from rich.table import Table
from harness.cli.exits import CommandGroup

from harness.cli.console import make_console
from harness.errors import EXIT_ERROR, EXIT_PASS, EXIT_PERF, HarnessError
from harness.perf import benchjson, stats
from harness.perf.stats import Comparison, Verdict

EXIT_OK, EXIT_REGRESSION, EXIT_CANNOT_RUN = EXIT_PASS, EXIT_PERF, EXIT_ERROR


# typer >= 0.20 vendors its own click; its UsageError is the base of the public typer.BadParameter.
_USAGE_ERRORS = tuple({click.UsageError, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")})


class _Group(CommandGroup):
    """Click reports usage errors with exit 2, which here means "regression"; make them 3."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _USAGE_ERRORS as exc:
            exc.exit_code = EXIT_CANNOT_RUN
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _USAGE_ERRORS as exc:
            exc.exit_code = EXIT_CANNOT_RUN
            raise


perf_app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False,
                       help="Performance history and regression gates (pytest-benchmark JSON).")

DbOpt = Annotated[Optional[str], typer.Option(
    "--db", help="SQLAlchemy URL. Default: $NPU_HARNESS_DB_URL, else sqlite:///reports/history.sqlite")]
LastOpt = Annotated[int, typer.Option("--last", min=2, help="Runs of history to use. Default: 10")]


def _fail(message: str) -> typer.Exit:
    # soft_wrap: a long path must stay on one line (an agent greps the message for the file name).
    Console(stderr=True).print(Text.assemble(("error:", "red"), " ", message), highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_CANNOT_RUN)


def parse_fraction(text: str, option: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05; a HarnessError naming ``option`` otherwise."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise HarnessError(f"{option}: {text!r} is not a number (write e.g. 5% or 0.05)") from None
    if not 0 < value < 1:
        raise HarnessError(f"{option}: {text!r} must lie strictly between 0 and 1 (write e.g. 5% or 0.05)")
    return value


@perf_app.command()
def record(files: Annotated[list[Path], typer.Argument(help="pytest-benchmark JSON files saved with raw data")],
           db: DbOpt = None) -> None:
    """Import pytest-benchmark JSON files into the history (commit and dirty flag from git in the cwd)."""
    from harness.perf import history  # SQLAlchemy: imported by the commands that use it, not every CLI start

    try:
        benches = [benchjson.load(f) for f in files]  # all or nothing: check every file first
        with history.History(db) as hist:
            for bench in benches:
                run_id = hist.record(bench)
                typer.echo(f"recorded run {run_id} from {bench.path}: {len(bench.series)} series")
    except HarnessError as exc:
        raise _fail(str(exc))


def _fmt(value: float, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}{(' ' + unit) if unit else ''}"


@perf_app.command("history")
def history_cmd(model: Annotated[str, typer.Option("--model", help="Model id, e.g. qwen3-0.6b")],
                metric: Annotated[Optional[str], typer.Option("--metric", help="Only this metric (ttft, tpot, ...)")] = None,
                db: DbOpt = None, last: LastOpt = 10) -> None:
    """Show a model's trend (median per run, verdict at record time) and its change points."""
    from harness.perf import history

    try:
        with history.History(db) as hist:
            points = hist.trend(model, metric=metric, last=last)
    except HarnessError as exc:
        raise _fail(str(exc))
    if not points:
        raise _fail(f"no history for model {model!r}" + (f" metric {metric!r}" if metric else ""))
    console = make_console()
    table = Table(title=f"{model}: last {last} runs per series")
    for col in ("run", "time", "commit", "deployment", "metric", "median", "n", "verdict"):
        table.add_column(col, overflow="fold")
    for p in points:
        commit = (p.commit or "-")[:10] + ("*" if p.dirty else "")
        table.add_row(*map(Text, (str(p.run_id), p.time.strftime("%Y-%m-%d %H:%M"), commit, p.deployment, p.metric,
                                  _fmt(statistics.median(p.samples), p.unit), str(len(p.samples)), p.verdict or "-")))
    console.print(table)
    for (dep, met), pts in history.group(points).items():
        for cp in stats.change_points([p.samples for p in pts], pts[0].direction):  # type: ignore[arg-type]
            at = pts[cp.index]
            console.print(f"change point {dep}/{met}: at run {at.run_id} ({(at.commit or '-')[:10]}), "
                          f"median {_fmt(cp.before_median)} -> {_fmt(cp.after_median)} {pts[0].unit} "
                          f"({stats.change_words(cp.slowdown)}), {cp.verdict.value}, p_adj={cp.p_adjusted:.2g}",
                          highlight=False)


def _row(label: tuple[str, str, str], unit: str, result: Comparison) -> dict[str, Any]:
    return {"model": label[0], "deployment": label[1], "metric": label[2], "unit": unit, **result.to_dict()}


def _history_pairs(model: str, db: str | None, last: int, threshold: float, alpha: float,
                   console: Console) -> list[dict[str, Any]]:
    """Newest run of each series of ``model`` against the pooled samples of its previous ``last`` runs."""
    from harness.perf import history

    with history.History(db) as hist:
        points = hist.trend(model, last=last + 1)
    if not points:
        raise HarnessError(f"no history for model {model!r}; record runs with `harness perf record`")
    newest = points[-1].run_id
    rows = []
    for (dep, met), pts in history.group(points).items():
        if pts[-1].run_id != newest:
            console.print(f"note: {dep}/{met} is not in the newest run {newest}; skipped", highlight=False)
            continue
        if len(pts) < 2:
            console.print(f"note: {dep}/{met} has no earlier run to compare with", highlight=False)
            continue
        base = [x for p in pts[:-1] for x in p.samples]
        result = stats.compare(base, pts[-1].samples, pts[-1].direction,  # type: ignore[arg-type]
                               threshold=threshold, alpha=alpha, label=f"{model}/{dep}/{met}")
        rows.append(_row((model, dep, met), pts[-1].unit, result))
    return rows


def _file_pairs(base_path: Path, cand_path: Path, threshold: float, alpha: float,
                console: Console) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    base, cand = benchjson.load(base_path), benchjson.load(cand_path)
    pairs, only_base, only_cand = benchjson.pair(base, cand)
    rows = []
    for b, c in pairs:
        if b.direction != c.direction:
            raise HarnessError(f"{cand_path}: {c.label} is {c.direction}-is-better but {b.direction} in {base_path}")
        result = stats.compare(b.samples, c.samples, c.direction,  # type: ignore[arg-type]
                               threshold=threshold, alpha=alpha, label=c.label)
        rows.append(_row(c.key if b.key == c.key else (c.model, f"{b.deployment} -> {c.deployment}", c.metric),
                         c.unit, result))
    for s in only_base:
        console.print(f"note: {s.label} is only in {base_path}", highlight=False)
    for s in only_cand:
        console.print(f"note: {s.label} is only in {cand_path}", highlight=False)
    return rows, [s.label for s in only_base], [s.label for s in only_cand]


def overall(rows: Sequence[dict[str, Any]]) -> tuple[str, int]:
    """(overall verdict, exit code): any regression -> 2; else any inconclusive or nothing -> 3; else 0."""
    verdicts = {r["verdict"] for r in rows}
    if Verdict.REGRESSION.value in verdicts:
        return Verdict.REGRESSION.value, EXIT_REGRESSION
    if not rows or Verdict.INCONCLUSIVE.value in verdicts:
        return Verdict.INCONCLUSIVE.value, EXIT_CANNOT_RUN
    if verdicts == {Verdict.IMPROVEMENT.value}:
        return Verdict.IMPROVEMENT.value, EXIT_OK
    return Verdict.UNCHANGED.value, EXIT_OK


@perf_app.command("compare")
def compare_cmd(
    base: Annotated[Optional[Path], typer.Argument(help="Baseline pytest-benchmark JSON")] = None,
    cand: Annotated[Optional[Path], typer.Argument(help="Candidate pytest-benchmark JSON")] = None,
    use_history: Annotated[bool, typer.Option("--history", help="Compare the newest recorded run "
                                              "with the previous ones instead of two files")] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="Model id (with --history)")] = None,
    threshold: Annotated[str, typer.Option("--threshold", help="Smallest slowdown that counts. Default: 5%")] = "5%",
    alpha: Annotated[str, typer.Option("--alpha", help="Mann-Whitney significance level. Default: 0.01")] = "0.01",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the decision as JSON here")] = None,
    db: DbOpt = None,
    last: LastOpt = 10,
) -> None:
    """Decide regression / improvement / unchanged / inconclusive; exit 0, 2 (regression) or 3."""
    console = make_console()
    unmatched: tuple[list[str], list[str]] = ([], [])
    try:
        thr, alp = parse_fraction(threshold, "--threshold"), parse_fraction(alpha, "--alpha")
        if json_out is not None:  # refused before the comparison prints anything
            from harness.cli.gate import ensure_writable

            ensure_writable(json_out, "--json")
        if use_history:
            if model is None or base is not None or cand is not None:
                raise HarnessError("--history takes --model ID and no files")
            rows = _history_pairs(model, db, last, thr, alp, console)
        else:
            if base is None or cand is None or model is not None:
                raise HarnessError("compare takes BASE.json CAND.json, or --history --model ID")
            rows, *rest = _file_pairs(base, cand, thr, alp, console)
            unmatched = (rest[0], rest[1])
    except HarnessError as exc:
        raise _fail(str(exc))
    verdict, code = overall(rows)
    table = Table(title=f"perf compare: {verdict} (threshold {thr:.1%}, alpha {alp})")
    for col in ("model", "deployment", "metric", "base median", "cand median", "change", "p", "n", "verdict"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*map(Text, (r["model"], r["deployment"], r["metric"], _fmt(r["base_median"], r["unit"]),
                                  _fmt(r["cand_median"], r["unit"]), stats.change_words(r["slowdown"]),
                                  _fmt(r["p_worse"] if r["p_worse"] is not None else float("nan")),
                                  f"{r['n_base']}/{r['n_cand']}", r["verdict"])))
    console.print(table)
    for r in rows:
        if r["verdict"] != Verdict.UNCHANGED.value:
            console.print(r["reason"], highlight=False)
    if not rows:
        console.print("nothing compared: no series matched", highlight=False)
    elif code == EXIT_CANNOT_RUN:
        console.print("inconclusive: more samples are needed (rerun with more rounds); exit 3", highlight=False)
    if json_out is not None:
        doc = {"schema": 1, "verdict": verdict, "exit_code": code, "threshold": thr, "alpha": alp,
               "base": "history" if use_history else str(base), "candidate": str(cand) if cand else model,
               "results": rows, "unmatched": {"base": unmatched[0], "candidate": unmatched[1]}}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    raise typer.Exit(code)
