"""Cross-checks of the reference capture against independent computations."""
import numpy as np
import pytest
import torch

import harness
from harness.reference.capture import run_reference
from harness.reference.hf_model import build_hf_model
from harness.reference.prompts import prompt_ids
from harness.spec import taps as tapspec
from harness.weights.synthetic import synthetic_weights


@pytest.fixture(scope="module", params=["llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b"])
def captured(request):
    spec = harness.models.get(request.param, "tiny")
    w = synthetic_weights(spec, 1)
    model = build_hf_model(spec, w)
    ids = prompt_ids(spec, 1)
    run = run_reference(model, spec, ids, decode_steps=3)
    return spec, w, model, ids, run


def test_every_canonical_tap_every_phase(captured):
    spec, _, _, _, run = captured
    assert list(run.taps) == tapspec.phase_names(3)
    for phase, taps in run.taps.items():
        assert sorted(taps) == sorted(tapspec.tap_names(spec))
        rows = len(run.input_ids) if phase == "prefill" else 1
        for name, value in taps.items():
            assert value.dtype == np.float32
            assert value.shape == tapspec.shape(spec, name, rows), name


def test_residual_identities(captured):
    spec, _, _, _, run = captured
    for phase, t in run.taps.items():
        for i in range(spec.num_layers):
            np.testing.assert_allclose(t[f"layers.{i}.out"], t[f"layers.{i}.attn_residual"] + t[f"layers.{i}.down"],
                                       rtol=1e-6, atol=1e-6)
            prev = t["embed"] if i == 0 else t[f"layers.{i - 1}.out"]
            np.testing.assert_allclose(t[f"layers.{i}.attn_residual"], prev + t[f"layers.{i}.o"], rtol=1e-6, atol=1e-6)
            gate, up = t[f"layers.{i}.gate"], t[f"layers.{i}.up"]
            np.testing.assert_allclose(t[f"layers.{i}.act"], gate / (1 + np.exp(-gate)) * up, rtol=1e-4, atol=1e-5)


def _rotary(x: np.ndarray, positions: np.ndarray, spec) -> np.ndarray:
    """Half-split RoPE computed independently of transformers (incl. Llama-3 frequency scaling)."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = spec.rope_scaling
    if rs and rs.get("rope_type") == "llama3":
        low_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
        high_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
        wl = 2 * np.pi / inv
        smooth = (rs["original_max_position_embeddings"] / wl - rs["low_freq_factor"]) / (
            rs["high_freq_factor"] - rs["low_freq_factor"])
        scaled = np.where(wl > low_wl, inv / rs["factor"], inv)
        mid = (wl >= high_wl) & (wl <= low_wl)
        inv = np.where(mid, (1 - smooth) * inv / rs["factor"] + smooth * inv, scaled)
    ang = positions[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    heads = x.reshape(x.shape[0], -1, d).astype(np.float64)
    rot = np.concatenate([-heads[..., d // 2:], heads[..., : d // 2]], -1)
    return (heads * cos[:, None] + rot * sin[:, None]).reshape(x.shape)


def test_q_rope_equals_independent_rotary(captured):
    spec, _, _, ids, run = captured
    pre = "q_norm" if spec.has_qk_norm else "q"
    for phase, t in run.taps.items():
        pos = np.arange(len(ids)) if phase == "prefill" else np.array([len(ids) + int(phase.split(".")[1])])
        for i in range(spec.num_layers):
            np.testing.assert_allclose(t[f"layers.{i}.q_rope"], _rotary(t[f"layers.{i}.{pre}"], pos, spec),
                                       rtol=1e-4, atol=1e-4)
            kpre = "k_norm" if spec.has_qk_norm else "k"
            np.testing.assert_allclose(t[f"layers.{i}.k_rope"], _rotary(t[f"layers.{i}.{kpre}"], pos, spec),
                                       rtol=1e-4, atol=1e-4)


def test_decode_taps_match_longer_prefill(captured):
    """Decode step n (KV cache) equals row T+n of a prefill over prompt + decoded tokens, in fp32 noise."""
    spec, _, model, ids, run = captured
    longer = np.concatenate([ids, run.decode_tokens])
    full = run_reference(model, spec, longer).taps["prefill"]
    for n in range(len(run.decode_tokens)):
        step = run.taps[f"decode.{n}"]
        for name in ("layers.0.k_rope", f"layers.{spec.num_layers - 1}.attn", "final_norm", "logits"):
            ref = full[name][len(ids) + n: len(ids) + n + 1]
            np.testing.assert_allclose(step[name], ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max(), err_msg=name)


def test_greedy_decode_tokens_are_argmax(captured):
    _, _, _, _, run = captured
    prev = run.taps["prefill"]["logits"][-1]
    for n, tok in enumerate(run.decode_tokens):
        assert tok == int(np.argmax(prev))
        prev = run.taps[f"decode.{n}"]["logits"][-1]


def test_teacher_forcing_feeds_forced_values(captured):
    """Forcing a tap changes what downstream ops see, and the recorded value is the module's own."""
    spec, w, _, ids, run = captured
    bf16 = build_hf_model(spec, w, torch.bfloat16)
    forced = run_reference(bf16, spec, ids, decode_steps=1, decode_tokens=run.decode_tokens, force=run.taps)
    free = run_reference(bf16, spec, ids, decode_steps=1, decode_tokens=run.decode_tokens)
    g, f_, fr = run.taps["prefill"], forced.taps["prefill"], free.taps["prefill"]
    name = f"layers.{spec.num_layers - 1}.out"
    err_forced = np.linalg.norm(f_[name] - g[name])
    err_free = np.linalg.norm(fr[name] - g[name])
    assert err_forced < 0.5 * err_free  # local error only, no accumulation
