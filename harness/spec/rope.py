"""RoPE inverse frequencies of a spec, with Llama-3 frequency scaling (one definition for every user)."""
from __future__ import annotations

import math

import numpy as np

from harness.errors import HarnessError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies of the half-split rotation (float64), Llama-3 scaled when ``scaling`` says so.

    Llama-3 divides the low frequencies (wavelength > original_max / low_freq_factor) by ``factor``,
    keeps the high ones (wavelength < original_max / high_freq_factor) and blends in between.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise HarnessError(f"rope_scaling type {kind!r} is not supported (llama3, default)")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, scaled)
