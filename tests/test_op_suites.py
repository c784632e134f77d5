"""The op registry (phase 1): one declaration per op, one identity per case, clean kernels within bf16
noise, tiling, exact probes, the backend protocol, timing from the same cases, adding an op in one place."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.deployment.emulator.config import EmulatorConfig
from harness.deployment.emulator.kernels import TilingError, check_tiling
from harness.deployment.emulator.op_backend import EmulatorOpBackend
from harness.deployment.pyxrt.artifacts import _KEY_RE
from harness.errors import HarnessError
from harness.spec import model_spec
from harness.suites import op_registry
from harness.suites.op_registry import OPS, Op, OpCase, cases_for, exact_probe, judge, register, time_cases
from harness.suites.ops_phase import op_ids

EMU = EmulatorOpBackend()
TINY_CASES = [c for m in model_spec.names() for c in cases_for(model_spec.get(m, "tiny"))]
UNIQUE = list({c.id: c for c in TINY_CASES}.values())


def test_identities_are_canonical_and_cover_every_op() -> None:
    cases = cases_for(model_spec.get("qwen2.5-0.5b", "full"), tokens=64)
    ids = [c.id for c in cases]
    assert "gemm[M=64,K=896,N=4864]" in ids and "gemv[K=4864,N=896]" in ids
    assert "gemm[M=63,K=896,N=4864]" in ids  # the remainder rows of an odd prompt length
    assert len(ids) == len(set(ids))
    assert {c.op for c in cases} == set(OPS) == {"gemm", "gemm_bias", "gemv", "rmsnorm", "rope", "silu_mul",
                                                 "softmax", "attention_prefill", "attention_decode"}
    assert "gemm_bias[M=1,K=896,N=128]" in ids  # Qwen2.5's k projection with its bias, decode row
    qwen3 = [c.id for c in cases_for(model_spec.get("qwen3-0.6b", "tiny"))]
    assert "rmsnorm[T=256,D=64,eps=1e-06,std=0.05]" in qwen3  # per-head q/k norm at head_dim
    llama = [c.id for c in cases_for(model_spec.get("llama-3.2-1b", "tiny"))]
    assert "rope[T=64,heads=8,hd=32,theta=500000.0,scaling=llama3,pos=131008]" in llama  # end of the context
    with pytest.raises(HarnessError, match="unknown op 'conv'"):
        OpCase("conv", ())
    with pytest.raises(HarnessError, match=r"gemm: parameters \('M', 'N'\), expected \('M', 'K', 'N'\)"):
        OpCase("gemm", (("M", 1), ("N", 2)))


def test_one_identity_everywhere() -> None:
    """The case id is the check id, the pytest id and a valid kernel-registry key."""
    spec = model_spec.get("qwen3-0.6b", "tiny")
    ids = op_ids(spec)
    assert ids[: len(cases_for(spec))] == [c.id for c in cases_for(spec)]
    assert all(_KEY_RE.match(c.id) for c in UNIQUE)
    assert {i[len("probe:"):] for i in ids if i.startswith("probe:")} == {c.id for c in cases_for(spec) if c.op in ("gemm", "gemv")}
    assert OpCase.of("gemm", N=3, K=2, M=1).id == "gemm[M=1,K=2,N=3]" == str(OpCase.of("gemm", M=1, K=2, N=3))


@pytest.mark.phase1
@pytest.mark.parametrize("case", UNIQUE, ids=[c.id for c in UNIQUE])
def test_emulator_kernels_within_bf16_noise(case: OpCase) -> None:
    result = judge(case, EMU)
    assert result, f"{case.id}: R={result.metrics['r']:.2f}"


def _gemm(m: int, k: int, n: int) -> OpCase:
    return OpCase.of("gemm", M=m, K=k, N=n)


@pytest.mark.phase1
@settings(max_examples=15, deadline=None)
@given(mb=st.integers(1, 2), kb=st.integers(1, 12), nb=st.integers(1, 3))
def test_gemm_on_the_tiling_grid(mb, kb, nb) -> None:
    cfg = EmulatorConfig(remainder="raise")
    case = _gemm(mb * cfg.m_block, kb * cfg.k_tile, nb * cfg.n_block)
    assert not check_tiling(case.id, *case.gemm_dims(), cfg)
    assert judge(case, EmulatorOpBackend(cfg))


@pytest.mark.phase1
@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, 160), k=st.integers(8, 400), n=st.integers(8, 600))
def test_gemm_off_the_grid_raises_or_pads_never_garbles(m, k, n) -> None:
    case = _gemm(m, k, n)
    strict = EmulatorOpBackend(EmulatorConfig(remainder="raise"))
    if check_tiling(case.id, m, k, n, strict.cfg):
        with pytest.raises(TilingError, match=r"gemm\[M="):
            strict.run(case, case.inputs())
    assert judge(case, EMU)  # the default pads: the result is the correct product


@pytest.mark.phase1
@pytest.mark.parametrize("case", [_gemm(32, 4864, 256), OpCase.of("gemv", K=4864, N=256)], ids=str)
def test_exact_probe_catches_a_bf16_accumulator_deterministically(case: OpCase) -> None:
    fp32 = exact_probe(case, EMU)
    bf16 = exact_probe(case, EmulatorOpBackend(EmulatorConfig(acc_dtype="bf16")))
    assert fp32 and fp32.metrics["max_exact_sum"] > 256
    assert not bf16 and bf16.metrics["mismatches"] > bf16.metrics["elements"] // 2
    with pytest.raises(HarnessError, match="exact probes exist for gemm, gemv only"):
        exact_probe(OpCase.of("softmax", rows=2, L=8), EMU)


def test_judge_fails_nan_wrong_results_and_wrong_shapes() -> None:
    case = OpCase.of("silu_mul", T=4, I=64)

    class Broken:
        def run(self, case, inputs):
            out = EMU.run(case, inputs)
            out[0, 0] = np.nan
            return out

    class Flat:
        def run(self, case, inputs):
            return EMU.run(case, inputs).reshape(-1)

    assert not judge(case, Broken())
    assert not judge(OpCase.of("silu_mul", T=64, I=256), EmulatorOpBackend(EmulatorConfig(tanh="hard")))
    with pytest.raises(HarnessError, match=r"silu_mul\[T=4,I=64\]: the op backend returned shape \(256,\)"):
        judge(case, Flat())


def test_any_backend_plugs_in_by_the_protocol() -> None:
    """A deployment's backend is any object with run(case, inputs); inputs are named as the signature."""
    seen = []

    class NumpyBackend:
        def supports(self, case):
            return case.op == "gemm"

        def run(self, case, inputs):
            seen.append((case.id, sorted(inputs)))
            return (inputs["a"].astype(np.float64) @ inputs["w"].T.astype(np.float64)).astype(np.float32)

    case = _gemm(16, 64, 32)
    assert judge(case, NumpyBackend()) and exact_probe(case, NumpyBackend())
    assert seen == [("gemm[M=16,K=64,N=32]", ["a", "w"])] * 2
    assert op_registry.supports(NumpyBackend(), case) and not op_registry.supports(NumpyBackend(), OpCase.of(
        "softmax", rows=2, L=8)) and op_registry.supports(EMU, case)


def test_time_cases_times_the_same_cases() -> None:
    spec = model_spec.get("qwen3-0.6b", "tiny")
    cases = [c for c in cases_for(spec) if c.op in ("rmsnorm", "softmax")]
    calls = []

    class Counting:
        def supports(self, case):
            return case.op == "rmsnorm"

        def run(self, case, inputs):
            calls.append(case.id)
            return EMU.run(case, inputs)

    times = time_cases(cases, Counting(), rounds=3, warmup=1)
    assert set(times) == {c.id for c in cases if c.op == "rmsnorm"}
    assert all(t["rounds"] == 3 and 0 < t["min_s"] <= t["median_s"] for t in times.values())
    assert len(calls) == 4 * len(times)
    with pytest.raises(HarnessError, match="rounds=0"):
        time_cases(cases, EMU, rounds=0)


def test_adding_an_op_is_one_declaration() -> None:
    """An op declared here (and nowhere else) gets cases, ids, a reference, a baseline and judging."""

    @register
    class Scale(Op):
        name, params = "scale_test_only", ("T", "D")
        signature = "x [T, D] -> [T, D] = 2 x"

        def inputs(self, p, act):
            return {"x": act(p["T"], p["D"])}

        def reference(self, p, x, case):
            return x["x"] * 2

        def cases(self, spec, t):
            return [dict(T=t, D=spec.hidden_size)]

    try:
        spec = model_spec.get("qwen3-0.6b", "tiny")
        case = next(c for c in cases_for(spec) if c.op == "scale_test_only")
        assert case.id == "scale_test_only[T=64,D=128]" and case.id in op_ids(spec)

        class Doubler:
            def run(self, case, inputs):
                return (torch.from_numpy(inputs["x"]) * 2).to(torch.bfloat16).float().numpy()

        assert judge(case, Doubler()) and not EMU.supports(case)
        with pytest.raises(HarnessError, match="declared twice"):
            register(Scale)
    finally:
        OPS.pop("scale_test_only", None)


def test_emulator_op_backend_honours_the_slowdown_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.deployment.emulator import op_backend

    slept = []
    monkeypatch.setattr(op_backend.time, "sleep", slept.append)
    case = OpCase.of("softmax", rows=4, L=8)
    EMU.run(case, case.inputs())
    EmulatorOpBackend(EmulatorConfig(slowdown=3.0)).run(case, case.inputs())
    assert len(slept) == 1 and slept[0] > 0
