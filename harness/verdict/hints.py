"""Cause hints: test known bug signatures against the first failing tap.

Each signature recomputes the failing tap from the *golden* inputs under a hypothesised bug (RoPE with
interleaved pairs, a different theta, no Llama-3 scaling; q/k/v without bias; no q/k norm; a shifted or
absent causal mask; a wrong attention scale or GQA head map; a stale or mislaid KV cache; a transposed
weight; a crude SiLU; a skipped residual or norm; a wrong RMSNorm eps; an untied LM head; bf16
accumulation; an unwritten GEMM tile remainder...) and measures how far the deployment's value is from
it. A hypothesis matches when the deployment sits at most ``MATCH_RATIO`` times as far from it as from
the golden; the closest match is reported as ``"<id>: <one line> (error under hypothesis X vs actual
Y)"`` with relative Frobenius errors, else ``"no known signature"``.

Recomputing from golden inputs works in both modes: in cumulative mode the deployment's inputs differ
from the golden by bf16 noise only (every earlier tap passed), which is small next to a real bug.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec
from harness.spec.rope import rope_inv_freq

NO_SIGNATURE = "no known signature"
# The deployment must be at most this fraction as far from the hypothesis as from the golden. A bug
# the hypothesis reproduces leaves only bf16 noise (ratio << 0.1 in isolated mode, ~0.2-0.4 in
# cumulative mode for the smallest faults); a hypothesis unrelated to the bug scores >= 1.
MATCH_RATIO = 0.5
_MAX_COLUMNS = 1024       # GEMM hypotheses are scored on at most this many evenly spaced columns
_MAX_ROWS = 64            # ... and rows, so a full-scale LM head costs milliseconds, not minutes
_EPS_CANDIDATES = (1e-5, 1e-6, 1e-8, 1e-12)
_THETA_CANDIDATES = (10000.0, 100000.0, 500000.0, 1000000.0, 5000000.0)
_ACC_TILES = (8, 16, 32, 64, 128)


@dataclass
class Context:
    """What a signature may read: the spec, the goldens and weights, the failing tap and its DUT value."""

    spec: ModelSpec
    golden: Any
    weights: dict[str, np.ndarray]
    phase: str
    kind: str
    layer: int | None
    dut: np.ndarray

    def g(self, kind: str, layer: int | None = None, phase: str | None = None) -> np.ndarray:
        """The fp32 golden of ``kind`` (this layer and phase by default)."""
        layer = self.layer if layer is None else layer
        name = kind if kind in tapspec.GLOBAL_HEAD + tapspec.GLOBAL_TAIL else f"layers.{layer}.{kind}"
        return self.golden.tensor(phase or self.phase, name, "fp32").astype(np.float32)

    def w(self, name: str) -> np.ndarray | None:
        value = self.weights.get(name) if self.weights else None
        return None if value is None else np.asarray(value, dtype=np.float32)

    def lw(self, suffix: str) -> np.ndarray | None:
        """A weight of this layer by its HF suffix (``self_attn.q_proj.weight``)."""
        return self.w(f"model.layers.{self.layer}.{suffix}")

    @property
    def prompt_len(self) -> int:
        return len(self.golden.input_ids)

    @property
    def step(self) -> int | None:
        """The decode step of the phase (None in prefill)."""
        return None if self.phase == "prefill" else int(self.phase.split(".")[1])

    def positions(self) -> np.ndarray:
        return np.arange(self.prompt_len) if self.step is None else np.array([self.prompt_len + self.step])

    def cache(self, kind: str) -> np.ndarray:
        """This layer's golden ``k_rope`` or ``v`` over every position up to the current one."""
        phases = ["prefill"] if self.step is None else ["prefill", *(f"decode.{s}" for s in range(self.step + 1))]
        return np.concatenate([self.g(kind, phase=p) for p in phases], axis=0)


@dataclass(frozen=True)
class Hypothesis:
    """A hypothesised tap value; ``rows`` / ``cols`` when it covers only that sample of the tap."""

    id: str
    line: str
    value: np.ndarray
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None


Candidates = Iterator[Hypothesis]


# -- reference pieces, fp32 numpy, written from the HF definitions ------------------------------------

def bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest even), returned as float32."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, group: int | None = None) -> np.ndarray:
    """HF RMSNorm over the last ``group`` features (default: the whole row)."""
    rows, width = x.shape
    g = width if group is None else group
    xs = x.reshape(rows, width // g, g).astype(np.float64)
    out = xs / np.sqrt(np.mean(xs * xs, axis=-1, keepdims=True) + eps)
    return (out.reshape(rows, width) * np.tile(w, width // len(w))).astype(np.float32)


inv_freq = rope_inv_freq  # the spec's one definition (harness.spec.rope)


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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, head_dim: int, kv_map: np.ndarray,
              scale: float, mask_offset: float = 0) -> np.ndarray:
    """softmax(q k^T * scale, key j visible when j <= pos + mask_offset) v; q [T, H*hd], k/v [L, KV*hd]."""
    t, length = q.shape[0], k.shape[0]
    qh = q.reshape(t, -1, head_dim).transpose(1, 0, 2).astype(np.float64)       # [H, T, hd]
    kh = k.reshape(length, -1, head_dim).transpose(1, 0, 2)[kv_map].astype(np.float64)
    vh = v.reshape(length, -1, head_dim).transpose(1, 0, 2)[kv_map].astype(np.float64)
    s = np.einsum("htd,hld->htl", qh, kh) * scale
    visible = np.arange(length)[None, :] <= (q_pos[:, None] + mask_offset)
    s = np.where(visible[None], s, -np.inf)
    # A query that sees no key at all (a mask hiding its own token at position 0) gets a zero context.
    top = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    return np.einsum("htl,hld->thd", p, vh).reshape(t, -1).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


# -- signatures per tap kind ----------------------------------------------------------------------------

_NORM_INPUT = {"attn_norm": ("input_layernorm.weight",), "ffn_norm": ("post_attention_layernorm.weight",)}
_GEMM = {"q": ("attn_norm", "self_attn.q_proj"), "k": ("attn_norm", "self_attn.k_proj"),
         "v": ("attn_norm", "self_attn.v_proj"), "o": ("attn", "self_attn.o_proj"),
         "gate": ("ffn_norm", "mlp.gate_proj"), "up": ("ffn_norm", "mlp.up_proj"), "down": ("act", "mlp.down_proj")}


def _norm_input(c: Context) -> tuple[np.ndarray, np.ndarray | None]:
    """(input, weight) of the norm tap being diagnosed."""
    if c.kind == "final_norm":
        return c.g("out", c.spec.num_layers - 1), c.w("model.norm.weight")
    if c.kind == "attn_norm":
        x = c.g("embed") if c.layer == 0 else c.g("out", c.layer - 1)
        return x, c.lw("input_layernorm.weight")
    return c.g("attn_residual"), c.lw("post_attention_layernorm.weight")


def _norms(c: Context) -> Candidates:
    x, w = _norm_input(c)
    if w is None:
        return
    for eps in _EPS_CANDIDATES:
        if not math.isclose(eps, c.spec.rms_norm_eps, rel_tol=1e-3):
            yield Hypothesis("rmsnorm_eps", f"RMSNorm with eps {eps:g} instead of the config's {c.spec.rms_norm_eps:g}",
                             rmsnorm(x, w, eps))
    if c.kind == "final_norm":
        yield Hypothesis("final_norm", "final RMSNorm skipped: the last layer's output reaches the LM head", x)
    else:
        yield Hypothesis("norm_skipped", f"{c.kind} RMSNorm skipped: the residual stream passed through", x)


def _qk_norm(c: Context) -> Candidates:
    x = c.g(c.kind[0])               # q_norm -> q, k_norm -> k
    w = c.lw(f"self_attn.{c.kind}.weight")
    yield Hypothesis("qk_norm", f"per-head {c.kind} RMSNorm skipped (the projection passed through)", x)
    if w is not None:
        for eps in _EPS_CANDIDATES:
            if not math.isclose(eps, c.spec.rms_norm_eps, rel_tol=1e-3):
                yield Hypothesis("rmsnorm_eps", f"{c.kind} with eps {eps:g} instead of {c.spec.rms_norm_eps:g}",
                                 rmsnorm(x, w, eps, c.spec.head_dim))


def _rope(c: Context) -> Candidates:
    which, hd, spec = c.kind[0], c.spec.head_dim, c.spec
    x = c.g(f"{which}_norm") if spec.has_qk_norm else c.g(which)
    pos, right = c.positions(), inv_freq(hd, spec.rope_theta, spec.rope_scaling)
    yield Hypothesis("interleaved_rope", "RoPE rotates interleaved pairs (2i, 2i+1) instead of HF's two halves",
                     rope(x, pos, right, hd, "interleaved"))
    for theta in _THETA_CANDIDATES:
        if not math.isclose(theta, spec.rope_theta, rel_tol=1e-6):
            yield Hypothesis("rope_theta", f"RoPE with theta {theta:g} instead of the config's {spec.rope_theta:g}",
                             rope(x, pos, inv_freq(hd, theta, spec.rope_scaling), hd))
    if spec.rope_scaling:
        yield Hypothesis("rope_scaling", "Llama-3 rope_scaling not applied to the inverse frequencies",
                         rope(x, pos, inv_freq(hd, spec.rope_theta, None), hd))
    for shift in (-1, 1):
        where = "decode_position" if c.step is not None else "rope_position"
        yield Hypothesis(where, f"RoPE at position p{shift:+d}: the {which} rotation is off by one",
                         rope(x, pos + shift, right, hd))
    if spec.has_qk_norm:
        yield Hypothesis("qk_norm", f"per-head {which}_norm skipped before RoPE", rope(c.g(which), pos, right, hd))


def _kv_caps(length: int, kv_heads: int) -> list[int]:
    """Buffer capacities to try for a mislaid cache: exact, 64-token blocks and powers of two up to the
    size past which the reinterpretation no longer depends on it (length * kv_heads)."""
    top = length * kv_heads
    caps = {length, top, *range(-(-length // 64) * 64, top + 1, 64)}
    caps |= {1 << b for b in range(length.bit_length(), top.bit_length() + 1) if length <= 1 << b <= top}
    caps = sorted(caps)
    return caps if len(caps) <= 64 else [caps[i * len(caps) // 64] for i in range(64)]


def _attn(c: Context) -> Candidates:
    spec, hd = c.spec, c.spec.head_dim
    q, k, v, pos = c.g("q_rope"), c.cache("k_rope"), c.cache("v"), c.positions()
    heads = np.arange(spec.num_heads)
    kv_map = heads // (spec.num_heads // spec.num_kv_heads)
    scale = 1.0 / math.sqrt(hd)
    if spec.num_heads != spec.num_kv_heads:
        yield Hypothesis("gqa_mapping", "GQA: query head h reads KV head h % kv_heads instead of h // groups",
                         attention(q, k, v, pos, hd, heads % spec.num_kv_heads, scale))
    if c.step is None:  # a decode query has no future keys to leak; hiding its own is the stale cache below
        for off, what in ((1, "lets each query see the next token"), (-1, "hides each query's own token"),
                          (math.inf, "is missing (every query sees every key)")):
            yield Hypothesis("causal_mask", f"causal mask {what}", attention(q, k, v, pos, hd, kv_map, scale, off))
    for s, what in ((1.0 / hd, "1/head_dim"), (1.0, "1 (no scaling)")):
        yield Hypothesis("attn_scale", f"scores scaled by {what} instead of 1/sqrt(head_dim)",
                         attention(q, k, v, pos, hd, kv_map, s))
    if c.step is None:
        return
    yield Hypothesis("stale_kv_cache", "decode attends over the cache without the new token's k/v (or masks "
                     "its own position)", attention(q, k[:-1], v[:-1], pos, hd, kv_map, scale))
    length, nkv = k.shape[0], spec.num_kv_heads
    for cap in _kv_caps(length, nkv):
        for written, read in (("head-major", "seq-major"), ("seq-major", "head-major")):
            kk, vv = (_mislaid(x, cap, nkv, hd, written) for x in (k, v))
            yield Hypothesis("kv_layout", f"KV cache written {written}, read {read} (capacity {cap})",
                             attention(q, kk, vv, pos, hd, kv_map, scale))


def _mislaid(x: np.ndarray, cap: int, kv_heads: int, hd: int, written: str) -> np.ndarray:
    """Cache rows [L, KV*hd] written into a ``cap``-token buffer in one layout and read in the other."""
    length = x.shape[0]
    heads = x.reshape(length, kv_heads, hd)
    if written == "head-major":
        buf = np.zeros((kv_heads, cap, hd), np.float32)
        buf[:, :length] = heads.transpose(1, 0, 2)
        return buf.reshape(cap, kv_heads, hd)[:length].reshape(length, -1)
    buf = np.zeros((cap, kv_heads, hd), np.float32)
    buf[:length] = heads
    return buf.reshape(kv_heads, cap, hd)[:, :length].transpose(1, 0, 2).reshape(length, -1)


def _gemm_parts(c: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(input, weight [N, K], bias) of the GEMM tap being diagnosed, or None without its weights."""
    if c.kind == "logits":
        head = c.w("lm_head.weight")
        if head is None or c.spec.tied_embeddings:
            head = c.w("model.embed_tokens.weight")
        return (c.g("final_norm"), head, None) if head is not None else None
    src, prefix = _GEMM[c.kind]
    w = c.lw(prefix + ".weight")
    return None if w is None else (c.g(src), w, c.lw(prefix + ".bias"))


def _columns(n: int) -> np.ndarray:
    return np.arange(n) if n <= _MAX_COLUMNS else np.linspace(0, n - 1, _MAX_COLUMNS).astype(np.int64)


def bf16_accumulate(a: np.ndarray, w: np.ndarray, k_tile: int, bias: np.ndarray | None = None) -> np.ndarray:
    """``a @ w.T`` with exact bf16 products summed in fp32 within each K tile and the running sum
    rounded to bf16 after every tile (a low-precision accumulator), output rounded to bf16."""
    a, w = bf16(a), bf16(w)
    total = np.zeros((a.shape[0], w.shape[0]), np.float32) if bias is None else np.tile(bias, (a.shape[0], 1))
    for k0 in range(0, a.shape[1], k_tile):
        total = bf16(total + a[:, k0:k0 + k_tile] @ w[:, k0:k0 + k_tile].T)
    return bf16(total)


def _gemm(c: Context) -> Candidates:
    """GEMM signatures, bf16 accumulation and the transposed weight scored on a row / column sample
    (``_MAX_ROWS`` x ``_MAX_COLUMNS``): bf16 accumulation, the transposed
    weight (square weights), q/k/v without their bias."""
    parts = _gemm_parts(c)
    if parts is None:
        return
    a, w, bias = parts
    rows, cols = np.arange(min(a.shape[0], _MAX_ROWS)), _columns(w.shape[0])
    a_s, w_s, b_s = a[rows], w[cols], None if bias is None else bias[cols]
    for kt in _ACC_TILES:
        if kt < a.shape[1]:
            yield Hypothesis("low_precision_accumulation", f"GEMM accumulates in bf16 every {kt} elements, not fp32",
                             bf16_accumulate(a_s, w_s, kt, b_s), rows, cols)
    if w.shape[0] == w.shape[1]:
        ident = "o_proj_layout" if c.kind == "o" else "weight_layout"
        yield Hypothesis(ident, f"{c.kind} weight used transposed ([out, in] read as [in, out])",
                         a_s @ w.T[cols].T + (0 if b_s is None else b_s), rows, cols)
    if bias is not None and c.kind in ("q", "k", "v"):
        yield Hypothesis("qkv_bias", f"{c.kind}_proj bias not added", c.g(c.kind) - bias[None, :])


def _remainder(c: Context) -> Candidates:
    """Trailing columns left unwritten (zeros): a GEMM that ignores N's remainder over its tile grid."""
    zero_cols = np.flatnonzero(~np.any(c.dut != 0, axis=0))
    n = c.dut.shape[1]
    trailing = 0
    while trailing < len(zero_cols) and zero_cols[len(zero_cols) - 1 - trailing] == n - 1 - trailing:
        trailing += 1
    if trailing:
        hyp = c.g(c.kind).copy()
        hyp[:, n - trailing:] = 0.0
        line = (f"GEMM left the last {trailing} of {n} columns unwritten (N not a multiple of its tile grid"
                + (", or smaller than one block)" if trailing == n else ")"))
        yield Hypothesis("tile_remainder", line, hyp)


def _act(c: Context) -> Candidates:
    gate, up = c.g("gate"), c.g("up")
    g64 = gate.astype(np.float64)
    yield Hypothesis("silu_approx", "SiLU with a hard sigmoid clip(0.5 + x/4, 0, 1)",
                     (g64 * np.clip(0.5 + g64 / 4, 0, 1) * up).astype(np.float32))
    yield Hypothesis("silu_approx", "SiLU linearised: sigmoid replaced by 0.5 + x/4",
                     ((g64 * (0.5 + g64 / 4)) * up).astype(np.float32))
    yield Hypothesis("silu_approx", "SiLU replaced by ReLU", (np.maximum(g64, 0) * up).astype(np.float32))
    yield Hypothesis("gate_up_swap", "gate and up swapped: silu(up) * gate", silu(up) * gate)


def _residual(c: Context) -> Candidates:
    if c.kind == "attn_residual":
        yield Hypothesis("residual", "residual add after attention skipped (o_proj output used alone)", c.g("o"))
        yield Hypothesis("residual", "attention output not added (the layer input passed through)",
                         c.g("embed") if c.layer == 0 else c.g("out", c.layer - 1))
    else:
        yield Hypothesis("residual", "residual add after the MLP skipped (down_proj output used alone)", c.g("down"))
        yield Hypothesis("residual", "MLP output not added (attn_residual passed through)", c.g("attn_residual"))


SIGNATURES: dict[str, tuple[Callable[[Context], Candidates], ...]] = {
    "attn_norm": (_norms,), "ffn_norm": (_norms,), "final_norm": (_norms,),
    "q": (_gemm, _remainder), "k": (_gemm, _remainder), "v": (_gemm, _remainder),
    "q_norm": (_qk_norm,), "k_norm": (_qk_norm,), "q_rope": (_rope,), "k_rope": (_rope,), "attn": (_attn,),
    "o": (_gemm, _remainder), "attn_residual": (_residual,), "out": (_residual,),
    "gate": (_gemm, _remainder), "up": (_gemm, _remainder), "down": (_gemm, _remainder), "act": (_act,),
    "logits": (_gemm, _remainder),
}


def _rel(dut: np.ndarray, ref: np.ndarray, scale: float) -> float:
    return float(np.linalg.norm((dut.astype(np.float64) - ref)) / scale) if scale > 0 else math.inf


def _untied_head(c: Context, actual: float) -> str | None:
    """A freshly initialised LM head where the model ties it: logits uncorrelated with the tied head's
    and as large as an N(0, initializer_range) head gives (what a mishandled tie in loading leaves)."""
    if c.kind != "logits" or not c.spec.tied_embeddings:
        return None
    golden, d = c.g("logits").astype(np.float64), c.dut.astype(np.float64)
    cos = float(np.sum(golden * d) / max(np.linalg.norm(golden) * np.linalg.norm(d), 1e-30))
    init = float(c.spec.config.get("initializer_range", 0.02))
    x = c.g("final_norm").astype(np.float64)
    expected = init * float(np.sqrt(np.mean(np.sum(x * x, axis=1))))   # rms logit of a random head
    rms = float(np.sqrt(np.mean(d * d)))
    if abs(cos) < 0.2 and 0.5 < rms / expected < 2.0:
        return (f"lm_head_tying: logits uncorrelated with the tied embedding head, as from a freshly initialised "
                f"LM head (cosine {cos:.3f}; logit rms {rms:.3g} vs {expected:.3g} for an N(0, {init:g}) head; "
                f"actual error {actual:.3g})")
    return None


def diagnose(spec: ModelSpec, golden: Any, first: Any, *, mode: str = "cumulative",
             weights: dict[str, np.ndarray] | None = None, dut: np.ndarray | None = None) -> str:
    """The best-matching known bug signature for ``first`` (a FirstFailure) given the deployment's value
    ``dut`` of that tap; ``"no known signature"`` when none matches (or without ``dut``). ``mode`` is
    accepted for the record: recomputing from golden inputs serves both modes."""
    if dut is None or not np.all(np.isfinite(dut)):
        return NO_SIGNATURE
    parsed = tapspec.parse(first.tap)
    c = Context(spec, golden, weights or {}, first.phase, parsed.kind, parsed.layer, np.asarray(dut, np.float32))
    ref = c.g(parsed.kind)
    scale = float(np.linalg.norm(ref.astype(np.float64)))
    actual = _rel(c.dut, ref, scale)
    if actual == 0.0:
        return NO_SIGNATURE
    best: tuple[float, str] | None = None
    lm = _untied_head(c, actual)
    if lm is not None:
        return lm
    for signature in SIGNATURES.get(parsed.kind, ()):
        for h in signature(c):
            if h.rows is not None:
                sub_dut, sub_ref = c.dut[np.ix_(h.rows, h.cols)], ref[np.ix_(h.rows, h.cols)]
                sub_scale = float(np.linalg.norm(sub_ref.astype(np.float64)))
                err, act = _rel(sub_dut, h.value, sub_scale), _rel(sub_dut, sub_ref, sub_scale)
            else:
                err, act = _rel(c.dut, h.value, scale), actual
            if act > 0 and err <= MATCH_RATIO * act and (best is None or err / act < best[0]):
                best = (err / act, f"{h.id}: {h.line} (error under hypothesis {err:.3g} vs actual {act:.3g})")
    return best[1] if best else NO_SIGNATURE
