"""Data the reports are built from: performance trend series and the renderer-neutral report content.

The HTML and Markdown renderers take the same :class:`ReportContent`, so both files always say the
same thing; only the markup differs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.errors import HarnessError


@dataclass(frozen=True)
class TrendSeries:
    """One metric of one model over successive runs.

    ``points`` are ``(label, value)`` in run order (label: a commit, a date, a run id);
    ``regressions`` are indices into ``points`` that the perf gate judged a regression.
    """

    model: str
    metric: str
    unit: str
    points: tuple[tuple[str, float], ...]
    regressions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists from callers (JSON, SQL rows) but store tuples: the series is a value.
        object.__setattr__(self, "points", tuple((str(lbl), float(val)) for lbl, val in self.points))
        object.__setattr__(self, "regressions", tuple(int(i) for i in self.regressions))
        where = f"trend series {self.model}/{self.metric}"
        if not self.points:
            raise HarnessError(f"{where}: no points")
        bad = [i for i in self.regressions if not 0 <= i < len(self.points)]
        if bad:
            raise HarnessError(f"{where}: regression indices {bad} outside 0..{len(self.points) - 1}")
        if not any(math.isfinite(v) for _, v in self.points):
            raise HarnessError(f"{where}: no finite value to plot")

    @property
    def slug(self) -> str:
        """A file-name-safe identity, e.g. ``qwen3-0.6b_ttft_ms``."""
        raw = f"{self.model}_{self.metric}"
        return "".join(c if c.isalnum() or c in "-._" else "_" for c in raw)


@dataclass(frozen=True)
class Row:
    """One verdict-table row (one phase x tap of one model). Metrics are already formatted."""

    model: str
    phase: str
    tap: str
    passed: bool
    r: str
    r_tail: str
    r_bias: str
    cosine: str
    first: bool = False  # the verdict's first failure


@dataclass(frozen=True)
class Image:
    """A PNG the report shows: its file name beside the report and its caption."""

    name: str
    caption: str
    png: bytes = field(repr=False)


@dataclass(frozen=True)
class ModelSection:
    """Everything the report says about one verdict."""

    title: str  # model / scale / seed / mode
    status: str  # PASS, FAIL, PERF REGRESSION, NOTHING COMPARED
    summary: tuple[str, ...]  # the same lines as the console summary
    failed_rows: tuple[Row, ...]
    passed_rows: tuple[Row, ...]
    perf: tuple[tuple[str, ...], ...]  # perf comparison rows, formatted
    image: Image | None


@dataclass(frozen=True)
class ReportContent:
    """A whole report: the overview, one section per verdict, trend plots."""

    title: str
    generated: str
    overview: tuple[tuple[str, ...], ...]  # model, status, compared, failed, first failure
    sections: tuple[ModelSection, ...]
    trends: tuple[Image, ...]

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(s.image for s in self.sections if s.image is not None) + self.trends


OVERVIEW_HEADER = ("model", "verdict", "compared", "failed taps", "first failure")
TABLE_HEADER = ("model", "phase", "tap", "result", "R", "R tail", "R bias", "cosine")
PERF_HEADER = ("model", "metric", "verdict", "base median", "cand median", "ratio", "p", "reason")
