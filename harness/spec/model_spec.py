"""Model specs: one model's identity and HF config, at full or reduced scale.

The nine configs ship inside the package as ``harness/spec/configs/<model id>.json`` (the real Hugging
Face ``config.json`` values; package data, so an installed wheel has them too). ``scaled("tiny")``
shrinks the dimensions while keeping every architecture feature a deployment can get wrong: the GQA
ratio (with at least two KV heads wherever the real model has several, so a head-mapping bug stays
visible), head_dim != hidden/heads where the real model has it, q/k/v bias, q/k norm, tied embeddings,
rope_theta, Llama-3 rope_scaling and rms_norm_eps.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

MODEL_IDS: tuple[str, ...] = (
    "llama-3.2-1b",
    "llama-3.2-3b",
    "smollm2-1.7b",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
)
SCALES: tuple[str, ...] = ("tiny", "small", "full")

# Caps of the reduced scales. tiny is what CI runs; small sits between tiny and full for a quick
# manual check that a bug is not an artefact of tiny dimensions.
_SCALE_CAPS = {
    "tiny": {"hidden": 256, "layers": 3, "vocab": 2048, "kv_heads": 2},
    "small": {"hidden": 512, "layers": 4, "vocab": 8192, "kv_heads": 2},
}
# Default prompt length per scale. 64+ tokens so Llama-3 RoPE scaling (which only touches the
# low-frequency pairs) moves the rotated values measurably; 128 at full scale.
DEFAULT_PROMPT_LEN = {"tiny": 64, "small": 96, "full": 128}

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def models_dir() -> Path:
    """The repository's ``models/`` folder (per-model suites and optional ``policy.toml``)."""
    return Path(__file__).resolve().parents[2] / "models"


def config_path(model_id: str) -> Path:
    """The packaged Hugging Face config of ``model_id``: ``harness/spec/configs/<id>.json``."""
    return Path(__file__).resolve().parent / "configs" / f"{model_id}.json"


def folder_name(model_id: str) -> str:
    """``qwen3-0.6b`` -> ``qwen3_0_6b``: a folder name pytest can import."""
    return model_id.replace(".", "_").replace("-", "_")


@dataclass(frozen=True)
class ModelSpec:
    """A model id, its scale and its HF config (``config`` holds config.json keys)."""

    id: str
    scale: str
    config: dict[str, Any] = field(repr=False)

    # -- architecture facts, derived once from the config --------------------------------------
    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def intermediate_size(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.config["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.config["head_dim"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def rms_norm_eps(self) -> float:
        return float(self.config["rms_norm_eps"])

    @property
    def rope_theta(self) -> float:
        return float(self.config["rope_theta"])

    @property
    def rope_scaling(self) -> dict | None:
        return self.config.get("rope_scaling")

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def has_qkv_bias(self) -> bool:
        # Qwen2 hard-codes a bias on q/k/v (not o); Llama and Qwen3 follow attention_bias.
        return self.model_type == "qwen2" or bool(self.config.get("attention_bias", False))

    @property
    def has_qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def gqa_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def default_prompt_len(self) -> int:
        return DEFAULT_PROMPT_LEN[self.scale]

    @property
    def key(self) -> str:
        return f"{self.id}/{self.scale}"

    def scaled(self, scale: str) -> "ModelSpec":
        """This model at another scale: ``tiny`` (CI), ``small`` or ``full`` (real dimensions)."""
        return get(self.id, scale)

    def hf_config(self):
        """A transformers ``PretrainedConfig`` for this spec (float32, eager-free sdpa attention)."""
        import transformers

        cfg = {k: v for k, v in self.config.items() if k not in ("architectures", "torch_dtype", "dtype")}
        config_cls = transformers.AutoConfig.for_model(self.model_type).__class__
        hf = config_cls(**cfg)
        hf.architectures = [_ARCHITECTURES[self.model_type]]
        return hf


def _load_full_config(model_id: str) -> dict[str, Any]:
    path = config_path(model_id)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"model config missing: {path}") from None
    except json.JSONDecodeError as exc:
        raise HarnessError(f"model config {path} is not valid JSON: {exc}") from None
    # Keys config.json leaves implicit but every consumer needs (HF derives the same defaults).
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("rope_scaling", None)
    return cfg


def _shrink(cfg: dict[str, Any], caps: dict[str, int]) -> dict[str, Any]:
    """Reduce dimensions under ``caps`` while keeping every ratio and flag that matters."""
    out = copy.deepcopy(cfg)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    groups = heads // kv
    if groups == 1:  # plain multi-head attention (SmolLM2): keep it MHA with a few heads
        kv_t = heads_t = 4
    else:
        kv_t = min(kv, caps["kv_heads"])
        heads_t = kv_t * groups
    # Largest head_dim (even, >= 16) whose attention width still fits the hidden cap.
    for hd in (64, 32, 16):
        if heads_t * hd <= caps["hidden"] and hd <= cfg["head_dim"]:
            break
    width = heads_t * hd
    if cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]:
        hidden_t = width
    else:  # keep hidden != heads * head_dim (Qwen3-0.6B / 4B), in the real ratio, multiple of 32
        ratio = cfg["hidden_size"] / (cfg["head_dim"] * cfg["num_attention_heads"])
        hidden_t = max(32, int(round(width * ratio / 32)) * 32)
        if hidden_t == width:
            hidden_t = width - 32 if ratio < 1 else width + 32
        hidden_t = min(hidden_t, caps["hidden"])
    inter_t = int(round(hidden_t * cfg["intermediate_size"] / cfg["hidden_size"] / 32)) * 32
    out.update(
        hidden_size=hidden_t,
        intermediate_size=inter_t,
        num_hidden_layers=min(cfg["num_hidden_layers"], caps["layers"]),
        num_attention_heads=heads_t,
        num_key_value_heads=kv_t,
        head_dim=hd,
        vocab_size=min(cfg["vocab_size"], caps["vocab"]),
    )
    # Special token ids must stay inside the shrunk vocabulary.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(out.get(key), int) and out[key] >= out["vocab_size"]:
            out[key] = out["vocab_size"] - 1
    return out


def names() -> list[str]:
    """The nine model ids in scope."""
    return list(MODEL_IDS)


def get(model_id: str, scale: str = "full") -> ModelSpec:
    """The spec of ``model_id`` at ``scale`` (default ``full``)."""
    if model_id not in MODEL_IDS:
        raise HarnessError(f"unknown model {model_id!r}; known: {', '.join(MODEL_IDS)}")
    if scale not in SCALES:
        raise HarnessError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    cfg = _load_full_config(model_id)
    if scale != "full":
        cfg = _shrink(cfg, _SCALE_CAPS[scale])
    return ModelSpec(id=model_id, scale=scale, config=cfg)
