"""harness gate / list / explain: exit codes, JSON naming the first failing tap, JUnit XML, console budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.deployment.emulator.faults import FAULTS
from harness.spec.model_spec import get

MODEL = "qwen3-0.6b"
runner = CliRunner()


def _gate(golden_root: Path, *args: str):
    return runner.invoke(app, ["gate", "--model", MODEL, "--golden-dir", str(golden_root), *args])


def test_pass_exits_0_with_json_and_junit(golden_root: Path, tmp_path: Path) -> None:
    out, xml = tmp_path / "v.json", tmp_path / "r.xml"
    res = _gate(golden_root, "--phase", "3", "--json", str(out), "--junit", str(xml))
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()) <= 20
    doc = json.loads(out.read_text())
    assert doc["passed"] and doc["exit_code"] == 0 and doc["first_failure"] is None
    phases = {p["phase"]: p["status"] for p in doc["models"][0]["phases"]}
    assert phases == {0: "pass", 1: "pass", 2: "pass", 3: "pass"}  # the emulator has an op backend
    verdict = doc["models"][0]["verdicts"]["isolated"]
    assert verdict["schema"] == 1 and verdict["passed"]
    cases = ET.parse(xml).getroot().findall(".//testcase")
    names = {c.get("name") for c in cases}
    assert "isolated:prefill/layers.0.q_rope" in names and "cumulative:prefill/logits" in names
    assert not ET.parse(xml).getroot().findall(".//failure")


@pytest.mark.parametrize("fault", ["interleaved_rope", "missing_qk_norm"])
def test_fault_exits_1_and_json_names_first_failing_tap(golden_root: Path, tmp_path: Path, fault: str) -> None:
    out, xml = tmp_path / "v.json", tmp_path / "r.xml"
    res = _gate(golden_root, "--phase", "3", "--fault", fault, "--json", str(out), "--junit", str(xml))
    assert res.exit_code == 1, res.output
    doc = json.loads(out.read_text())
    phase, tap = FAULTS[fault].expected_tap(get(MODEL, "tiny"))
    assert (doc["first_failing_tap"]["phase"], doc["first_failing_tap"]["tap"]) == (phase, tap)
    ff = doc["first_failure"]
    if fault == "interleaved_rope":  # the bug lives inside the RoPE op: phase 1's rope cases fail first
        assert ff["gate_phase"] == 1 and ff["check"].startswith("rope[")
    else:  # q/k norm skipped between ops: no op case, phase 2 names the tap
        assert ff["tap"] == tap and ff["gate_phase"] == 2
    assert tap in res.output
    failures = ET.parse(xml).getroot().findall(".//testcase[failure]")
    assert f"isolated:{phase}/{tap}" in {c.get("name") for c in failures}


def test_decode_fault_fails_in_phase_5(golden_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    res = _gate(golden_root, "--phase", "5", "--mode", "cumulative", "--fault", "stale_kv_cache", "--json", str(out))
    assert res.exit_code == 1, res.output
    doc = json.loads(out.read_text())
    statuses = {p["phase"]: p["status"] for p in doc["models"][0]["phases"]}
    assert statuses[2] == statuses[3] == "pass" and statuses[5] == "fail" and statuses[4] == "measured"
    assert doc["first_failure"]["gate_phase"] == 5
    # The bug lives in decode attention; which step first exceeds the cumulative policy is the policy's call.
    assert doc["first_failure"]["phase"].startswith("decode.") and doc["first_failure"]["tap"] == "layers.0.attn"


def test_unknown_model_exits_3(golden_root: Path) -> None:
    res = runner.invoke(app, ["gate", "--model", "gpt-5", "--golden-dir", str(golden_root)])
    assert res.exit_code == 3
    assert "gpt-5" in res.output


@pytest.mark.parametrize("target, words", [
    ("broken_dep:factory", ["cannot import broken_dep", "ModuleNotFoundError"]),
    ("bad_deps:raises", ["kernel timed out", "RuntimeError"]),
    ("bad_deps:silent", ["no taps", "nothing was compared"]),
    ("bad_deps:nosuch", ["no attribute"]),
])
def test_broken_deployments_exit_3(golden_root: Path, tmp_path: Path, bad_deployments: str, target: str,
                                   words: list[str]) -> None:
    out = tmp_path / "v.json"
    res = _gate(golden_root, "--phase", "2", "-d", target, "--json", str(out))
    assert res.exit_code == 3, res.output
    doc = json.loads(out.read_text())
    assert doc["exit_code"] == 3 and not doc["passed"]
    text = json.dumps(doc)
    assert any(w in text for w in words), text[:2000]


def test_fault_needs_emulator(golden_root: Path) -> None:
    res = _gate(golden_root, "-d", "replay-fp32", "--fault", "interleaved_rope")
    assert res.exit_code == 3 and "--fault needs the emulator" in res.output


def test_list_names_models_phases_deployments_faults() -> None:
    res = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for word in ("qwen3-0.6b", "llama-3.2-1b", "recheck", "replay-fp32", "interleaved_rope", "stale_kv_cache"):
        assert word in res.output


def test_explain_names_hf_module_and_emulator_site() -> None:
    res = runner.invoke(app, ["explain", "layers.2.q_rope", "--model", MODEL], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "apply_rotary_pos_emb" in res.output
    assert "harness/deployment/emulator/model.py" in res.output and "K.rope(" in res.output
    assert "interleaved_rope" in res.output
    bad = runner.invoke(app, ["explain", "layers.0.nonsense"])
    assert bad.exit_code == 3 and "layers.0.nonsense" in bad.output
    missing = runner.invoke(app, ["explain", "layers.0.q_norm", "--model", "llama-3.2-1b"])
    assert missing.exit_code == 3 and "no q/k norm" in missing.output


def test_console_script_subprocess(golden_root: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("harness")
    out = tmp_path / "v.json"
    proc = subprocess.run([str(exe), "gate", "--model", MODEL, "--phase", "0", "--golden-dir", str(golden_root),
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    checks = {c["id"]: c["passed"] for c in doc["models"][0]["phases"][0]["checks"]}
    assert checks == {"golden_integrity": True, "residual_identity": True, "decode_matches_prefill": True,
                      "bf16_top1": True}
    assert "exit 0" in proc.stdout


def test_headline_is_the_exit_codes_verdict(golden_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One truth: taps all pass but phase 0 fails -> the headline says FAIL and counts the model as failed."""
    import harness.suites.sanity as sanity
    from harness.suites.phases import Check

    ok = _gate(golden_root, "--phase", "3", "--mode", "isolated")
    assert ok.exit_code == 0 and ok.output.splitlines()[0].startswith("PASS gate: 1 of 1 models passed"), ok.output
    monkeypatch.setattr(sanity, "sanity_checks", lambda golden, weights: [Check("golden_integrity", False, "edited")])
    res = _gate(golden_root, "--phase", "3", "--mode", "isolated")
    lines = res.output.splitlines()
    assert res.exit_code == 1, res.output
    assert lines[0].startswith("FAIL gate: 0 of 1 models passed"), res.output
    assert not any(ln.startswith("PASS") for ln in lines)
    assert lines[-1].startswith("FAIL gate phases 0-3: exit 1")
    assert "phase 0 sanity: FAIL" in res.output


def test_headline_counts_models_that_could_not_run() -> None:
    from harness.cli.gate import summary_lines
    from harness.suites.phases import GateResult, PhaseOutcome

    broken = GateResult(MODEL, "emulator", 3, error="--seed -5: must be an integer in 0..4294967295")
    failed = GateResult("llama-3.2-1b", "emulator", 6, outcomes={6: PhaseOutcome(6, "fail", message="top1 1 of 32")})
    lines = summary_lines([broken, failed], 1.0, 3, 6)
    assert lines[0].startswith("COULD NOT RUN gate: 0 of 2 models passed")
    assert lines[-1].startswith("COULD NOT RUN gate phases 0-6: exit 3")
    assert len(lines) <= 20


def test_trace_without_decode_is_not_judged_pass_on_decode(golden_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace"
    dumped = runner.invoke(app, ["trace", "dump", str(out), "--model", MODEL, "--decode-steps", "0",
                                 "--golden-dir", str(golden_root)])
    assert dumped.exit_code == 0, dumped.output
    js, xml = tmp_path / "v.json", tmp_path / "r.xml"
    res = runner.invoke(app, ["gate", "--trace", str(out), "--golden-dir", str(golden_root), "--json", str(js),
                              "--junit", str(xml)])
    assert res.exit_code == 3, res.output
    phases = {p["phase"]: p for p in json.loads(js.read_text())["models"][0]["phases"]}
    assert phases[3]["status"] == "pass" and phases[5]["status"] == "not run"
    assert "PASS" not in res.output.splitlines()[0]
    errors = ET.parse(xml).getroot().findall(".//testcase[error]")
    assert any(c.get("name") == "decode" for c in errors)  # JUnit: an error, never a silent pass


def test_a_raising_factory_is_said_once(golden_root: Path, bad_deployments: str) -> None:
    """Every phase that needs the deployment errors with the same cause: the console says it once."""
    res = _gate(golden_root, "--phase", "3", "-d", "bad_deps:raises")
    assert res.exit_code == 3, res.output
    assert res.output.count("kernel timed out") == 1, res.output
    assert "the same cause as phase" in res.output
