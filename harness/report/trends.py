"""Trend series for the reports, read from the performance history (SQLite or PostgreSQL)."""
from __future__ import annotations

import statistics

from harness.report.model import TrendSeries


def history_trends(models: list[str], db: str | None = None, metric: str | None = None,
                   last: int | None = 20) -> list[TrendSeries]:
    """One series per (model, deployment, metric) of the history, the median of each run, the runs the
    gate judged a regression marked; models without history give no series."""
    from harness.perf import history

    out: list[TrendSeries] = []
    with history.History(db) as hist:
        for model in models:
            for (deployment, met), pts in history.group(hist.trend(model, metric=metric, last=last)).items():
                points = [((p.commit or f"run {p.run_id}")[:10], statistics.median(p.samples)) for p in pts]
                marked = [i for i, p in enumerate(pts) if (p.verdict or "").startswith("regression")]
                out.append(TrendSeries(f"{model} [{deployment}]", met, pts[0].unit, points, marked))
    return out
