"""Measure how far the emulator sits from the fp32 golden, in units of bf16 noise, tap by tap.

R = ||emu - fp32|| / ||baseline - fp32|| per (phase, tap): in ``cumulative`` mode the baseline is the HF
bf16 run end to end; in ``isolated`` mode the emulator continues from golden taps and the baseline is
the teacher-forced bf16 run (each op's own rounding). The clean emulator scores ~1; the distribution
per tap kind is what the policy thresholds are calibrated from, and faults must stand clearly above it.

    python -m harness.deployment.emulator.calibrate --models all --seeds 0,1,2
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from harness.spec import model_spec
from harness.spec.taps import parse

MODES = ("cumulative", "isolated")


@dataclass(frozen=True)
class References:
    """Weights, prompt and the three reference runs of one (model, scale, seed)."""

    spec: model_spec.ModelSpec
    weights: dict
    input_ids: np.ndarray
    golden: object      # ReferenceRun, fp32
    cumulative: object  # ReferenceRun, bf16 end to end
    isolated: object    # ReferenceRun, bf16 teacher-forced on the golden taps


@lru_cache(maxsize=20)  # tiny sets are ~10 MB each; the emulator tests use 18
def references(model_id: str, scale: str = "tiny", seed: int = 0, decode_steps: int = 4) -> References:
    """The reference runs (cached per process: tests and the CLI reuse them)."""
    from harness.reference.capture import run_reference
    from harness.reference.hf_model import build_hf_model
    from harness.reference.prompts import prompt_ids
    from harness.weights.synthetic import synthetic_weights

    spec = model_spec.get(model_id, scale)
    weights = synthetic_weights(spec, seed)
    ids = prompt_ids(spec, seed)
    golden = run_reference(build_hf_model(spec, weights, torch.float32), spec, ids, decode_steps=decode_steps)
    bf16 = build_hf_model(spec, weights, torch.bfloat16)
    cum = run_reference(bf16, spec, ids, decode_steps=decode_steps, decode_tokens=golden.decode_tokens)
    iso = run_reference(bf16, spec, ids, decode_steps=decode_steps, decode_tokens=golden.decode_tokens,
                        force=golden.taps)
    return References(spec, weights, ids, golden, cum, iso)


def run_deployment(factory: Callable, refs: References, mode: str) -> dict[str, dict[str, np.ndarray]]:
    """Run ``factory``'s deployment on the references' prompt and decode tokens; returns its taps."""
    deployment = factory(refs.spec, refs.weights)
    out: dict[str, dict[str, np.ndarray]] = {}

    def tap_for(phase: str):
        def tap(name: str, value: np.ndarray) -> np.ndarray:
            out.setdefault(phase, {})[name] = np.array(value, dtype=np.float32)
            return refs.golden.taps[phase][name] if mode == "isolated" else value
        return tap

    deployment.prefill(refs.input_ids, tap_for("prefill"))
    for step, token in enumerate(refs.golden.decode_tokens):
        deployment.decode(int(token), tap_for(f"decode.{step}"))
    return out


def tap_ratios(factory: Callable, refs: References, mode: str) -> dict[tuple[str, str], float]:
    """R per (phase, tap) of ``factory``'s deployment in ``mode``."""
    from harness.compare.metrics import tap_metrics

    base = refs.cumulative if mode == "cumulative" else refs.isolated
    taps = run_deployment(factory, refs, mode)
    return {(phase, name): float(tap_metrics(value, refs.golden.taps[phase][name], base.taps[phase][name])["r"])
            for phase, named in taps.items() for name, value in named.items()}


def distribution(factory: Callable, models: list[str], seeds: list[int], scale: str = "tiny",
                 decode_steps: int = 4) -> dict[tuple[str, str, str], tuple[float, str]]:
    """Max R per (mode, prefill|decode, tap kind) over models and seeds, with where it occurred."""
    worst: dict[tuple[str, str, str], tuple[float, str]] = {}
    for model_id in models:
        for seed in seeds:
            refs = references(model_id, scale, seed, decode_steps)
            for mode in MODES:
                for (phase, name), r in tap_ratios(factory, refs, mode).items():
                    key = (mode, "prefill" if phase == "prefill" else "decode", parse(name).kind)
                    if r > worst.get(key, (-1.0, ""))[0]:
                        worst[key] = (r, f"{model_id}/seed{seed}/{phase}/{name}")
    return worst


def main(argv: list[str] | None = None) -> None:
    from harness.deployment.emulator import make_factory

    parser = argparse.ArgumentParser(description="R of the emulator per tap kind (max over models and seeds)")
    parser.add_argument("--models", default="all", help="comma-separated ids or 'all'. Default: all")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds. Default: 0")
    parser.add_argument("--scale", default="tiny", help="model scale. Default: tiny")
    parser.add_argument("--faults", default="", help="comma-separated emulator faults. Default: none")
    args = parser.parse_args(argv)
    models = model_spec.names() if args.models == "all" else args.models.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    faults = tuple(f for f in args.faults.split(",") if f)
    worst = distribution(make_factory(faults=faults), models, seeds, args.scale)
    for mode, where, kind in sorted(worst):
        r, at = worst[(mode, where, kind)]
        print(f"{mode:10s} {where:7s} {kind:14s} R_max={r:7.3f}  {at}")


if __name__ == "__main__":
    main()
