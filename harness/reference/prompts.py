"""Prompt token ids: seeded, reproducible, inside the (possibly shrunk) vocabulary."""
from __future__ import annotations

import numpy as np

from harness.spec.model_spec import ModelSpec


def prompt_ids(spec: ModelSpec, seed: int, length: int | None = None) -> np.ndarray:
    """``length`` (default: the scale's prompt length) token ids, starting with BOS, seeded by ``seed``."""
    length = length or spec.default_prompt_len
    rng = np.random.default_rng([seed, 31337, length])
    ids = rng.integers(0, spec.vocab_size, size=length, dtype=np.int64)
    bos = spec.config.get("bos_token_id")
    if isinstance(bos, int) and 0 <= bos < spec.vocab_size:
        ids[0] = bos
    return ids
