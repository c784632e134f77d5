"""The console summary: at most 20 actionable lines, whatever the verdict holds."""
from __future__ import annotations

import io
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from harness.errors import HarnessError
from harness.report import load_verdict, print_gate_summary, print_summary, render_gate_summary, render_summary
from harness.report.samples import sample_perf, sample_verdict
from harness.report.summary import MAX_LINES, against_thresholds
from harness.spec import model_spec, taps


def test_passing_verdict_says_pass_coverage_and_time():
    text = render_summary(sample_verdict("llama-3.2-1b"), elapsed_s=3.25)
    lines = text.splitlines()
    assert lines[0].startswith("PASS llama-3.2-1b scale=tiny seed=0 mode=cumulative")
    assert "coverage: compared 144; required missing: none; not exposed: 0" in lines
    assert lines[-1] == "time: 3.2 s" or lines[-1] == "time: 3.3 s"
    assert "first failure" not in text


def test_prefill_failure_names_tap_thresholds_hint_and_elements():
    v = sample_verdict("qwen3-0.6b", fail_phase="prefill", fail_tap="layers.1.q_rope")
    lines = render_summary(v, elapsed_s=1.0).splitlines()
    assert lines[0].startswith("FAIL qwen3-0.6b")
    assert lines[1] == "first failure: prefill layers.1.q_rope (step)"
    judged = next(ln for ln in lines if "judged by calibrated" in ln)
    ff = v["first_failure"]["metrics"]
    assert f"r {ff['r']:.4g} > max 2" in judged and f"r_tail {ff['r_tail']:.4g} > max 3" in judged
    assert any(ln.startswith("  hint: RoPE") for ln in lines)
    assert any("stays high downstream" in ln for ln in lines)
    tok, head, dim = v["first_failure"]["localisation"]["worst_elements"][0][:3]
    assert any(f"t{tok} h{head} d{dim}" in ln for ln in lines)
    n_failed = sum(not r["passed"] for r in v["results"])
    assert any(ln.startswith(f"failed: {n_failed} taps in 3 phases: prefill") for ln in lines)


def test_decode_spike_failure():
    v = sample_verdict("qwen2.5-0.5b", fail_phase="decode.1", fail_tap="layers.0.down", kind="spike")
    text = render_summary(v)
    assert "first failure: decode.1 layers.0.down (spike)" in text
    assert "returns to baseline downstream" in text
    assert "failed: 1 tap in 1 phase: decode.1 1" in text
    assert "t0 f" in text  # down is not per-head: token and feature only


def test_hundreds_of_failures_fit_in_twenty_lines():
    not_exposed = tuple(f"layers.{i}.{k}" for i in range(3) for k in ("q", "k", "v", "attn"))
    v = sample_verdict("qwen3-4b", scale="small", decode_steps=12, fail_phase="prefill", fail_tap="embed",
                       not_exposed=not_exposed, perf=sample_perf("qwen3-4b", regression=True))
    v["first_failure"]["hint"] = "a very long hint\nspanning lines " * 40
    assert sum(not r["passed"] for r in v["results"]) > 500
    lines = render_summary(v, elapsed_s=99.0).splitlines()
    assert len(lines) <= MAX_LINES
    assert all(len(ln) <= 260 for ln in lines)
    assert any(ln.startswith("perf: 1 regression in 2 comparisons") for ln in lines)
    assert any("not exposed: 12 (layers.0.q, layers.0.k, layers.0.v, +9 more)" in ln for ln in lines)


def test_nan_metrics_and_missing_required_taps_are_shown():
    v = sample_verdict("qwen3-0.6b", fail_phase="prefill", fail_tap="layers.0.q", nan_at_failure=True,
                       not_exposed=("layers.2.out",))
    text = render_summary(v)
    assert "r nan (limit 2)" in text and "max_abs=inf" in text
    assert "required missing: layers.2.out" in text


def test_perf_regression_on_a_correct_run_heads_the_summary():
    v = sample_verdict("qwen3-0.6b", perf=sample_perf(regression=True))
    assert render_summary(v).startswith("PERF REGRESSION qwen3-0.6b")
    v["perf"] = {"comparisons": sample_perf()}  # the dict form is read too
    assert render_summary(v).startswith("PASS")
    v["perf"] = "fast"
    with pytest.raises(HarnessError, match="perf must be"):
        render_summary(v)


def test_nothing_compared_never_reads_as_pass():
    v = sample_verdict("qwen3-0.6b")
    v["results"], v["coverage"]["compared"] = [], 0
    assert render_summary(v).startswith("NOTHING COMPARED")


def test_thresholds_direction_and_unknown_keys():
    text = against_thresholds({"cosine": 0.93, "r": 1.2}, {"cosine_min": 0.99, "r": 2, "rtol": 0.016})
    assert text == "cosine 0.93 < min 0.99; r 1.2 <= max 2; rtol=0.016"
    assert against_thresholds({"cosine": 0.995}, {"cosine": 0.99}) == "cosine 0.995 >= min 0.99"


@pytest.mark.parametrize("bad, match", [({"schema": 2, "model": "m", "passed": True, "results": []}, "schema 2"),
                                        ({"schema": 1, "model": "m"}, "lacks key"),
                                        ([], "expected a verdict dict")])
def test_bad_verdicts_are_named(bad, match):
    with pytest.raises(HarnessError, match=match):
        render_summary(bad)


def test_load_verdict_names_the_file(tmp_path):
    good = tmp_path / "v.json"
    good.write_text(json.dumps(sample_verdict("qwen3-0.6b")))
    assert load_verdict(good)["model"] == "qwen3-0.6b"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HarnessError, match="bad.json"):
        load_verdict(bad)
    with pytest.raises(HarnessError, match="missing.json"):
        load_verdict(tmp_path / "missing.json")


def _rich_text(fn, *args, **kw) -> str:
    buf = io.StringIO()
    fn(*args, Console(file=buf, width=40, color_system=None), **kw)
    return buf.getvalue().rstrip("\n")


def test_print_summary_prints_the_same_lines_unwrapped_and_unmarked():
    v = sample_verdict("qwen3-0.6b", fail_phase="decode.0", fail_tap="layers.2.attn")
    v["first_failure"]["hint"] = "[bold]not markup[/bold] check the mask"
    assert _rich_text(print_summary, v, elapsed_s=2.0) == render_summary(v, elapsed_s=2.0)
    assert "[bold]not markup[/bold]" in render_summary(v)


def test_gate_summary_one_line_per_model_and_first_failing_detail():
    verdicts = [sample_verdict(m) for m in model_spec.names()]
    verdicts[4] = sample_verdict(verdicts[4]["model"], fail_phase="prefill", fail_tap="layers.1.q_rope")
    verdicts[7] = sample_verdict(verdicts[7]["model"], fail_phase="decode.1", fail_tap="logits", kind="spike")
    lines = render_gate_summary(verdicts, 42.0).splitlines()
    assert len(lines) <= MAX_LINES
    assert lines[0] == "FAIL gate: 7 of 9 models passed in 42.0 s"
    assert sum(ln.startswith("  PASS ") for ln in lines) == 7
    assert f"-- {verdicts[4]['model']} (first model not passing) --" in lines
    assert "first failure: prefill layers.1.q_rope (step)" in lines
    assert _rich_text(print_gate_summary, verdicts, elapsed_s=42.0) == "\n".join(lines)


def test_gate_summary_with_many_failing_models_still_fits():
    verdicts = [sample_verdict("qwen3-0.6b", seed=s, fail_phase="prefill" if s % 2 else None, fail_tap="embed")
                for s in range(30)]
    lines = render_gate_summary(verdicts).splitlines()
    assert len(lines) <= MAX_LINES
    assert "  PASS (15): " in "\n".join(lines)
    assert any("more models not passing" in ln for ln in lines)
    with pytest.raises(HarnessError, match="no verdicts"):
        render_gate_summary([])


_MODELS = st.sampled_from(model_spec.names())


@settings(max_examples=25, deadline=None)
@given(model=_MODELS, steps=st.integers(0, 4), data=st.data(), kind=st.sampled_from(["step", "spike"]),
       nan=st.booleans(), elapsed=st.none() | st.floats(0, 1e5))
def test_summary_is_short_and_names_the_first_failure(model, steps, data, kind, nan, elapsed):
    spec = model_spec.get(model, "tiny")
    phase = data.draw(st.none() | st.sampled_from(taps.phase_names(steps)))
    tap = data.draw(st.sampled_from(taps.tap_names(spec)))
    v = sample_verdict(model, decode_steps=steps, fail_phase=phase, fail_tap=tap, kind=kind, nan_at_failure=nan)
    lines = render_summary(v, elapsed_s=elapsed).splitlines()
    assert 1 <= len(lines) <= MAX_LINES
    assert lines[0].split()[0] == ("PASS" if phase is None else "FAIL")
    if phase is not None:
        assert lines[1] == f"first failure: {phase} {tap} ({kind})"
    if elapsed is not None and math.isfinite(elapsed):
        assert lines[-1].startswith("time: ")


def test_reads_verdicts_as_harness_encodes_them():
    """Verdict.to_dict() writes NaN / inf as strings and harness.perf's comparisons carry p_worse, not p_value."""
    from harness.perf.stats import compare
    from harness.verdict.verdict import _json_safe

    base = [10.0, 10.1, 9.9, 10.05, 9.95, 10.02, 10.0, 9.98]
    slow = [1.15 * x for x in base]
    perf = [{"model": "qwen3-0.6b", "metric": "ttft", "unit": "ms", **compare(base, slow).to_dict()}]
    v = json.loads(json.dumps(_json_safe(sample_verdict("qwen3-0.6b", fail_phase="prefill", fail_tap="layers.0.k",
                                                        nan_at_failure=True, perf=perf))))
    assert v["first_failure"]["metrics"]["r"] == "nan"
    v["provenance"]["elapsed_s"] = 4.5
    text = render_summary(v)
    assert "judged by calibrated: r nan (limit 2); r_tail nan (limit 3)" in text
    assert "max_abs=inf" in text
    assert "perf: 1 regression in 1 comparison: qwen3-0.6b ttft regression 1.15x (p=" in text
    assert "(p=-)" not in text
    assert text.endswith("time: 4.5 s")  # from the provenance when the caller gives no time


def test_a_failure_without_numbers_states_its_reason():
    """A wrong tap shape is judged by no policy: the first-failure block still says why (issue 13)."""
    v = sample_verdict("qwen3-0.6b", fail_phase="prefill")
    v["first_failure"].update({"judgement": None, "metrics": {}, "hint": "no known signature",
                               "message": "tap layers.0.q: shape (64, 128), expected (64, 256)"})
    text = render_summary(v)
    assert "why: tap layers.0.q: shape (64, 128), expected (64, 256)" in text
