"""Output for people and agents: the console summary, per-layer and trend plots, HTML / Markdown reports.

Everything here reads the verdict as a plain dict (schema 1, docs/contract.md), so saved ``--json`` verdicts
can be summarised and reported offline.
"""
from harness.report.model import TrendSeries
from harness.report.reading import load_verdict
from harness.report.summary import print_gate_summary, print_summary, render_gate_summary, render_summary
from harness.report.writer import build_content, write_report

__all__ = ["TrendSeries", "build_content", "load_verdict", "print_gate_summary", "print_summary",
           "render_gate_summary", "render_summary", "write_report"]
