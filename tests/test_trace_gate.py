"""Trace round trip: a live deployment's dump judged through --trace gives the live verdict."""
import json

import pytest
from typer.testing import CliRunner

import harness
from harness.cli import app
from harness.deployment.loader import load_factory

runner = CliRunner()


@pytest.mark.parametrize("deployment", ["emulator", "emulator[faults=interleaved_rope]",
                                        "emulator[faults=kv_layout_mixup]"])
def test_dump_then_trace_matches_the_live_check(deployment, tmp_path, golden_root):
    trace = tmp_path / "trace"
    res = runner.invoke(app, ["trace", "dump", str(trace), "--model", "qwen2.5-0.5b", "--deployment", deployment,
                              "--decode-steps", "2", "--golden-dir", str(golden_root)])
    assert res.exit_code == 0, res.output
    live = harness.check("qwen2.5-0.5b", load_factory(deployment), decode_steps=2, golden_dir=golden_root)
    replayed = harness.check_trace(trace, golden_dir=golden_root)
    assert replayed.passed == live.passed
    assert [r.id for r in replayed.failures] == [r.id for r in live.failures]
    if not live.passed:
        assert (replayed.first_failure.phase, replayed.first_failure.tap) == (live.first_failure.phase,
                                                                              live.first_failure.tap)
    out = tmp_path / "verdict.json"
    res = runner.invoke(app, ["gate", "--trace", str(trace), "--golden-dir", str(golden_root), "--json", str(out)])
    assert res.exit_code == (0 if live.passed else 1), res.output
    if not live.passed:
        tap = json.loads(out.read_text())["first_failing_tap"]
        assert (tap["phase"], tap["tap"]) == (live.first_failure.phase, live.first_failure.tap)


def test_prepare_writes_inputs_of_the_golden(tmp_path, golden_root):
    res = runner.invoke(app, ["trace", "prepare", str(tmp_path / "t"), "--model", "qwen3-0.6b", "--decode-steps", "2",
                              "--golden-dir", str(golden_root)])
    assert res.exit_code == 0, res.output
    from safetensors.numpy import load_file

    from harness.store import GoldenRequest, GoldenStore

    inputs = load_file(str(tmp_path / "t" / "inputs.safetensors"))
    golden = GoldenStore(golden_root).get(GoldenRequest("qwen3-0.6b", "tiny", 0, 2))
    assert inputs["input_ids"].tolist() == golden.input_ids.tolist()
    assert inputs["decode_tokens"].tolist() == golden.decode_tokens.tolist()
    assert json.loads((tmp_path / "t" / "trace.json").read_text())["model"] == "qwen3-0.6b"
    assert "config.json, expected.json" in res.output
    assert json.loads((tmp_path / "t" / "config.json").read_text()) == golden.spec.config
    expected = json.loads((tmp_path / "t" / "expected.json").read_text())
    assert [f["tokens"] for f in expected["write"]] == [len(golden.input_ids), 1, 1]
