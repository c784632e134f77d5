"""Reference ops in NumPy, written from the Hugging Face definitions, with the precision knobs the cause
hints recompute a tap under (bf16 statistics, bf16 accumulation, round-toward-zero).

Every function takes and returns float32 arrays and computes in float64 unless a knob says otherwise.
The emulator (harness.deployment.emulator) never imports this module: the hints and independent checks
must not share arithmetic with the device under test they judge.
"""
from __future__ import annotations

import numpy as np

from harness.spec.rope import rope_inv_freq

inv_freq = rope_inv_freq  # the spec's one definition (harness.spec.rope)


# -- rounding into bf16 --------------------------------------------------------------------------------

def bf16(x: np.ndarray) -> np.ndarray:
    """Round to bf16 (nearest, ties to even), returned as float32."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def bf16_rtz(x: np.ndarray) -> np.ndarray:
    """Round toward zero into bf16 (the low 16 bits of the float32 dropped), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFF0000)).view(np.float32)


# -- RMSNorm -------------------------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, group: int | None = None) -> np.ndarray:
    """HF RMSNorm over the last ``group`` features (default: the whole row)."""
    rows, width = x.shape
    g = width if group is None else group
    xs = x.reshape(rows, width // g, g).astype(np.float64)
    out = xs / np.sqrt(np.mean(xs * xs, axis=-1, keepdims=True) + eps)
    return (out.reshape(rows, width) * np.tile(w, width // len(w))).astype(np.float32)


def rmsnorm_bf16_stats(x: np.ndarray, w: np.ndarray, eps: float, block: int | None = None,
                       every_step: bool = False) -> np.ndarray:
    """RMSNorm with its statistics in bf16: the input in bf16, the mean of squares rounded to bf16
    (``block``: the running sum of squares rounded to bf16 after every ``block`` elements, else one fp32
    reduction rounded once), 1/rms rounded to bf16, then x * inv rounded and times the weight rounded.
    ``every_step``: every intermediate a bf16 tensor, as torch computes ``x.pow(2).mean(-1)`` and
    ``rsqrt(var + eps)`` on bf16 tensors - the squares and ``var + eps`` rounded too."""
    xb = bf16(x).astype(np.float64)
    sq = bf16(xb * xb).astype(np.float64) if every_step else xb * xb
    if block is None:
        var = bf16(np.mean(sq, axis=-1, keepdims=True))
    else:
        total = np.zeros((x.shape[0], 1), np.float32)
        for k0 in range(0, x.shape[1], block):
            total = bf16(total + np.sum(sq[:, k0:k0 + block], axis=-1, keepdims=True))
        var = bf16(total / x.shape[1])
    shifted = bf16(var + np.float32(eps)) if every_step else var.astype(np.float64) + eps
    inv = bf16(1.0 / np.sqrt(shifted.astype(np.float64)))
    return bf16(bf16(xb * inv) * bf16(w)[None, :])


# -- RoPE, attention, SiLU -----------------------------------------------------------------------------

def rope(x: np.ndarray, positions: np.ndarray, inv: np.ndarray, head_dim: int, style: str = "half") -> np.ndarray:
    """Rotate ``x`` [T, heads*head_dim]: ``half`` (HF's rotate_half) or ``interleaved`` pairs (2i, 2i+1)."""
    t = x.shape[0]
    xs = x.reshape(t, -1, head_dim).astype(np.float64)
    ang = positions[:, None].astype(np.float64) * inv[None, :]          # [T, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if style == "half":
        x1, x2 = xs[..., : head_dim // 2], xs[..., head_dim // 2:]
        out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        xe, xo = xs[..., 0::2], xs[..., 1::2]
        out = np.empty_like(xs)
        out[..., 0::2], out[..., 1::2] = xe * cos - xo * sin, xe * sin + xo * cos
    return out.reshape(t, -1).astype(np.float32)


def _heads(q: np.ndarray, k: np.ndarray, v: np.ndarray, head_dim: int, kv_map: np.ndarray):
    t, length = q.shape[0], k.shape[0]
    qh = q.reshape(t, -1, head_dim).transpose(1, 0, 2).astype(np.float64)       # [H, T, hd]
    kh = k.reshape(length, -1, head_dim).transpose(1, 0, 2)[kv_map].astype(np.float64)
    vh = v.reshape(length, -1, head_dim).transpose(1, 0, 2)[kv_map].astype(np.float64)
    return qh, kh, vh


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, head_dim: int, kv_map: np.ndarray,
              scale: float, mask_offset: float = 0) -> np.ndarray:
    """softmax(q k^T * scale, key j visible when j <= pos + mask_offset) v; q [T, H*hd], k/v [L, KV*hd]."""
    t, length = q.shape[0], k.shape[0]
    qh, kh, vh = _heads(q, k, v, head_dim, kv_map)
    s = np.einsum("htd,hld->htl", qh, kh) * scale
    visible = np.arange(length)[None, :] <= (q_pos[:, None] + mask_offset)
    s = np.where(visible[None], s, -np.inf)
    # A query that sees no key at all (a mask hiding its own token at position 0) gets a zero context.
    top = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    return np.einsum("htl,hld->thd", p, vh).reshape(t, -1).astype(np.float32)


def attention_bf16_stats(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, head_dim: int,
                         kv_map: np.ndarray, scale: float, block: int) -> np.ndarray:
    """Causal attention with an online softmax over ``block`` keys whose running max and running sum are
    rounded to bf16 after every block (a flash kernel keeping its statistics in bf16); everything else
    exact. ``block`` 1 is a softmax summing its exponentials in a bf16 accumulator."""
    t, length = q.shape[0], k.shape[0]
    qh, kh, vh = _heads(q, k, v, head_dim, kv_map)
    heads = qh.shape[0]
    m = np.full((heads, t, 1), -np.inf)
    l_sum = np.zeros((heads, t, 1))
    o = np.zeros((heads, t, head_dim))
    last = int(q_pos.max())
    for b0 in range(0, min(length, last + 1), block):
        b1 = min(b0 + block, length)
        s = np.einsum("htd,hld->htl", qh, kh[:, b0:b1]) * scale
        s = np.where(np.arange(b0, b1)[None, None, :] <= q_pos[None, :, None], s, -np.inf)
        m_new = bf16(np.maximum(m, s.max(axis=-1, keepdims=True))).astype(np.float64)
        with np.errstate(invalid="ignore"):
            alpha = np.nan_to_num(np.exp(m - m_new), nan=0.0)
        p = np.exp(s - np.where(np.isfinite(m_new), m_new, 0.0))
        l_sum = bf16(l_sum * alpha + p.sum(axis=-1, keepdims=True)).astype(np.float64)
        o = o * alpha + np.einsum("htl,hld->htd", p, vh[:, b0:b1])
        m = m_new
    out = o / np.maximum(l_sum, 1e-300)
    return out.transpose(1, 0, 2).reshape(t, -1).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


# -- GEMM ----------------------------------------------------------------------------------------------

def gemm(a: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``a @ w.T + bias`` in float64 (HF weight layout [N, K])."""
    out = a.astype(np.float64) @ w.astype(np.float64).T
    return (out if bias is None else out + bias).astype(np.float32)


def bf16_accumulate(a: np.ndarray, w: np.ndarray, k_tile: int, bias: np.ndarray | None = None,
                    order: str = "sequential") -> np.ndarray:
    """``a @ w.T`` with bf16 operands whose products are summed in fp32 within each K tile, the tile
    partials combined in a bf16 accumulator (rounded after every addition), output rounded to bf16.

    ``order``: ``sequential`` adds tile after tile into the running sum (the bias, if any, first);
    ``pairwise`` adds the tile partials as a binary tree (each sum rounded; partials held on a stack,
    so memory stays O(log tiles)), bias last."""
    a, w = bf16(a), bf16(w)
    partials = (a[:, k0:k0 + k_tile] @ w[:, k0:k0 + k_tile].T for k0 in range(0, a.shape[1], k_tile))
    if order == "pairwise":
        stack: list[tuple[int, np.ndarray]] = []          # (tree level, partial sum)
        for value in partials:
            level = 0
            while stack and stack[-1][0] == level:
                value = bf16(stack.pop()[1] + value)
                level += 1
            stack.append((level, value))
        total = stack.pop()[1]
        while stack:
            total = bf16(stack.pop()[1] + total)
        return bf16(total if bias is None else total + bias[None, :])
    total = np.zeros((a.shape[0], w.shape[0]), np.float32) if bias is None else np.tile(bias, (a.shape[0], 1))
    for part in partials:
        total = bf16(total + part)
    return bf16(total)
