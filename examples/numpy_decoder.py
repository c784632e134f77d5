"""A deployment written from the contract alone: a plain NumPy fp32 decoder (Llama, Qwen2, Qwen3).

    harness gate --model qwen3-0.6b --deployment examples/numpy_decoder.py:factory --phase 5
    harness list --taps --model qwen3-0.6b        # the taps it hands over, in order, with shapes

Everything it needs comes from ``spec.config`` (the model's HF config.json keys) and the weights dict
(HF parameter names -> float32 arrays); every canonical tap goes through ``tap`` and the decoder
continues with what ``tap`` returns (the golden in isolated mode). docs/contract.md is the reference.
"""
from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight).astype(np.float32)


def inv_frequencies(config: dict, head_dim: int) -> np.ndarray:
    inv = 1.0 / config["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":  # Llama-3.2: long wavelengths slowed by `factor`
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
        inv = np.where(wavelen > old / low, inv / factor,
                       np.where(wavelen < old / high, inv, (1 - smooth) * inv / factor + smooth * inv))
    return inv


def rope(x: np.ndarray, positions: np.ndarray, inv: np.ndarray, heads: int) -> np.ndarray:
    """Half-split rotation of x [T, heads * head_dim] at ``positions``."""
    t = x.shape[0]
    x = x.reshape(t, heads, -1)
    angles = positions[:, None].astype(np.float64) * inv[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, -1)[:, None, :].astype(np.float32)
    sin = np.concatenate([np.sin(angles)] * 2, -1)[:, None, :].astype(np.float32)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rotated * sin).reshape(t, -1).astype(np.float32)


class NumpyDecoder:
    def __init__(self, spec, weights):
        c = spec.config
        self.c, self.w, self.n_layers = c, weights, spec.num_layers
        self.heads, self.kv_heads, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.eps = c["rms_norm_eps"]
        self.inv = inv_frequencies(c, self.hd)
        self.head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])

    def _layer(self, i: int, x: np.ndarray, positions: np.ndarray, tap) -> np.ndarray:
        w, p, hd = self.w, f"model.layers.{i}.", self.hd
        name = f"layers.{i}."

        def proj(kind: str, h: np.ndarray, param: str) -> np.ndarray:
            y = h @ w[p + param + ".weight"].T
            if p + param + ".bias" in w:  # Qwen2.5's q/k/v bias
                y = y + w[p + param + ".bias"]
            return tap(name + kind, y.astype(np.float32))

        h = tap(name + "attn_norm", rms_norm(x, w[p + "input_layernorm.weight"], self.eps))
        q, k, v = (proj(kind, h, f"self_attn.{kind}_proj") for kind in "qkv")
        t = x.shape[0]
        if p + "self_attn.q_norm.weight" in w:  # Qwen3: per-head RMSNorm over head_dim
            q = tap(name + "q_norm", rms_norm(q.reshape(t, -1, hd), w[p + "self_attn.q_norm.weight"], self.eps).reshape(t, -1))
            k = tap(name + "k_norm", rms_norm(k.reshape(t, -1, hd), w[p + "self_attn.k_norm.weight"], self.eps).reshape(t, -1))
        q = tap(name + "q_rope", rope(q, positions, self.inv, self.heads))
        k = tap(name + "k_rope", rope(k, positions, self.inv, self.kv_heads))
        keys, values = self.cache[i]
        keys, values = np.concatenate([keys, k]), np.concatenate([values, v])
        self.cache[i] = (keys, values)
        ctx = np.empty((t, self.heads * hd), np.float32)
        groups = self.heads // self.kv_heads
        visible = np.arange(len(keys))[None, :] <= positions[:, None]  # causal over the whole cache
        for head in range(self.heads):
            kv = head // groups
            qh = q[:, head * hd:(head + 1) * hd]
            scores = qh @ keys[:, kv * hd:(kv + 1) * hd].T / math.sqrt(hd)
            scores = np.where(visible, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            ctx[:, head * hd:(head + 1) * hd] = probs @ values[:, kv * hd:(kv + 1) * hd]
        ctx = tap(name + "attn", ctx)
        o = tap(name + "o", (ctx @ w[p + "self_attn.o_proj.weight"].T).astype(np.float32))
        x = tap(name + "attn_residual", (x + o).astype(np.float32))
        h = tap(name + "ffn_norm", rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps))
        gate = proj("gate", h, "mlp.gate_proj")
        up = proj("up", h, "mlp.up_proj")
        act = tap(name + "act", (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32))
        down = proj("down", act, "mlp.down_proj")
        return tap(name + "out", (x + down).astype(np.float32))

    def _forward(self, ids: np.ndarray, tap) -> np.ndarray:
        positions = np.arange(self.pos, self.pos + len(ids))
        x = tap("embed", self.w["model.embed_tokens.weight"][ids].astype(np.float32))
        for i in range(self.n_layers):
            x = self._layer(i, x, positions, tap)
        x = tap("final_norm", rms_norm(x, self.w["model.norm.weight"], self.eps))
        self.pos += len(ids)
        return tap("logits", (x @ self.head.T).astype(np.float32))

    def prefill(self, input_ids, tap):
        width = self.kv_heads * self.hd
        self.cache = [(np.zeros((0, width), np.float32), np.zeros((0, width), np.float32))] * self.n_layers
        self.pos = 0
        return self._forward(np.asarray(input_ids).reshape(-1), tap)

    def decode(self, token_id, tap):
        return self._forward(np.array([int(token_id)]), tap)


def factory(spec, weights):
    return NumpyDecoder(spec, weights)
