"""`harness report`: HTML and Markdown from `harness gate --json` files and verdicts, r_bias shown."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.report import load_verdict
from harness.report.plots import failing_metric
from harness.report.reading import load_verdicts
from harness.report.samples import sample_verdict

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def gate_json(tmp_path_factory, golden_root) -> Path:
    out = tmp_path_factory.mktemp("gate") / "gate.json"
    res = runner.invoke(app, ["gate", "--model", "qwen3-0.6b", "--phase", "3", "--fault", "crude_silu",
                              "--golden-dir", str(golden_root), "--json", str(out)])
    assert res.exit_code == 1, res.output
    return out


def test_load_verdict_reads_a_gate_document(gate_json: Path) -> None:
    verdicts = load_verdicts(gate_json)
    assert {v["mode"] for v in verdicts} == {"cumulative", "isolated"}
    first = load_verdict(gate_json)                 # the failing verdict the console summary shows
    assert not first["passed"] and first["first_failure"]["tap"].endswith(".act")


def test_report_command_writes_both_pages_with_r_bias(gate_json: Path, tmp_path: Path) -> None:
    verdict = tmp_path / "verdict.json"
    verdict.write_text(json.dumps(sample_verdict("llama-3.2-1b")))
    res = runner.invoke(app, ["report", str(tmp_path / "out"), str(gate_json), str(verdict)])
    assert res.exit_code == 0, res.output
    html, md = (tmp_path / "out" / "report.html").read_text(), (tmp_path / "out" / "report.md").read_text()
    assert "R bias" in html and "| R bias |" in md
    assert "qwen3-0.6b" in html and "llama-3.2-1b" in html


def test_report_command_errors_exit_3_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = runner.invoke(app, ["report", str(tmp_path / "out"), str(bad)])
    assert res.exit_code == 3 and "bad.json" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "out")])
    assert res.exit_code == 3 and "nothing to report" in res.output


def test_the_plot_shows_the_metric_that_failed() -> None:
    v = sample_verdict("qwen3-0.6b", fail_phase="prefill")
    v["first_failure"]["judgement"] = {"reasons": ["r_bias 9 (up to 5.5 allowed): lean"], "thresholds": {"r_bias_max": 5.5}}
    assert failing_metric(v) == "r_bias"
    v["first_failure"]["judgement"]["reasons"] = ["R 3 (up to 2 allowed)"]
    assert failing_metric(v) == "r"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_with_r_bias(gate_json: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", str(tmp_path / "out"), str(gate_json)])
    assert res.exit_code == 0, res.output
    page = tmp_path / "out" / "report.html"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "<th>R bias</th>" in dom and "(first failure)" in dom


def test_piped_list_keeps_whole_names_and_brackets() -> None:
    out = subprocess.run([sys.executable, "-m", "harness", "list"], capture_output=True, text=True, timeout=120).stdout
    assert "…" not in out
    assert "([out, in]" in out                      # fault text with brackets is not read as markup
