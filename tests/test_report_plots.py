"""Per-layer error plots and performance trend plots: valid, non-blank PNGs for any verdict."""
from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.image import imread

from harness.errors import HarnessError
from harness.report import TrendSeries
from harness.report.plots import layer_error_png, trend_png
from harness.report.samples import sample_verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pixels(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_MAGIC)
    return imread(io.BytesIO(png), format="png")


def _non_blank(img: np.ndarray) -> bool:
    # A drawn figure has many distinct colours; a blank canvas has one.
    return len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20


@pytest.mark.parametrize("kwargs", [
    {},
    {"fail_phase": "prefill", "fail_tap": "layers.1.q_rope"},
    {"fail_phase": "decode.1", "fail_tap": "layers.2.attn", "kind": "spike", "nan_at_failure": True},
])
def test_layer_plot_is_a_drawn_png(kwargs):
    img = _pixels(layer_error_png(sample_verdict("qwen3-0.6b", **kwargs)))
    assert img.shape[0] > 400 and img.shape[1] > 700
    assert _non_blank(img)


def test_layer_plot_marks_failures_in_red():
    def red_pixels(png: bytes) -> int:
        rgb = _pixels(png)[..., :3]
        return int(((rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)).sum())

    clean = red_pixels(layer_error_png(sample_verdict("qwen3-0.6b")))
    failing = red_pixels(layer_error_png(sample_verdict("qwen3-0.6b", fail_phase="prefill")))
    assert failing > clean + 500


def test_layer_plot_handles_many_decode_phases_and_only_out_taps():
    v = sample_verdict("llama-3.2-1b", decode_steps=10)
    v["results"] = [r for r in v["results"] if r["tap"].endswith(".out") or r["tap"] == "logits"]
    assert _non_blank(_pixels(layer_error_png(v, all_taps=False)))


def test_layer_plot_needs_canonical_taps():
    v = sample_verdict("qwen3-0.6b")
    v["results"] = [{"phase": "prefill", "tap": "gemm_op", "passed": True, "metrics": {"r": 1.0}}]
    with pytest.raises(HarnessError, match="no canonical taps"):
        layer_error_png(v)


def test_trend_plot_marks_regressions():
    pts = [(f"c{i:03d}", 40.0 + (i % 3) + (7.0 if i >= 20 else 0.0)) for i in range(45)]
    plain = _pixels(trend_png(TrendSeries("qwen3-0.6b", "ttft", "ms", pts)))
    marked = _pixels(trend_png(TrendSeries("qwen3-0.6b", "ttft", "ms", pts, [20])))
    assert _non_blank(marked)
    red = lambda im: int(((im[..., 0] > 0.9) & (im[..., 1] < 0.2) & (im[..., 2] < 0.2)).sum())  # noqa: E731
    assert red(marked) > red(plain) + 20


def test_trend_plot_skips_non_finite_points():
    s = TrendSeries("m", "tokens_per_s", "tok/s", [("a", 10.0), ("b", float("nan")), ("c", 11.0)], [1])
    assert _non_blank(_pixels(trend_png(s)))


@pytest.mark.parametrize("points, regs, match", [
    ([], (), "no points"),
    ([("a", 1.0)], (3,), "outside 0..0"),
    ([("a", float("inf"))], (), "no finite value"),
])
def test_trend_series_rejects_bad_input(points, regs, match):
    with pytest.raises(HarnessError, match=match):
        TrendSeries("m", "ttft", "ms", points, regs)


def test_layer_plot_reads_json_encoded_non_finite_metrics():
    v = sample_verdict("qwen3-0.6b", fail_phase="prefill", fail_tap="layers.0.v", nan_at_failure=True)
    res = next(r for r in v["results"] if r["tap"] == "layers.0.v" and r["phase"] == "prefill")
    res["metrics"].update(r="nan", cosine="-inf")  # as Verdict.to_dict() writes them
    assert _non_blank(_pixels(layer_error_png(v)))
