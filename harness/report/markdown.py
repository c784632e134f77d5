"""report.md: the same content as report.html, in GitHub-flavoured Markdown (images as files beside it)."""
from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import quote

from harness.report.model import OVERVIEW_HEADER, PERF_HEADER, TABLE_HEADER, ReportContent, Row

# Characters Markdown (or inline HTML) would interpret inside text and table cells.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def escape(text: str) -> str:
    """Escape Markdown and inline-HTML syntax; newlines become spaces so a cell stays one cell."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    out = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return out + [""]


def _row_cells(r: Row) -> tuple[str, ...]:
    tap = f"{r.tap} (first failure)" if r.first else r.tap
    return (r.model, r.phase, tap, "pass" if r.passed else "FAIL", r.r, r.r_tail, r.r_bias, r.cosine)


def _image(assets: str, name: str, caption: str) -> str:
    return f"![{escape(caption)}]({quote(assets)}/{quote(name)})"


def render_markdown(content: ReportContent, assets: str) -> str:
    """The Markdown report for ``content``; ``assets`` is the relative folder holding the PNGs."""
    out = [f"# {escape(content.title)}", "", f"Generated {escape(content.generated)}.", "", "## Overview", ""]
    out += _table(OVERVIEW_HEADER, content.overview)
    for s in content.sections:
        out += [f"## {escape(s.title)}: {escape(s.status)}", "", "### Summary", ""]
        # A fenced block shows the console lines verbatim; a longer fence than any backtick run in
        # the text keeps a hint holding backticks from closing it early.
        fence = "`" * max(3, 1 + max((len(m) for line in s.summary for m in re.findall(r"`+", line)), default=0))
        out += [fence + "text", *s.summary, fence, ""]
        if s.image:
            out += ["### Error by layer", "", _image(assets, s.image.name, s.image.caption), ""]
        if s.perf:
            out += ["### Performance", ""] + _table(PERF_HEADER, s.perf)
        out += ["### Verdict table", ""]
        if s.failed_rows:
            out += [f"Failing taps ({len(s.failed_rows)}), in execution order:", ""]
            out += _table(TABLE_HEADER, map(_row_cells, s.failed_rows))
        else:
            out += ["No failing taps.", ""]
        if s.passed_rows:
            # GitHub renders <details>; the blank lines around the table let Markdown parse it inside.
            out += ["<details>", f"<summary>Passing taps ({len(s.passed_rows)})</summary>", ""]
            out += _table(TABLE_HEADER, map(_row_cells, s.passed_rows))
            out += ["</details>", ""]
    if content.trends:
        out += ["## Performance trends", ""]
        for img in content.trends:
            out += [_image(assets, img.name, img.caption), ""]
    return "\n".join(out)
