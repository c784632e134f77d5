"""PNG plots for the reports: per-layer error of one verdict, and performance trends.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg renderer, never through
pyplot: no display, no global backend switch, nothing left open between calls.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.report import reading
from harness.report.model import TrendSeries
from harness.spec import taps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# 1 - cosine of identical tensors is 0, which a log axis cannot show; it sits on this floor instead.
COS_FLOOR = 1e-9
_MAX_LABELLED_PHASES = 6  # more decode steps share one legend entry
_DPI = 100


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" metadata: the same figure gives the same bytes whatever matplotlib version wrote it.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _x(name: str, n_layers: int) -> float | None:
    """x position of a tap: embed at -1, layer i's ops spread over [i - 0.4, i + 0.4], then final_norm, logits."""
    try:
        tap = taps.parse(name)
    except HarnessError:
        return None
    if tap.layer is not None:
        return tap.layer - 0.4 + 0.8 * taps.LAYER_KINDS.index(tap.kind) / (len(taps.LAYER_KINDS) - 1)
    if tap.kind == "embed":
        return -1.0
    return float(n_layers + taps.GLOBAL_TAIL.index(tap.kind))


def _is_chain(name: str) -> bool:
    """Taps on the residual-stream line: embed, every layer's out, final_norm, logits."""
    return name in ("embed", "final_norm", "logits") or name.endswith(".out")


def _values(results: list[dict[str, Any]], metric: str) -> list[float]:
    vals = [reading.as_float(r.get("metrics", {}).get(metric)) for r in results]
    if metric == "cosine":  # plotted as 1 - cosine so that 0.9999 and 0.99 are far apart
        vals = [max(1.0 - v, COS_FLOOR) if math.isfinite(v) else v for v in vals]
    return vals


def _top(values: list[float]) -> float:
    """Where non-finite values are drawn: a decade above the largest finite positive value."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return max(finite, default=1.0) * 10


def _threshold(verdict: dict[str, Any], metric: str) -> float | None:
    thr = ((verdict.get("first_failure") or {}).get("judgement") or {}).get("thresholds") or {}
    for key in (metric, f"{metric}_max", f"max_{metric}"):
        if isinstance(thr.get(key), (int, float)) and not isinstance(thr.get(key), bool):
            return float(thr[key])
    return None


# Metrics the calibrated policy judges: key in the results' metrics -> (short name, axis label).
METRIC_LABELS = {"r": ("R", "R = |dut - fp32| / |bf16 - fp32|"),
                 "r_tail": ("r_tail", "r_tail = p99 ULP error / bf16's"),
                 "r_bias": ("r_bias", "r_bias = lean along the golden (t) / bf16's")}


def failing_metric(verdict: dict[str, Any]) -> str:
    """The metric that failed the first failing tap (``r``, ``r_tail`` or ``r_bias``; ``r`` by default),
    read from the judgement's first reason: the plot shows that metric against its own limit."""
    reasons = ((verdict.get("first_failure") or {}).get("judgement") or {}).get("reasons") or []
    first = str(reasons[0]).split(" ", 1)[0] if reasons else ""
    return {"R": "r", "r_tail": "r_tail", "r_bias": "r_bias"}.get(first, "r")


def layer_error_png(verdict: dict[str, Any], *, all_taps: bool = True) -> bytes:
    """The failing metric (R unless the first failure failed on r_tail or r_bias) and 1 - cosine by
    layer for prefill and every decode phase, as PNG bytes, the metric against its limit.

    Lines follow the residual stream (embed, ``layers.i.out``, final_norm, logits); with ``all_taps``
    (default True) every other tap is a light point inside its layer, in execution order. Failing
    taps are red crosses, non-finite values red triangles on the top edge, the first failure is named.
    """
    reading.validate(verdict)
    results = [r for r in reading.sorted_results(verdict) if reading.tap_position(r["tap"])[0] < 1 << 30]
    if not results:
        raise HarnessError(f"verdict for {verdict['model']}: no canonical taps to plot")
    layers = [taps.parse(r["tap"]).layer for r in results]
    n_layers = max((lyr for lyr in layers if lyr is not None), default=-1) + 1
    phases = list(dict.fromkeys(r["phase"] for r in results))
    # matplotlib here, not at import: it costs ~0.5 s of every CLI start, and most commands draw nothing.
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cmap = colormaps["viridis"]

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    lead = failing_metric(verdict)
    for ax, metric, label in ((axes[0], lead, METRIC_LABELS[lead][1]),
                              (axes[1], "cosine", "1 - cosine")):
        all_vals = _values(results, metric)
        top = _top(all_vals)
        for p_i, phase in enumerate(phases):
            rows = [(r, v) for r, v in zip(results, all_vals) if r["phase"] == phase]
            color = "black" if phase == "prefill" else cmap(0.15 + 0.7 * p_i / max(len(phases) - 1, 1))
            chain = [(_x(r["tap"], n_layers), v) for r, v in rows if _is_chain(r["tap"]) and math.isfinite(v)]
            labelled = p_i < _MAX_LABELLED_PHASES or p_i == len(phases) - 1
            if chain:
                ax.plot(*zip(*chain), marker="o", ms=3, lw=1.2, color=color, label=phase if labelled else None)
            if all_taps:
                light = [(_x(r["tap"], n_layers), v) for r, v in rows if not _is_chain(r["tap"]) and math.isfinite(v)]
                if light:
                    ax.scatter(*zip(*light), s=6, color=color, alpha=0.25, linewidths=0)
            bad = [(_x(r["tap"], n_layers), v) for r, v in rows if not r["passed"] and math.isfinite(v)]
            if bad:
                ax.scatter(*zip(*bad), marker="x", s=18, color="red", linewidths=1, zorder=3)
            nonfinite = [_x(r["tap"], n_layers) for r, v in rows if not math.isfinite(v)]
            if nonfinite:
                ax.scatter(nonfinite, [top] * len(nonfinite), marker="^", s=30, color="red", zorder=3)
        if any(not math.isfinite(v) for v in all_vals):
            ax.annotate("nan / inf", (1.0, top), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                        color="red", fontsize=8)
        thr = _threshold(verdict, metric)
        if thr is not None and thr > 0:
            ax.axhline(thr, color="red", ls="--", lw=0.8, label=f"{METRIC_LABELS.get(metric, (metric,))[0]} limit {thr:g}")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
    ff = verdict.get("first_failure")
    heading = f"{reading.status(verdict)} {reading.title(verdict)}"
    if ff and _x(ff["tap"], n_layers) is not None:
        heading += f" - first failure (red line): {ff['phase']} {ff['tap']}"
        for ax in axes:
            ax.axvline(_x(ff["tap"], n_layers), color="red", lw=0.8, alpha=0.6)
    for ax in axes:  # alternate bands show where each layer's taps sit
        for layer in range(0, n_layers, 2):
            ax.axvspan(layer - 0.45, layer + 0.45, color="0.5", alpha=0.07, lw=0)
    ticks = [-1.0, *range(n_layers), float(n_layers), float(n_layers + 1)]
    axes[1].set_xticks(ticks, ["embed", *map(str, range(n_layers)), "final_norm", "logits"],
                       rotation=45 if n_layers > 16 else 0, fontsize=8)
    axes[1].set_xlabel("layer (points inside a layer: its taps in execution order)")
    # R near 1 is the healthy value: keep 0.5..4 in view so a clean run is not magnified into noise.
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(min(lo, 0.5), max(hi, 4.0))
    axes[0].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8,
               ncols=min(len(phases) + 1, 8))
    fig.suptitle(heading, fontsize=10)
    return _png(fig)


def trend_png(series: TrendSeries) -> bytes:
    """One metric of one model over runs, regressions marked with red triangles, as PNG bytes."""
    xs = range(len(series.points))
    labels = [lbl for lbl, _ in series.points]
    values = [v for _, v in series.points]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    finite = [(x, v) for x, v in zip(xs, values) if math.isfinite(v)]
    ax.plot(*zip(*finite), marker="o", ms=3, lw=1.2, color="tab:blue", label=series.metric)
    regs = [(i, values[i]) for i in series.regressions if math.isfinite(values[i])]
    if regs:
        ax.scatter(*zip(*regs), marker="v", s=60, color="red", zorder=3, label="regression")
    ax.set_ylabel(f"{series.metric} [{series.unit}]" if series.unit else series.metric)
    step = max(1, len(labels) // 20)  # at most ~20 tick labels stay readable
    ax.set_xticks(list(xs)[::step], labels[::step], rotation=45, ha="right", fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{series.model}: {series.metric}", fontsize=10)
    return _png(fig)
