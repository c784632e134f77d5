"""The nine specs load at every scale and tiny scale keeps every architecture feature."""
import json

import pytest

import harness
from harness.errors import HarnessError
from harness.spec.model_spec import config_path, models_dir

IDS = harness.models.names()


def test_nine_models():
    assert IDS == ["llama-3.2-1b", "llama-3.2-3b", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b",
                   "qwen2.5-3b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"]


@pytest.mark.parametrize("model", IDS)
def test_full_config_is_the_real_one(model):
    shared = json.loads((models_dir().parents[1] / "shared" / "models" / f"{model}.json").read_text()) \
        if (models_dir().parents[1] / "shared" / "models").is_dir() else None
    spec = harness.models.get(model)
    on_disk = json.loads(config_path(model).read_text())
    for key, value in on_disk.items():
        assert spec.config[key] == value
    if shared is not None:  # the packaged copy keeps every config.json key and value of shared/
        for key, value in shared.items():
            if not key.startswith("_"):
                assert on_disk[key] == value, key
    for key in ("rope_theta", "rope_scaling", "head_dim", "tie_word_embeddings", "model_type"):
        assert key in spec.config


@pytest.mark.parametrize("model", IDS)
def test_tiny_keeps_every_feature(model):
    full, tiny = harness.models.get(model), harness.models.get(model).scaled("tiny")
    c = tiny.config
    assert c["hidden_size"] <= 256 and 2 <= c["num_hidden_layers"] <= 4 and c["vocab_size"] <= 2048
    assert tiny.model_type == full.model_type
    assert tiny.gqa_groups == full.gqa_groups
    if full.num_kv_heads > 1:
        assert tiny.num_kv_heads >= 2, "a head-mapping bug needs >= 2 KV heads to show"
    assert (tiny.head_dim * tiny.num_heads == tiny.hidden_size) == (full.head_dim * full.num_heads == full.hidden_size)
    assert tiny.has_qkv_bias == full.has_qkv_bias == (model.startswith("qwen2.5"))
    assert tiny.has_qk_norm == full.has_qk_norm == (model.startswith("qwen3"))
    assert tiny.tied_embeddings == full.tied_embeddings
    for key in ("rope_theta", "rope_scaling", "rms_norm_eps", "hidden_act"):
        assert c[key] == full.config[key], key
    assert tiny.default_prompt_len >= 64
    assert tiny.head_dim % 2 == 0
    hf = tiny.hf_config()
    assert hf.model_type == full.model_type


def test_unknown_model_and_scale():
    with pytest.raises(HarnessError, match="unknown model 'gpt-2'"):
        harness.models.get("gpt-2")
    with pytest.raises(HarnessError, match="unknown scale 'huge'"):
        harness.models.get("qwen3-0.6b", "huge")


def test_llama3_rope_scaling_changes_rotation_at_default_prompt_length():
    """At the default prompt length the Llama-3 scaling moves rotated q/k measurably above bf16 noise."""
    import numpy as np
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = harness.models.get("llama-3.2-1b", "tiny")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](spec.hf_config(), "cpu")
    plain = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))
    pos = torch.arange(spec.default_prompt_len, dtype=torch.float32)[:, None]
    q = torch.from_numpy(np.random.default_rng(0).standard_normal((spec.default_prompt_len, spec.head_dim),
                                                                  dtype=np.float32))

    def rotate(freqs):  # half-split rotation, as HF's apply_rotary_pos_emb
        ang = torch.cat([pos * freqs, pos * freqs], dim=-1)
        half = spec.head_dim // 2
        rot = torch.cat([-q[:, half:], q[:, :half]], dim=-1)
        return q * torch.cos(ang) + rot * torch.sin(ang)

    a, b = rotate(scaled), rotate(plain)
    rel = ((a - b).norm() / b.norm()).item()
    assert rel > 4 * 2.0 ** -9, f"scaling moves q_rope by {rel:.2%} only: within bf16 noise"
