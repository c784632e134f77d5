"""A Llama / Qwen2 / Qwen3 decoder in NumPy whose numerics are an ``Arithmetic``: the engine of the
NumPy validation deployments. Written from the Hugging Face model definitions, sharing nothing with
the emulator; implements the deployment contract (``prefill`` / ``decode`` handing every canonical tap
to ``tap`` and continuing with what it returns).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from harness.deployment.validation import rope
from harness.deployment.validation.arithmetic import Arithmetic
from harness.errors import HarnessError, TapError
from harness.spec.model_spec import ModelSpec

Tap = Callable[[str, np.ndarray], np.ndarray]
FAMILIES = ("llama", "qwen2", "qwen3")
_CACHE_SLACK = 32  # decode positions the KV cache holds beyond the prompt before it grows


def _pass_through(name: str, value: np.ndarray) -> np.ndarray:
    return value


class _LayerWeights:
    """One decoder layer's weights in HF [out, in] layout, as the arithmetic holds them."""

    def __init__(self, get: Callable[[str], np.ndarray], i: int, spec: ModelSpec, arith: Arithmetic):
        p = f"model.layers.{i}."
        self.attn_norm = get(p + "input_layernorm.weight")
        self.ffn_norm = get(p + "post_attention_layernorm.weight")
        wq, wk, wv = (get(p + f"self_attn.{x}_proj.weight") for x in "qkv")
        self.o = get(p + "self_attn.o_proj.weight")
        gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
        self.down = get(p + "mlp.down_proj.weight")
        self.bias = None
        if spec.has_qkv_bias:
            self.bias = tuple(get(p + f"self_attn.{x}_proj.bias").astype(arith.dtype) for x in "qkv")
        self.q_norm = self.k_norm = None
        if spec.has_qk_norm:
            self.q_norm, self.k_norm = get(p + "self_attn.q_norm.weight"), get(p + "self_attn.k_norm.weight")
        self.qkv_split = (wq.shape[0], wq.shape[0] + wk.shape[0])
        self.q, self.k, self.v, self.gate, self.up = wq, wk, wv, gate, up

    # The fused members' concatenated weights, built when the GEMM runs and dropped after it: held for
    # every layer they would add half the model's weights again (3.7 GB at 1.7B), and the product is
    # the same either way (one GEMM over the concatenation).
    def qkv(self) -> np.ndarray:
        return np.concatenate([self.q, self.k, self.v])

    def gate_up(self) -> np.ndarray:
        return np.concatenate([self.gate, self.up])


class NumpyDecoder:
    """One model's decoder; ``arith`` says how it computes."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], arith: Arithmetic, name: str):
        if spec.model_type not in FAMILIES:
            raise HarnessError(f"{name}: model_type {spec.model_type!r} not supported ({', '.join(FAMILIES)})")
        self.spec, self.arith, self.name = spec, arith, name
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim

        def get(key: str) -> np.ndarray:
            if key not in weights:
                raise HarnessError(f"{name}: weight {key!r} missing for {spec.id} ({spec.scale})")
            return arith.weight(weights[key])

        self.embed = get("model.embed_tokens.weight")
        self.lm_head = self.embed if spec.tied_embeddings else get("lm_head.weight")
        self.final_norm = get("model.norm.weight")
        self.layers = [_LayerWeights(get, i, spec, arith) for i in range(spec.num_layers)]
        self.eps = spec.rms_norm_eps
        self.freqs = rope.inverse_frequencies(self.head_dim, spec.rope_theta, spec.rope_scaling)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.pos = 0
        self.cache: list[tuple[np.ndarray, np.ndarray]] = []

    # -- the deployment contract ------------------------------------------------------------------
    def prefill(self, input_ids, tap: Tap | None = None) -> np.ndarray:
        ids = self._ids(input_ids, "prefill input_ids")
        if ids.size == 0:
            raise HarnessError(f"{self.name} prefill: input_ids is empty")
        cap = ids.size + _CACHE_SLACK
        self.cache = [(np.zeros((cap, self.kv_heads, self.head_dim), self.arith.dtype),
                       np.zeros((cap, self.kv_heads, self.head_dim), self.arith.dtype)) for _ in self.layers]
        self.pos = 0
        return self._forward(ids, tap or _pass_through)

    def decode(self, token_id, tap: Tap | None = None) -> np.ndarray:
        if not self.cache:
            raise HarnessError(f"{self.name} decode called before prefill")
        return self._forward(self._ids([int(token_id)], "decode token_id"), tap or _pass_through)

    # -- internals ---------------------------------------------------------------------------------
    def _ids(self, ids, what: str) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            raise HarnessError(f"{self.name} {what}: expected integer token ids, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.vocab_size):
            raise HarnessError(f"{self.name} {what}: token id outside vocabulary [0, {self.spec.vocab_size})")
        return ids.astype(np.int64)

    def _tap(self, tap: Tap, name: str, value: np.ndarray) -> np.ndarray:
        """Hand ``value`` over as 2-D float32; continue with what ``tap`` returns, stored as this
        deployment stores values (the f64 deployment continues from the fp32 value: rounded at each tap)."""
        given = np.ascontiguousarray(value.reshape(value.shape[0], -1), dtype=np.float32)
        out = tap(name, given)
        if out is None:
            raise TapError(f"tap {name!r} returned None; it must return the value to continue with")
        if out is given and self.arith.compute == "fp32":
            return value
        arr = np.asarray(out, dtype=np.float32)
        if arr.shape != given.shape:
            raise TapError(f"tap {name!r} returned shape {arr.shape}, expected {given.shape}")
        return self.arith.store(arr.astype(self.arith.dtype)).reshape(value.shape)

    def _forward(self, ids: np.ndarray, tap: Tap) -> np.ndarray:
        a = self.arith
        x = self._tap(tap, "embed", a.store(self.embed[ids].astype(a.dtype)))
        positions = np.arange(self.pos, self.pos + ids.size)
        cos, sin = rope.cos_sin(positions, self.freqs, a.dtype)
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, positions, cos, sin, tap)
        self.pos += ids.size
        h = self._tap(tap, "final_norm", a.rmsnorm(x, self.final_norm, self.eps))
        logits = self._tap(tap, "logits", a.store(a.matmul(h, self.lm_head)))
        return np.ascontiguousarray(logits, dtype=np.float32)

    def _project(self, h: np.ndarray, w: _LayerWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.arith
        if a.fused:
            qkv = a.matmul(h, w.qkv())
            parts = np.split(qkv, w.qkv_split, axis=1)
        else:
            parts = [a.matmul(h, m) for m in (w.q, w.k, w.v)]
        if w.bias is not None:
            parts = [p + b for p, b in zip(parts, w.bias)]
        return tuple(a.store(p) for p in parts)

    def _mlp_in(self, h: np.ndarray, w: _LayerWeights) -> tuple[np.ndarray, np.ndarray]:
        a = self.arith
        if a.fused:
            gate, up = np.split(a.matmul(h, w.gate_up()), 2, axis=1)
        else:
            gate, up = a.matmul(h, w.gate), a.matmul(h, w.up)
        return a.store(gate), a.store(up)

    def _layer(self, i: int, w: _LayerWeights, x: np.ndarray, positions: np.ndarray,
               cos: np.ndarray, sin: np.ndarray, tap: Tap) -> np.ndarray:
        a, p, t = self.arith, f"layers.{i}.", x.shape[0]
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        h = self._tap(tap, p + "attn_norm", a.rmsnorm(x, w.attn_norm, self.eps))
        q, k, v = self._project(h, w)
        q, k, v = (self._tap(tap, p + n, val) for n, val in (("q", q), ("k", k), ("v", v)))
        q, k, v = q.reshape(t, nh, hd), k.reshape(t, nkv, hd), v.reshape(t, nkv, hd)
        if w.q_norm is not None:
            q = self._tap(tap, p + "q_norm", a.rmsnorm(q, w.q_norm, self.eps).reshape(t, -1)).reshape(t, nh, hd)
            k = self._tap(tap, p + "k_norm", a.rmsnorm(k, w.k_norm, self.eps).reshape(t, -1)).reshape(t, nkv, hd)
        q = self._tap(tap, p + "q_rope", a.store(rope.rotate(q, cos, sin)).reshape(t, -1)).reshape(t, nh, hd)
        k = self._tap(tap, p + "k_rope", a.store(rope.rotate(k, cos, sin)).reshape(t, -1)).reshape(t, nkv, hd)
        keys, values = self._append_kv(i, k, v)
        ctx = a.attention(q, keys, values, positions, self.scale)
        ctx = self._tap(tap, p + "attn", ctx.reshape(t, nh * hd))
        o = self._tap(tap, p + "o", a.store(a.matmul(ctx, w.o)))
        r = self._tap(tap, p + "attn_residual", a.store(x + o))
        h2 = self._tap(tap, p + "ffn_norm", a.rmsnorm(r, w.ffn_norm, self.eps))
        gate, up = self._mlp_in(h2, w)
        gate = self._tap(tap, p + "gate", gate)
        up = self._tap(tap, p + "up", up)
        act = self._tap(tap, p + "act", a.silu_mul(gate, up))
        down = self._tap(tap, p + "down", a.store(a.matmul(act, w.down)))
        return self._tap(tap, p + "out", a.store(r + down))

    def _append_kv(self, i: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k / v [T, kv_heads, hd] at the current positions; return every cached position."""
        keys, values = self.cache[i]
        end = self.pos + k.shape[0]
        if end > keys.shape[0]:
            grow = max(2 * keys.shape[0], end)
            keys = np.concatenate([keys, np.zeros((grow - keys.shape[0],) + keys.shape[1:], keys.dtype)])
            values = np.concatenate([values, np.zeros((grow - values.shape[0],) + values.shape[1:], values.dtype)])
            self.cache[i] = (keys, values)
        keys[self.pos:end] = k
        values[self.pos:end] = v
        return keys[:end], values[:end]
