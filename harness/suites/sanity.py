"""Phase 0, reference sanity: is the golden itself trustworthy before anything is judged against it?

Four checks, each a ``Check`` with metrics against its threshold:

- ``golden_integrity``: every file of the entry matches the sha256 in its manifest (``verify_dir``).
- ``residual_identity``: in the fp32 golden, ``layers.i.out == attn_residual + down`` and
  ``attn_residual == (previous out or embed) + o``, every phase. HF adds in fp32, so the identity holds
  to the rounding of one addition: at most ``RESIDUAL_ULPS`` fp32 ULPs of the largest magnitude.
- ``decode_matches_prefill``: each decode step's taps equal the matching row of one longer fp32 prefill
  over prompt + decode tokens, within ``DECODE_PREFILL_RTOL`` of the tap's scale (fp32 noise from a
  different reduction order; a KV-cache or position bug in the reference is O(1)).
- ``bf16_top1``: the bf16 reference picks the fp32 reference's top-1 token on at least
  ``BF16_TOP1_MIN`` of all logit rows; a broken noise baseline would make every policy meaningless.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from harness.store.golden import GoldenSet, verify_dir
from harness.suites.phases import Check

RESIDUAL_ULPS = 4.0
# fp32 eps is 1.2e-7; a few layers of differently ordered reductions (SDPA over T keys vs one query)
# stay below 1e-5 relative at tiny and small scale; 1e-4 leaves headroom for full-scale depth.
DECODE_PREFILL_RTOL = 1e-4
# Measured at tiny scale with synthetic weights: 0.90-0.99 over the nine models (prompt rows included,
# where logits of a random prompt are flat and ties common). Below 0.75 the bf16 run is broken.
BF16_TOP1_MIN = 0.75
_EPS32 = float(np.finfo(np.float32).eps)


def golden_integrity(golden: GoldenSet) -> Check:
    """Every file's sha256 against the manifest (and the local baseline's, when built)."""
    problems = verify_dir(golden.path)
    return Check("golden_integrity", not problems,
                 "; ".join(problems) if problems else f"{golden.path}: every file matches its sha256",
                 {"problems": len(problems)})


def residual_identity(golden: GoldenSet) -> Check:
    """``out == attn_residual + down`` and ``attn_residual == input + o`` in fp32, every layer and phase."""
    spec = golden.spec
    worst, where = 0.0, ""
    for phase in golden.phases:
        prev = golden.tensor(phase, "embed")
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            ar, o = golden.tensor(phase, p + "attn_residual"), golden.tensor(phase, p + "o")
            out, down = golden.tensor(phase, p + "out"), golden.tensor(phase, p + "down")
            for name, lhs, rhs in ((p + "attn_residual", ar, prev + o), (p + "out", out, ar + down)):
                scale = max(float(np.abs(lhs).max()), 1e-30)
                ulps = float(np.abs(lhs - rhs).max()) / (scale * _EPS32)
                if ulps > worst:
                    worst, where = ulps, f"{phase} {name}"
            prev = out
    ok = worst <= RESIDUAL_ULPS
    msg = f"worst {worst:.3g} ulp at {where or '-'} (max {RESIDUAL_ULPS:g})"
    return Check("residual_identity", ok, msg, {"worst_ulps": worst, "max_ulps": RESIDUAL_ULPS, "where": where})


def decode_matches_prefill(golden: GoldenSet, weights: Mapping[str, np.ndarray]) -> Check:
    """Decode-step taps against the rows of one fp32 prefill over prompt + decode tokens.

    The longer prefill streams (one layer's weights at a time) and each tap is compared the moment it
    is captured, only its decode rows: nothing of it is kept.
    """
    if len(golden.phases) < 2:
        return Check("decode_matches_prefill", True, "no decode steps in this golden", {"compared": 0})
    import torch

    from harness.reference.capture import run_reference
    from harness.reference.streaming import build_streaming_model

    spec = golden.spec
    steps = len(golden.phases) - 1
    ids = np.concatenate([golden.input_ids, golden.decode_tokens[:steps]])
    t0 = len(golden.input_ids)
    state = {"worst": 0.0, "where": "", "compared": 0}

    def compare(_phase: str, name: str, value) -> None:
        rows = value[t0: t0 + steps].float().numpy()
        for j, phase in enumerate(golden.phases[1:]):
            dec, row = golden.tensor(phase, name), rows[j: j + 1]
            rel = float(np.abs(dec - row).max()) / max(float(np.abs(row).max()), 1e-30)
            state["compared"] += 1
            if rel > state["worst"]:
                state["worst"], state["where"] = rel, f"{phase} {name}"

    run_reference(build_streaming_model(spec, weights, torch.float32), spec, ids, sink=compare)
    worst, where, compared = state["worst"], state["where"], state["compared"]
    ok = worst <= DECODE_PREFILL_RTOL
    return Check("decode_matches_prefill", ok,
                 f"worst relative difference {worst:.3g} at {where or '-'} (max {DECODE_PREFILL_RTOL:g})",
                 {"worst_rel": worst, "max_rel": DECODE_PREFILL_RTOL, "where": where, "compared": compared})


def bf16_top1(golden: GoldenSet) -> Check:
    """Share of logit rows (prefill and decode) where the bf16 run's argmax is the fp32 run's."""
    agree = total = 0
    for phase in golden.phases:
        f, b = golden.tensor(phase, "logits"), golden.tensor(phase, "logits", "bf16")
        agree += int((f.argmax(-1) == b.argmax(-1)).sum())
        total += f.shape[0]
    share = agree / total
    return Check("bf16_top1", share >= BF16_TOP1_MIN,
                 f"bf16 top-1 agreement {share:.3f} over {total} rows (min {BF16_TOP1_MIN})",
                 {"top1_agreement": share, "min": BF16_TOP1_MIN, "rows": total})


def sanity_checks(golden: GoldenSet, weights: Mapping[str, np.ndarray]) -> list[Check]:
    """The four phase-0 checks of ``golden`` (``weights``: the ones the golden was built from)."""
    return [golden_integrity(golden), residual_identity(golden), decode_matches_prefill(golden, weights),
            bf16_top1(golden)]
