"""Canonical tap names, their execution order, kinds and shapes.

Every tap is a 2-D ``[tokens, features]`` float32 array; heads are flattened head-major
(``head * head_dim + d``), matching the HF projection layouts. The order below is execution order:
localisation names the first failing tap in it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from harness.errors import TapError
from harness.spec.model_spec import ModelSpec

# Per-layer tap kinds in execution order. q_norm / k_norm exist only where the model has q/k norm.
LAYER_KINDS: tuple[str, ...] = (
    "attn_norm", "q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope", "attn", "o",
    "attn_residual", "ffn_norm", "gate", "up", "act", "down", "out",
)
QK_NORM_KINDS = ("q_norm", "k_norm")
GLOBAL_HEAD = ("embed",)
GLOBAL_TAIL = ("final_norm", "logits")

# What each tap is in Hugging Face terms (``harness explain``) and where the emulator computes it.
DESCRIPTIONS: dict[str, str] = {
    "embed": "model.embed_tokens output: the embedding rows of the input tokens",
    "attn_norm": "layers[i].input_layernorm output (RMSNorm of the residual stream)",
    "q": "layers[i].self_attn.q_proj output (with bias on Qwen2.5)",
    "k": "layers[i].self_attn.k_proj output (with bias on Qwen2.5)",
    "v": "layers[i].self_attn.v_proj output (with bias on Qwen2.5)",
    "q_norm": "layers[i].self_attn.q_norm output: per-head RMSNorm over head_dim (Qwen3 only)",
    "k_norm": "layers[i].self_attn.k_norm output: per-head RMSNorm over head_dim (Qwen3 only)",
    "q_rope": "query after apply_rotary_pos_emb (half-split rotation), as the attention function sees it",
    "k_rope": "key after apply_rotary_pos_emb for the new positions (what is written to the KV cache)",
    "attn": "attention context softmax(q k^T * scale + causal mask) v, the input of o_proj",
    "o": "layers[i].self_attn.o_proj output",
    "attn_residual": "residual stream after attention: layer input + o, the input of post_attention_layernorm",
    "ffn_norm": "layers[i].post_attention_layernorm output",
    "gate": "layers[i].mlp.gate_proj output (pre-activation)",
    "up": "layers[i].mlp.up_proj output",
    "act": "silu(gate) * up, the input of mlp.down_proj",
    "down": "layers[i].mlp.down_proj output",
    "out": "decoder layer output: attn_residual + down (the residual stream)",
    "final_norm": "model.norm output (final RMSNorm)",
    "logits": "lm_head output [tokens, vocab] (tied to embed_tokens in all nine models)",
}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.([a-z_]+)$")


@dataclass(frozen=True)
class TapName:
    """A parsed tap name: ``layer`` is None for the global taps."""

    name: str
    kind: str
    layer: int | None


def parse(name: str) -> TapName:
    """Parse a canonical tap name; raises TapError naming it when it is not one."""
    m = _LAYER_RE.match(name)
    if m:
        kind = m.group(2)
        if kind in LAYER_KINDS:
            return TapName(name, kind, int(m.group(1)))
    elif name in GLOBAL_HEAD + GLOBAL_TAIL:
        return TapName(name, name, None)
    raise TapError(f"unknown tap name {name!r}; canonical names: embed, layers.<i>.<kind>, final_norm, logits")


def layer_kinds(spec: ModelSpec) -> tuple[str, ...]:
    return tuple(k for k in LAYER_KINDS if spec.has_qk_norm or k not in QK_NORM_KINDS)


def tap_names(spec: ModelSpec) -> list[str]:
    """Every canonical tap of ``spec`` in execution order."""
    names = list(GLOBAL_HEAD)
    kinds = layer_kinds(spec)
    for i in range(spec.num_layers):
        names.extend(f"layers.{i}.{k}" for k in kinds)
    names.extend(GLOBAL_TAIL)
    return names


def inputs(spec: ModelSpec, name: str) -> tuple[str, ...]:
    """The taps whose values the op behind ``name`` reads in the same phase: its data-flow inputs (the KV
    cache that ``attn`` also reads comes from earlier phases and is left out). In isolated mode a tap is
    teacher-forced only when every one of these was handed over with ``tap`` (docs/policies.md, "The
    median statistics")."""
    t = validate(spec, name)
    if t.layer is None:
        last = f"layers.{spec.num_layers - 1}.out"
        return {"embed": (), "final_norm": (last,), "logits": ("final_norm",)}[t.kind]
    i = t.layer
    p = f"layers.{i}."
    residual = f"layers.{i - 1}.out" if i else "embed"
    q_in, k_in = (p + "q_norm", p + "k_norm") if spec.has_qk_norm else (p + "q", p + "k")
    return {
        "attn_norm": (residual,), "q": (p + "attn_norm",), "k": (p + "attn_norm",), "v": (p + "attn_norm",),
        "q_norm": (p + "q",), "k_norm": (p + "k",), "q_rope": (q_in,), "k_rope": (k_in,),
        "attn": (p + "q_rope", p + "k_rope", p + "v"), "o": (p + "attn",), "attn_residual": (p + "o", residual),
        "ffn_norm": (p + "attn_residual",), "gate": (p + "ffn_norm",), "up": (p + "ffn_norm",),
        "act": (p + "gate", p + "up"), "down": (p + "act",), "out": (p + "down", p + "attn_residual"),
    }[t.kind]


def required_taps(spec: ModelSpec) -> list[str]:
    """Taps every deployment must expose: embed, every layer's out, final_norm, logits."""
    return ["embed", *(f"layers.{i}.out" for i in range(spec.num_layers)), "final_norm", "logits"]


def validate(spec: ModelSpec, name: str) -> TapName:
    """Parse ``name`` and check it exists in ``spec`` (layer in range, q/k norm only on Qwen3)."""
    tap = parse(name)
    if tap.layer is not None and tap.layer >= spec.num_layers:
        raise TapError(f"tap {name!r}: layer {tap.layer} out of range, {spec.id} has {spec.num_layers} layers")
    if tap.kind in QK_NORM_KINDS and not spec.has_qk_norm:
        raise TapError(f"tap {name!r}: {spec.id} has no q/k norm")
    return tap


def features(spec: ModelSpec, kind: str) -> int:
    """The feature width of a tap kind (the second dimension)."""
    q_width = spec.num_heads * spec.head_dim
    kv_width = spec.num_kv_heads * spec.head_dim
    if kind in ("q", "q_norm", "q_rope", "attn"):
        return q_width
    if kind in ("k", "v", "k_norm", "k_rope"):
        return kv_width
    if kind in ("gate", "up", "act"):
        return spec.intermediate_size
    if kind == "logits":
        return spec.vocab_size
    return spec.hidden_size


def shape(spec: ModelSpec, name: str, tokens: int) -> tuple[int, int]:
    """The expected ``[tokens, features]`` shape of tap ``name``."""
    return (tokens, features(spec, parse(name).kind))


def head_of(spec: ModelSpec, kind: str, feature: int) -> tuple[int | None, int]:
    """Decode a flattened feature index into (head, dim) for per-head taps, else (None, feature)."""
    if kind in ("q", "q_norm", "q_rope", "attn", "k", "v", "k_norm", "k_rope"):
        return feature // spec.head_dim, feature % spec.head_dim
    return None, feature


def phase_names(decode_steps: int) -> list[str]:
    """``prefill``, then ``decode.0`` ... ``decode.{n-1}``."""
    return ["prefill", *(f"decode.{i}" for i in range(decode_steps))]


# How each kind's features are laid out (docs/contract.md).
def layout(spec: ModelSpec, kind: str) -> str:
    """The feature layout of a tap kind in words: head-major for per-head taps."""
    head, _ = head_of(spec, kind, 0)
    if head is not None:
        return f"{features(spec, kind) // spec.head_dim} heads x head_dim {spec.head_dim}, head-major (head * {spec.head_dim} + d)"
    return "vocabulary" if kind == "logits" else "features"


def width_formula(kind: str) -> str:
    """The second dimension of a tap kind in config terms."""
    if kind in ("q", "q_norm", "q_rope", "attn"):
        return "num_attention_heads * head_dim"
    if kind in ("k", "v", "k_norm", "k_rope"):
        return "num_key_value_heads * head_dim"
    if kind in ("gate", "up", "act"):
        return "intermediate_size"
    return "vocab_size" if kind == "logits" else "hidden_size"


def table(spec: ModelSpec, tokens: int) -> list[dict]:
    """Every tap of ``spec`` in execution order, as ``harness list --taps`` and docs/contract.md show them:
    order, name, kind, shape formula, shape for a prefill of ``tokens`` (decode steps: 1 row), layout,
    whether the contract requires it."""
    required = set(required_taps(spec))
    return [{"order": k, "name": name, "kind": parse(name).kind,
             "shape": f"[tokens, {width_formula(parse(name).kind)}]",
             "prefill_shape": list(shape(spec, name, tokens)), "decode_shape": list(shape(spec, name, 1)),
             "layout": layout(spec, parse(name).kind), "required": name in required}
            for k, name in enumerate(tap_names(spec))]
