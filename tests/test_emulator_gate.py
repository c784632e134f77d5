"""The emulator passes the default gate: nine models x five seeds x both modes at tiny scale, and the
two full-scale models the issue names (full-size goldens, off the default run: `pytest -m fullscale`)."""
import pytest

import harness
from harness.deployment.emulator import factory

IDS = harness.models.names()


@pytest.mark.parametrize("model", IDS)
def test_emulator_passes_default_gate_five_seeds_both_modes(model, golden_root):
    for seed in range(5):
        for mode in ("cumulative", "isolated"):
            v = harness.check(model, factory, seed=seed, decode_steps=4, mode=mode, golden_dir=golden_root)
            assert v.passed, v.summary()


@pytest.mark.slow
@pytest.mark.fullscale
@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "qwen3-0.6b"])
def test_emulator_passes_default_gate_full_scale(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("golden-full")
    for mode in ("cumulative", "isolated"):
        v = harness.check(model, factory, scale="full", seed=0, decode_steps=4, mode=mode, golden_dir=root)
        assert v.passed, v.summary()
