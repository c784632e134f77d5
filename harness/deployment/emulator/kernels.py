"""XDNA 2 (AIE2P) kernel numerics on CPU: every function takes and returns float32 torch tensors that
hold bf16 values (the NPU's buffers), computing inside the way the kernels do.

Sources (mlir-aie ``aie_kernels/`` and ``aie_runtime_lib/AIE2/``, amd/IRON ``aie_kernels/``):

- GEMM / GEMV: bf16 operands, products exact in the fp32 accumulator, accumulated one K tile after the
  other (IRON mm.cc / mv.cc), output rounded once to bf16.
- RMSNorm: IRON aie2p/rms_norm.cc - fp32 sum of squares, invsqrt, x * inv_rms * weight in fp32, one
  rounding to bf16.
- RoPE: IRON generic/rope.cc ``rope_kernel_two_halves`` - each product rounded to bf16, then the
  difference / sum rounded to bf16, from a precomputed bf16 cos/sin table.
- SiLU x mul: IRON aie2p/silu_mul.cc - sigmoid(x) = 0.5 * (1 + tanh(x / 2)) in bf16 steps, tanh from
  ``aie::tanh`` (mlir-aie common/activations.h: native vtanh on AIE2P, the interpolated LUT
  ``getTanhBf16`` on AIE2).
- exp: mlir-aie common/exp2_bf16.h (the EXP2_BF16_ACCURATE polynomial rounded once to bf16, or the AIE2
  cubic) and aie_runtime_lib/AIE2/lut_based_ops.h ``getExpBf16`` (LUT).
- Softmax / flash attention: mlir-aie activation/softmax_aie2p.h - max of bf16 scores, exp of the
  difference, fp32 sum, bf16 reciprocal; ``partial_softmax_alias_bf16`` carries the running max in bf16
  and the sum in fp32 between key blocks (the ``softmax_stats`` knob).
"""
from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import torch

from harness.deployment.emulator.config import EmulatorConfig
from harness.errors import HarnessError
from harness.spec.rope import rope_inv_freq  # noqa: F401  (re-exported: kernels.rope_inv_freq)

LOG2E = 1.4426950408889634


class TilingError(HarnessError):
    """A kernel was given a shape off the NPU tiling grid and the remainder policy is ``raise``."""


def bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to bf16 (round to nearest even) and return float32."""
    return x.to(torch.bfloat16).to(torch.float32)


# -- GEMM / GEMV -------------------------------------------------------------------------------------

def check_tiling(name: str, m: int, k: int, n: int, cfg: EmulatorConfig) -> list[str]:
    """The ways an [m, k] x [k, n] GEMM misses the tiling grid (empty when it fits)."""
    problems = []
    if n % cfg.n_block:
        problems.append(f"N={n} is not a multiple of n_tile*herd_n={cfg.n_block}")
    if k % cfg.k_tile:
        problems.append(f"K={k} is not a multiple of k_tile={cfg.k_tile}")
    if m > 1 and m % cfg.m_block:  # m == 1 runs on the GEMV kernel, which tiles N and K only
        problems.append(f"M={m} is not a multiple of m_tile*herd_m={cfg.m_block}")
    return problems


class Tiled:
    """A weight [N, K] (``transposed``: given as [K, N]) laid out K-tile-major, ``tiles`` [K / k_tile,
    k_tile, N] (K zero-padded: exact), as the NPU streams it: prepared once, so each GEMM is one batched
    product per K tile."""

    def __init__(self, w: torch.Tensor, k_tile: int, *, transposed: bool = False):
        k, n = w.shape if transposed else w.shape[::-1]
        nk = -(-k // k_tile)
        wt = torch.empty(nk * k_tile, n)
        wt[k:] = 0.0  # K padding: exact zeros
        if transposed:
            wt[:k] = w
        else:
            _transpose_into(wt, w)
        self.n, self.k, self.k_tile = n, k, k_tile
        self.tiles = wt.reshape(nk, k_tile, n)

    @classmethod
    def from_weight(cls, w, k_tile: int, *, transposed: bool = False) -> "Tiled":
        """A weight as the NPU holds it: ``w`` [N, K] (``transposed``: [K, N]; any float array, read-only
        views of memory-mapped weights too) laid out as ``Tiled`` does and rounded to bf16 in place: the
        values of ``Tiled(bf16(tensor(w)), k_tile)`` without its float32 copy, rounded copy and zeroed layout (a
        streamed layer is prepared on every call, so its passes over memory are the cost)."""
        tiled = cls(float32_view(w), k_tile, transposed=transposed)
        _round_bf16_inplace(tiled.tiles.numpy().reshape(-1).view(np.uint32))  # K padding stays 0
        return tiled


def float32_view(w) -> torch.Tensor:
    """A float32 tensor over ``w`` without a copy where it is float32 already, read-only memory maps
    included: for callers that only read it (the copy into tiles)."""
    src = np.ascontiguousarray(w, dtype=np.float32)
    with warnings.catch_warnings():  # a read-only source is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(src)


_TRANSPOSE_ROWS = 128  # weight rows transposed per copy: a wide weight (the LM head) at once is 2x slower


def _transpose_into(wt: torch.Tensor, w: torch.Tensor) -> None:
    """``wt[:K] = w.T`` for w [N, K] (any float dtype, widened exactly), a band of rows at a time."""
    n, k = w.shape
    for r0 in range(0, n, _TRANSPOSE_ROWS):
        wt[:k, r0:r0 + _TRANSPOSE_ROWS] = w[r0:r0 + _TRANSPOSE_ROWS].T


@numba.njit(inline="always")
def _bf16_bits(u):
    """float32 bits rounded to the nearest bf16 (ties to even), as torch's float32 -> bfloat16 -> float32
    casts do, NaN included (torch gives 0xFFFF for every NaN; tests/test_emulator_kernels.py)."""
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.uint32(0xFFFF0000) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r


@numba.njit(nogil=True, cache=True)
def _round_bf16_inplace(bits: np.ndarray) -> None:
    """float32 bits rounded to bf16 in place (``_bf16_bits``)."""
    for i in range(bits.size):
        bits[i] = _bf16_bits(bits[i])


@numba.njit(fastmath=False, nogil=True, cache=True, error_model="numpy")
def _sum_tiles_round_into(partial: np.ndarray, init: np.ndarray, out_bits: np.ndarray, c0: int) -> None:
    """``out[i, c0 + x] = bf16(init[x] + partial[0, i, x] + partial[1, i, x] + ...)``: the float32 adds
    of the fp32 accumulator in K-tile order (no reassociation: the very sums of ``total += tile_j``),
    then one rounding to bf16 as torch casts (``_bf16_bits``), written into the output's bits. One pass
    per output row, which stays in cache across the tiles (as ``nk`` torch additions the sum cost 3x the
    products; a zeroed accumulator, a copy into the output and two rounding casts were three more passes).
    Serial: on a loaded machine a parallel loop's thread wake-up cost more than the loop."""
    nk, m, c = partial.shape
    acc = np.empty(c, dtype=np.float32)
    bits = acc.view(np.uint32)
    for i in range(m):
        for x in range(c):
            acc[x] = init[x]
        for j in range(nk):
            tile = partial[j, i]
            for x in range(c):
                acc[x] += tile[x]
        row = out_bits[i]
        for x in range(c):
            row[c0 + x] = _bf16_bits(bits[x])


# Partial products held at once: nk x M x N-chunk float32 elements (64 MB), so the LM head's
# [tiles, tokens, vocab] partials stream through in column chunks instead of 1 GB at once.
_PARTIAL_ELEMENTS = 1 << 24


def gemm(
    a: torch.Tensor,
    w: torch.Tensor | Tiled,
    cfg: EmulatorConfig,
    *,
    bias: torch.Tensor | None = None,
    acc: str | None = None,
    remainder: str | None = None,
    name: str = "gemm",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bf16(a @ w.T + bias)`` for a [M, K] and w [N, K] (HF layout, or ``Tiled``), tile by tile over K.

    Each K tile's product is exact-input fp32 (bf16 x bf16 products); the tiles are summed in order
    into the accumulator, which ``acc`` (default ``cfg.acc_dtype``) keeps in fp32, or rounds to bf16 after
    every tile. ``remainder`` (default ``cfg.remainder``): ``pad`` computes off-grid shapes as if
    zero-padded (exact, so only K is padded), ``raise`` raises TilingError, ``ignore`` reproduces the
    real bug of leaving the columns past the last full n_tile*herd_n block unwritten (zeros). ``out``: a
    float32 [M, N] tensor to write the result into (the logits' shared-memory array).
    """
    acc = acc or cfg.acc_dtype
    remainder = remainder or cfg.remainder
    tiled = w if isinstance(w, Tiled) and w.k_tile == cfg.k_tile else Tiled(w if not isinstance(w, Tiled) else
                                                                                 w.tiles.reshape(-1, w.n)[: w.k].T, cfg.k_tile)
    m, k = a.shape
    n = tiled.n
    if k != tiled.k:
        raise HarnessError(f"{name}: activation has K={k}, weight has K={tiled.k}")
    problems = check_tiling(name, m, k, n, cfg)
    if problems and remainder == "raise":
        raise TilingError(f"{name} [M={m}, K={k}, N={n}]: " + "; ".join(problems) + " (remainder='raise')")
    nk, kt = tiled.tiles.shape[:2]
    a_pad = a if k == nk * kt else torch.nn.functional.pad(a, (0, nk * kt - k))
    a_tiles = a_pad.reshape(m, nk, kt).transpose(0, 1)  # [nk, M, kt]
    out = torch.empty(m, n) if out is None else out
    out_bits = out.numpy().view(np.uint32)
    chunk = max(1, _PARTIAL_ELEMENTS // (nk * m))
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        partial = torch.bmm(a_tiles, tiled.tiles[:, :, c0:c1])  # [nk, M, chunk]
        if acc == "bf16":
            total = torch.zeros(m, c1 - c0) if bias is None else bias[c0:c1].expand(m, c1 - c0).clone()
            for j in range(nk):  # the NPU's K-tile order, rounded after every tile (so already bf16)
                total = bf16(total + partial[j])
            out[:, c0:c1] = total
        else:  # the NPU's K-tile order into the fp32 accumulator, then the output's one rounding
            init = np.zeros(c1 - c0, dtype=np.float32) if bias is None else \
                np.ascontiguousarray(bias[c0:c1].numpy(), dtype=np.float32)
            _sum_tiles_round_into(partial.numpy(), init, out_bits, c0)
    if remainder == "ignore" and n % cfg.n_block:
        out[:, n - n % cfg.n_block:] = 0.0
    return out


# -- norms, RoPE -------------------------------------------------------------------------------------

def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: fp32 reduction, x * inv_rms * weight in fp32, one bf16 rounding."""
    inv = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return bf16(x * inv * weight)


def rope_table(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The host-precomputed bf16 cos / sin tables, each [positions, head_dim / 2]."""
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return bf16(torch.from_numpy(np.cos(ang).astype(np.float32))), bf16(torch.from_numpy(np.sin(ang).astype(np.float32)))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "half") -> torch.Tensor:
    """Rotate x [T, heads, head_dim] with tables [T, head_dim/2]: ``half`` split (HF) or ``interleaved`` pairs."""
    c, s = cos[:, None, :], sin[:, None, :]
    if style == "half":
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat([bf16(bf16(x1 * c) - bf16(x2 * s)), bf16(bf16(x2 * c) + bf16(x1 * s))], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([bf16(bf16(x1 * c) - bf16(x2 * s)), bf16(bf16(x2 * c) + bf16(x1 * s))], dim=-1)
    return out.reshape(x.shape)


# -- exp, tanh, SiLU ---------------------------------------------------------------------------------

def exp_approx(x: torch.Tensor, kind: str = "exact") -> torch.Tensor:
    """e^x as the NPU computes it, rounded to bf16 (x <= 0 in softmax; -inf gives 0)."""
    if kind == "exact":
        return bf16(torch.exp(x))
    if kind == "lut":
        # getExpBf16: x to int16 with 8 fractional bits (truncating), the high byte indexes a table of
        # e^int, the low byte a table of e^(frac/256); both bf16, multiplied in the fp32 accumulator.
        fixed = torch.clamp(torch.floor(torch.nan_to_num(x, neginf=-128.0) * 256.0), -32768.0, 32767.0)
        hi = torch.floor(fixed / 256.0)
        lo = fixed - hi * 256.0
        return bf16(bf16(torch.exp(hi)) * bf16(torch.exp(lo / 256.0)))
    if kind == "poly3":
        # exp2_bf16_16 (AIE2): y = x log2e, k = round(y), f = bf16(y - k), a cubic Horner in bf16 products
        # with fp32 accumulation, then k added to the exponent field.
        y = torch.clamp(torch.nan_to_num(x * LOG2E, neginf=-200.0), -200.0, 127.0)
        k = torch.round(y)
        f = bf16(y - k)
        t = 0.2402265069 + f * bf16(torch.tensor(0.0555041087))
        t = 0.6931471805 + f * bf16(t)
        t = 1.0 + f * bf16(t)
        return bf16(torch.ldexp(t, k.to(torch.int32)))
    raise HarnessError(f"unknown exp approximation {kind!r}")


def tanh_approx(x: torch.Tensor, kind: str = "exact") -> torch.Tensor:
    """tanh(x) rounded to bf16, through the chosen AIE implementation."""
    if kind == "exact":
        return bf16(torch.tanh(x))
    if kind == "lut":
        # getTanhBf16: 32 linear segments of width 0.25 over [-4, 4) (step_bits = -2, bias 16). Modelled
        # as each segment's best line (the chord shifted by half its midpoint gap), which lands inside
        # the documented 5.1e-3 absolute error where the plain chord would reach 7.7e-3.
        xc = torch.clamp(x, -4.0, 4.0)
        lo = torch.clamp(torch.floor(xc * 4.0) / 4.0, max=3.75)
        t0, t1 = torch.tanh(lo), torch.tanh(lo + 0.25)
        shift = (torch.tanh(lo + 0.125) - (t0 + t1) / 2) / 2
        return bf16(t0 + (t1 - t0) * (xc - lo) * 4.0 + shift)
    if kind == "vtanh":
        # AIE2P's vtanh returns its argument unchanged for |x| <= 0.5 (mlir-aie common/activations.h).
        return bf16(torch.where(x.abs() <= 0.5, x, torch.tanh(x)))
    if kind == "hard":
        return bf16(torch.clamp(x, -1.0, 1.0))
    raise HarnessError(f"unknown tanh approximation {kind!r}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor, tanh: str = "exact") -> torch.Tensor:
    """silu(gate) * up as IRON's silu_mul kernel computes it, every step rounded to bf16."""
    t = tanh_approx(gate * 0.5, tanh)
    sig = bf16(t + 1.0) * 0.5
    return bf16(bf16(gate * sig) * up)


# -- softmax and attention ---------------------------------------------------------------------------

def softmax(x: torch.Tensor, exp: str = "exact") -> torch.Tensor:
    """Row softmax (softmax_simple_bf16): bf16 max, approximate exp, fp32 sum, bf16 reciprocal."""
    m = x.amax(-1, keepdim=True)
    e = exp_approx(x - m, exp)
    inv = bf16(1.0 / e.sum(-1, keepdim=True))
    return bf16(e * inv)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    kv_map: torch.Tensor,
    scale: float,
    cfg: EmulatorConfig,
    *,
    mask_offset: int = 0,
) -> torch.Tensor:
    """Causal attention with an online softmax over blocks of ``cfg.attn_block`` keys.

    q [heads, T, hd], k / v [kv_heads, L, hd] (key j sits at position j), q_pos [T] absolute query
    positions; query head h reads KV head ``kv_map[h]``. Scores are a bf16 GEMM output; the running max
    and sum are fp32 or bf16 (``cfg.softmax_stats``); probabilities are bf16 into an fp32 P.V accumulator.
    Returns bf16 [heads, T, hd]. ``mask_offset`` > 0 lets a query see that many future keys (a bug).
    """
    kh, vh = k[kv_map], v[kv_map]
    heads, t, hd = q.shape
    length = kh.shape[1]
    m = torch.full((heads, t, 1), -math.inf)
    l = torch.zeros(heads, t, 1)
    o = torch.zeros(heads, t, hd)
    limit = (q_pos + mask_offset)[:, None]
    stats = bf16 if cfg.softmax_stats == "bf16" else (lambda z: z)
    scores = bf16 if cfg.scores_dtype == "bf16" else (lambda z: z)
    last = int(q_pos.max()) + mask_offset
    for b0 in range(0, min(length, last + 1), cfg.attn_block):
        b1 = min(b0 + cfg.attn_block, length)
        s = scores(torch.matmul(q, kh[:, b0:b1].transpose(1, 2))) * scale
        visible = torch.arange(b0, b1)[None, :] <= limit
        s = s.masked_fill(~visible, -math.inf)
        m_new = stats(torch.maximum(m, s.amax(-1, keepdim=True)))
        p = exp_approx(s - m_new, cfg.exp)
        alpha = exp_approx(torch.nan_to_num(m - m_new, nan=-math.inf), cfg.exp)
        l = stats(l * alpha + p.sum(-1, keepdim=True))
        o = o * alpha + torch.matmul(p, vh[:, b0:b1])
        m = m_new
    return bf16(o / l)
