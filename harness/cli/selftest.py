"""``harness selftest``: three populations scored under our policy and the classic ones (see
harness.selftest.scoreboard): every emulator fault and the clean emulator, the validation deployments
(independent correct implementations, and an imprecise one that must fail), and generic bug shapes
injected into one tap. Exit 0 when our policy meets its targets, 1 when it misses one, 3 when the
self-test itself cannot run (bad option, unknown model, fault, member or shape)."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from harness.errors import HarnessError

DEFAULT_JSON = Path("reports/selftest.json")
DEFAULT_MD = Path("reports/selftest.md")


def _names(text: str | None, known: list[str], option: str) -> list[str] | None:
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise HarnessError(f"{option}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def register(app: typer.Typer) -> None:
    """Add the ``selftest`` command to ``app``."""

    @app.command("selftest")
    def selftest(
        quick: bool = typer.Option(False, "--quick", help="The CI subset: each fault once, clean seeds 0-1. "
                                                          "Default: off (every fault on every model)."),
        seeds: int = typer.Option(20, "--seeds", min=1, help="Clean seeds per model (0..N-1). Default: 20."),
        models: str = typer.Option("", "--models", help="Comma-separated model ids. Default: all nine."),
        faults: str = typer.Option("", "--faults", help="Comma-separated emulator faults. Default: all."),
        members: str = typer.Option("", "--members", help="Comma-separated validation deployments, or 'none'. "
                                                          "Default: every member and the imprecise one."),
        member_seeds: int = typer.Option(10, "--member-seeds", min=0, help="Seeds per model for the validation "
                                                                          "members (0..N-1). Default: 10."),
        shapes: str = typer.Option("", "--shapes", help="Comma-separated bug shapes, or 'none'. Default: all."),
        shape_seeds: int = typer.Option(2, "--shape-seeds", min=0, help="Seeds per model for the bug shapes, two "
                                                                        "taps each (a prefill and a decode one). "
                                                                        "Default: 2."),
        jobs: int = typer.Option(0, "--jobs", min=0, help="Worker processes. Default: 0 = every core."),
        json_path: Path = typer.Option(DEFAULT_JSON, "--json", help=f"JSON report. Default: {DEFAULT_JSON}."),
        md_path: Path = typer.Option(DEFAULT_MD, "--md", help=f"Markdown report. Default: {DEFAULT_MD}."),
        golden_dir: Path = typer.Option(None, "--golden-dir", help="Golden store. Default: the project's golden/."),
    ) -> None:
        """Score the gate on seeded bugs and clean runs: detection, exact localisation, false alarms."""
        from rich.console import Console
        from rich.progress import Progress

        from harness.deployment.emulator.faults import names as fault_names
        from harness.deployment.validation import IMPRECISE, MEMBERS
        from harness.selftest.bug_shapes import SHAPES
        from harness.selftest.runner import (member_population, population, quick_population, run_cases,
                                             shape_population)
        from harness.selftest.scoreboard import Scoreboard
        from harness.spec.model_spec import names as model_names

        try:
            chosen = _names(models, model_names(), "--models") or model_names()
            chosen_faults = _names(faults, fault_names(), "--faults")
            all_members = [*MEMBERS, *IMPRECISE]
            chosen_members = [] if members == "none" else _names(members, all_members, "--members") or all_members
            chosen_shapes = [] if shapes == "none" else _names(shapes, list(SHAPES), "--shapes") or list(SHAPES)
        except HarnessError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(3) from None
        if quick:
            cases = quick_population(chosen, members=chosen_members, shapes=chosen_shapes)
            if chosen_faults is not None:
                cases = [c for c in cases if c.fault == "clean" or c.fault in chosen_faults]
        else:
            cases = (population(chosen, range(seeds), chosen_faults)
                     + member_population(chosen, range(member_seeds), chosen_members)
                     + shape_population(chosen, range(shape_seeds), chosen_shapes))
        console = Console()
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{len(cases)} checks", total=len(cases))
            results = run_cases(cases, jobs=jobs or None, golden_dir=golden_dir,
                                progress=lambda done, total: bar.update(task, completed=done))
        board = Scoreboard.build(results, time.perf_counter() - t0)
        board.write(json_path, md_path)
        console.print(board.rich_table())
        for line in board.failures() + board.misses[:20] + board.errors[:20]:
            console.print(f"  {line}")
        console.print(f"reports: {json_path}, {md_path}")
        if board.errors:
            raise typer.Exit(3)
        raise typer.Exit(0 if board.passed else 1)
