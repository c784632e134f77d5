"""Weights: local Hugging Face checkpoints (safetensors only) or seeded synthetic weights."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

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


def read_weights(spec: ModelSpec, source: WeightsSource | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The source's own weights, read afresh (never a dict anyone else has seen): golden builds use these."""
    source = source or WeightsSource()
    if source.path:
        from harness.weights.checkpoint import load_checkpoint

        return load_checkpoint(spec, Path(source.path))
    from harness.weights.synthetic import synthetic_weights

    return synthetic_weights(spec, seed)


def _immutable(arr: np.ndarray) -> np.ndarray:
    """``arr`` backed by an immutable ``bytes`` buffer: its WRITEABLE flag cannot be switched back on, so
    not even ``arr.flags.writeable = True`` or a write through ``.base`` can change the cached value."""
    arr = np.ascontiguousarray(arr)
    return np.frombuffer(arr.tobytes(), dtype=arr.dtype).reshape(arr.shape)


@functools.lru_cache(maxsize=4)
def _cached(model_id: str, scale: str, source: WeightsSource, seed: int) -> dict[str, np.ndarray]:
    from harness.spec.model_spec import get

    w = read_weights(get(model_id, scale), source, seed)
    for name in list(w):  # one tensor at a time: the peak is one extra tensor, not a second model
        w[name] = _immutable(w.pop(name))
    return w


def load_weights(spec: ModelSpec, source: WeightsSource | None = None, seed: int = 0) -> Mapping[str, np.ndarray]:
    """The weights of ``spec`` (float32, bf16-representable) for a deployment or a check.

    Each call hands out its own read-only Mapping (assigning into it raises TypeError; a deployment that
    wants changes copies it) over arrays whose memory cannot be written, so nothing a deployment does
    reaches another caller. The arrays are shared per process (cached): goldens are built from
    ``read_weights`` instead, never from a Mapping a deployment has seen.
    """
    source = source or WeightsSource()
    return MappingProxyType(dict(_cached(spec.id, spec.scale, source, seed)))
