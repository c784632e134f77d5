"""Local Hugging Face checkpoints: sharded safetensors load offline; pickle and mismatches are refused."""
import json

import numpy as np
import pytest
import torch

import harness
from harness.errors import HarnessError
from harness.reference.hf_model import build_hf_model
from harness.weights import WeightsSource, load_weights, weights_digest
from harness.weights.checkpoint import load_checkpoint
from harness.weights.synthetic import synthetic_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A sharded checkpoint written by transformers' own save_pretrained (qwen2.5 tiny: has biases)."""
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    w = synthetic_weights(spec, 5)
    path = tmp_path_factory.mktemp("ckpt")
    build_hf_model(spec, w).save_pretrained(path, max_shard_size="1MB")
    return spec, w, path


def test_sharded_checkpoint_round_trip(checkpoint):
    spec, w, path = checkpoint
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    loaded = load_checkpoint(spec, path)
    assert loaded.keys() == w.keys()
    for name in w:
        np.testing.assert_array_equal(loaded[name], w[name], err_msg=name)


def test_checkpoint_weights_drive_the_golden(checkpoint, tmp_path):
    spec, _, path = checkpoint
    from harness.deployment.replay import bf16_replay, check_replay

    v = check_replay(spec.id, bf16_replay, scale="tiny", seed=0, decode_steps=1, weights=path, golden_dir=tmp_path)
    assert v.passed
    assert v.provenance["golden"]["weights"]["source"] == f"checkpoint:{path}"
    assert weights_digest(spec, WeightsSource(str(path)), 0).startswith("ckpt-")


def test_pickle_checkpoint_refused(tmp_path):
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    (tmp_path / "config.json").write_text(json.dumps(spec.config))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(HarnessError, match="pickle checkpoints found .*pytorch_model.bin.*refused"):
        load_checkpoint(spec, tmp_path)


def test_config_of_another_model_refused(checkpoint):
    _, _, path = checkpoint
    other = harness.models.get("qwen3-0.6b", "tiny")
    with pytest.raises(HarnessError, match=r"config.json: model_type = 'qwen2', but qwen3-0.6b"):
        load_checkpoint(other, path)


def test_missing_dir_and_config(tmp_path):
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    with pytest.raises(HarnessError, match="not a directory"):
        load_checkpoint(spec, tmp_path / "nope")
    with pytest.raises(HarnessError, match="no config.json"):
        load_checkpoint(spec, tmp_path)


def test_weights_are_read_only():
    spec = harness.models.get("qwen3-0.6b", "tiny")
    w = load_weights(spec, None, 0)
    with pytest.raises(ValueError):
        w["model.norm.weight"][0] = 1.0
