"""Kernel-design knobs of the XDNA 2 emulator: what a deployment team could choose on real hardware.

Defaults describe a kernel set that passes the default gate: fp32 accumulation, 64x64 GEMM tiles on a
4-column herd, accurate bf16 exp / tanh, fp32 flash-attention statistics over 32-key blocks, tiling
remainders handled by padding. Every other value is a legitimate design someone might ship; the point
of the knobs is to ask "would this kernel design pass the gate?" before hardware exists.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from harness.errors import HarnessError

ACC_DTYPES = ("fp32", "bf16")
# exp: "exact" = 2^x by the EXP2_BF16_ACCURATE polynomial (within 2.8e-6) rounded once to bf16;
# "lut" = AIE2 getExpBf16 (8.8 fixed point, two 256-entry bf16 tables multiplied);
# "poly3" = AIE2 exp2_bf16_16 (cubic in bf16 products, "within 0.2% of 2^f").
EXP_APPROXES = ("exact", "lut", "poly3")
# tanh (SiLU's sigmoid is 0.5 + 0.5 tanh(x/2)): "exact" = accurate tanh rounded to bf16;
# "lut" = AIE2 getTanhBf16 (linear interpolation, 0.25 steps over [-4, 4]);
# "vtanh" = AIE2P native vtanh, which returns its argument unchanged for |x| <= 0.5;
# "hard" = hardtanh clip(x, -1, 1), i.e. the hard sigmoid clip(0.5 + x/4, 0, 1) of cheap kernels.
TANH_APPROXES = ("exact", "lut", "vtanh", "hard")
STATS_DTYPES = ("fp32", "bf16")
REMAINDER_POLICIES = ("pad", "raise")


@dataclass(frozen=True)
class EmulatorConfig:
    """Numerics knobs. Defaults: fp32 accumulation, k_tile=64, n_tile=64, herd_n=4, m_tile=32, herd_m=4,
    exp="exact", tanh="exact", softmax_stats="fp32", scores_dtype="fp32", attn_block=32, remainder="pad", slowdown=1.0."""

    acc_dtype: str = "fp32"       # GEMM/GEMV accumulator: fp32, or bf16 rounded after every k_tile
    k_tile: int = 64              # K elements per accumulation step (the NPU's K-tile order)
    n_tile: int = 64              # output columns per core
    herd_n: int = 4               # cores across N: N must be a multiple of n_tile * herd_n
    m_tile: int = 32              # rows per core (prefill GEMM)
    herd_m: int = 4               # cores across M
    exp: str = "exact"            # exp approximation inside softmax / flash attention
    tanh: str = "exact"           # tanh approximation inside SiLU
    softmax_stats: str = "fp32"   # dtype of flash attention's running max and sum
    scores_dtype: str = "fp32"    # Q.K^T into the softmax: fp32 accumulator (fused) or a bf16 buffer
    attn_block: int = 32          # keys per flash-attention block (online softmax step)
    remainder: str = "pad"        # shapes off the tiling grid: pad (zeros, exact) or raise
    slowdown: float = 1.0         # run-time factor: sleeps (slowdown - 1) x each call's own time

    def __post_init__(self) -> None:
        choices = {"acc_dtype": ACC_DTYPES, "exp": EXP_APPROXES, "tanh": TANH_APPROXES,
                   "softmax_stats": STATS_DTYPES, "scores_dtype": STATS_DTYPES, "remainder": REMAINDER_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise HarnessError(f"emulator knob {name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("k_tile", "n_tile", "herd_n", "m_tile", "herd_m", "attn_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HarnessError(f"emulator knob {name}={value!r}; must be a positive integer")
        if not (isinstance(self.slowdown, (int, float)) and self.slowdown >= 1.0):
            raise HarnessError(f"emulator knob slowdown={self.slowdown!r}; must be a number >= 1.0")

    @property
    def n_block(self) -> int:
        """Columns one herd pass covers: N must be a multiple of this (or be padded)."""
        return self.n_tile * self.herd_n

    @property
    def m_block(self) -> int:
        """Rows one herd pass covers in a prefill GEMM."""
        return self.m_tile * self.herd_m

    @classmethod
    def from_knobs(cls, **knobs) -> "EmulatorConfig":
        """A config from keyword knobs; an unknown knob raises HarnessError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(knobs) - known)
        if unknown:
            raise HarnessError(f"unknown emulator knob(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**knobs)
