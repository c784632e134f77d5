"""Run a transformers model and capture every canonical tap, for prefill and each decode step.

Taps come from module forward hooks (projections, norms, MLP, decoder layers) and, for the
post-RoPE q/k, from an attention function registered in transformers' AttentionInterface that
wraps the stock SDPA attention - never a re-implementation. Where a tap is given a forced value
(teacher forcing), the hook records the module's own output and hands the forced value downstream:
that is how the isolated-mode baseline (each op in bf16 on the golden inputs) is produced.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from harness.reference.hf_model import ATTN_IMPL
from harness.spec.model_spec import ModelSpec

_ACTIVE: contextvars.ContextVar["TapRecorder | None"] = contextvars.ContextVar("npu_harness_recorder", default=None)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] -> [T, features] (batch 1; heads already head-major in the last dims)."""
    return t.reshape(t.shape[1], -1)


def _heads_flat(t: torch.Tensor) -> torch.Tensor:
    """[1, heads, T, hd] -> [T, heads * hd], head-major like the projection layouts."""
    return t[0].transpose(0, 1).reshape(t.shape[2], -1)


Force = Callable[[str, str], "np.ndarray | None"]  # (phase, tap) -> the value to force, or None
Sink = Callable[[str, str, torch.Tensor], None]  # (phase, tap, value [T, features]) as captured


@dataclass
class TapRecorder:
    """Collects taps of the current phase, or hands each to ``sink`` as it is captured (then nothing is
    kept but the last logits row, for greedy decoding); optionally replaces taps with forced values."""

    phase: str = "prefill"
    taps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    force: Force | None = None
    sink: Sink | None = None
    last_logits: torch.Tensor | None = None

    def record(self, name: str, value: torch.Tensor) -> torch.Tensor | None:
        """Record ``value`` ([T, features]); return the forced replacement or None."""
        value = value.detach()
        if name == "logits":
            self.last_logits = value[-1].clone()
        if self.sink is not None:
            self.sink(self.phase, name, value)
        else:
            self.taps.setdefault(self.phase, {})[name] = value
        if self.force is None:
            return None
        forced = self.force(self.phase, name)
        if forced is None:
            return None
        return torch.from_numpy(np.array(forced, dtype=np.float32)).to(value.dtype)  # a copy: stores map read-only

    def numpy(self, keep_bf16: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Captured taps as float32 NumPy arrays (bf16 values are exact in float32); with ``keep_bf16`` a
        bf16 run's taps stay bfloat16 (ml_dtypes, zero-copy), half the bytes for the store to write."""
        return {phase: {name: to_numpy(t, keep_bf16) for name, t in taps.items()} for phase, taps in self.taps.items()}


def to_numpy(t: torch.Tensor, keep_bf16: bool = False) -> np.ndarray:
    """A captured tap as NumPy: float32, or bfloat16 (ml_dtypes, zero-copy) for a bf16 tap with ``keep_bf16``."""
    if keep_bf16 and t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.to(torch.float32).numpy()


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that taps q/k after RoPE (k: the new positions, as written to the KV cache)."""
    rec = _ACTIVE.get()
    if rec is not None:
        i, T = module.layer_idx, query.shape[2]
        forced = rec.record(f"layers.{i}.q_rope", _heads_flat(query))
        if forced is not None:
            query = forced.reshape(T, query.shape[1], -1).transpose(0, 1).unsqueeze(0).contiguous()
        new_keys = key[:, :, -T:, :]
        forced = rec.record(f"layers.{i}.k_rope", _heads_flat(new_keys))
        if forced is not None:
            # In place: the tensor is the KV cache's own storage, so later steps see the forced keys.
            new_keys.copy_(forced.reshape(T, key.shape[1], -1).transpose(0, 1).unsqueeze(0))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPL, _capture_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def _output_hook(name: str, reshape=_flat):
    def hook(module, args, output):
        rec = _ACTIVE.get()
        if rec is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        forced = rec.record(name, reshape(out))
        if forced is None:
            return None
        forced = forced.reshape(out.shape)
        return (forced, *output[1:]) if isinstance(output, tuple) else forced

    return hook


def _input_hook(name: str):
    def hook(module, args):
        rec = _ACTIVE.get()
        if rec is None:
            return None
        forced = rec.record(name, _flat(args[0]))
        if forced is None:
            return None
        return (forced.reshape(args[0].shape), *args[1:])

    return hook


def _per_head_norm_flat(t: torch.Tensor) -> torch.Tensor:
    """Qwen3 q/k norm output [1, T, heads, hd] -> [T, heads * hd]."""
    return t.reshape(t.shape[1], -1)


def install_hooks(model, spec: ModelSpec) -> list:
    """Register the tap hooks on ``model``; returns the handles (call ``.remove()`` to undo)."""
    inner = model.model
    h = [inner.embed_tokens.register_forward_hook(_output_hook("embed"))]
    for i, layer in enumerate(inner.layers):
        p = f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        h.append(layer.input_layernorm.register_forward_hook(_output_hook(p + "attn_norm")))
        for proj in ("q", "k", "v"):
            h.append(getattr(attn, f"{proj}_proj").register_forward_hook(_output_hook(p + proj)))
        if spec.has_qk_norm:
            h.append(attn.q_norm.register_forward_hook(_output_hook(p + "q_norm", _per_head_norm_flat)))
            h.append(attn.k_norm.register_forward_hook(_output_hook(p + "k_norm", _per_head_norm_flat)))
        h.append(attn.o_proj.register_forward_pre_hook(_input_hook(p + "attn")))
        h.append(attn.o_proj.register_forward_hook(_output_hook(p + "o")))
        h.append(layer.post_attention_layernorm.register_forward_pre_hook(_input_hook(p + "attn_residual")))
        h.append(layer.post_attention_layernorm.register_forward_hook(_output_hook(p + "ffn_norm")))
        h.append(mlp.gate_proj.register_forward_hook(_output_hook(p + "gate")))
        h.append(mlp.up_proj.register_forward_hook(_output_hook(p + "up")))
        h.append(mlp.down_proj.register_forward_pre_hook(_input_hook(p + "act")))
        h.append(mlp.down_proj.register_forward_hook(_output_hook(p + "down")))
        h.append(layer.register_forward_hook(_output_hook(p + "out")))
    h.append(inner.norm.register_forward_hook(_output_hook("final_norm")))
    h.append(model.lm_head.register_forward_hook(_output_hook("logits")))
    return h


@dataclass
class ReferenceRun:
    """Taps per phase (``prefill``, ``decode.0``, ...) and the tokens that produced them."""

    taps: dict[str, dict[str, np.ndarray]]
    input_ids: np.ndarray
    decode_tokens: np.ndarray


def _dict_force(force: dict[str, dict[str, np.ndarray]]) -> Force:
    return lambda phase, name: force.get(phase, {}).get(name)


def run_reference(
    model,
    spec: ModelSpec,
    input_ids: np.ndarray,
    *,
    decode_steps: int = 0,
    decode_tokens: np.ndarray | None = None,
    force: dict[str, dict[str, np.ndarray]] | Force | None = None,
    keep_bf16: bool = False,
    sink: Sink | None = None,
    layer_first: bool = False,
) -> ReferenceRun:
    """Prefill ``input_ids`` then decode with the KV cache, capturing every tap.

    Decode tokens are ``decode_tokens`` when given (the fp32 golden's greedy tokens, fed to every
    other run), else chosen greedily from this run's own logits. ``force`` maps phase -> tap -> value
    (or is a function of (phase, tap)) to teacher-force (each op then sees golden inputs).
    ``keep_bf16``: see ``TapRecorder.numpy``. With ``sink(phase, tap, tensor)`` every tap goes there the
    moment it is captured and the returned run holds no taps (streaming: the golden build writes and
    releases each one); the tensor is only valid during the call. ``layer_first`` (with ``decode_tokens``):
    every phase through each layer in turn (harness.reference.layer_first: a streamed model then reads
    each layer once per run, not once per phase), with the same taps.
    """
    from transformers import DynamicCache

    from harness.reference import layer_first as lf

    if isinstance(force, dict):
        force = _dict_force(force)
    rec = TapRecorder(force=force, sink=sink)
    handles = install_hooks(model, spec)
    token = _ACTIVE.set(rec)
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None, :]
            if layer_first and (decode_tokens is not None or not decode_steps) and lf.supported(model):
                tokens = [int(t) for t in (decode_tokens[:decode_steps] if decode_steps else [])]
                lf.run_layer_first(model, rec, cache, [("prefill", ids)] + [
                    (f"decode.{step}", torch.tensor([[t]])) for step, t in enumerate(tokens)])
            else:
                tokens = _step_by_step(model, rec, cache, ids, decode_steps, decode_tokens)
    finally:
        _ACTIVE.reset(token)
        for handle in handles:
            handle.remove()
    return ReferenceRun(rec.numpy(keep_bf16), np.asarray(input_ids, dtype=np.int64), np.asarray(tokens, dtype=np.int64))


def _step_by_step(model, rec: TapRecorder, cache, ids: torch.Tensor, decode_steps: int,
                  decode_tokens: np.ndarray | None) -> list[int]:
    """Prefill, then each decode step through the whole model (greedy unless ``decode_tokens``)."""
    out = model(input_ids=ids, cache=cache, use_cache=True)
    del out  # the logits are a tap: the sink has them, nothing else keeps them
    tokens: list[int] = []
    for step in range(decode_steps):
        if decode_tokens is not None:
            nxt = int(decode_tokens[step])
        else:
            nxt = int(torch.argmax(rec.last_logits.float()))
        tokens.append(nxt)
        rec.phase = f"decode.{step}"
        out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
        del out
    return tokens
