"""Hint precision on three kinds of failure: how often a named cause is wrong (target <= 1% of failures).

Populations (each a row of the report, and one total):

- ``faults``: every emulator fault, on models taken in turn (the self-test's quick set; ``--full``: every
  applicable model), both modes; the right hint is the fault's own id.
- ``shapes``: generic bug shapes (random noise, sparse corruption, one row / head / channel, offset, sign
  flip, scale, stale row, round-toward-zero) applied to one tap at a time of a clean isolated run of the
  emulator and, where present, of each validation deployment; the right hint is "no known signature"
  except ``round_toward_zero`` for truncation.
- ``validation``: the validation deployments (harness.deployment.validation, where present) checked in
  both modes; a correct one that fails should get no named cause, the less precise member its
  precision cause (``bf16_rmsnorm_stats``).

Usage (about 3 minutes on one core at the defaults)::

    OMP_NUM_THREADS=1 python benchmarks/hint_precision.py --models qwen3-0.6b llama-3.2-1b qwen2.5-0.5b \\
        --out reports/hint_precision.json

Exit 0 when the wrong-hint rate is within target, 1 when not, 3 when it cannot run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from harness.selftest.hint_scoring import (TARGET_WRONG, HintCase, cases_from_selftest, expected_hint,
                                           perturbed_tap_cases, record_isolated, score_hints)



def fault_cases(models: list[str], full: bool, jobs: int, golden_dir: Any) -> list[HintCase]:
    from harness.selftest.runner import population, quick_population, run_cases

    cases = population(models, seeds=()) if full else quick_population(models, seeds=())
    return cases_from_selftest(run_cases(cases, jobs=jobs, golden_dir=golden_dir), population="faults")


def validation_members(names: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(correct members, less precise members): name -> factory (harness.deployment.validation)."""
    from harness.deployment.validation import IMPRECISE, MEMBERS

    pick = (lambda n: True) if names is None else (lambda n: n in names)
    return ({n: m.factory for n, m in MEMBERS.items() if pick(n)},
            {n: m.factory for n, m in IMPRECISE.items() if pick(n)})


def validation_cases(members: dict[str, Any], models: list[str], golden_dir: Any) -> list[HintCase]:
    import harness

    cases = []
    for name, factory in members.items():
        for model in models:
            for mode in ("isolated", "cumulative"):
                v = harness.check(model, factory, scale="tiny", seed=0, decode_steps=2, mode=mode, golden_dir=golden_dir)
                ff = v.first_failure
                hint = None if ff is None else (ff.hint or "no known signature")
                cases.append(HintCase(f"{name}/{model}/{mode}" + (f" at {ff.phase}/{ff.tap}" if ff else ""),
                                      "validation", expected_hint(deployment=name), hint))
    return cases


def shape_cases(deployments: dict[str, Any], models: list[str], golden_dir: Any, stride: int) -> list[HintCase]:
    from harness.spec.model_spec import get
    from harness.spec.taps import tap_names

    cases = []
    for dep_name, factory in deployments.items():
        for model in models:
            verdict, taps = record_isolated(model, factory, golden_dir=golden_dir)
            # a tap failing unperturbed says nothing about a shape on top of it (the validation run counts it)
            failing = {(r.phase, r.tap) for r in verdict.results if not r.passed}
            if failing:
                print(f"  ({dep_name} on {model} fails {len(failing)} taps unperturbed: no shapes there)")
            order = {t: i for i, t in enumerate(tap_names(get(model, "tiny")))}
            cases.extend(perturbed_tap_cases(
                model, taps, population="shapes", deployment=dep_name, golden_dir=golden_dir,
                select=lambda phase, tap: order[tap] % stride == 0 and (phase, tap) not in failing))
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen3-0.6b", "llama-3.2-1b", "qwen2.5-0.5b"])
    ap.add_argument("--full", action="store_true", help="every fault on every applicable model")
    ap.add_argument("--stride", type=int, default=2, help="perturb every n-th tap (1: all)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--golden-dir", default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=("faults", "shapes", "validation"))
    ap.add_argument("--members", nargs="*", default=None, help="validation members (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write the score as JSON here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    from harness.deployment.emulator import make_factory

    correct, imprecise = validation_members(args.members)
    cases: list[HintCase] = []
    if "faults" not in args.skip:
        cases += fault_cases(args.models, args.full, args.jobs, args.golden_dir)
    if "validation" not in args.skip:
        cases += validation_cases({**correct, **imprecise}, args.models, args.golden_dir)
    if "shapes" not in args.skip:
        cases += shape_cases({"emulator": make_factory(), **correct}, args.models, args.golden_dir, args.stride)
    score = score_hints(cases)
    for name, sub in score.populations.items():
        print(f"{name:11s} {sub.row()}")
    print(f"{'total':11s} {score.row()}")
    for line in score.wrong_cases[:20]:
        print("  wrong:", line)
    print(f"({len(cases)} cases, {time.perf_counter() - t0:.0f} s; validation members: {len(correct) + len(imprecise)})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"models": args.models, "target_wrong": TARGET_WRONG, **score.to_dict()}, indent=1))
    return 0 if score.ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one line naming the cause, exit 3 (the harness's "could not run")
        print(f"hint_precision: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(3)
