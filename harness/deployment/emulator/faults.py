"""Named faults: real deployment bugs the emulator can reproduce, in one registry.

A fault is a declaration: its ``name``, the real bug it reproduces (``description``), which models it
can exist in (``applies``), the first tap that must fail (``expected_tap``), the id of the cause
signature that must name it (``hint``: a key of harness.verdict.hints.CATALOGUE, checked by
tests/test_hints.py; named here, not imported, so the emulator shares no code with the hints) and the
``Deviations`` it switches on. The emulator reads ``Deviations`` at the points where
each bug lives; the clean emulator runs with the all-default ``Deviations()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from harness.deployment.emulator.config import EmulatorConfig
from harness.errors import HarnessError
from harness.spec.model_spec import ModelSpec


@dataclass(frozen=True)
class Deviations:
    """What the deployment does differently from the model; the defaults are the correct behaviour."""

    rope_style: str = "half"              # "interleaved": pairs (2i, 2i+1) instead of halves
    rope_theta: float | None = None       # override of the config's rope_theta
    rope_scaling: bool = True             # False: Llama-3 scaling of inv_freq not applied
    qkv_bias: bool = True                 # False: q/k/v bias not added
    qk_norm: bool = True                  # False: Qwen3 per-head q/k RMSNorm skipped
    gqa_modulo: bool = False              # True: query head h reads KV head h % kv_heads
    mask_offset: int = 0                  # > 0: queries see that many future keys
    attn_scale_linear: bool = False       # True: scores scaled by 1/head_dim, not 1/sqrt(head_dim)
    o_proj_transposed: bool = False       # True: o_proj weight used transposed
    attn_residual: bool = True            # False: the attention residual add is skipped
    eps: float | None = None              # override of rms_norm_eps
    tanh: str | None = None               # override of the SiLU tanh approximation
    acc: tuple[tuple[str, str, int], ...] = ()  # per-GEMM (name, accumulator dtype, k_tile) overrides
    final_norm: bool = True               # False: final RMSNorm skipped
    decode_pos_offset: int = 0            # decode RoPE position shifted by this much
    decode_append_kv: bool = True         # False: decode attends without appending the new k/v
    kv_read_seq_major: bool = False       # True: cache written head-major, read seq-major
    fresh_lm_head: bool = False           # True: a separately initialised LM head where the model ties it
    gemm_remainder: str | None = None     # "ignore": columns past the last full N block left as zeros


@dataclass(frozen=True)
class Fault:
    """One named deployment bug: ``applies(spec)``, ``expected_tap(spec)`` and its deviations."""

    name: str
    description: str
    hint: str   # the id of the cause signature that must name this bug (harness.verdict.hints.CATALOGUE)
    where: Callable[[ModelSpec], tuple[str, str]]
    changes: Callable[[ModelSpec], dict[str, Any]]
    when: Callable[[ModelSpec], bool] = field(default=lambda spec: True)

    def applies(self, spec: ModelSpec) -> bool:
        """Whether this bug can exist in ``spec`` (e.g. missing q/k/v bias only where there is one)."""
        return bool(self.when(spec))

    def expected_tap(self, spec: ModelSpec) -> tuple[str, str]:
        """(phase, tap) where the bug lives: the first tap that must fail."""
        return self.where(spec)

    def deviations(self, spec: ModelSpec, base: Deviations | None = None) -> Deviations:
        return replace(base or Deviations(), **self.changes(spec))


def _at(phase: str, tap: str) -> Callable[[ModelSpec], tuple[str, str]]:
    return lambda spec: (phase, tap)


def gemm_widths(spec: ModelSpec) -> list[tuple[str, int]]:
    """(tap, N) of every GEMM in execution order (layer 0, then the LM head)."""
    q, kv, h, i = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.hidden_size, spec.intermediate_size
    return [("layers.0.q", q), ("layers.0.k", kv), ("layers.0.v", kv), ("layers.0.o", h),
            ("layers.0.gate", i), ("layers.0.up", i), ("layers.0.down", h), ("logits", spec.vocab_size)]


def _first_ragged_gemm(spec: ModelSpec) -> str | None:
    block = EmulatorConfig().n_block
    return next((tap for tap, n in gemm_widths(spec) if n % block), None)


def _swapped_eps(spec: ModelSpec) -> float:
    # The two values these models use, swapped: 1e-6 (Qwen) <-> 1e-5 (Llama, SmolLM2).
    return 1e-5 if spec.rms_norm_eps < 5e-6 else 1e-6


_FAULTS: tuple[Fault, ...] = (
    Fault("interleaved_rope", "RoPE rotates interleaved pairs (2i, 2i+1) instead of HF's two halves "
          "(the paper's early bug: correlation with HF fell from 0.9997 to 0.616)", "interleaved_rope",
          _at("prefill", "layers.0.q_rope"), lambda s: {"rope_style": "interleaved"}),
    Fault("wrong_rope_theta", "RoPE tables built with the Llama-2 default theta 10000 instead of the config's "
          "rope_theta", "rope_theta", _at("prefill", "layers.0.q_rope"), lambda s: {"rope_theta": 10000.0},
          when=lambda s: s.rope_theta != 10000.0),
    Fault("missing_rope_scaling", "Llama-3 rope_scaling ignored: low-frequency inv_freq not divided by the "
          "factor (only Llama-3.2 has it)", "rope_scaling", _at("prefill", "layers.0.q_rope"),
          lambda s: {"rope_scaling": False}, when=lambda s: bool(s.rope_scaling)),
    Fault("missing_qkv_bias", "q/k/v projection bias dropped (Qwen2.5 carries one)", "qkv_bias",
          _at("prefill", "layers.0.q"), lambda s: {"qkv_bias": False}, when=lambda s: s.has_qkv_bias),
    Fault("missing_qk_norm", "Qwen3's per-head q/k RMSNorm skipped", "qk_norm", _at("prefill", "layers.0.q_norm"),
          lambda s: {"qk_norm": False}, when=lambda s: s.has_qk_norm),
    Fault("wrong_gqa_mapping", "GQA heads mapped h % kv_heads instead of h // groups", "gqa_mapping",
          _at("prefill", "layers.0.attn"), lambda s: {"gqa_modulo": True}, when=lambda s: s.gqa_groups > 1),
    Fault("causal_mask_off_by_one", "causal mask lets each query see the next token (<= i + 1)", "causal_mask",
          _at("prefill", "layers.0.attn"), lambda s: {"mask_offset": 1}),
    Fault("wrong_attention_scale", "scores scaled by 1/head_dim instead of 1/sqrt(head_dim)", "attn_scale",
          _at("prefill", "layers.0.attn"), lambda s: {"attn_scale_linear": True}),
    Fault("transposed_o_proj", "o_proj weight used transposed ([out, in] read as [in, out])", "o_proj_layout",
          _at("prefill", "layers.0.o"), lambda s: {"o_proj_transposed": True},
          when=lambda s: s.num_heads * s.head_dim == s.hidden_size),
    Fault("skipped_residual", "residual add after attention skipped (o_proj output used alone)", "residual",
          _at("prefill", "layers.0.attn_residual"), lambda s: {"attn_residual": False}),
    Fault("wrong_rmsnorm_eps", "RMSNorm eps 1e-5 and 1e-6 swapped; matters at layer 0, where embeddings are "
          "small", "rmsnorm_eps", _at("prefill", "layers.0.attn_norm"), lambda s: {"eps": _swapped_eps(s)}),
    Fault("crude_silu", "SiLU with a hard sigmoid clip(0.5 + x/4, 0, 1) (tanh replaced by hardtanh), the "
          "cheap first-order approximation", "silu_approx", _at("prefill", "layers.0.act"), lambda s: {"tanh": "hard"}),
    Fault("bf16_accumulation", "down_proj (the longest K) accumulates in bf16 every 8 elements instead of "
          "fp32 (the 'low precision' GEMM variant)", "low_precision_accumulation",
          _at("prefill", "layers.0.down"), lambda s: {"acc": (("down", "bf16", 8),)}),
    Fault("skipped_final_norm", "final RMSNorm skipped before the LM head", "final_norm",
          _at("prefill", "final_norm"), lambda s: {"final_norm": False}),
    Fault("decode_rope_off_by_one", "decode rotates the new token at position pos + 1", "decode_position",
          _at("decode.0", "layers.0.q_rope"), lambda s: {"decode_pos_offset": 1}),
    Fault("stale_kv_cache", "decode attends over the cache without appending the new token's k/v",
          "stale_kv_cache", _at("decode.0", "layers.0.attn"), lambda s: {"decode_append_kv": False}),
    Fault("kv_layout_mixup", "KV cache written head-major, read seq-major: prefill is fine, decode breaks",
          "kv_layout", _at("decode.0", "layers.0.attn"), lambda s: {"kv_read_seq_major": True}),
    Fault("untied_lm_head", "a freshly initialised LM head used where the model ties it to the embedding",
          "lm_head_tying", _at("prefill", "logits"), lambda s: {"fresh_lm_head": True},
          when=lambda s: s.tied_embeddings),
    Fault("gemm_tile_remainder", "GEMM ignores the remainder when N is not a multiple of n_tile*herd_n "
          "(those columns come back unwritten, with no error)", "tile_remainder",
          lambda s: ("prefill", _first_ragged_gemm(s) or "logits"), lambda s: {"gemm_remainder": "ignore"},
          when=lambda s: _first_ragged_gemm(s) is not None),
)

FAULTS: dict[str, Fault] = {f.name: f for f in _FAULTS}


def names() -> list[str]:
    """Every fault name, in catalogue order."""
    return list(FAULTS)


def get(name: str) -> Fault:
    """The fault called ``name``; raises HarnessError listing the known names."""
    try:
        return FAULTS[name]
    except KeyError:
        raise HarnessError(f"unknown emulator fault {name!r}; known: {', '.join(FAULTS)}") from None


def deviations(fault_names: tuple[str, ...], spec: ModelSpec) -> Deviations:
    """The combined deviations of ``fault_names`` on ``spec``; a fault that cannot exist there raises."""
    dev = Deviations()
    for name in fault_names:
        fault = get(name)
        if not fault.applies(spec):
            raise HarnessError(f"emulator fault {name!r} does not apply to {spec.id} ({spec.scale}): {fault.description}")
        dev = fault.deviations(spec, dev)
    return dev
