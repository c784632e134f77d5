"""The arithmetic choices a validation deployment varies: storage precision between ops, GEMM
accumulation order, RMSNorm reduction and attention algorithm. Plain NumPy, written for this package
(nothing shared with the emulator's kernels), each choice one a real NPU team could ship.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# Elements of partial products held at once (64 MB of float32): wide GEMMs (the LM head) stream
# through in column chunks instead of materialising [blocks, tokens, vocab].
_CHUNK_ELEMENTS = 1 << 24


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), returned as float32."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@dataclass(frozen=True)
class Arithmetic:
    """One deployment's numerics.

    compute: "fp32" or "f64" (the dtype every op computes in).
    storage: "fp32" (keep the compute dtype between ops) or "bf16" (round every op output to bf16).
    gemm: "blas" (NumPy/BLAS order), "blocked" (K blocks of ``k_block`` accumulated in sequence) or
        "pairwise" (K blocks of ``k_block`` summed in a balanced tree).
    norm: "blas" (NumPy's pairwise mean), "reversed" (sequential sum, last channel first),
        "two_pass" (scaled by the row's max first), "bf16_stats" (mean of squares, rsqrt and products
        in bf16: less precise than HF bf16).
    attn: "softmax" (scores and softmax in the compute dtype) or "flash" (online softmax over key
        blocks of ``kv_block`` with bf16 running max and sum).
    fused: one GEMM over concatenated q/k/v weights and one over gate/up, split afterwards.
    """

    compute: str = "fp32"
    storage: str = "fp32"
    gemm: str = "blas"
    k_block: int = 96
    norm: str = "blas"
    attn: str = "softmax"
    kv_block: int = 16
    fused: bool = False

    @property
    def dtype(self):
        return np.float64 if self.compute == "f64" else np.float32

    # -- storage --------------------------------------------------------------------------------
    def store(self, x: np.ndarray) -> np.ndarray:
        """An op's output as the deployment keeps it between ops."""
        if self.storage == "bf16":
            return round_bf16(x)
        return np.asarray(x, dtype=self.dtype)

    def weight(self, w: np.ndarray) -> np.ndarray:
        """A weight as the deployment holds it, converted once: bf16 storage rounds it (returning the
        caller's array itself when it is bf16-representable already, so nothing is copied)."""
        w = np.asarray(w, dtype=np.float32)
        if self.storage != "bf16":
            return w
        rounded = round_bf16(w)
        return w if np.array_equal(rounded, w) else rounded

    # -- GEMM: x [M, K] @ w[N, K]^T -------------------------------------------------------------
    def matmul(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        if self.compute == "f64":
            return _matmul_f64(x, w)
        if self.gemm == "blocked":
            return _matmul_blocked(x, w, self.k_block)
        if self.gemm == "pairwise":
            return _matmul_pairwise(x, w, self.k_block)
        return x @ w.T

    # -- RMSNorm over the last axis -------------------------------------------------------------
    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        if self.norm == "bf16_stats":
            return _rmsnorm_bf16_stats(x, weight, eps)
        if self.norm == "reversed":
            squares = (x * x)[..., ::-1]
            mean_sq = np.add.accumulate(squares, axis=-1)[..., -1] / x.shape[-1]
        elif self.norm == "two_pass":
            peak = np.max(np.abs(x), axis=-1, keepdims=True)
            peak = np.where(peak > 0, peak, 1)
            scaled = x / peak
            mean_sq = np.mean(scaled * scaled, axis=-1) * (peak[..., 0] * peak[..., 0])
        else:
            mean_sq = np.mean(x * x, axis=-1)
        inv_rms = (1.0 / np.sqrt(mean_sq + eps)).astype(self.dtype)
        return self.store(x * inv_rms[..., None] * weight.astype(self.dtype))

    # -- SiLU(gate) * up --------------------------------------------------------------------------
    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        e = np.exp(-np.abs(gate))  # stable sigmoid: no overflow for large negative gates
        sigmoid = np.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(self.dtype)
        return self.store(gate * sigmoid * up)

    # -- attention --------------------------------------------------------------------------------
    def attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, q_pos: np.ndarray,
                  scale: float) -> np.ndarray:
        """Causal GQA attention. q [T, heads, hd], keys / values [L, kv_heads, hd] at positions
        0..L-1, query t at position q_pos[t]; head h reads kv head h // (heads / kv_heads).
        Returns the context [T, heads, hd]."""
        t, heads, hd = q.shape
        length, kv_heads, _ = keys.shape
        groups = heads // kv_heads
        # [kv_heads, groups * T, hd]: every query head of one kv head in one batched product
        qg = q.reshape(t, kv_heads, groups, hd).transpose(1, 2, 0, 3).reshape(kv_heads, groups * t, hd)
        kt = keys.transpose(1, 2, 0)      # [kv_heads, hd, L]
        vv = values.transpose(1, 0, 2)    # [kv_heads, L, hd]
        visible = np.arange(length)[None, :] <= np.asarray(q_pos)[:, None]  # [T, L]
        visible = np.tile(visible, (groups, 1))                            # [groups * T, L]
        if self.attn == "flash":
            ctx = self._flash(qg, kt, vv, visible, scale)
        else:
            ctx = self._softmax_attention(qg, kt, vv, visible, scale)
        ctx = ctx.reshape(kv_heads, groups, t, hd).transpose(2, 0, 1, 3).reshape(t, heads, hd)
        return self.store(ctx)

    def _softmax_attention(self, qg, kt, vv, visible, scale):
        scores = np.where(visible, (qg @ kt) * self.dtype(scale), -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis=-1, keepdims=True)
        if self.storage == "bf16":  # the PV product takes bf16 probabilities, as a bf16 GEMM does
            probs = round_bf16(probs)
        return probs @ vv

    def _flash(self, qg, kt, vv, visible, scale):
        """Online softmax over key blocks; the running max and sum are held in bf16 between blocks,
        the context accumulator in fp32."""
        kvh, rows, hd = qg.shape
        run_max = np.full((kvh, rows, 1), -np.inf, dtype=np.float32)
        run_sum = np.zeros((kvh, rows, 1), dtype=np.float32)
        acc = np.zeros((kvh, rows, hd), dtype=np.float32)
        for k0 in range(0, kt.shape[-1], self.kv_block):
            k1 = min(k0 + self.kv_block, kt.shape[-1])
            s = round_bf16((qg @ kt[:, :, k0:k1]) * np.float32(scale))
            s = np.where(visible[:, k0:k1], s, -np.inf)
            new_max = round_bf16(np.maximum(run_max, s.max(axis=-1, keepdims=True)))
            p = round_bf16(np.exp(s - new_max))
            correction = np.exp(run_max - new_max)  # 0 on the first block (run_max = -inf)
            run_sum = round_bf16(run_sum * correction + p.sum(axis=-1, keepdims=True))
            acc = acc * correction + p @ vv[:, k0:k1]
            run_max = new_max
        return acc / run_sum


def _matmul_f64(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w^T in float64, converting the float32 weight one column chunk at a time (no full copy)."""
    x = np.asarray(x, dtype=np.float64)
    n, k = w.shape
    chunk = max(1, _CHUNK_ELEMENTS // (4 * max(k, 1)))
    if chunk >= n:
        return x @ w.astype(np.float64).T
    out = np.empty((x.shape[0], n), dtype=np.float64)
    for n0 in range(0, n, chunk):
        out[:, n0:n0 + chunk] = x @ w[n0:n0 + chunk].astype(np.float64).T
    return out


def _matmul_blocked(x: np.ndarray, w: np.ndarray, k_block: int) -> np.ndarray:
    """K blocks of ``k_block`` each multiplied exactly-ish by BLAS, accumulated one after the other."""
    k = w.shape[1]
    acc = x[:, :k_block] @ w[:, :k_block].T
    for k0 in range(k_block, k, k_block):
        acc += x[:, k0:k0 + k_block] @ w[:, k0:k0 + k_block].T
    return acc


def _matmul_pairwise(x: np.ndarray, w: np.ndarray, k_block: int) -> np.ndarray:
    """Partial products of K blocks of ``k_block`` summed in a balanced binary tree."""
    m, k = x.shape
    n = w.shape[0]
    blocks = -(-k // k_block)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, blocks * m))
    out = np.empty((m, n), dtype=np.float32)
    for n0 in range(0, n, chunk):
        wc = w[n0:n0 + chunk]
        partials = [x[:, k0:k0 + k_block] @ wc[:, k0:k0 + k_block].T for k0 in range(0, k, k_block)]
        while len(partials) > 1:
            paired = [partials[j] + partials[j + 1] for j in range(0, len(partials) - 1, 2)]
            if len(partials) % 2:
                paired.append(partials[-1])
            partials = paired
        out[:, n0:n0 + chunk] = partials[0]
    return out


def _rmsnorm_bf16_stats(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with every statistic in bf16 (a torch bf16 CPU reference): bf16 squares, their mean
    rounded to bf16, a bf16 rsqrt, bf16 products."""
    xb = round_bf16(x)
    mean_sq = round_bf16(np.mean(round_bf16(xb * xb), axis=-1, keepdims=True))
    inv_rms = round_bf16(1.0 / np.sqrt(round_bf16(mean_sq + np.float32(eps))))
    return round_bf16(round_bf16(xb * inv_rms) * round_bf16(weight))
