"""The validation population: independent correct deployments (``MEMBERS``) the gate must pass, and
correct-but-less-precise ones (``IMPRECISE``) it must fail at a known tap.

``split`` says which members recalibrate the policy ("calibration") and which only report false
alarms ("heldout"); docs/validation.md explains each member's variation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from harness.deployment.validation.arithmetic import Arithmetic
from harness.spec.model_spec import ModelSpec


@dataclass(frozen=True)
class Member:
    """One validation deployment."""

    name: str
    factory: Callable
    description: str
    varies: str                      # what it does differently from HF bf16 / the emulator
    split: str = "heldout"           # "calibration" | "heldout"
    expected_failure: str | None = None  # IMPRECISE members: the tap the gate must fail first


def numpy_factory(name: str, arith: Arithmetic) -> Callable:
    """A deployment factory of the NumPy decoder with ``arith``; ``factory.name`` names the member."""

    def factory(spec: ModelSpec, weights: dict[str, np.ndarray]):
        from harness.deployment.validation.numpy_decoder import NumpyDecoder

        return NumpyDecoder(spec, weights, arith, name)

    factory.name = name
    factory.arithmetic = arith
    return factory


def hf_factory(attention: str) -> Callable:
    def factory(spec: ModelSpec, weights: dict[str, np.ndarray]):
        from harness.deployment.validation.hf_decoder import HFDeployment

        return HFDeployment(spec, weights, attention)

    factory.name = f"hf-bf16-{attention}"
    return factory


numpy_fp32 = numpy_factory("numpy-fp32", Arithmetic())
numpy_f64 = numpy_factory("numpy-f64", Arithmetic(compute="f64"))
numpy_bf16_pairwise = numpy_factory("numpy-bf16-pairwise", Arithmetic(storage="bf16", gemm="pairwise", k_block=32))
numpy_bf16_blocked = numpy_factory("numpy-bf16-blocked", Arithmetic(storage="bf16", gemm="blocked", k_block=96))
numpy_flash_bf16stats = numpy_factory("numpy-flash-bf16stats",
                                      Arithmetic(storage="bf16", attn="flash", kv_block=16))
numpy_flash48_bf16stats = numpy_factory("numpy-flash48-bf16stats",
                                        Arithmetic(storage="bf16", attn="flash", kv_block=48))
numpy_fused = numpy_factory("numpy-fused", Arithmetic(storage="bf16", fused=True, norm="reversed"))
numpy_bf16_twopass_norm = numpy_factory("numpy-bf16-twopass-norm", Arithmetic(storage="bf16", norm="two_pass"))
numpy_bf16_rmsnorm_stats = numpy_factory("numpy-bf16-rmsnorm-stats", Arithmetic(storage="bf16", norm="bf16_stats"))
hf_bf16_eager = hf_factory("eager")
hf_bf16_sdpa = hf_factory("sdpa")

_ALL = [
    Member("numpy-fp32", numpy_fp32, "plain NumPy decoder in float32",
           "fp32 everywhere (more precise than HF bf16; error sub-ULP of bf16)", "calibration"),
    Member("numpy-f64", numpy_f64, "NumPy decoder in float64, rounded to fp32 at each tap",
           "float64 arithmetic (more accurate than the fp32 golden itself)", "heldout"),
    Member("numpy-bf16-pairwise", numpy_bf16_pairwise, "bf16 storage between ops, fp32 pairwise GEMM",
           "every op output rounded once to bf16; GEMM K summed in a balanced tree of 32-wide blocks", "calibration"),
    Member("numpy-bf16-blocked", numpy_bf16_blocked, "bf16 storage between ops, fp32 K-blocked GEMM",
           "GEMM K accumulated in blocks of 96 (not the emulator's 64 tiles)", "heldout"),
    Member("hf-bf16-sdpa", hf_bf16_sdpa, "transformers in bf16, SDPA attention",
           "the baseline's own code path, tapped by independent hooks", "calibration"),
    Member("hf-bf16-eager", hf_bf16_eager, "transformers in bf16, eager attention",
           "eager attention: bf16 score matmul, fp32 softmax rounded to bf16 before PV", "heldout"),
    Member("numpy-flash-bf16stats", numpy_flash_bf16stats, "flash attention, key blocks of 16, bf16 running stats",
           "online softmax over 16-key blocks, bf16 scores, running max and sum held in bf16", "calibration"),
    Member("numpy-flash48-bf16stats", numpy_flash48_bf16stats, "flash attention, key blocks of 48, bf16 running stats",
           "as numpy-flash-bf16stats with 48-key blocks", "heldout"),
    Member("numpy-fused", numpy_fused, "fused QKV and gate/up GEMMs, reversed RMSNorm reduction",
           "one GEMM over concatenated q/k/v (and gate/up) weights split afterwards; RMSNorm sum of "
           "squares accumulated sequentially from the last channel", "heldout"),
    Member("numpy-bf16-twopass-norm", numpy_bf16_twopass_norm, "bf16 storage, two-pass RMSNorm",
           "RMSNorm scales each row by its max before the mean of squares", "heldout"),
]
MEMBERS: dict[str, Member] = {m.name: m for m in _ALL}

IMPRECISE: dict[str, Member] = {
    "numpy-bf16-rmsnorm-stats": Member(
        "numpy-bf16-rmsnorm-stats", numpy_bf16_rmsnorm_stats,
        "bf16 storage with RMSNorm statistics in bf16 (AMD IRON's Llama-3.2-1B CPU reference)",
        "mean of squares, rsqrt and products rounded to bf16: a row scale error several times HF bf16's",
        split="imprecise", expected_failure="layers.0.attn_norm"),
}


def member(name: str) -> Member:
    """A member of MEMBERS or IMPRECISE by name."""
    if name in MEMBERS:
        return MEMBERS[name]
    if name in IMPRECISE:
        return IMPRECISE[name]
    raise KeyError(f"unknown validation deployment {name!r}; known: {', '.join([*MEMBERS, *IMPRECISE])}")
