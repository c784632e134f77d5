"""Sweep the 1% perturbation property over every tap: each (model, seed, phase, tap) once.

For each tap of each phase (prefill and the decode steps), the fp32 golden replayed with that one tap
scaled by 1.01 is checked in isolated mode; the property holds when the verdict fails at exactly that
tap and nowhere else. Prints the misses (with R, r_tail, r_bias and the baseline's bias t there) and
the totals; exit 1 if any. docs/policies.md quotes the seeds 0-3 run (5,400 perturbations).

    .venv/bin/python benchmarks/perturbation_sweep.py [--seeds 0-3] [--decode-steps 2] [--jobs 2]
        [--golden-dir DIR]

About a minute per seed on 2 cores once the goldens are built.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor


def _sweep(args: tuple[str, int, int, str | None]) -> tuple[str, int, int, list[str]]:
    """(model, seed, perturbations, misses) for one model and seed."""
    import harness
    from harness.deployment.replay import check_replay, perturbed_replay
    from harness.spec import taps as tapspec
    from harness.threads import use_one_thread

    use_one_thread()
    model, seed, steps, golden_dir = args
    spec = harness.models.get(model, "tiny")
    misses, count = [], 0
    for phase in tapspec.phase_names(steps):
        for tap in tapspec.tap_names(spec):
            count += 1
            v = check_replay(model, perturbed_replay(phase, tap, 0.01), seed=seed, decode_steps=steps,
                             mode="isolated", golden_dir=golden_dir)
            if not v.passed and [r.id for r in v.failures] == [f"{phase}/{tap}"]:
                continue
            r = next(r for r in v.results if (r.phase, r.tap) == (phase, tap))
            m, measured = r.metrics or {}, (r.judgement or {}).get("measured", {})
            misses.append(f"{model} seed {seed} {phase}/{tap}: failures {[x.id for x in v.failures][:3]}, "
                          f"R {measured.get('r', float('nan')):.3g}, r_tail {measured.get('r_tail', float('nan')):.3g}, "
                          f"r_bias {measured.get('r_bias', float('nan')):.3g} (baseline bias t "
                          f"{m.get('baseline_bias_t', float('nan')):.3g})")
    return model, seed, count, misses


def main() -> int:
    from harness.spec.model_spec import names

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-3", help="Seeds, 'a-b' or 'a,b,c'. Default: 0-3.")
    p.add_argument("--decode-steps", type=int, default=2, help="Decode steps. Default: 2 (as tests/test_check.py).")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes. Default: 2.")
    p.add_argument("--golden-dir", default=None, help="Golden store. Default: the project's golden/.")
    args = p.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi) + 1)) if hi else [int(s) for s in args.seeds.split(",")]
    jobs = [(m, s, args.decode_steps, args.golden_dir) for s in seeds for m in names()]
    t0, total, missed = time.perf_counter(), 0, []
    with ProcessPoolExecutor(args.jobs) as pool:
        for model, seed, count, misses in pool.map(_sweep, jobs):
            total += count
            missed += misses
            print(f"{model} seed {seed}: {count} perturbations, {len(misses)} missed")
    for line in missed:
        print("  MISS", line)
    print(f"{total} perturbations, {len(missed)} missed, {time.perf_counter() - t0:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
