"""Phase 0, reference sanity: is the golden itself trustworthy before anything is judged against it?

Four checks, each a ``Check`` with metrics against its threshold:

- ``golden_integrity``: every file of the entry matches the sha256 in its manifest (``verify_dir``).
- ``residual_identity``: in the fp32 golden, ``layers.i.out == attn_residual + down`` and
  ``attn_residual == (previous out or embed) + o``, every phase. HF adds in fp32, so the identity holds
  to the rounding of one addition: at most ``RESIDUAL_ULPS`` fp32 ULPs of the largest magnitude.
- ``decode_matches_prefill``: each decode step's taps equal the matching row of one longer fp32 prefill
  over prompt + decode tokens, within ``DECODE_PREFILL_RTOL`` of the tap's scale or, deeper in the model,
  ``DECODE_PREFILL_BF16_SHARE`` of the bf16 golden's own difference there (fp32 noise from a different
  reduction order; a KV-cache or position bug in the reference is O(1)).
- ``bf16_top1``: the bf16 reference picks the fp32 reference's top-1 token (or a near tie of it within
  its own rounding noise) on at least ``BF16_TOP1_MIN`` of all logit rows; a broken noise baseline would
  make every policy meaningless.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from harness.store.golden import GoldenSet, verify_dir
from harness.suites.phases import Check

RESIDUAL_ULPS = 4.0
# fp32 eps is 1.2e-7; a few layers of differently ordered reductions (SDPA over T keys vs one query)
# stay below 1e-5 relative at tiny and small scale. The reordering noise grows with depth and prompt
# length as bf16's rounding does (qwen3-4b at 256 tokens: 1.9e-4 at layer 27 of 36, decode step 22),
# so the limit follows the bf16 golden's difference from fp32 on that same tap: fp32 reordering is
# 2^-23 per operation against bf16's 2^-8, and a share of 1/20 leaves a 1000x margin to either. A
# reference bug (stale cache, wrong position) is O(1) relative, far above both.
DECODE_PREFILL_RTOL = 1e-4
DECODE_PREFILL_BF16_SHARE = 0.05
# Measured at tiny scale with synthetic weights: 0.90-0.99 over the nine models (prompt rows included,
# where logits of a random prompt are flat and ties common). Below 0.75 the bf16 run is broken.
BF16_TOP1_MIN = 0.75
# A disagreement is a near tie when the bf16 pick trails the fp32 top-1 by at most 3 RMS of the bf16
# run's error on that row plus one bf16 ULP of the top value (a rounding-level difference), and only
# while that error stays below half of the row's logit spread. Synthetic weights amplify bf16 rounding
# with depth: qwen3-4b at full scale and 2048 tokens measured 0.28-0.38 of the spread (cosine
# 0.93-0.96 to fp32), where the flat top of 151936 logits swaps with any noise; a broken bf16 run
# (logits unrelated to fp32) sits at 1.4, so it is never excused.
TIE_NOISE = 3.0
TIE_MAX_NOISE = 0.5
TOP1_CHUNK_ROWS = 64  # [2048, 151936] full-scale logits would need 2.5 GB per float64 copy
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
    state = {"score": 0.0, "worst": 0.0, "allowed": DECODE_PREFILL_RTOL, "where": "", "compared": 0}

    def compare(_phase: str, name: str, value) -> None:
        rows = value[t0: t0 + steps].float().numpy()
        for j, phase in enumerate(golden.phases[1:]):
            dec, row = golden.tensor(phase, name), rows[j: j + 1]
            rel = _rel_max(dec, row)
            # Only read the bf16 tap when the fixed floor is exceeded (rare: deep layers at full scale).
            allowed = DECODE_PREFILL_RTOL if rel <= DECODE_PREFILL_RTOL else max(
                DECODE_PREFILL_RTOL, DECODE_PREFILL_BF16_SHARE * _rel_max(golden.tensor(phase, name, "bf16"), dec))
            state["compared"] += 1
            if rel / allowed > state["score"]:
                state.update(score=rel / allowed, worst=rel, allowed=allowed, where=f"{phase} {name}")

    run_reference(build_streaming_model(spec, weights, torch.float32), spec, ids, sink=compare)
    worst, allowed, where = state["worst"], state["allowed"], state["where"]
    return Check("decode_matches_prefill", state["score"] <= 1.0,
                 f"worst relative difference {worst:.3g} at {where or '-'} (max {allowed:.3g}: "
                 f"{DECODE_PREFILL_RTOL:g}, or {DECODE_PREFILL_BF16_SHARE:g} of the bf16 golden's difference there)",
                 {"worst_rel": worst, "max_rel": allowed, "where": where, "compared": state["compared"],
                  "score": state["score"]})


def _rel_max(value: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return float(np.abs(value - ref).max()) / max(float(np.abs(ref).max()), 1e-30)


def top1_agreement(fp32: np.ndarray, bf16: np.ndarray) -> tuple[int, int]:
    """(rows where the bf16 pick is the fp32 top-1 or a near tie of it, rows where it is exactly it).

    A near tie: in the fp32 logits the bf16 pick sits within ``TIE_NOISE`` x the row's RMS bf16-vs-fp32
    difference plus one bf16 ULP of the top value (two values a rounding apart can swap) of the fp32
    top-1, and that difference is small against the row's own spread (below
    ``TIE_MAX_NOISE`` of its standard deviation). Long prompts on synthetic weights have nearly flat
    logits, where the two references' argmax differ by rounding alone; a broken bf16 run differs by as
    much as the logits spread, so it is never excused."""
    agree = exact = 0
    for r0 in range(0, fp32.shape[0], TOP1_CHUNK_ROWS):  # float64 copies of a few rows, not of a whole phase
        a, e = _top1_rows(np.asarray(fp32[r0:r0 + TOP1_CHUNK_ROWS], dtype=np.float64),
                          np.asarray(bf16[r0:r0 + TOP1_CHUNK_ROWS], dtype=np.float64))
        agree, exact = agree + a, exact + e
    return agree, exact


def _top1_rows(fp32: np.ndarray, bf16: np.ndarray) -> tuple[int, int]:
    rows = np.arange(fp32.shape[0])
    f_pick, b_pick = fp32.argmax(-1), bf16.argmax(-1)
    exact = f_pick == b_pick
    noise = np.sqrt(np.mean((bf16 - fp32) ** 2, axis=-1))
    top = fp32[rows, f_pick]
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(top), np.finfo(np.float32).tiny))) - 7)  # bf16 ULP there
    gap = top - fp32[rows, b_pick]
    tie = (gap <= TIE_NOISE * noise + ulp) & (noise <= TIE_MAX_NOISE * fp32.std(axis=-1))
    return int((exact | tie).sum()), int(exact.sum())


def bf16_top1(golden: GoldenSet) -> Check:
    """Share of logit rows (prefill and decode) where the bf16 run's argmax is the fp32 run's, or a
    near tie of it within the bf16 run's own noise (``top1_agreement``)."""
    agree = exact = total = 0
    for phase in golden.phases:
        fp32 = golden.tensor(phase, "logits")  # read once: at full scale the largest tap of the phase
        a, e = top1_agreement(fp32, golden.tensor(phase, "logits", "bf16"))
        agree, exact, total = agree + a, exact + e, total + fp32.shape[0]
    share = agree / total
    return Check("bf16_top1", share >= BF16_TOP1_MIN,
                 f"bf16 top-1 agreement {share:.3f} over {total} rows, near ties included "
                 f"({exact / total:.3f} exact; min {BF16_TOP1_MIN})",
                 {"top1_agreement": share, "exact_agreement": exact / total, "min": BF16_TOP1_MIN, "rows": total})


REUSABLE = ("residual_identity", "decode_matches_prefill", "bf16_top1")  # functions of the entry's bytes alone


def sanity_checks(golden: GoldenSet, weights: Mapping[str, np.ndarray]) -> list[Check]:
    """The four phase-0 checks of ``golden`` (``weights``: the ones the golden was built from). The three
    that read only the entry come from its record (``sanity_record``) when an earlier gate ran them on
    the same files, which ``golden_integrity`` has just verified; otherwise they run and are recorded."""
    from harness.suites import sanity_record

    integrity = golden_integrity(golden)
    # Files that fail their sha256: nothing recorded is trusted, and nothing is recorded, for them.
    stored = sanity_record.load(golden, REUSABLE) if integrity.passed else None
    if stored is not None:
        return [integrity, *stored]
    checks = [residual_identity(golden), decode_matches_prefill(golden, weights), bf16_top1(golden)]
    if integrity.passed:
        sanity_record.save(golden, checks)
    return [integrity, *checks]
