"""Synthetic weights are deterministic, bf16-representable and make activations look trained."""
import numpy as np
import pytest
import torch

import harness
from harness.reference.capture import run_reference
from harness.reference.hf_model import build_hf_model
from harness.reference.prompts import prompt_ids
from harness.weights.synthetic import EMBED_STD, bf16_round, outlier_channels, synthetic_weights

IDS = harness.models.names()


def test_bf16_round_is_round_to_nearest_even():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 37
    bits = x.view(np.uint32)  # the bit-level definition: add 0x7FFF plus the lsb of the kept half
    ref = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(bf16_round(x), ref)


def test_deterministic_and_seeded():
    spec = harness.models.get("qwen3-0.6b", "tiny")
    a, b, c = synthetic_weights(spec, 3), synthetic_weights(spec, 3), synthetic_weights(spec, 4)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("model", IDS)
def test_trained_like_activations(model):
    spec = harness.models.get(model, "tiny")
    w = synthetic_weights(spec, 0)
    for name, value in w.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(bf16_round(value), value, err_msg=name)
    if spec.tied_embeddings:
        assert "lm_head.weight" not in w
    run = run_reference(build_hf_model(spec, w), spec, prompt_ids(spec, 0))
    taps = run.taps["prefill"]
    # Embeddings at a trained model's small scale: RMSNorm's eps is a visible fraction of the mean square.
    typical = np.delete(taps["embed"], outlier_channels(spec, 0), axis=1)
    assert np.sqrt(np.mean(typical ** 2)) == pytest.approx(EMBED_STD, rel=0.2)
    assert spec.rms_norm_eps / np.mean(typical ** 2) > 2e-3
    for i in range(spec.num_layers):
        assert taps[f"layers.{i}.gate"].std() >= 1.0, f"layer {i}: SiLU would stay linear"
        # Outlier channels in the residual stream: a few channels far above the median.
        rms = np.sqrt(np.mean(taps[f"layers.{i}.out"] ** 2, axis=0))
        assert np.sort(rms)[-1] > 5 * np.median(rms)
    # Attention far from uniform: the mean max attention probability of layer 0 (from the captured q/k).
    q = torch.from_numpy(taps["layers.0.q_rope"]).view(-1, spec.num_heads, spec.head_dim).transpose(0, 1)
    k = torch.from_numpy(taps["layers.0.k_rope"]).view(-1, spec.num_kv_heads, spec.head_dim).transpose(0, 1)
    k = k.repeat_interleave(spec.gqa_groups, dim=0)
    scores = q @ k.transpose(1, 2) / spec.head_dim ** 0.5
    T = scores.shape[-1]
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    p = torch.softmax(scores, -1)[:, T // 2:]  # rows with at least T/2 keys
    uniform = 1.0 / torch.arange(T // 2 + 1, T + 1, dtype=torch.float32)
    assert (p.max(-1).values.mean() / uniform.mean()).item() > 5
    logits = taps["logits"]
    assert logits.std() > 1.5  # a trained spread: top-k is meaningful
