"""The ``harness`` command line: a thin layer over the library (typer).

Exit codes of every command: 0 pass, 1 correctness failure, 2 measured performance regression, 3 the
check itself could not run (a usage error, bad input, a missing golden, a broken store, a deployment that
cannot be imported or raises, any unexpected exception) - with one line on stderr naming the cause
(``harness.cli.exits``). ``-h``/``--help`` and ``--version`` work on every command.
"""
from __future__ import annotations

import typer

from harness.cli import gate, info, report, trace
from harness.cli.exits import HarnessGroup
from harness.cli.golden import golden_app
from harness.cli.perf import perf_app
from harness.cli.selftest import register as register_selftest

app = typer.Typer(
    name="harness",
    cls=HarnessGroup,
    help="Correctness and performance gates for LLM deployments on spatial NPUs (XDNA 2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from harness.version import __version__

        typer.echo(f"harness {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    """Correctness and performance gates for LLM deployments on spatial NPUs (XDNA 2)."""


app.add_typer(golden_app, name="golden")
app.add_typer(trace.trace_app, name="trace")
app.add_typer(perf_app, name="perf")
gate.register(app)
info.register(app)
register_selftest(app)
report.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``HarnessGroup`` turns every outcome into exit 0-3)."""
    app(args=argv)
