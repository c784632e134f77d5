"""Weights: local Hugging Face checkpoints (safetensors only) or seeded synthetic weights."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.spec.model_spec import ModelSpec

SYNTHETIC_VERSION = 2  # bump when synthetic_weights changes its output: it is part of the golden key


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: a checkpoint directory, or synthetic weights of ``seed``."""

    path: str | None = None

    def describe(self) -> str:
        return f"checkpoint:{self.path}" if self.path else "synthetic"


def weights_digest(spec: ModelSpec, source: WeightsSource, seed: int) -> str:
    """A digest that changes whenever the weights would (cheap for synthetic weights)."""
    if source.path:
        from harness.weights.checkpoint import checkpoint_digest

        return "ckpt-" + checkpoint_digest(source.path)
    ident = json.dumps({"v": SYNTHETIC_VERSION, "seed": seed, "config": spec.config}, sort_keys=True)
    return "synth-" + hashlib.sha256(ident.encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _cached(model_id: str, scale: str, source: WeightsSource, seed: int) -> dict[str, np.ndarray]:
    from harness.spec.model_spec import get

    spec = get(model_id, scale)
    if source.path:
        from harness.weights.checkpoint import load_checkpoint

        return load_checkpoint(spec, Path(source.path))
    from harness.weights.synthetic import synthetic_weights

    return synthetic_weights(spec, seed)


def load_weights(spec: ModelSpec, source: WeightsSource | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The weights of ``spec`` (float32, bf16-representable). Cached per process: treat as read-only."""
    source = source or WeightsSource()
    w = _cached(spec.id, spec.scale, source, seed)
    for v in w.values():
        v.flags.writeable = False  # a deployment that edits weights in place would poison the cache
    return w
