"""The pytest plugin end to end through pytester subprocesses: default and fault deployments, test ids
naming the tap, --phase deselection, phase 7's nothing-skipped rule, -n 2 and --junitxml."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

SUITE = '''
from harness.suites.model_suite import ModelSuite


class TestQwen3(ModelSuite):
    model_id = "qwen3-0.6b"
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_qwen3=SUITE)
    return pytester


def _run(p: pytest.Pytester, golden_root: Path, *args: str) -> pytest.RunResult:
    return p.runpytest_subprocess("-p", "no:cacheprovider", "--golden-dir", str(golden_root), *args, timeout=600)


def test_phase_selection_and_tap_ids(suite: pytest.Pytester, golden_root: Path) -> None:
    res = _run(suite, golden_root, "--phase", "2", "--mode", "isolated", "-v")
    res.assert_outcomes(passed=4 + 46 + 18)  # sanity, op cases + probes, embed + layer-0 taps (Qwen3: 17 kinds)
    res.stdout.fnmatch_lines(["*test_layer_isolated?prefill-layers.0.q_rope? PASSED*"])
    assert "test_layer[" not in res.stdout.str() and "decode.0" not in res.stdout.str()


def test_fault_fails_with_ids_naming_the_tap(suite: pytest.Pytester, golden_root: Path) -> None:
    res = _run(suite, golden_root, "--phase", "3", "--mode", "isolated", "--fault", "interleaved_rope",
               "-k", "layer")
    outcomes = res.parseoutcomes()
    assert res.ret == 1 and outcomes["failed"] >= 1
    res.stdout.fnmatch_lines(["FAILED *test_layer_isolated?prefill-layers.0.q_rope?*"])
    assert "test_layer_isolated[prefill-layers.0.q]" not in "".join(
        ln for ln in res.stdout.lines if ln.startswith("FAILED"))
    res.stdout.fnmatch_lines(["*r * > max *"])  # metrics against thresholds in the assertion message


def test_recheck_fails_when_required_tests_were_deselected(suite: pytest.Pytester, golden_root: Path) -> None:
    res = _run(suite, golden_root, "--mode", "cumulative", "--recheck-seed", "7",
               "-k", "not layers.1 and not perf and not ops")
    assert res.ret == 1
    res.stdout.fnmatch_lines(["*npu-harness phase 7*", "*test_layer?*-layers.1.* not run (deselected)*"])
    assert res.parseoutcomes().get("failed", 0) == 0  # every test that ran passed; phase 7 still fails


def test_expected_failure_is_strict_xfail(pytester: pytest.Pytester, golden_root: Path) -> None:
    pytester.makepyfile(test_qwen3=SUITE + '''
    expected_failures = {"test_e2e[kl]": "known: KL above bound on this kernel set"}
''')
    res = _run(pytester, golden_root, "-k", "e2e", "--phase", "6")
    # the emulator passes the KL check, so the strict xfail fails as XPASS(strict)
    assert res.ret == 1
    res.assert_outcomes(passed=4, failed=1)
    res.stdout.fnmatch_lines(["*test_e2e?kl?*XPASS(strict)*"])


def test_missing_model_id_fails_loudly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad='''
from harness.suites.model_suite import ModelSuite


class TestForgot(ModelSuite):
    pass
''')
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only")
    assert res.ret != 0
    res.stdout.fnmatch_lines(["*TestForgot: set the class attribute model_id*"])


def test_xdist_and_junitxml(suite: pytest.Pytester, golden_root: Path) -> None:
    xml = suite.path / "r.xml"
    res = _run(suite, golden_root, "-n", "2", "--phase", "3", "--mode", "cumulative",
               f"--junitxml={xml}")
    assert res.ret == 0, res.stdout.str()[-3000:]
    names = {c.get("name") for c in ET.parse(xml).getroot().iter("testcase")}
    assert "test_layer[prefill-layers.2.out]" in names and "test_sanity[golden_integrity]" in names


def test_help_lists_options_with_defaults(pytester: pytest.Pytester) -> None:
    res = pytester.runpytest_subprocess("--help")
    text = res.stdout.str()
    for opt in ("--deployment", "--trace-dir", "--scale", "--seed", "--weights", "--mode", "--phase",
                "--golden-dir", "--decode-steps", "--fault", "--recheck-seed", "--recheck-prompt-len"):
        assert opt in text
    assert text.count("Default:") >= 10


def test_plugin_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, harness.pytest_plugin; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plugin_and_gate_share_one_run_state() -> None:
    """The plugin's session hands out the gate's ModelRun: same options type, same derived re-check."""
    from harness.suites.run import ModelRun, RunOptions
    from harness.suites.session import HarnessSession, Settings

    assert Settings is RunOptions
    opts = RunOptions(deployment="numpy-fp32", mode="cumulative", isolation="inline")
    session = HarnessSession(opts)
    run = session.run("qwen3-0.6b")
    assert isinstance(run, ModelRun) and session.run("qwen3-0.6b") is run
    assert run.recheck_params() == ModelRun("qwen3-0.6b", opts).recheck_params()
