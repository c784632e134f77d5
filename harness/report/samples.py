"""Realistic sample verdict dicts (schema 1) for the report tests, the docs and demos.

Metric values follow what a bf16 deployment scores against the fp32 golden: R near 1, cosine
0.9999x, a few ULPs at p99. A fault raises the error from its tap on: a *step* keeps it high for the
rest of the run (cumulative mode), a *spike* lets it fall back downstream.
"""
from __future__ import annotations

import random
from typing import Any

from harness.errors import HarnessError
from harness.spec import model_spec, taps

_HINTS = {
    "q_rope": "RoPE: check the half-split rotation and the cos/sin table (interleaved pairs score cosine ~0.6)",
    "k_rope": "RoPE on keys: check positions of the new tokens and the KV-cache write",
    "attn": "attention: check the causal mask, the softmax statistics and the GQA head mapping",
    "down": "GEMM: check the accumulation precision (fp32 inside the kernel) and the K tiling",
}
_THRESHOLDS = {"r": 2.0, "r_tail": 3.0}


def _clean_metrics(rng: random.Random) -> dict[str, float]:
    return {"r": rng.uniform(0.85, 1.3), "r_tail": rng.uniform(0.9, 1.6), "cosine": 1 - rng.uniform(1e-6, 4e-5),
            "rel_fro": rng.uniform(2e-3, 6e-3), "max_abs": rng.uniform(5e-3, 5e-2),
            "ulp_p99": float(rng.choice([1, 1, 2, 2, 3]))}


def _bad_metrics(rng: random.Random, severity: float) -> dict[str, float]:
    m = _clean_metrics(rng)
    m.update(r=2.0 + severity * rng.uniform(1.5, 3), r_tail=3.0 + severity * rng.uniform(3, 8),
             cosine=1 - severity * rng.uniform(2e-3, 2e-2), rel_fro=severity * rng.uniform(0.02, 0.08),
             max_abs=severity * rng.uniform(0.2, 2.0), ulp_p99=float(rng.randint(20, 400)))
    return m


def sample_verdict(model: str = "qwen3-0.6b", *, scale: str = "tiny", seed: int = 0, mode: str = "cumulative",
                   decode_steps: int = 2, fail_phase: str | None = None, fail_tap: str = "layers.1.q_rope",
                   kind: str = "step", not_exposed: tuple[str, ...] = (), nan_at_failure: bool = False,
                   perf: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A verdict for ``model`` at ``scale`` (default tiny, 2 decode steps).

    ``fail_phase`` None passes; ``"prefill"`` or ``"decode.N"`` fails at ``fail_tap`` (default
    ``layers.1.q_rope``) in that phase, ``kind`` ``"step"`` (default; every later tap and phase fails too)
    or ``"spike"`` (only that tap). ``nan_at_failure`` puts NaN metrics at the failing tap.
    """
    spec = model_spec.get(model, scale)
    names = [n for n in taps.tap_names(spec) if n not in not_exposed]
    phases = taps.phase_names(decode_steps)
    if fail_phase is not None and (fail_phase not in phases or fail_tap not in names):
        raise HarnessError(f"sample verdict: {fail_phase} {fail_tap} is not a compared phase/tap of {model}")
    if kind not in ("step", "spike"):
        raise HarnessError(f"sample verdict: kind must be 'step' or 'spike', got {kind!r}")
    rng = random.Random(f"{model}/{scale}/{seed}/{fail_phase}/{fail_tap}/{kind}")
    start = (phases.index(fail_phase), names.index(fail_tap)) if fail_phase else None
    results = []
    for p_i, phase in enumerate(phases):
        for t_i, name in enumerate(names):
            bad = start is not None and ((p_i, t_i) == start or (kind == "step" and (p_i, t_i) > start))
            metrics = _bad_metrics(rng, 1.0 + 0.1 * t_i / len(names)) if bad else _clean_metrics(rng)
            if bad and nan_at_failure and (p_i, t_i) == start:
                metrics.update(r=float("nan"), r_tail=float("nan"), cosine=float("nan"), max_abs=float("inf"))
            res: dict[str, Any] = {"phase": phase, "tap": name, "passed": not bad, "metrics": metrics}
            if bad:
                res["judgement"] = {"policy": "calibrated", "thresholds": dict(_THRESHOLDS),
                                    "reasons": [f"r {metrics['r']:.3g} > 2", f"r_tail {metrics['r_tail']:.3g} > 3"]}
            results.append(res)
    first = None
    if start is not None:
        res = results[start[0] * len(names) + start[1]]
        parsed = taps.parse(fail_tap)
        tokens = spec.default_prompt_len if fail_phase == "prefill" else 1
        worst_tokens = sorted(rng.sample(range(tokens), min(5, tokens)), reverse=True)
        width = taps.features(spec, parsed.kind)
        elements = []
        for tok in worst_tokens[:4]:
            head, dim = taps.head_of(spec, parsed.kind, rng.randrange(width))
            gold = rng.uniform(-3, 3)
            elements.append([tok, head, dim, gold + rng.choice([-1, 1]) * rng.uniform(0.3, 1.5), gold])
        first = {"phase": fail_phase, "tap": fail_tap, "metrics": dict(res["metrics"]),
                 "hint": _HINTS.get(parsed.kind, f"check the op that produces {parsed.kind}"),
                 "judgement": res["judgement"],
                 "localisation": {"kind": kind, "worst_tokens": worst_tokens, "worst_elements": elements}}
    required = set(taps.required_taps(spec))
    return {"schema": 1, "model": model, "scale": scale, "seed": seed, "mode": mode, "passed": start is None,
            "first_failure": first,
            "coverage": {"compared": len(results), "required_missing": sorted(required & set(not_exposed)),
                         "not_exposed": list(not_exposed)},
            "results": results, "perf": perf,
            "provenance": {"harness": "0.1.0", "golden": f"{model}/{scale}/seed{seed}", "sample": True}}


def sample_perf(model: str = "qwen3-0.6b", *, regression: bool = False) -> list[dict[str, Any]]:
    """Two perf comparisons (TTFT and TPOT); ``regression`` makes TTFT 15% slower with p = 2e-4."""
    ttft = ({"verdict": "regression", "cand_median": 48.3, "ratio": 1.15, "p_value": 2.0e-4,
             "reason": "15.0% slower >= 5% and Mann-Whitney p=0.0002 < 0.01"} if regression else
            {"verdict": "unchanged", "cand_median": 42.1, "ratio": 1.002, "p_value": 0.62,
             "reason": "0.2% change < 5%"})
    return [{"model": model, "metric": "ttft", "unit": "ms", "base_median": 42.0, **ttft},
            {"model": model, "metric": "tpot", "unit": "ms", "verdict": "unchanged", "base_median": 15.6,
             "cand_median": 15.5, "ratio": 0.994, "p_value": 0.41, "reason": "-0.6% change < 5%"}]
