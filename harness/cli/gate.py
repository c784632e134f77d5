"""``harness gate``: phases 0..N for one or more models against one deployment, with exit codes a
pipeline can trust (0 pass, 1 correctness, 2 performance regression, 3 could not run / compared nothing).

The console shows at most 20 lines (``render_gate_summary``); ``--json`` writes every phase's checks and
the per-mode verdicts (schema 1 each); ``--junit`` writes one testcase per phase check (tap ids for
phases 2, 3, 5). Default ``--phase 7`` (5 with ``--trace``): the whole gate, as a reviewer or a nightly job runs it; an agent
in phase N of its loop passes ``--phase N`` and gets only phases 0..N.
"""
from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from harness.cli.common import (DecodeOpt, GoldenDirOpt, ModelOpt, PromptOpt, RowsOpt, ScaleOpt, SeedOpt, WeightsOpt,
                                path_or_none)
from harness.errors import HarnessError

GATE_SCHEMA = 1


def gate_document(results: list[Any], phase: int, elapsed_s: float, exit_code: int) -> dict[str, Any]:
    """The ``--json`` document: overall outcome, the first failure across models, every model's gate."""
    models = [r.to_dict() for r in results]
    first = next(({"model": m["model"], **m["first_failure"]} for m in models if m["first_failure"]), None)
    tap = next(({"model": m["model"], **m["first_failing_tap"]} for m in models if m["first_failing_tap"]), None)
    errors = [{"model": m["model"], "error": m["error"]} for m in models if m["error"]]
    return {"schema": GATE_SCHEMA, "kind": "gate", "phase": phase, "passed": exit_code == 0,
            "exit_code": exit_code, "elapsed_s": round(elapsed_s, 3), "first_failure": first,
            "first_failing_tap": tap, "errors": errors, "models": models}


def junit_xml(results: list[Any], elapsed_s: float) -> bytes:
    """JUnit XML: one testsuite per model, one testcase per phase check (``phase3.prefill/layers.0.q`` ...)."""
    root = ET.Element("testsuites", name="harness gate", time=f"{elapsed_s:.3f}")
    for r in results:
        cases = [(f"phase{o.phase}.{o.name}", c) for o in sorted(r.outcomes.values(), key=lambda o: o.phase)
                 for c in o.checks]
        suite = ET.SubElement(root, "testsuite", name=f"{r.model} [{r.deployment}]", tests=str(len(cases) + bool(r.error)),
                              failures=str(sum(not c.passed for _, c in cases)), errors=str(int(bool(r.error))),
                              time=f"{r.elapsed_s:.3f}")
        if r.error:
            case = ET.SubElement(suite, "testcase", classname=r.model, name="setup")
            ET.SubElement(case, "error", message=r.error[:500]).text = r.error
        for o in sorted(r.outcomes.values(), key=lambda o: o.phase):
            if (o.status in ("error", "n/a") and not o.checks) or o.status == "not run":
                case = ET.SubElement(suite, "testcase", classname=f"{r.model}.phase{o.phase}", name=o.name)
                tag = "skipped" if o.status == "n/a" else "error"  # "not run" compared nothing: not a pass
                ET.SubElement(case, tag, message=o.message[:500]).text = o.message
        for cls, c in cases:
            case = ET.SubElement(suite, "testcase", classname=f"{r.model}.{cls}", name=c.id)
            if not c.passed:
                ET.SubElement(case, "failure", message=c.message[:500]).text = json.dumps(c.to_dict()["metrics"], default=str)[:4000]
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


EXIT_WORDS = {0: "PASS", 1: "FAIL", 2: "PERF REGRESSION", 3: "COULD NOT RUN"}


def _summary_verdicts(results: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(result, one verdict-shaped dict) per model that has a verdict (worst mode first)."""
    out = []
    for r in results:
        vs = list(r.verdicts.values())
        failing = [v for v in vs if not v["passed"]]
        if failing:
            out.append((r, failing[0]))
        elif vs:
            v = dict(vs[0])
            v["perf"] = r.perf
            out.append((r, v))
    return out


def summary_lines(results: list[Any], elapsed_s: float, exit_code: int, phase: int) -> list[str]:
    """At most 20 lines. One truth: the headline is the exit code's verdict and counts each model by its
    gate's exit code (phase 0, 1, 6 and 7 failures included), then the tap summary of the models with
    verdicts, one line per non-passing phase, phase 7's rerun command and the exit line."""
    from harness.report.summary import Line, gate_lines, trim

    word = EXIT_WORDS[exit_code]
    passed = sum(r.exit_code == 0 for r in results)
    headline = f"{word} gate: {passed} of {len(results)} models passed in {elapsed_s:.1f} s"
    lines: list[str] = [headline]
    pairs = _summary_verdicts(results)
    if pairs:
        states = [EXIT_WORDS[r.exit_code] for r, _ in pairs]
        rows = gate_lines([v for _, v in pairs], states=states, headline=Line(headline))
        lines = [ln.text for ln in trim(rows, 12)]
    for r in results:
        if r.error:
            lines.append(f"{r.model}: could not run: {r.error}")
        said: dict[str, int] = {}  # a cause shared by several phases (a factory that raises) is said once
        for o in sorted(r.outcomes.values(), key=lambda o: o.phase):
            if o.status not in ("pass", "measured"):
                first = said.setdefault(o.message, o.phase) if o.message else o.phase
                why = o.message if first == o.phase else f"the same cause as phase {first}"
                lines.append(f"{r.model} phase {o.phase} {o.name}: {o.status.upper()}: {why}")
    reruns = [f"{r.model} phase 7 rerun: {r.recheck['reproduce']}" for r in results if r.recheck]
    tail = f"{word} gate phases 0-{phase}: exit {exit_code}, {elapsed_s:.1f} s"
    return lines[: 19 - len(reruns[:3])] + reruns[:3] + [tail]


def _print(console: Console, results: list[Any], elapsed_s: float, exit_code: int, phase: int) -> None:
    for ln in summary_lines(results, elapsed_s, exit_code, phase):
        style = "bold green" if ln.startswith("PASS") else "bold red" if ln.startswith(("FAIL", "COULD")) else ""
        console.print(Text(ln[:400], style=style), soft_wrap=True)


def gate(
    model: Optional[list[str]] = ModelOpt,
    all_models: bool = typer.Option(False, "--all", help="All nine models."),
    deployment: Optional[str] = typer.Option(None, "--deployment", "-d", help="MODULE:FACTORY or a built-in "
                                             "name (see `harness list`). Default: the emulator."),
    fault: list[str] = typer.Option([], "--fault", help="Emulator fault to switch on (repeatable; see "
                                    "`harness list`). Default: none."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Judge a trace directory instead of a live "
                                         "deployment (phases 0-5, cumulative). Default: none."),
    phase: Optional[int] = typer.Option(None, "--phase", min=0, max=7,
                                        help="Run the gates of phases 0..N. Default: 7; 5 with --trace (a "
                                             "trace holds one cumulative run: phases 6-7 need a live deployment)."),
    scale: str = ScaleOpt,
    seed: int = SeedOpt,
    weights: Optional[Path] = WeightsOpt,
    mode: str = typer.Option("both", "--mode", help="cumulative, isolated or both. Default: both."),
    decode_steps: int = DecodeOpt,
    prompt_len: Optional[int] = PromptOpt,
    rows: str = RowsOpt,
    recheck_seed: Optional[int] = typer.Option(None, "--recheck-seed", min=0,
                                               help="Phase 7's seed. Default: derived from the deployment and "
                                                    "the golden key (the same every run of the same deployment)."),
    recheck_prompt_len: Optional[int] = typer.Option(None, "--recheck-prompt-len", min=1,
                                                     help="Phase 7's prompt length. Default: derived as the seed."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the gate JSON here. Default: none."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here. Default: none."),
    perf: bool = typer.Option(False, "--perf", help="Judge phases 4-5 timings against the history and record "
                              "them (exit 2 on a regression). Default: off (timings only reported)."),
    db: Optional[str] = typer.Option(None, "--db", help="History database URL for --perf. Default: "
                                     "$NPU_HARNESS_DB_URL, else sqlite:///reports/history.sqlite."),
    golden_dir: Optional[Path] = GoldenDirOpt,
    rounds: int = typer.Option(10, "--rounds", min=10, help="Timed rounds per performance series (phases 4-5); "
                               "more rounds settle an inconclusive comparison. Default: 10."),
    isolation: str = typer.Option("process", "--isolation", help="Where the deployment runs: process (a child "
                                  "process: a crash or hang is exit 3 naming the phase and last tap) or inline "
                                  "(in the harness's process, for debugging). Default: process."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Deadline in seconds of each prefill or decode "
                                            "call of the deployment (exit 3 naming the phase when overrun; building "
                                            "keeps its own, longer deadline). Default: derived from the model size "
                                            "and tokens (floor 60 s)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="A line on stderr as each "
                                            "phase starts and ends and at each golden-build stage, with the "
                                            "time since the start. Default: on when stderr is a terminal."),
) -> None:
    """Run the phase gates 0..N; exit 0 pass, 1 correctness failure, 2 perf regression, 3 could not run."""
    from harness.cli.common import models_or_all
    from harness.suites.gate import GateOptions, run_gate
    from harness.suites.phases import overall_exit

    console = Console()
    t0 = time.perf_counter()
    if phase is None:
        phase = 5 if trace is not None else 7
    # Everything that can be refused is refused before the run starts (exit 3, one line, via the CLI edge).
    if trace is not None and not (model or all_models):
        from harness.deployment.trace import read_trace

        model = [read_trace(trace).model]
    ids = models_or_all(model, all_models)
    from harness.suites.run import deployment_with_faults, modes_of

    deployment_with_faults(deployment, fault)  # --fault with a non-emulator deployment
    modes_of(mode)
    from harness.store.streamwrite import check_rows

    check_rows(rows)
    for option, path in (("--json", json_out), ("--junit", junit)):
        if path is not None:
            ensure_writable(path, option)
    if perf or db is not None:
        check_database(db)
    from harness.deployment.isolation import DeploymentHost

    host = DeploymentHost(isolation, timeout)  # one deployment host (one child process) for every model
    opts = dict(deployment=deployment, faults=tuple(fault), phase=phase, scale=scale, seed=seed,
                weights=path_or_none(weights), mode=mode, golden_dir=path_or_none(golden_dir), perf=perf,
                perf_db=db, decode_steps=decode_steps, prompt_len=prompt_len, rows=rows, trace=path_or_none(trace),
                recheck_seed=recheck_seed, recheck_prompt_len=recheck_prompt_len, isolation=host, timeout=timeout,
                rounds=rounds)
    if progress is None:
        progress = Console(stderr=True).is_terminal
    if progress:
        from harness.cli.progress import GateProgress

        reporter = GateProgress()
        opts.update(on_phase=reporter.phase, progress=reporter.build)
    with host:
        results = [run_gate(m, GateOptions(**opts)) for m in ids]
    elapsed = time.perf_counter() - t0
    code = overall_exit(results)
    # The reports are written before the verdict is printed: a failed write is exit 3, never "PASS" first.
    if json_out is not None:
        doc = gate_document(results, phase, elapsed, code)
        _write(json_out, (json.dumps(doc, indent=1, default=str) + "\n").encode("utf-8"), "--json")
    if junit is not None:
        _write(junit, junit_xml(results, elapsed), "--junit")
    _print(console, results, elapsed, code, phase)
    raise typer.Exit(code)


def ensure_writable(path: Path, option: str) -> None:
    """Refuse (HarnessError naming ``option``) a report path that cannot be written: a directory, a parent
    that is a file, a read-only or full file system. Probes by creating a file next to it (os.access
    says yes to root even on a read-only mount)."""
    import tempfile

    if path.is_dir():
        raise HarnessError(f"{option} {path}: is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as exc:
        raise HarnessError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


def check_database(url: Optional[str]) -> None:
    """Open the history database once before the run (HarnessError naming it: unknown scheme, no driver)."""
    from harness.perf.history import History

    History(url).close()


def _write(path: Path, data: bytes, option: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise HarnessError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


def register(app: typer.Typer) -> None:
    """Add ``harness gate`` to the CLI app."""
    app.command("gate")(gate)
