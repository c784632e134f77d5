"""The ``harness`` command line: a thin layer over the library (typer).

Exit codes (DESIGN.md): 0 pass, 1 correctness failure, 2 performance regression, 3 the check itself
could not run (bad input, missing golden, broken store, a deployment that cannot be imported or raises).
"""
from __future__ import annotations

import sys

import typer

from harness.cli import gate, info, report, trace
from harness.cli.golden import golden_app
from harness.cli.perf import perf_app
from harness.cli.selftest import register as register_selftest
from harness.errors import EXIT_ERROR, HarnessError

app = typer.Typer(
    name="harness",
    help="Correctness and performance gates for LLM deployments on spatial NPUs (XDNA 2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(golden_app, name="golden")
app.add_typer(trace.trace_app, name="trace")
app.add_typer(perf_app, name="perf")
gate.register(app)
info.register(app)
register_selftest(app)
report.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; any HarnessError that escapes a command is exit 3 with its message."""
    try:
        app(args=argv, standalone_mode=True)
    except HarnessError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
