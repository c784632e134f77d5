"""Phase 1's full-scale memory: the op cases' inputs, references, exact probes and the emulator's GEMMs
go a band of rows at a time when large (the LM head's weight is 1.6 GB at qwen3-4b), with the very
values of the one-piece computation. Forced here on tiny shapes by shrinking the band."""
from __future__ import annotations

import numpy as np
import pytest

import harness.deployment.emulator.op_backend as ob
import harness.suites.op_registry as reg
from harness.deployment.emulator.config import EmulatorConfig
from harness.spec.model_spec import get
from harness.suites.op_registry import OpCase, cases_for, exact_probe, judge


def _one_piece(case: OpCase) -> tuple[dict, np.ndarray, np.ndarray]:
    """The pre-chunking computation: one float64 draw cast and scaled, torch's bf16 round trip, the whole
    weight cast at once."""
    import zlib

    import torch

    rng = np.random.default_rng([0, zlib.crc32(case.id.encode())])

    def act(*shape, std=1.0, outliers=True):
        x = rng.standard_normal(shape).astype(np.float32) * std
        if outliers and shape[-1] >= 16:
            x[..., rng.choice(shape[-1], 2, replace=False)] *= 8.0
        return x

    inputs = {k: reg.bf16(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))).numpy()
              for k, v in case.definition.inputs(case.p, act).items()}
    ref = case.definition.reference(case.p, {k: torch.from_numpy(v).double() for k, v in inputs.items()}, case)
    base = case.definition.reference(case.p, {k: torch.from_numpy(v).bfloat16() for k, v in inputs.items()}, case)
    return inputs, ref.float().numpy(), base.float().numpy()


def _cases() -> list[OpCase]:
    out = []
    for model in ("qwen2.5-0.5b", "qwen3-0.6b"):
        out += [c for c in cases_for(get(model, "tiny")) if c.op in ("gemm", "gemv", "gemm_bias", "rmsnorm",
                                                                      "attention_prefill", "silu_mul")]
    return out


@pytest.mark.parametrize("case", _cases(), ids=str)
def test_banded_inputs_and_references_equal_the_one_piece_ones(case: OpCase, monkeypatch) -> None:
    inputs, ref, base = _one_piece(case)
    monkeypatch.setattr(reg, "_CHUNK_ELEMENTS", 100)  # a band of one or a few rows
    banded = case.inputs(0)
    assert banded.keys() == inputs.keys()
    for k in inputs:
        assert np.array_equal(banded[k], inputs[k]), k
    np.testing.assert_array_equal(case.reference(banded), ref)
    np.testing.assert_array_equal(case.baseline(banded), base)


@pytest.mark.parametrize("faults", [(), ("gemm_tile_remainder",), ("bf16_accumulation",)])
def test_banded_emulator_gemm_and_probe_equal_the_one_piece_ones(faults: tuple, monkeypatch) -> None:
    spec = get("qwen2.5-0.5b", "tiny")  # q / k / v with a bias, and a ragged q GEMM for the remainder fault
    backend = ob.EmulatorOpBackend(EmulatorConfig(), spec, faults)
    gemms = [c for c in cases_for(spec) if c.op in ("gemm", "gemv", "gemm_bias")]
    whole = {c.id: (judge(c, backend).metrics, exact_probe(c, backend).metrics if c.definition.probe else None)
             for c in gemms}
    monkeypatch.setattr(ob, "_TILED_ELEMENTS", 1)  # one n_tile*herd_n block of columns per band
    monkeypatch.setattr(reg, "_CHUNK_ELEMENTS", 100)
    for c in gemms:
        metrics, probe = judge(c, backend).metrics, exact_probe(c, backend).metrics if c.definition.probe else None
        assert metrics == whole[c.id][0] and probe == whole[c.id][1], c.id


def test_a_shape_that_must_raise_still_raises_whole(monkeypatch) -> None:
    from harness.deployment.emulator.kernels import TilingError

    monkeypatch.setattr(ob, "_TILED_ELEMENTS", 1)
    backend = ob.EmulatorOpBackend(EmulatorConfig(remainder="raise"))
    case = OpCase.of("gemm", M=64, K=64, N=200)  # N off the 128-column grid
    with pytest.raises(TilingError, match=r"N=200"):
        backend.run(case, case.inputs(0))
