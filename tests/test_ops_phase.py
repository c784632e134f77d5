"""Phase 1 judges the deployment's OWN op backend: the emulator's honours its knobs and faults, a
deployment without one is "not applicable" (never a pass), in run_ops, the gate CLI and the pytest plugin."""
from __future__ import annotations

import json
import os
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.deployment.emulator import make_factory
from harness.errors import HarnessError
from harness.spec import model_spec
from harness.suites.ops_phase import NO_OP_BACKEND, op_backend_of, op_ids, run_ops

MODEL = "qwen3-0.6b"
runner = CliRunner()

# Faults that live inside an op, and the ops whose cases must catch them (the others are wiring between
# ops, which phases 2-6 judge tap by tap).
OP_FAULTS = {
    "interleaved_rope": {"rope"}, "wrong_rope_theta": {"rope"}, "missing_rope_scaling": {"rope"},
    "wrong_gqa_mapping": {"attention_prefill", "attention_decode"},
    "causal_mask_off_by_one": {"attention_prefill"},
    "wrong_attention_scale": {"attention_prefill", "attention_decode"},
    "wrong_rmsnorm_eps": {"rmsnorm"}, "missing_qkv_bias": {"gemm_bias"}, "crude_silu": {"silu_mul"}, "bf16_accumulation": {"gemm", "gemv"},
    "gemm_tile_remainder": {"gemm", "gemv"},
}


def _model_for(fault: str) -> str:
    from harness.deployment.emulator import faults

    return next(m for m in ("qwen2.5-0.5b", "llama-3.2-1b", MODEL)
                if faults.get(fault).applies(model_spec.get(m, "tiny")))


def test_bf16_accumulator_fails_the_exact_probes_and_clean_passes():
    spec = model_spec.get("qwen2.5-0.5b", "tiny")
    clean = run_ops(spec, "emulator")
    assert clean.checks and all(c.passed for c in clean.checks) and not clean.not_run
    assert clean.outcome().status == "pass"
    bad = {c.id: c for c in run_ops(spec, "emulator[acc_dtype=bf16]").checks}
    assert sorted(bad) == sorted(op_ids(spec))  # the same check ids whatever the design under test
    # down_proj (K = intermediate = 1216): partial sums pass 256, so a bf16 accumulator must miss bits
    long_k = [c for cid, c in bad.items() if cid.startswith(("probe:gemm[M=64,K=1216", "probe:gemv[K=1216"))]
    assert len(long_k) == 2 and not any(c.passed for c in long_k)


@pytest.mark.parametrize("fault", sorted(OP_FAULTS))
def test_op_level_faults_fail_their_op_cases(fault: str) -> None:
    spec = model_spec.get(_model_for(fault), "tiny")
    ops = OP_FAULTS[fault]
    only = {i for i in op_ids(spec) if i.removeprefix("probe:").split("[", 1)[0] in ops}
    run = run_ops(spec, make_factory((fault,)), only=only)
    failed = {c.id for c in run.checks if not c.passed}
    assert failed, f"{fault}: no {ops} case failed"
    assert run.outcome().status == "fail"


def test_a_wiring_fault_has_no_op_case() -> None:
    run = run_ops(model_spec.get(MODEL, "tiny"), make_factory(("skipped_residual",)))
    assert run.outcome().status == "pass"  # the residual add is between ops: phase 2 catches it


def test_no_op_backend_is_not_applicable_never_a_pass() -> None:
    spec = model_spec.get(MODEL, "tiny")

    def bare(spec, weights):  # a deployment factory without op_backend
        raise AssertionError("phase 1 must not build the deployment")

    assert op_backend_of(bare, spec) is None and op_backend_of("emulator", spec) is not None
    run = run_ops(spec, bare)
    assert not run.checks and set(run.not_run) == set(op_ids(spec))
    assert set(run.not_run.values()) == {NO_OP_BACKEND}
    out = run.outcome()
    assert out.status == "n/a" and out.message.startswith("not applicable: no op backend") and not out.checks
    assert run_ops(spec, "replay-fp32").outcome().status == "n/a"


def test_unsupported_cases_are_listed_not_passed() -> None:
    spec = model_spec.get(MODEL, "tiny")
    emu = make_factory().op_backend(spec)

    class GemmOnly:
        def supports(self, case):
            return case.op == "gemm"

        def run(self, case, inputs):
            return emu.run(case, inputs)

    def factory(spec, weights):
        raise AssertionError("not built in phase 1")

    factory.op_backend = lambda spec: GemmOnly()
    run = run_ops(spec, factory)
    assert run.checks and all(c.id.removeprefix("probe:").startswith("gemm[") for c in run.checks)
    assert "softmax[rows=256,L=64]" in run.not_run
    out = run.outcome()
    assert out.status == "pass" and "not supported by the op backend" in out.message


@pytest.fixture
def silent(bad_deployments: str) -> str:
    """A deployment returning zeros, handing over no taps and offering no op backend (tests/conftest.py)."""
    return f"{bad_deployments}:silent"


def _gate(golden_root: Path, *args: str):
    return runner.invoke(app, ["gate", "--model", MODEL, "--golden-dir", str(golden_root), "--phase", "1", *args],
                         env={"COLUMNS": "200"})


@pytest.mark.parametrize("args", [["--fault", "bf16_accumulation"], ["-d", "emulator[acc_dtype=bf16]"]], ids=str)
def test_gate_phase_1_fails_for_a_bf16_accumulator(golden_root: Path, tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "g.json"
    res = _gate(golden_root, *args, "--json", str(out))
    assert res.exit_code == 1, res.output
    phase1 = json.loads(out.read_text())["models"][0]["phases"][1]
    assert phase1["status"] == "fail" and "probe:gemm[M=64,K=384,N=128]" in {c["id"] for c in phase1["checks"]
                                                                              if not c["passed"]}
    assert "phase 1 ops: FAIL" in res.output


def test_gate_phase_1_says_not_applicable_without_an_op_backend(golden_root: Path, tmp_path: Path,
                                                                silent: str) -> None:
    out, xml = tmp_path / "g.json", tmp_path / "r.xml"
    res = _gate(golden_root, "-d", silent, "--json", str(out), "--junit", str(xml))
    assert "phase 1 ops: N/A: not applicable: no op backend" in res.output
    phase1 = json.loads(out.read_text())["models"][0]["phases"][1]
    assert phase1["status"] == "n/a" and phase1["checks"] == [] and "no op backend" in phase1["message"]
    skipped = ET.parse(xml).getroot().findall(".//testcase[skipped]")
    assert [c.get("name") for c in skipped] == ["ops"]
    assert "no op backend" in skipped[0].find("skipped").get("message")
    assert not ET.parse(xml).getroot().findall(".//testcase[@name='ops']/failure")


def test_gate_phase_1_never_exits_0_for_a_deployment_that_returns_zeros(golden_root: Path, silent: str) -> None:
    """Phase 0 judges only the reference and phase 1 is n/a: nothing of the deployment was judged."""
    res = _gate(golden_root, "-d", silent)
    assert res.exit_code == 3, res.output
    assert "COULD NOT RUN gate phases 0-1: exit 3" in res.output


def test_phase7_accounting_lists_not_applicable_without_failing() -> None:
    """The plugin's phase-7 accounting: a phase-1 test skipped as not applicable is counted as not run,
    not as a failure (as the gate's phase 7 treats phase 1 n/a); any other skip is a problem."""
    from harness.pytest_plugin import REQUIRED, SETTINGS, Phase7Accounting
    from harness.suites.model_suite import NOT_APPLICABLE_PROPERTY, required_keys
    from harness.suites.session import Settings

    settings = Settings(deployment="numpy-fp32", mode="cumulative")
    acc = Phase7Accounting(types.SimpleNamespace(stash={SETTINGS: settings}))
    keys = sorted(required_keys(MODEL, settings))

    def report(key: str, **kw):
        props = [(REQUIRED, key)] + ([(NOT_APPLICABLE_PROPERTY, NO_OP_BACKEND)] if kw.pop("na", False) else [])
        base = dict(user_properties=props, when="call", passed=False, failed=False, skipped=False)
        return types.SimpleNamespace(**{**base, **kw})

    for key in keys:
        ops = "::test_ops[" in key
        acc.pytest_runtest_logreport(report(key, skipped=ops, passed=not ops, na=ops))
    assert acc.problems_now() == []
    assert acc.not_applicable and all("::test_ops[" in k and NO_OP_BACKEND in k for k in acc.not_applicable)
    sanity = next(k for k in keys if "::test_sanity[" in k)
    acc.outcomes.pop(sanity)
    acc.pytest_runtest_logreport(report(sanity, skipped=True))
    assert acc.problems_now() == [f"{sanity}: skipped"]


pytest_plugins = ("pytester",)


def test_plugin_skips_phase_1_tests_as_not_applicable(pytester: pytest.Pytester, golden_root: Path) -> None:
    pytester.makepyfile(test_qwen3='''
from harness.suites.model_suite import ModelSuite


class TestQwen3(ModelSuite):
    model_id = "qwen3-0.6b"
''')
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--golden-dir", str(golden_root), "--phase", "1",
                                        "--deployment", "numpy-fp32", "-k", "ops", "-rs", timeout=600)
    n = len(op_ids(model_spec.get(MODEL, "tiny")))
    res.assert_outcomes(skipped=n)
    res.stdout.fnmatch_lines([f"SKIPPED [[]{n}[]] *: not applicable: no op backend"])


@pytest.mark.npu
def test_registered_kernels_judged_on_the_npu() -> None:
    """Phase 1 on the NPU: the cases of MODEL with a kernel in ``$NPU_HARNESS_REGISTRY`` (default
    kernels/registry.json), judged through NpuOpBackend like any deployment's op backend."""
    from harness.deployment.pyxrt import NpuOpBackend, require_npu

    require_npu()
    path = Path(os.environ.get("NPU_HARNESS_REGISTRY", "kernels/registry.json"))
    backend = NpuOpBackend(path)

    def factory(spec, weights):
        raise AssertionError("not built in phase 1")

    factory.op_backend = lambda spec: backend
    run = run_ops(model_spec.get(MODEL, "tiny"), factory)
    if not run.checks:
        pytest.skip(f"no kernel in {path} for a {MODEL} tiny op case (register one under its case id, docs/npu.md)")
    assert all(c.passed for c in run.checks), [f"{c.id}: {c.message}" for c in run.checks if not c.passed]


def test_kernel_registry_is_keyed_by_case_id(tmp_path: Path) -> None:
    """A compiled kernel registered under a case's id is the kernel phase 1 runs for that case."""
    import numpy as np

    from harness.deployment.pyxrt import ArgSpec, KernelRegistry, NpuOpBackend
    from harness.suites.op_registry import OpCase

    case = OpCase.of("gemm", M=64, K=128, N=256)
    (tmp_path / "gemm.py").write_text("print('module {}')\n")
    (tmp_path / "final.xclbin").write_bytes(b"xclbin")
    (tmp_path / "insts.bin").write_bytes(np.arange(4, dtype="<u4").tobytes())
    fp = {"mlir_aie": "1.2.0", "llvm_aie": "19.1.0", "pyxrt": None, "xrt": "2.19.0"}
    reg = KernelRegistry(tmp_path / "registry.json", fingerprint=fp, builder=None)
    args = [ArgSpec("a", "in", (64, 128)), ArgSpec("w", "in", (256, 128)), ArgSpec("out", "out", (64, 256))]
    reg.register(case.id, None, args, {"xclbin": tmp_path / "final.xclbin", "insts": tmp_path / "insts.bin"},
                 design=tmp_path / "gemm.py")
    reg = KernelRegistry(tmp_path / "registry.json", fingerprint=fp, builder=None)
    assert reg.keys() == ["gemm[M=64,K=128,N=256]"]
    art = reg.resolve(case.id)
    assert (art.op, art.shape_key) == ("gemm", "M=64,K=128,N=256")
    backend = NpuOpBackend(reg)
    assert backend.supports(case) and not backend.supports(OpCase.of("gemm", M=63, K=128, N=256))
    with pytest.raises(HarnessError, match=r"no artifact 'gemm\[M=63,K=128,N=256\]'; gemm has gemm\[M=64"):
        reg.resolve("gemm[M=63,K=128,N=256]")


def test_a_gate_that_judged_nothing_of_the_deployment_is_not_a_pass() -> None:
    from harness.suites.phases import GateResult, PhaseOutcome

    def gate(*statuses: str) -> GateResult:
        return GateResult(MODEL, "d", len(statuses) - 1, {n: PhaseOutcome(n, s) for n, s in enumerate(statuses)})

    assert gate("pass").exit_code == 0  # phase 0 alone judges the reference, as asked
    assert gate("pass", "n/a").exit_code == 3 and gate("pass", "n/a").judged_nothing
    assert gate("pass", "n/a").first_failure()["message"].startswith("nothing of the deployment was judged")
    assert gate("pass", "n/a", "pass").exit_code == 0  # judged tap by tap from phase 2
    assert gate("pass", "n/a", "fail").exit_code == 1
