"""Validation population: independent correct deployments of the nine models (NumPy decoders with
varied numerics, transformers in bf16 with eager or SDPA attention), sharing no code with the
emulator. The gate must pass every member of ``MEMBERS`` and fail each of ``IMPRECISE`` at its
expected tap (docs/validation.md). Each factory works with ``--deployment``, e.g. ``numpy-fp32``.
"""
from harness.deployment.validation.registry import (  # noqa: F401
    IMPRECISE,
    MEMBERS,
    Member,
    hf_bf16_eager,
    hf_bf16_sdpa,
    member,
    numpy_bf16_blocked,
    numpy_bf16_pairwise,
    numpy_bf16_rmsnorm_stats,
    numpy_bf16_twopass_norm,
    numpy_f64,
    numpy_flash48_bf16stats,
    numpy_flash_bf16stats,
    numpy_fp32,
    numpy_fused,
)
