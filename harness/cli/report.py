"""``harness report``: HTML and Markdown from saved gate / verdict JSON files and the perf history."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from harness.cli.console import make_console
from harness.errors import EXIT_ERROR, HarnessError


def report_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write report.html and report.md into (created)."),
    files: Optional[List[Path]] = typer.Argument(None, help="JSON files: `harness gate --json` documents or "
                                                            "verdicts (harness.check(...).to_dict())."),
    history: bool = typer.Option(False, "--history", help="Add performance trends from the history database "
                                                          "for the reported models (and every --model)."),
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="Model whose trends to add (repeatable)."),
    db: Optional[str] = typer.Option(None, "--db", help="History SQLAlchemy URL. Default: $NPU_HARNESS_DB_URL, "
                                                        "else sqlite:///reports/history.sqlite"),
    metric: Optional[str] = typer.Option(None, "--metric", help="Only this trend metric (ttft, tpot, ...)."),
    last: int = typer.Option(20, "--last", min=2, help="Runs per trend. Default: 20."),
    title: str = typer.Option("npu-harness report", "--title", help="The report's title."),
) -> None:
    """Write report.html and report.md: every verdict's tap table (R, r_tail, r_bias, cosine), the
    failing metric plotted by layer against its limit, and performance trends."""
    from harness.report.reading import load_verdicts
    from harness.report.trends import history_trends
    from harness.report.writer import write_report

    console = make_console()
    try:
        verdicts = [v for f in files or [] for v in load_verdicts(f)]
        models = list(dict.fromkeys([*(model or []), *(v["model"] for v in verdicts)]))
        trends = history_trends(models, db, metric, last) if (history or model) else []
        if not verdicts and not trends:
            raise HarnessError("nothing to report: give gate/verdict JSON files, or --history --model ID with a "
                               "history that has runs")
        page = write_report(out_dir, verdicts, trends, title=title)
    except HarnessError as exc:
        make_console(stderr=True).print(Text(f"error: {exc}"), soft_wrap=True)
        raise typer.Exit(EXIT_ERROR)
    console.print(Text(f"wrote {page} and {page.with_name('report.md')}: {len(verdicts)} verdict(s), "
                       f"{len(trends)} trend(s)"), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
