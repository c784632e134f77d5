"""Missing Llama-3 RoPE scaling at the default full-scale prompt: a cheap stand-in for the full-scale gate.

The gate's first failure for the ``missing_rope_scaling`` fault is ``layers.0.q_rope`` in isolated mode:
the emulator's RoPE on the golden q with unscaled frequencies, judged against the teacher-forced bf16
baseline. Its signal grows with position, so the default full-scale prompt must be long enough for the
gate to fail it clearly (docs/emulator.md gives the measured full-scale figure). Here the same R is
computed on llama-3.2-1b's real RoPE (head_dim, theta, scaling) over the default positions, on random
bf16 queries, with the harness's own metric and policy limit: milliseconds instead of a full-scale build.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.checker import policies_for
from harness.compare.metrics import tap_metrics
from harness.deployment.emulator import kernels as K
from harness.spec.model_spec import DEFAULT_PROMPT_LEN, get
from harness.spec.rope import rope_inv_freq

MODEL = "llama-3.2-1b"


def _hf_rope(q: torch.Tensor, positions: np.ndarray, inv_freq: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """transformers' Llama RoPE: fp32 angles, cos/sin cast to the model dtype, q*cos + rotate_half(q)*sin."""
    freqs = torch.from_numpy(positions.astype(np.float32))[:, None] * torch.from_numpy(inv_freq.astype(np.float32))[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    x = q.to(dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).float()


def _q_rope_r(tokens: int, scaled_in_dut: bool) -> tuple[float, float]:
    """(R, isolated prefill R limit) of the emulator's q_rope over ``tokens`` positions."""
    spec = get(MODEL, "full")
    hd, heads = spec.head_dim, spec.num_heads
    q = K.bf16(torch.randn(tokens, heads, hd, generator=torch.Generator().manual_seed(0)))
    pos = np.arange(tokens)
    right = rope_inv_freq(hd, spec.rope_theta, spec.rope_scaling)
    golden = _hf_rope(q, pos, right, torch.float32).reshape(tokens, -1).numpy()
    base = _hf_rope(q, pos, right, torch.bfloat16).reshape(tokens, -1).numpy()
    used = right if scaled_in_dut else rope_inv_freq(hd, spec.rope_theta, None)
    dut = K.rope(q, *K.rope_table(pos, used), "half").reshape(tokens, -1).numpy()
    metrics = tap_metrics(dut, golden, base)
    policy = policies_for(spec).lookup("q_rope", "prefill")
    return metrics["r"], policy.limits("prefill", "isolated", "q_rope")["r"]


def test_missing_rope_scaling_fails_at_least_twice_the_limit_at_the_default_full_prompt() -> None:
    tokens = DEFAULT_PROMPT_LEN["full"]
    r, limit = _q_rope_r(tokens, scaled_in_dut=False)
    assert r >= 2 * limit, f"missing RoPE scaling scores R {r:.2f} at {tokens} tokens; the gate needs >= {2 * limit}"


def test_the_signal_grows_with_position_and_the_clean_rope_passes() -> None:
    short, _ = _q_rope_r(32, scaled_in_dut=False)
    default, limit = _q_rope_r(DEFAULT_PROMPT_LEN["full"], scaled_in_dut=False)
    clean, _ = _q_rope_r(DEFAULT_PROMPT_LEN["full"], scaled_in_dut=True)
    assert default > 1.5 * short
    assert clean < limit
