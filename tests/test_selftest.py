"""The gate self-test: the CI subset meets its targets, the scoreboard's rules, calibration, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.compare.policies import CALIBRATED_THRESHOLDS, threshold_prefix
from harness.deployment.emulator.faults import FAULTS
from harness.selftest.calibration import FAMILIES, derive, ratios, rejudge, summarise
from harness.deployment.validation import IMPRECISE, MEMBERS
from harness.selftest.bug_shapes import SHAPES
from harness.selftest.runner import (
    CLASSIC, OURS, POLICIES, Case, CaseResult, load_results, member_population, quick_population, run_cases,
    save_results, shape_population,
)
from harness.selftest.scoreboard import Row, Scoreboard, dominates


@pytest.fixture(scope="module")
def quick(golden_root: Path) -> list[CaseResult]:
    """The CI subset (`harness selftest --quick`) on both cores, per-tap metrics kept."""
    return run_cases(quick_population(), jobs=2, golden_dir=golden_root, keep_taps=True)


def test_quick_selftest_meets_targets(quick: list[CaseResult]) -> None:
    """CI gate: a policy change that loses detection or localisation, or raises a false alarm, fails here."""
    board = Scoreboard.build(quick)
    assert not board.errors
    assert board.counts["faults"] == len(FAULTS) and board.counts["models"] == 9
    # the three populations: every validation member (the imprecise one included) and every bug shape
    assert [v["member"] for v in board.validation] == sorted(
        [n for n, m in MEMBERS.items() if m.split == "calibration"]) + sorted(
        [n for n, m in MEMBERS.items() if m.split == "heldout"]) + list(IMPRECISE)
    assert {sh["shape"] for sh in board.shapes} == set(SHAPES)
    # every target but the bug shapes' 99.5% (reported, and `harness selftest` exits 1 while it is
    # missed: 1% noise on decode attention is as large as a correct flash attention's own error)
    assert [f for f in board.failures() if not f.startswith("shape ")] == [], "\n".join(board.failures() + board.misses)
    gross = [sh for sh in board.shapes if sh["shape"] in ("sparse", "channel", "rtz", "stale", "sign", "scale")]
    assert all(sh["policies"][OURS] == [sh["runs"], sh["runs"]] for sh in gross), board.misses
    ours = board.rows[OURS]
    assert ours.detected == ours.fault_runs and ours.false_alarms == 0
    # The classic policies are scored on the same traces: each loses somewhere.
    assert all(dominates(ours, board.rows[name]) for name in CLASSIC)
    assert board.rows["torch-bf16"].false_alarms > 0          # bf16 rounding breaks rtol 1.6e-2 / atol 1e-5
    assert board.rows["top5-walk"].localisation < 0.5         # logits only: it cannot say where


def test_hints_right_for_every_fault_in_the_quick_run(quick: list[CaseResult]) -> None:
    board = Scoreboard.build(quick)
    wrong = [f["fault"] for f in board.faults if f["hint_right"] != f["models"]]
    assert wrong == []


def test_rejudge_with_current_thresholds_reproduces_the_gate(quick: list[CaseResult]) -> None:
    """Offline re-judging from the stored metrics gives exactly the live check's outcome."""
    again = rejudge(quick, dict(CALIBRATED_THRESHOLDS))
    assert [r.outcomes[OURS] for r in again] == [r.outcomes[OURS] for r in quick]


def test_calibration_summary_and_derived_thresholds(quick: list[CaseResult]) -> None:
    summary = summarise(ratios(quick))
    assert set(summary) == set(FAMILIES)
    for fam, (mode, phase) in FAMILIES.items():
        prefix, row = threshold_prefix(phase, mode), summary[fam]
        assert row["count"] > 0 and 0 < row["r_p999"] <= row["r_max"] and row["tail_p999"] <= row["tail_max"]
        # the clean runs sit under the shipped thresholds (no false alarm) ...
        assert row["r_max"] <= CALIBRATED_THRESHOLDS[f"{prefix}r_max"]
        assert row["tail_max"] <= CALIBRATED_THRESHOLDS[f"{prefix}tail_max"]
        assert 0 <= row["bias_p999"] <= row["bias_max"] <= CALIBRATED_THRESHOLDS[f"{prefix}bias_max"]
    th = derive(summary, margin=1.5)
    assert th["r_max"] >= 1.5 * summary["prefill"]["r_max"] and th["r_max"] % 0.25 == 0
    assert th["decode_tail_max"] >= 1.5 * summary["decode"]["tail_max"] and th["decode_tail_max"] % 0.5 == 0
    assert th["isolated_decode_r_max"] >= 1.5 * summary["isolated_decode"]["r_max"]
    assert th["isolated_decode_bias_max"] >= 1.5 * summary["isolated_decode"]["bias_max"]
    assert th["isolated_decode_bias_max"] % 0.5 == 0
    assert th["r_floor"] == CALIBRATED_THRESHOLDS["r_floor"]
    # ... and thresholds at the clean maximum itself still pass every clean run
    tight = dict(th)
    for fam, (mode, phase) in FAMILIES.items():
        prefix = threshold_prefix(phase, mode)
        for key in ("r", "tail", "bias"):
            tight[f"{prefix}{key}_max"] = summary[fam][f"{key}_max"]
    assert all(r.outcomes[OURS]["passed"] for r in rejudge(quick, tight)
               if r.case.fault == "clean" and not r.case.shape and r.expected is None)


def _result(model: str, seed: int, mode: str, fault: str, outcomes: dict, expected: str | None = None,
            hint: str | None = None) -> CaseResult:
    full = {p: {"passed": True, "first": None} for p in POLICIES}
    full.update(outcomes)
    return CaseResult(Case(model, seed, mode, fault), expected, full, hint)


def test_scoreboard_combines_modes_as_the_gate() -> None:
    """Detected when either mode fails; localisation and hint from the isolated run when it failed."""
    exp = "prefill/layers.0.attn"
    fail_at = lambda tap: {OURS: {"passed": False, "first": tap}}  # noqa: E731
    results = [
        _result("m", 0, "cumulative", "causal_mask_off_by_one", fail_at("prefill/layers.0.q"), exp, "x"),
        _result("m", 0, "isolated", "causal_mask_off_by_one", fail_at(exp), exp, "causal_mask: shifted"),
        _result("m", 0, "cumulative", "wrong_attention_scale", fail_at(exp), exp, "attn_scale: 1/d"),
        _result("m", 0, "isolated", "wrong_attention_scale", {}, exp),
        _result("m", 0, "cumulative", "clean", {}),
        _result("m", 0, "isolated", "clean", fail_at("decode.1/logits")),
    ]
    board = Scoreboard.build(results)
    ours = board.rows[OURS]
    assert (ours.fault_runs, ours.detected, ours.localised) == (2, 2, 2)
    assert (ours.clean_runs, ours.false_alarms) == (1, 1)
    assert ours.per_mode["isolated"]["detected"] == 1 and ours.per_mode["cumulative"]["localised"] == 1
    assert [f["hint_right"] for f in board.faults] == [1, 1]
    assert any("false alarm" in f for f in board.failures())
    assert "false alarm m/seed0/clean: decode.1/logits" in board.misses
    md = board.to_markdown()
    assert "| calibrated |" in md and "| causal_mask_off_by_one | 1 | 1/1 |" in md


def test_dominance_is_strict() -> None:
    def row(loc: int, fa: int) -> Row:
        return Row("p", fault_runs=10, detected=10, localised=loc, clean_runs=10, false_alarms=fa)
    assert dominates(row(10, 0), row(9, 0)) and dominates(row(10, 0), row(10, 1))
    assert not dominates(row(10, 0), row(10, 0))                  # equal is not strictly better
    assert not dominates(row(10, 1), row(9, 0)) and not dominates(row(9, 0), row(10, 1))   # a trade-off


def test_cli_writes_reports_and_exit_code_follows_targets(golden_root: Path, tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    res = CliRunner().invoke(app, ["selftest", "--quick", "--models", "qwen3-0.6b", "--faults", "skipped_residual",
                                   "--members", "none", "--shapes", "none", "--jobs", "1", "--golden-dir", str(golden_root), "--json", str(out_json),
                                   "--md", str(out_md)])
    data = json.loads(out_json.read_text())
    assert res.exit_code == (0 if data["passed"] else 1), res.output
    assert data["counts"] == {"checks": 6, "fault_runs": 1, "clean_runs": 2, "models": 1, "faults": 1, "clean_seeds": 2,
                              "validation_runs": 0, "shape_runs": 0}
    assert [p["policy"] for p in data["policies"]] == list(POLICIES)
    assert data["faults"][0]["fault"] == "skipped_residual" and data["faults"][0]["hint_right"] == 1
    assert out_md.read_text().startswith("# Gate self-test")


@pytest.mark.parametrize("args, word", [(["--models", "gpt-5"], "gpt-5"), (["--faults", "cosmic_ray"], "cosmic_ray"),
                                        (["--members", "numpy-fp16"], "numpy-fp16"), (["--shapes", "wobble"], "wobble")])
def test_cli_bad_names_exit_3(args: list[str], word: str) -> None:
    res = CliRunner().invoke(app, ["selftest", "--quick", *args])
    assert res.exit_code == 3 and word in res.output


def test_scoreboard_reports_validation_members_and_shapes() -> None:
    """A correct member's failing run is a false alarm of its member (split shown); the imprecise member
    must fail at its expected tap; a shape run is detected when either mode fails, localised at its target."""
    fail_at = lambda tap: {OURS: {"passed": False, "first": tap}}  # noqa: E731
    fp32, imprecise = "numpy-fp32", next(iter(IMPRECISE))
    exp = f"prefill/{IMPRECISE[imprecise].expected_failure}"
    res = [
        CaseResult(Case("m", 0, "cumulative", "clean", fp32), None, {p: {"passed": True, "first": None} for p in POLICIES}),
        CaseResult(Case("m", 0, "isolated", "clean", fp32), None, {**{p: {"passed": True, "first": None} for p in POLICIES},
                                                                  **fail_at("decode.1/layers.1.attn")}),
        CaseResult(Case("m", 0, "isolated", "clean", imprecise), exp, {**{p: {"passed": True, "first": None} for p in POLICIES},
                                                                      **fail_at(exp)}),
        CaseResult(Case("m", 0, "isolated", "clean", "emulator", "noise", "decode.2/layers.0.q"), "decode.2/layers.0.q",
                   {**{p: {"passed": True, "first": None} for p in POLICIES}, **fail_at("decode.2/layers.0.q")}, "x: y"),
        CaseResult(Case("m", 0, "isolated", "clean", "emulator", "head", "prefill/layers.0.k"), "prefill/layers.0.k",
                   {p: {"passed": True, "first": None} for p in POLICIES}),
    ]
    board = Scoreboard.build(res)
    v = {x["member"]: x for x in board.validation}
    assert v[fp32]["split"] == "calibration" and v[fp32]["policies"][OURS] == [1, 0] and v[fp32]["runs"] == 1
    assert v[imprecise]["policies"][OURS] == [1, 1]
    sh = {x["shape"]: x for x in board.shapes}
    assert sh["noise"]["by_phase"] == {"decode": [1, 1, 1]} and sh["noise"]["hints"] == {"x": 1}
    assert sh["head"]["by_phase"] == {"prefill": [1, 0, 0]}
    failures = board.failures()
    assert any("numpy-fp32" in f and "false alarm" in f for f in failures)
    assert any(f.startswith("shape head (prefill)") for f in failures)
    assert not any(imprecise in f for f in failures)
    md = board.to_markdown()
    assert "| numpy-fp32 | calibration | 1 | 1 |" in md and "| noise | 1 | 0/0 of 0 | 1/1 of 1 |" in md


def test_populations_ids_and_saved_runs_round_trip(tmp_path: Path) -> None:
    members = member_population(["qwen3-0.6b"], [3], ["numpy-fp32"])
    shapes = shape_population(["qwen3-0.6b", "llama-3.2-1b"], [0, 1], ["noise"], targets=2)
    assert [c.id for c in members] == ["numpy-fp32:qwen3-0.6b/seed3/cumulative/clean", "numpy-fp32:qwen3-0.6b/seed3/isolated/clean"]
    assert len(shapes) == 2 * 2 * 2 * 2 and {c.population for c in shapes} == {"shapes"}
    assert [c.target.split("/")[0] == "prefill" for c in shapes[::2]] == [True, False] * 4    # alternating phases
    assert shapes == shape_population(["qwen3-0.6b", "llama-3.2-1b"], [0, 1], ["noise"], targets=2)   # seeded
    r = CaseResult(shapes[0], shapes[0].target, {OURS: {"passed": False, "first": shapes[0].target}}, "h: x", None, 1.5,
                   [("prefill", "embed", "embed", {"r": float("nan"), "r_bias": 2.0}, True)])
    save_results([r], tmp_path / "runs.jsonl")
    (back,) = load_results(tmp_path / "runs.jsonl")
    assert back.case == r.case and back.outcomes == r.outcomes and back.taps[0][3]["r_bias"] == 2.0
    assert back.taps[0][3]["r"] != back.taps[0][3]["r"]                                      # NaN survives
