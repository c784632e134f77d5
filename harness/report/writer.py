"""Build the report content from verdicts and trends, and write report.html / report.md atomically.

Atomic means a crash (or a second writer) never leaves a half-written report: everything is written
into a hidden temp folder inside ``out_dir``, the PNGs move into place as a freshly named assets folder
(one directory rename), then ``report.md`` and ``report.html`` are each replaced by ``os.replace``.
At every instant the page on disk is complete and every image it references exists. Assets folders
no page refers to any more are removed afterwards. Other files in ``out_dir`` (verdict.json,
benchmark data) are left alone.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from harness.errors import HarnessError
from harness.report import plots, reading, summary
from harness.report.html import render_html
from harness.report.markdown import render_markdown
from harness.report.model import Image, ModelSection, ReportContent, Row, TrendSeries

ASSETS_PREFIX = "report-files-"
_TMP_PREFIX = ".report-tmp-"
_ASSETS_RE = re.compile(rf"^{re.escape(ASSETS_PREFIX)}[0-9a-f]{{12}}$")
_ASSETS_REF_RE = re.compile(rf"{re.escape(ASSETS_PREFIX)}[0-9a-f]{{12}}")
_TMP_MAX_AGE_S = 3600.0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _rows(verdict: dict[str, Any]) -> list[Row]:
    ff = verdict.get("first_failure") or {}
    rows = []
    for r in reading.sorted_results(verdict):
        m = r.get("metrics") or {}
        rows.append(Row(model=str(verdict["model"]), phase=str(r["phase"]), tap=str(r["tap"]), passed=bool(r["passed"]),
                        r=reading.fmt(m.get("r")), r_tail=reading.fmt(m.get("r_tail")), r_bias=reading.fmt(m.get("r_bias")),
                        cosine=reading.fmt_cos(m.get("cosine")),
                        first=(r["phase"], r["tap"]) == (ff.get("phase"), ff.get("tap"))))
    return rows


def _perf_rows(verdict: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    out = []
    for c in reading.perf_comparisons(verdict):
        unit = f" {c['unit']}" if c.get("unit") else ""
        out.append((str(c.get("model", verdict["model"])), str(c.get("metric", "?")), str(c.get("verdict", "?")),
                    reading.fmt(c.get("base_median")) + unit, reading.fmt(c.get("cand_median")) + unit,
                    reading.fmt(c.get("ratio")), reading.fmt(reading.perf_p(c)), reading.one_line(c.get("reason", ""))))
    return tuple(out)


def _section(verdict: dict[str, Any], index: int, plot: bool) -> ModelSection:
    rows = _rows(verdict)
    image = None
    if plot and any(reading.tap_position(r["tap"])[0] < 1 << 30 for r in verdict["results"]):
        name = f"layers-{index:02d}-{_slug(reading.title(verdict))}.png"
        lead = plots.failing_metric(verdict)
        image = Image(name, f"{plots.METRIC_LABELS[lead][0]} and 1 - cosine by layer: {reading.title(verdict)}",
                      plots.layer_error_png(verdict))
    return ModelSection(
        title=reading.title(verdict), status=reading.status(verdict),
        summary=tuple(summary.render_summary(verdict).splitlines()),
        failed_rows=tuple(r for r in rows if not r.passed), passed_rows=tuple(r for r in rows if r.passed),
        perf=_perf_rows(verdict), image=image)


def build_content(verdicts: Iterable[dict[str, Any]], trends: Iterable[TrendSeries] = (), *,
                  title: str = "npu-harness report", plot: bool = True) -> ReportContent:
    """Everything both renderers show, with the PNGs rendered (``plot`` False skips the layer plots)."""
    verdicts = list(verdicts)
    for i, v in enumerate(verdicts):
        reading.validate(v, source=f"verdicts[{i}]")
    trends = list(trends)
    if not verdicts and not trends:
        raise HarnessError("write_report: nothing to report (no verdicts and no trends)")
    overview = []
    for v in verdicts:
        ff = v.get("first_failure")
        n_failed = sum(not r["passed"] for r in v["results"])
        compared = (v.get("coverage") or {}).get("compared", len(v["results"]))
        overview.append((reading.title(v), reading.status(v), str(compared), str(n_failed),
                         f"{ff['phase']} {ff['tap']}" if ff else "-"))
    sections = tuple(_section(v, i, plot) for i, v in enumerate(verdicts))
    trend_images = tuple(
        Image(f"trend-{i:02d}-{s.slug}.png", f"{s.model}: {s.metric} over {len(s.points)} runs"
              + (f", {len(s.regressions)} regression(s) marked" if s.regressions else ""), plots.trend_png(s))
        for i, s in enumerate(trends))
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return ReportContent(title=title, generated=generated, overview=tuple(overview), sections=sections,
                         trends=trend_images)


def write_report(out_dir: str | Path, verdicts: Iterable[dict[str, Any]], trends: Iterable[TrendSeries] = (),
                 *, title: str = "npu-harness report") -> Path:
    """Write ``report.html`` and ``report.md`` (plus their PNGs) into ``out_dir``; returns report.html's path.

    ``out_dir`` is created if needed. Raises HarnessError for bad verdicts or an unwritable folder.
    """
    content = build_content(verdicts, trends, title=title)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    except OSError as exc:
        raise HarnessError(f"cannot write report into {out}: {exc}") from None
    try:
        assets = f"{ASSETS_PREFIX}{uuid.uuid4().hex[:12]}"
        (tmp / assets).mkdir()
        for img in content.images:
            (tmp / assets / img.name).write_bytes(img.png)
        (tmp / "report.md").write_text(render_markdown(content, assets), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(content, assets), encoding="utf-8")
        os.rename(tmp / assets, out / assets)  # images first: the pages below refer to them
        os.replace(tmp / "report.md", out / "report.md")
        os.replace(tmp / "report.html", out / "report.html")
    except OSError as exc:
        raise HarnessError(f"cannot write report into {out}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(out, keep=assets)
    return out / "report.html"


def _remove_stale(out: Path, keep: str) -> None:
    """Delete assets folders no current page refers to, and temp folders crashed writers left behind.

    A concurrent writer's folders survive: its assets are kept once its page is in place (the page names
    them), and temp folders younger than an hour are left alone.
    """
    referenced = {keep}
    for page in ("report.html", "report.md"):
        try:
            referenced |= set(_ASSETS_REF_RE.findall((out / page).read_text(encoding="utf-8")))
        except OSError:
            pass
    now = time.time()
    for p in out.iterdir():
        if not p.is_dir():
            continue
        stale_tmp = p.name.startswith(_TMP_PREFIX) and now - p.stat().st_mtime > _TMP_MAX_AGE_S
        if stale_tmp or (_ASSETS_RE.match(p.name) and p.name not in referenced):
            shutil.rmtree(p, ignore_errors=True)
