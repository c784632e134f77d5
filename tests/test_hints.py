"""Cause hints: every emulator fault gets its own hint id, a clean pass none, a random perturbation none."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harness
from harness.deployment.emulator import make_factory
from harness.deployment.emulator.faults import FAULTS
from harness.spec import taps as tapspec
from harness.spec.model_spec import get, names
from harness.store import GoldenRequest, GoldenStore
from harness.verdict.hints import NO_SIGNATURE, attention, bf16_accumulate, diagnose, inv_freq, rope
from harness.verdict.verdict import FirstFailure


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny emulator runs are ~10x faster on one torch thread than on two (thread hand-off dominates)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _applicable_model(fault) -> str:
    """A model the fault applies to, rotating by the fault's position so all nine get exercised."""
    fits = [m for m in names() if fault.applies(get(m, "tiny"))]
    return fits[list(FAULTS).index(fault.name) % len(fits)]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_fault_gets_its_hint(golden_root: Path, fault: str) -> None:
    f = FAULTS[fault]
    model = _applicable_model(f)
    v = harness.check(model, make_factory(faults=(fault,)), scale="tiny", seed=0, decode_steps=4, mode="isolated",
                      golden_dir=golden_root)
    ff = v.first_failure
    assert ff is not None, f"{fault} on {model}: not detected"
    assert (ff.phase, ff.tap) == f.expected_tap(get(model, "tiny"))
    assert ff.hint.startswith(f.hint + ": "), f"{fault} on {model}: hint {ff.hint!r}, expected id {f.hint!r}"
    assert "error under hypothesis" in ff.hint or "cosine" in ff.hint
    assert v.to_dict()["first_failure"]["hint"] == ff.hint


def test_clean_pass_has_no_hint(golden_root: Path) -> None:
    v = harness.check("qwen2.5-0.5b", make_factory(), scale="tiny", seed=0, decode_steps=2, mode="isolated",
                      golden_dir=golden_root)
    assert v.passed and v.first_failure is None and v.to_dict()["first_failure"] is None


@pytest.fixture(scope="module")
def goldens(golden_root: Path) -> dict:
    store = GoldenStore(golden_root)
    return {m: store.get(GoldenRequest(m, "tiny", 0, 2)) for m in ("llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b")}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_perturbation_has_no_known_signature(goldens: dict, data) -> None:
    """Golden plus 2-20% random noise on a random tap, phase and model matches no bug signature."""
    from harness.weights import load_weights

    model = data.draw(st.sampled_from(sorted(goldens)))
    golden = goldens[model]
    spec = golden.spec
    phase = data.draw(st.sampled_from(golden.phases))
    tap = data.draw(st.sampled_from([t for t in tapspec.tap_names(spec) if t != "embed"]))
    level = data.draw(st.floats(0.02, 0.2))
    g = golden.tensor(phase, tap, "fp32")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    dut = (g + level * np.sqrt(np.mean(g * g)) * rng.standard_normal(g.shape)).astype(np.float32)
    first = FirstFailure(phase=phase, tap=tap, metrics={})
    assert diagnose(spec, golden, first, weights=load_weights(spec, seed=0), dut=dut) == NO_SIGNATURE


def test_no_dut_or_non_finite_dut_has_no_signature(goldens: dict) -> None:
    golden = goldens["qwen3-0.6b"]
    first = FirstFailure(phase="prefill", tap="layers.0.q", metrics={})
    assert diagnose(golden.spec, golden, first, dut=None) == NO_SIGNATURE
    bad = golden.tensor("prefill", "layers.0.q").copy()
    bad[0, 0] = np.nan
    assert diagnose(golden.spec, golden, first, dut=bad) == NO_SIGNATURE


def test_attention_matches_torch_sdpa() -> None:
    rng = np.random.default_rng(0)
    t, heads, kv, hd = 7, 4, 2, 8
    q, k, v = (rng.standard_normal((t, n * hd)).astype(np.float32) for n in (heads, kv, kv))
    kv_map = np.arange(heads) // (heads // kv)
    ours = attention(q, k, v, np.arange(t), hd, kv_map, 1 / np.sqrt(hd))
    tq = torch.from_numpy(q).reshape(t, heads, hd).transpose(0, 1)
    tk = torch.from_numpy(k).reshape(t, kv, hd).transpose(0, 1)[torch.from_numpy(kv_map)]
    tv = torch.from_numpy(v).reshape(t, kv, hd).transpose(0, 1)[torch.from_numpy(kv_map)]
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).transpose(0, 1).reshape(t, -1)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_rope_and_llama3_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    spec = get("llama-3.2-1b", "tiny")
    cfg = LlamaConfig(**{k: v for k, v in spec.config.items() if k not in ("architectures", "model_type")})
    emb = LlamaRotaryEmbedding(cfg)
    np.testing.assert_allclose(inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling),
                               emb.inv_freq.double().numpy(), rtol=1e-6)
    rng = np.random.default_rng(1)
    t, hd = 5, spec.head_dim
    x = rng.standard_normal((t, 2 * hd)).astype(np.float32)
    pos = np.arange(10, 10 + t)
    tx = torch.from_numpy(x).reshape(1, t, 2, hd).transpose(1, 2)
    cos, sin = emb(tx, torch.from_numpy(pos)[None])
    ref, _ = apply_rotary_pos_emb(tx, tx, cos, sin)
    ours = rope(x, pos, inv_freq(hd, spec.rope_theta, spec.rope_scaling), hd)
    np.testing.assert_allclose(ours, ref.transpose(1, 2).reshape(t, -1).numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(rope(x, pos, inv_freq(hd, spec.rope_theta, None), hd, "interleaved"), ours, atol=1e-2)


def test_bf16_accumulation_error_grows_as_the_tile_shrinks() -> None:
    rng = np.random.default_rng(2)
    a, w = rng.standard_normal((16, 512)).astype(np.float32), rng.standard_normal((32, 512)).astype(np.float32)
    exact = bf16_accumulate(a, w, 512)                       # one tile: fp32 accumulation, one rounding
    errs = [np.linalg.norm(bf16_accumulate(a, w, kt) - exact) for kt in (256, 64, 8)]
    assert errs[0] < errs[1] < errs[2]
