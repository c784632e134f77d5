"""Cause hints: test known bug signatures against the first failing tap, and name one only when it
explains the failure.

Each signature recomputes the failing tap from the *golden* inputs under a hypothesised bug (RoPE with
interleaved pairs, a different theta, no Llama-3 scaling; q/k/v without bias; no q/k norm; a shifted or
absent causal mask; a wrong attention scale or GQA head map; a stale or mislaid KV cache; a transposed
weight; a crude SiLU; a skipped residual or norm; a wrong RMSNorm eps; an untied LM head; an unwritten
GEMM tile remainder) or a precision cause (RMSNorm statistics, GEMM accumulation or softmax sums kept in
bf16; rounding toward zero into bf16). The reference arithmetic lives in harness.reference.numpy_ops;
this module holds only the signatures (``CATALOGUE``) and the matching rule.

A hypothesis *matches* only when all three hold (``_decide``):

1. it explains the error: the deployment sits within ``EXPLAIN`` times the tap's bf16 noise level of it
   (the noise level is the bf16 baseline's own error at this tap, or the golden's rounding to bf16);
2. it is clearly closer than the golden: at most ``MATCH_RATIO`` times as far as the golden;
3. it is clearly the best cause: every hypothesis of another id, and the golden times (or plus) a fitted
   constant - a generic scale or offset error - leaves at least ``MARGIN`` noise levels more unexplained
   (in quadrature) than it does.

The best match is reported as ``"<id>: <one line> (error under hypothesis X vs actual Y)"`` with
relative Frobenius errors, else ``"no known signature"``: a failure no signature explains (random noise,
sparse corruption, one corrupted row, head or channel, an offset, a sign flip) gets no guess.

Recomputing from golden inputs works in both modes: in cumulative mode the deployment's inputs differ
from the golden by bf16 noise only (every earlier tap passed), which the noise level absorbs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from harness.reference.numpy_ops import (attention, attention_bf16_stats, bf16, bf16_accumulate, bf16_rtz, inv_freq,
                                         rmsnorm, rmsnorm_bf16_stats, rope, silu)
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec

NO_SIGNATURE = "no known signature"
# (1) The deployment must sit within this many noise levels of the hypothesis: a bug the hypothesis
# reproduces leaves only rounding (isolated) or rounding plus upstream drift (cumulative) behind.
EXPLAIN = 4.0
# (2) ... at most this fraction as far from the hypothesis as from the golden;
MATCH_RATIO = 0.5
# (3) ... and every other cause, and the golden times or plus a fitted constant, must leave at least
# this many noise levels unexplained beyond the best one (added in quadrature: independent errors).
MARGIN = 1.0
_MAX_COLUMNS = 1024       # GEMM hypotheses are scored on at most this many evenly spaced columns
_MAX_ROWS = 64            # ... and rows, so a full-scale LM head costs milliseconds, not minutes
_EPS_CANDIDATES = (1e-5, 1e-6, 1e-8, 1e-12)
_THETA_CANDIDATES = (10000.0, 100000.0, 500000.0, 1000000.0, 5000000.0)
_ACC_TILES = (1, 4, 8, 16, 32, 64, 128, 256)
_ACC_ORDERS = ("sequential", "pairwise")
# bf16 RMSNorm statistics: (running-sum block or None for one rounding of the mean, every step in bf16)
_NORM_STATS = ((None, False), (None, True), (1, False), (8, False), (32, False))
_SOFTMAX_BLOCKS = (1, 16, 32, 64, 128)      # bf16 softmax statistics: keys per running-sum update

# Every cause a hint can name: id -> what it means. Emulator faults name one of these ids (Fault.hint).
CATALOGUE: dict[str, str] = {
    "interleaved_rope": "RoPE rotates interleaved pairs (2i, 2i+1) instead of HF's two halves",
    "rope_theta": "RoPE built with another theta than the config's",
    "rope_scaling": "Llama-3 rope_scaling not applied to the inverse frequencies",
    "rope_position": "prefill RoPE at position p +- 1",
    "decode_position": "decode RoPE at position p +- 1",
    "qkv_bias": "q/k/v projection bias not added",
    "qk_norm": "per-head q/k RMSNorm skipped",
    "gqa_mapping": "GQA query heads mapped to the wrong KV heads",
    "causal_mask": "causal mask shifted, leaky or missing",
    "attn_scale": "attention scores scaled by 1/head_dim or 1 instead of 1/sqrt(head_dim)",
    "stale_kv_cache": "decode attends without the new token's k/v",
    "kv_layout": "KV cache written in one layout and read in another",
    "o_proj_layout": "o_proj weight used transposed",
    "weight_layout": "a square GEMM weight used transposed",
    "residual": "a residual add skipped",
    "norm_skipped": "an RMSNorm skipped",
    "final_norm": "the final RMSNorm skipped",
    "rmsnorm_eps": "RMSNorm with another eps than the config's",
    "silu_approx": "SiLU replaced by a crude approximation (hard / linear sigmoid, ReLU)",
    "gate_up_swap": "gate and up projections swapped",
    "lm_head_tying": "a freshly initialised LM head where the model ties it to the embedding",
    "tile_remainder": "GEMM left the columns past its tile grid unwritten",
    "low_precision_accumulation": "GEMM accumulates in bf16 (any K block, sequential or pairwise)",
    "bf16_rmsnorm_stats": "RMSNorm statistics (mean of squares, 1/rms) computed in bf16",
    "bf16_softmax_stats": "softmax running max / sum kept in bf16",
    "round_toward_zero": "values rounded toward zero into bf16 instead of to nearest",
}


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
        """The positions of this phase's golden rows (a sampled golden stores some prompt rows)."""
        if self.step is not None:
            return np.array([self.prompt_len + self.step])
        rows = self.golden.rows("prefill") if hasattr(self.golden, "rows") else None
        return np.arange(self.prompt_len) if rows is None else rows

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

    def __post_init__(self) -> None:
        if self.id not in CATALOGUE:
            raise ValueError(f"hint id {self.id!r} is not in hints.CATALOGUE")


Candidates = Iterator[Hypothesis]


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


def _stats_how(block: int | None, every: bool) -> str:
    if every:
        return "squares, their mean, var + eps, 1/rms and products each rounded to bf16"
    what = "the mean of squares rounded to bf16" if block is None else f"a bf16 running sum of squares every {block}"
    return what + ", 1/rms in bf16"


def _norms(c: Context) -> Candidates:
    x, w = _norm_input(c)
    if w is None:
        return
    for eps in _EPS_CANDIDATES:
        if not math.isclose(eps, c.spec.rms_norm_eps, rel_tol=1e-3):
            yield Hypothesis("rmsnorm_eps", f"RMSNorm with eps {eps:g} instead of the config's {c.spec.rms_norm_eps:g}",
                             rmsnorm(x, w, eps))
    for block, every in _NORM_STATS:
        yield Hypothesis("bf16_rmsnorm_stats", f"RMSNorm statistics in bf16 ({_stats_how(block, every)})",
                         rmsnorm_bf16_stats(x, w, c.spec.rms_norm_eps, block, every))
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
        hd = c.spec.head_dim
        per_head = x.reshape(-1, hd)
        for block, every in _NORM_STATS:
            yield Hypothesis("bf16_rmsnorm_stats", f"{c.kind} statistics in bf16 ({_stats_how(block, every)})",
                             rmsnorm_bf16_stats(per_head, w, c.spec.rms_norm_eps, block, every).reshape(x.shape))


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
    for block in _SOFTMAX_BLOCKS:
        if block == 1 or block < k.shape[0]:
            what = "summed in a bf16 accumulator" if block == 1 else f"over {block}-key blocks"
            yield Hypothesis("bf16_softmax_stats", f"softmax running max and sum kept in bf16 ({what})",
                             attention_bf16_stats(q, k, v, pos, hd, kv_map, scale, block))
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
        for order in _ACC_ORDERS:
            # at least two bf16 roundings of partial sums, else it is the correct GEMM rounded once;
            # one-element steps only up to K = 4096 (each step is a pass over the sampled output)
            tiles = -(-a.shape[1] // kt)
            if tiles > (1 if order == "sequential" else 2) and (order == "sequential" or kt >= 4) and tiles <= 4096:
                what = f"every {kt} elements" if order == "sequential" else f"in a pairwise tree of {kt}-element blocks"
                yield Hypothesis("low_precision_accumulation", f"GEMM accumulates in bf16 {what}, not fp32",
                                 bf16_accumulate(a_s, w_s, kt, b_s, order), rows, cols)
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
    # A tile grid of 2^b columns leaves N mod 2^b unwritten: a zeroed head or channel that no such grid
    # explains is not a remainder.
    if trailing and any(n % (1 << b) == trailing for b in range(4, max(5, n.bit_length() + 1))):
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


def _rounding(c: Context) -> Candidates:
    """Any tap: the right value rounded toward zero into bf16 (truncated) instead of to nearest."""
    yield Hypothesis("round_toward_zero", "values rounded toward zero into bf16 instead of to nearest",
                     bf16_rtz(c.g(c.kind)))


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
    if c.step is not None:   # stale logits (the previous token's) are uncorrelated too, but not new
        before = c.g("logits", phase="prefill" if c.step == 0 else f"decode.{c.step - 1}")[-1:].astype(np.float64)
        if abs(float(np.sum(before * d) / max(np.linalg.norm(before) * np.linalg.norm(d), 1e-30))) > 0.5:
            return None
    if abs(cos) < 0.2 and 0.5 < rms / expected < 2.0:
        return (f"lm_head_tying: logits uncorrelated with the tied embedding head, as from a freshly initialised "
                f"LM head (cosine {cos:.3f}; logit rms {rms:.3g} vs {expected:.3g} for an N(0, {init:g}) head; "
                f"actual error {actual:.3g})")
    return None


@dataclass(frozen=True)
class Score:
    """How far the deployment is from one hypothesis (``error``) and from the golden (``actual``), both
    relative Frobenius errors on the hypothesis's sample of the tap."""

    id: str
    line: str
    error: float
    actual: float
    distinct: float = math.inf   # how far the hypothesis itself is from the golden

    @property
    def hint(self) -> str:
        return f"{self.id}: {self.line} (error under hypothesis {self.error:.3g} vs actual {self.actual:.3g})"


@dataclass(frozen=True)
class Diagnosis:
    """Every hypothesis's score at the failing tap, the tap's noise level and the resulting hint."""

    actual: float
    noise: float
    scores: tuple[Score, ...]
    hint: str
    nulls: tuple[Score, ...] = ()


def _decide(scores: tuple[Score, ...], nulls: tuple[Score, ...], noise: float) -> Score | None:
    """The one hypothesis that explains the error (see the module docstring), or None. ``nulls`` are the
    generic alternatives (the golden scaled, or offset, by a fitted constant): rivals that name no cause."""
    # A hypothesis within the noise of the golden is the correct computation under another name.
    scores = tuple(sc for sc in scores if sc.distinct > noise)
    if not scores:
        return None
    best = min(scores, key=lambda sc: (sc.error / sc.actual if sc.actual > 0 else math.inf))
    if not (best.actual > 0 and best.error <= EXPLAIN * noise and best.error <= MATCH_RATIO * best.actual):
        return None
    rival = min((sc.error for sc in (*scores, *nulls) if sc.id != best.id), default=math.inf)
    return best if rival ** 2 >= best.error ** 2 + (MARGIN * noise) ** 2 else None


def _nulls(dut: np.ndarray, ref: np.ndarray, scale: float, actual: float) -> tuple[Score, ...]:
    """The golden times the least-squares scale and plus the mean offset: what a generic scale or offset
    error looks like. A cause must explain the deployment better than these."""
    d, g = dut.astype(np.float64), ref.astype(np.float64)
    gg = float(np.sum(g * g))
    factor = float(np.sum(d * g)) / gg if gg > 0 else 1.0
    nulls = [Score("offset golden", "the golden plus one constant", _rel(d, g + float(np.mean(d - g)), scale), actual)]
    if 0.5 < factor < 2.0:   # a scale error; a factor near 0 or negative is another bug (zeros, a sign)
        nulls.append(Score("scaled golden", "the golden times one constant", _rel(d, g * factor, scale), actual))
    return tuple(nulls)


def _noise_level(first: Any, golden_tap: np.ndarray) -> float:
    """The tap's bf16 noise level: the bf16 baseline's error here (the check's ``baseline_rel_fro``, in
    the judged mode) or, when larger or unknown, the golden's own rounding to bf16."""
    scale = float(np.linalg.norm(golden_tap.astype(np.float64)))
    rounding = _rel(bf16(golden_tap), golden_tap, scale)
    baseline = (getattr(first, "metrics", None) or {}).get("baseline_rel_fro")
    try:
        baseline = float(baseline)
    except (TypeError, ValueError):
        baseline = 0.0
    return max(rounding, baseline if math.isfinite(baseline) else 0.0)


def assess(spec: ModelSpec, golden: Any, first: Any, *, weights: dict[str, np.ndarray] | None = None,
           dut: np.ndarray | None = None) -> Diagnosis | None:
    """Score every signature of ``first``'s tap against ``dut``; None without a finite ``dut`` or when it
    equals the golden."""
    if dut is None or not np.all(np.isfinite(dut)):
        return None
    parsed = tapspec.parse(first.tap)
    c = Context(spec, golden, weights or {}, first.phase, parsed.kind, parsed.layer, np.asarray(dut, np.float32))
    ref = c.g(parsed.kind)
    if ref.shape != c.dut.shape:
        return None
    scale = float(np.linalg.norm(ref.astype(np.float64)))
    actual = _rel(c.dut, ref, scale)
    if actual == 0.0:
        return None
    noise = _noise_level(first, ref)
    lm = _untied_head(c, actual)
    if lm is not None:
        return Diagnosis(actual, noise, (), lm)
    scores = []
    for signature in (*SIGNATURES.get(parsed.kind, ()), _rounding):
        for h in signature(c):
            if h.rows is not None:
                sub_dut, sub_ref = c.dut[np.ix_(h.rows, h.cols)], ref[np.ix_(h.rows, h.cols)]
                sub_scale = float(np.linalg.norm(sub_ref.astype(np.float64)))
                err, act = _rel(sub_dut, h.value, sub_scale), _rel(sub_dut, sub_ref, sub_scale)
                distinct = _rel(h.value, sub_ref, sub_scale)
            else:
                err, act, distinct = _rel(c.dut, h.value, scale), actual, _rel(h.value, ref, scale)
            scores.append(Score(h.id, h.line, err, act, distinct))
    nulls = _nulls(c.dut, ref, scale, actual)
    best = _decide(tuple(scores), nulls, noise)
    return Diagnosis(actual, noise, tuple(scores), best.hint if best else NO_SIGNATURE, nulls)


def diagnose(spec: ModelSpec, golden: Any, first: Any, *, mode: str = "cumulative",
             weights: dict[str, np.ndarray] | None = None, dut: np.ndarray | None = None) -> str:
    """The known cause of ``first`` (a FirstFailure) given the deployment's value ``dut`` of that tap, as
    a one-line hint with its evidence; ``"no known signature"`` when no signature explains it (or
    without ``dut``). ``mode`` is accepted for the record: the noise level in ``first.metrics`` already
    belongs to the judged mode."""
    found = assess(spec, golden, first, weights=weights, dut=dut)
    return NO_SIGNATURE if found is None else found.hint
