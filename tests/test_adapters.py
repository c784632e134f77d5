"""The adapter kit: tap value conversions, and TorchTaps on a module tree, weights and plain functions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
from harness.deployment.adapters import TorchTaps, from_tap_array, hf_weight_taps, to_tap_array
from harness.reference.hf_model import build_hf_model
from harness.spec.model_spec import get
from harness.weights import load_weights


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 5), h=st.integers(1, 4), d=st.integers(1, 6),
       layout=st.sampled_from(["bthd", "bhtd", "thd", "htd"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_round_trip_of_every_layout_is_exact_and_head_major(t: int, h: int, d: int, layout: str, dtype) -> None:
    canonical = torch.arange(t * h * d, dtype=torch.float32).reshape(t, h * d).to(dtype)
    thd = canonical.reshape(t, h, d)
    value = {"thd": thd, "bthd": thd[None], "htd": thd.transpose(0, 1), "bhtd": thd.transpose(0, 1)[None]}[layout]
    arr = to_tap_array(value, layout)
    assert arr.dtype == np.float32 and arr.shape == (t, h * d)
    assert np.array_equal(arr, canonical.float().numpy())          # head * head_dim + d, whatever the layout
    back = from_tap_array(arr, value, layout)
    assert back.dtype == dtype and back.shape == value.shape and torch.equal(back, value)


def test_values_from_numpy_and_batched_torch() -> None:
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    assert to_tap_array(x).shape == (3, 8)
    assert to_tap_array(np.ones((2, 4), np.float64)).dtype == np.float32
    with pytest.raises(ValueError, match="batch dimension 2"):
        to_tap_array(torch.zeros(2, 3, 4), "btf", "layers.0.q")
    with pytest.raises(TypeError, match="not a floating-point"):
        to_tap_array(torch.zeros(2, 3, dtype=torch.int64), name="embed")
    with pytest.raises(ValueError, match="layout 'bthd' needs 4"):
        to_tap_array(torch.zeros(2, 3), "bthd")


def _hf_deployment(spec, weights, taps_of):
    """An HF model in bf16 gated through module paths (or weight identity), nothing else."""
    model = build_hf_model(spec, weights, torch.bfloat16)

    class Dep:
        def __init__(self):
            self.taps = taps_of(model)
            self.cache = None

        def _run(self, ids, tap):
            with torch.no_grad(), self.taps.attached(tap):
                out = model(input_ids=torch.as_tensor(np.asarray(ids).reshape(1, -1)), cache=self.cache, use_cache=True)
            return to_tap_array(out.logits)

        def prefill(self, ids, tap):
            from transformers import DynamicCache

            self.cache = DynamicCache(config=model.config)
            return self._run(ids, tap)

        def decode(self, tok, tap):
            return self._run([int(tok)], tap)

    return Dep()


# Every op input handed over, so that in isolated mode each judged tap is one op on golden inputs.
MODULE_MAP = {"embed": "model.embed_tokens", "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm",
              "layers.{i}.q": "model.layers.{i}.self_attn.q_proj", "layers.{i}.k": "model.layers.{i}.self_attn.k_proj",
              "layers.{i}.v": "model.layers.{i}.self_attn.v_proj",
              "layers.{i}.attn": "input:model.layers.{i}.self_attn.o_proj", "layers.{i}.o": "model.layers.{i}.self_attn.o_proj",
              "layers.{i}.attn_residual": "input:model.layers.{i}.post_attention_layernorm",
              "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
              "layers.{i}.gate": "model.layers.{i}.mlp.gate_proj", "layers.{i}.up": "model.layers.{i}.mlp.up_proj",
              "layers.{i}.down": "model.layers.{i}.mlp.down_proj",
              "layers.{i}.act": "input:model.layers.{i}.mlp.down_proj", "layers.{i}.out": "model.layers.{i}",
              "final_norm": "model.norm", "logits": "lm_head"}


@pytest.mark.parametrize("mode", ["cumulative", "isolated"])
def test_module_paths_gate_an_hf_model(golden_root, mode: str) -> None:
    def factory(spec, weights):
        return _hf_deployment(spec, weights, lambda m: TorchTaps(spec.num_layers, root=m, modules=MODULE_MAP))

    v = harness.check("llama-3.2-1b", factory, mode=mode, golden_dir=golden_root, decode_steps=2)
    assert v.passed, v.first_failure
    assert "layers.0.q" not in v.coverage.not_exposed and "layers.0.q_rope" in v.coverage.not_exposed


def test_isolated_mode_continues_from_what_tap_returns(golden_root) -> None:
    """A module's output replaced by the tap's value is what the next op reads (teacher forcing)."""
    spec = get("qwen3-0.6b")
    weights = load_weights(spec, seed=0)
    seen: dict[str, np.ndarray] = {}

    def tap(name, value):
        if name == "layers.0.attn_norm":
            return np.zeros_like(value)             # forced: q_proj must see zeros
        seen[name] = value
        return value

    dep = _hf_deployment(spec, weights, lambda m: TorchTaps(spec.num_layers, root=m, modules=MODULE_MAP))
    dep.prefill(np.arange(5), tap)
    bias = weights.get("model.layers.0.self_attn.q_proj.bias")
    expected = np.zeros_like(seen["layers.0.q"]) if bias is None else np.broadcast_to(bias, seen["layers.0.q"].shape)
    np.testing.assert_allclose(seen["layers.0.q"], expected, atol=1e-2)


def test_weight_identity_finds_products_inputs_and_the_tied_head(golden_root) -> None:
    spec = get("qwen2.5-0.5b")
    weights = load_weights(spec, seed=0)
    names: list[str] = []

    def factory(spec, weights):
        def taps_of(model):
            tensors = {n: p for n, p in model.named_parameters()}
            return TorchTaps(spec.num_layers, weights=hf_weight_taps(spec.num_layers, tensors, tied=spec.tied_embeddings),
                             root=model, modules={"layers.{i}.out": "model.layers.{i}"})  # both ways at once
        return _hf_deployment(spec, weights, taps_of)

    dep = factory(spec, weights)
    dep.prefill(np.arange(6), lambda n, v: names.append(n) or v)
    assert names[:6] == ["embed", "layers.0.attn_norm", "layers.0.q", "layers.0.k", "layers.0.v", "layers.0.attn"]
    assert {"layers.0.act", "layers.0.down", "final_norm", "logits"} <= set(names)
    # Cumulative: attn_residual is not a weight's op, so in isolated mode ffn_norm would also carry the
    # residual add's rounding (docs/contract.md, "Isolated mode and partial coverage").
    v = harness.check("qwen2.5-0.5b", factory, mode="cumulative", golden_dir=golden_root, decode_steps=1)
    assert v.passed, v.first_failure


def test_observe_only_taps_keep_the_deployments_value() -> None:
    lin = torch.nn.Linear(4, 4)
    taps = TorchTaps(1, root=torch.nn.Sequential(lin), modules={"layers.0.q": "0"}, observe={"q"})
    x = torch.randn(1, 3, 4)
    got = []
    with taps.attached(lambda n, v: got.append(n) or np.zeros_like(v)):
        y = taps.root(x)
    assert got == ["layers.0.q"] and torch.equal(y, lin(x))


def test_functions_by_name_cycle_per_layer() -> None:
    import types

    ns = types.ModuleType("ns")
    ns.f = lambda x: (x + 1, x + 2)
    taps = TorchTaps(2, functions={(ns, "f"): [("layers.{i}.q_rope", "layers.{i}.k_rope")]})
    got = []
    with taps.attached(lambda n, v: got.append(n) or v):
        for _ in range(2):
            ns.f(torch.zeros(1, 2, 4))
    assert got == ["layers.0.q_rope", "layers.0.k_rope", "layers.1.q_rope", "layers.1.k_rope"]
    assert not hasattr(ns.f, "__wrapped__")                      # removed on exit


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_observe_only_taps_are_judged_and_listed_in_the_verdict(golden_root, isolation: str) -> None:
    """tap.observe: judged like any tap, the deployment keeps its own value, the verdict says so."""
    v = harness.check("llama-3.2-1b", "examples/torch_functions_adapter.py:factory[observe=attn]", mode="isolated",
                      golden_dir=golden_root, decode_steps=1, isolation=isolation)
    assert v.coverage.observed == [f"layers.{i}.attn" for i in range(3)]
    assert any(r.tap == "layers.0.attn" for r in v.results)
    assert v.to_dict()["coverage"]["observed"] == v.coverage.observed
