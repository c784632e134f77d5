"""Rotary position embedding for the validation deployments, written from the HF definition (not shared
with the emulator): half-split rotation, inverse frequencies with Llama-3 frequency scaling."""
from __future__ import annotations

import math

import numpy as np

from harness.errors import HarnessError


def inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> np.ndarray:
    """The rotation frequencies of the ``head_dim / 2`` pairs, in float64.

    Llama-3 scaling keeps the short wavelengths, divides the long ones (beyond the original context
    over ``low_freq_factor``) by ``factor``, and interpolates linearly in 1/wavelength in between.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    freqs = 1.0 / np.power(float(theta), exponents)
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if kind == "default":
        return freqs
    if kind != "llama3":
        raise HarnessError(f"validation deployment: rope_scaling {kind!r} not supported (llama3 or none)")
    factor = float(rope_scaling["factor"])
    low = float(rope_scaling["low_freq_factor"])
    high = float(rope_scaling["high_freq_factor"])
    context = float(rope_scaling["original_max_position_embeddings"])
    wavelength = 2.0 * math.pi / freqs
    out = freqs.copy()
    long_waves = wavelength > context / low
    out[long_waves] = freqs[long_waves] / factor
    between = ~long_waves & (wavelength >= context / high)
    blend = (context / wavelength[between] - low) / (high - low)
    out[between] = (1.0 - blend) * freqs[between] / factor + blend * freqs[between]
    return out


def cos_sin(positions: np.ndarray, freqs: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin tables [T, head_dim] (each frequency repeated for both halves), computed in ``dtype``
    the way the reference does: angle = position x frequency, both rounded to ``dtype`` first."""
    angles = np.asarray(positions, dtype=dtype)[:, None] * freqs.astype(dtype)[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles), np.sin(angles)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Half-split rotation of x [T, heads, head_dim]: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    turned = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + turned * sin[:, None, :]
