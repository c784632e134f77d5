"""Hugging Face transformers in bf16 as a deployment (eager or SDPA attention): the stock model code,
tapped by this package's own forward hooks and its own registered attention function (post-RoPE q / k).

Every hook hands its tensor to ``tap`` and, when ``tap`` returns another value (the golden, in
isolated mode), the hook returns it as the module's output (or input), so the model continues with it.
Written independently of the harness's reference capture.
"""
from __future__ import annotations

import warnings

import numpy as np

from harness.errors import HarnessError, TapError
from harness.spec.model_spec import ModelSpec

ATTENTION = {"eager": "npu_validation_eager", "sdpa": "npu_validation_sdpa"}
_registered: set[str] = set()


class _TapState:
    """The tap of the running phase, shared by every hook of one model."""

    def __init__(self):
        self.tap = None

    def hand_over(self, name: str, flat):
        """Tap ``flat`` ([T, features] torch tensor); the replacement tensor, or None to keep it."""
        import torch

        given = flat.detach().to(torch.float32).contiguous().numpy()
        out = self.tap(name, given)
        if out is None:
            raise TapError(f"tap {name!r} returned None; it must return the value to continue with")
        if out is given:
            return None
        arr = np.array(out, dtype=np.float32)  # a copy: torch cannot wrap read-only arrays
        if arr.shape != given.shape:
            raise TapError(f"tap {name!r} returned shape {arr.shape}, expected {given.shape}")
        return torch.from_numpy(arr).to(flat.dtype)


def _register_attention(kind: str) -> str:
    """Register the tapping attention function of ``kind`` under this package's own name."""
    name = ATTENTION[kind]
    if name in _registered:
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    if kind == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as inner
        mask = sdpa_mask
    else:
        from transformers.models.llama.modeling_llama import eager_attention_forward as inner
        mask = eager_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        state: _TapState | None = getattr(module, "_npu_validation_taps", None)
        if state is not None and state.tap is not None:
            i, t = module.layer_idx, query.shape[2]
            new_q = query[0].transpose(0, 1).reshape(t, -1)  # [1, heads, T, hd] -> [T, heads * hd]
            forced = state.hand_over(f"layers.{i}.q_rope", new_q)
            if forced is not None:
                query = forced.reshape(t, query.shape[1], -1).transpose(0, 1).unsqueeze(0).contiguous()
            new_k = key[:, :, -t:, :]  # the new positions: a view of the KV cache's own storage
            forced = state.hand_over(f"layers.{i}.k_rope", new_k[0].transpose(0, 1).reshape(t, -1))
            if forced is not None:  # written into the cache, so later steps attend to the forced keys
                new_k.copy_(forced.reshape(t, key.shape[1], -1).transpose(0, 1).unsqueeze(0))
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    _registered.add(name)
    return name


def _tokens_flat(t):
    """[1, T, ...] -> [T, features]."""
    return t.reshape(t.shape[1], -1)


def _output_hook(state: _TapState, name: str):
    def hook(module, args, output):
        if state.tap is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        forced = state.hand_over(name, _tokens_flat(out))
        if forced is None:
            return None
        forced = forced.reshape(out.shape)
        return (forced, *output[1:]) if isinstance(output, tuple) else forced

    return hook


def _input_hook(state: _TapState, name: str):
    def hook(module, args):
        if state.tap is None:
            return None
        forced = state.hand_over(name, _tokens_flat(args[0]))
        if forced is None:
            return None
        return (forced.reshape(args[0].shape), *args[1:])

    return hook


def _install(model, spec: ModelSpec, state: _TapState) -> None:
    inner = model.model
    inner.embed_tokens.register_forward_hook(_output_hook(state, "embed"))
    for i, layer in enumerate(inner.layers):
        p, attn, mlp = f"layers.{i}.", layer.self_attn, layer.mlp
        attn._npu_validation_taps = state
        layer.input_layernorm.register_forward_hook(_output_hook(state, p + "attn_norm"))
        for proj in "qkv":
            getattr(attn, f"{proj}_proj").register_forward_hook(_output_hook(state, p + proj))
        if spec.has_qk_norm:
            attn.q_norm.register_forward_hook(_output_hook(state, p + "q_norm"))
            attn.k_norm.register_forward_hook(_output_hook(state, p + "k_norm"))
        attn.o_proj.register_forward_pre_hook(_input_hook(state, p + "attn"))
        attn.o_proj.register_forward_hook(_output_hook(state, p + "o"))
        layer.post_attention_layernorm.register_forward_pre_hook(_input_hook(state, p + "attn_residual"))
        layer.post_attention_layernorm.register_forward_hook(_output_hook(state, p + "ffn_norm"))
        mlp.gate_proj.register_forward_hook(_output_hook(state, p + "gate"))
        mlp.up_proj.register_forward_hook(_output_hook(state, p + "up"))
        mlp.down_proj.register_forward_pre_hook(_input_hook(state, p + "act"))
        mlp.down_proj.register_forward_hook(_output_hook(state, p + "down"))
        layer.register_forward_hook(_output_hook(state, p + "out"))
    inner.norm.register_forward_hook(_output_hook(state, "final_norm"))
    model.lm_head.register_forward_hook(_output_hook(state, "logits"))


def build_bf16_model(spec: ModelSpec, weights: dict[str, np.ndarray], attention: str):
    """The transformers model of ``spec`` in bf16 with the tapping ``attention`` ("eager" / "sdpa"),
    built without the default initialisation (its weights are overwritten at once)."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    impl = _register_attention(attention)
    config = spec.hf_config()
    config._attn_implementation = impl
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=impl)
    params = model.state_dict()
    missing = [k for k in params if k not in weights and not (k == "lm_head.weight" and spec.tied_embeddings)]
    if missing:
        raise HarnessError(f"hf-bf16-{attention}: weights missing for {spec.id}: {missing[:3]}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # copy_ only reads
        for key, value in weights.items():
            if key not in params:
                raise HarnessError(f"hf-bf16-{attention}: unexpected weight {key!r} for {spec.id}")
            if tuple(params[key].shape) != tuple(value.shape):
                raise HarnessError(f"hf-bf16-{attention}: weight {key} has shape {value.shape}, expected {tuple(params[key].shape)}")
            params[key].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
    if spec.tied_embeddings:
        model.tie_weights()
    return model.eval()


class HFDeployment:
    """transformers in bf16 behind the deployment contract; the KV cache lives between calls."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], attention: str):
        self.spec, self.name = spec, f"hf-bf16-{attention}"
        self.model = build_bf16_model(spec, weights, attention)
        self.state = _TapState()
        _install(self.model, spec, self.state)
        self.cache = None

    def _run(self, ids: np.ndarray, tap) -> np.ndarray:
        import torch

        self.state.tap = tap if tap is not None else (lambda name, value: value)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=torch.from_numpy(ids)[None, :], cache=self.cache, use_cache=True)
        finally:
            self.state.tap = None
        return out.logits[0].to(torch.float32).numpy()

    def prefill(self, input_ids, tap=None) -> np.ndarray:
        from transformers import DynamicCache

        ids = np.asarray(input_ids).reshape(-1).astype(np.int64)
        if ids.size == 0:
            raise HarnessError(f"{self.name} prefill: input_ids is empty")
        self.cache = DynamicCache(config=self.model.config)
        return self._run(ids, tap)

    def decode(self, token_id, tap=None) -> np.ndarray:
        if self.cache is None:
            raise HarnessError(f"{self.name} decode called before prefill")
        return self._run(np.array([int(token_id)], dtype=np.int64), tap)
