"""A decoder written as plain torch functions over a weights dict, in bf16: the shape of many CPU
references that NPU teams keep beside their kernels (no nn.Module, no harness imports).

It knows nothing about the harness; ``torch_functions_adapter.py`` beside it gates it with a mapping.
Covers the Llama (Llama-3 RoPE scaling), Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) families.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(weight.dtype)


def rope_tables(config: dict, head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [1, heads, T, head_dim], half-split rotation."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q: [1, H, T, D]; k, v: [1, KV, S, D] (the whole cache); causal from position ``start``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    t, s = q.shape[2], k.shape[2]
    mask = torch.arange(s)[None, :] > (start + torch.arange(t))[:, None]
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return (probs @ v.float()).to(q.dtype)


def transformer_block(x, w, i, config, cos, sin, cache, start):  # type: ignore[no-untyped-def]
    p = f"model.layers.{i}."
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    eps = config["rms_norm_eps"]
    t = x.shape[1]
    h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
    q = F.linear(h, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
    k = F.linear(h, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
    v = F.linear(h, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
    q, k, v = (y.view(1, t, n, hd) for y, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    if p + "self_attn.q_norm.weight" in w:
        q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
        k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if i in cache:
        k = torch.cat([cache[i][0], k], dim=2)
        v = torch.cat([cache[i][1], v], dim=2)
    cache[i] = (k, v)
    ctx = attention(q, k, v, start).transpose(1, 2).reshape(1, t, heads * hd)
    x = x + F.linear(ctx, w[p + "self_attn.o_proj.weight"])
    h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    gate = F.linear(h, w[p + "mlp.gate_proj.weight"])
    up = F.linear(h, w[p + "mlp.up_proj.weight"])
    return x + F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])


def forward(ids: torch.Tensor, w: dict, config: dict, cache: dict, start: int) -> torch.Tensor:
    """Logits [1, T, vocab] of ``ids`` [T] at positions start.. (appends to ``cache``)."""
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    cos, sin = rope_tables(config, hd, torch.arange(start, start + ids.numel()))
    x = F.embedding(ids[None, :], w["model.embed_tokens.weight"])
    for i in range(config["num_hidden_layers"]):
        x = transformer_block(x, w, i, config, cos, sin, cache, start)
    x = rms_norm(x, w["model.norm.weight"], config["rms_norm_eps"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return F.linear(x, head)
