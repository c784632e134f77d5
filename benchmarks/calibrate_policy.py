"""Reproduce the calibration of CALIBRATED_THRESHOLDS (harness/compare/policies.py, docs/policies.md).

1. Calibration population: clean runs of the emulator on the calibration seeds (default 100-119) and
   of the validation population's calibration members (harness/deployment/validation, split
   "calibration") on their calibration seeds (default 100-104); all nine models, both modes, prefill
   and 4 decode steps: R, r_tail and r_bias of every tap -> count, max, p99.9 per family.
2. Thresholds = margin (default 1.5) x the maxima, rounded up (R to 0.25, tail and bias to 0.5); the
   attention taps get limits of their own from their own maxima (never below the shared ones); and
   never below the emulator-only calibration on seeds 100-139 (whose seeds 120-139 are not rerun).
3. Held out, re-judged under the derived thresholds and scored as `harness selftest` scores them:
   the emulator's fault catalogue with clean seeds 0-9, every validation member (held-out members and
   calibration members alike) on seeds 0-9 the calibration never saw, the imprecise member, and the
   generic bug shapes (two taps per shape, model and seed, seeds 0-1).

Every run is appended to a JSON-lines cache (``--runs``, default reports/calibration_runs.jsonl) with
its per-tap statistics, and runs already in it are not run again: rerunning with other margins or
seeds costs only the runs it lacks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibrate_policy.py [--calib-seeds 100-119]
        [--member-calib-seeds 100-104] [--holdout-seeds 0-9] [--shape-seeds 0-1] [--margin 1.5]
        [--jobs 2] [--golden-dir DIR] [--runs reports/calibration_runs.jsonl]
        [--json reports/calibration.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _seeds(text: str) -> list[int]:
    if not text:
        return []
    lo, sep, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if sep else [int(s) for s in text.split(",")]


def _run(cases: list, runs: Path, jobs: int, golden_dir: str | None) -> list:
    """The results of ``cases``: from the cache where present, else run (and appended to the cache)."""
    from harness.selftest.runner import load_results, run_cases, save_results

    have = {r.case.id: r for r in load_results(runs)} if runs.exists() else {}
    todo = [c for c in cases if c.id not in have]
    for start in range(0, len(todo), 72):          # saved in chunks: an interrupted run keeps its work
        chunk = run_cases(todo[start:start + 72], jobs=jobs, golden_dir=golden_dir, keep_taps=True)
        save_results(chunk, runs)
        have.update({r.case.id: r for r in chunk})
        print(f"  ran {min(start + 72, len(todo))}/{len(todo)} new checks", flush=True)
    return [have[c.id] for c in cases]


def main(argv: list[str] | None = None) -> int:
    from harness.compare.policies import CALIBRATED_THRESHOLDS
    from harness.deployment.validation import IMPRECISE, MEMBERS
    from harness.compare import policies
    from harness.selftest.calibration import (EMULATOR_SEEDS_100_139, derive, derive_kind_limits, kind_maxima, ratios,
                                              rejudge, summarise)
    from harness.selftest.runner import OURS, member_population, population, shape_population
    from harness.selftest.scoreboard import Scoreboard
    from harness.spec.model_spec import names

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-seeds", default="100-119", help="Emulator calibration seeds. Default: 100-119.")
    p.add_argument("--member-calib-seeds", default="100-104",
                   help="Calibration members' calibration seeds. Default: 100-104.")
    p.add_argument("--holdout-seeds", default="0-9", help="Held-out seeds (every member, clean emulator). Default: 0-9.")
    p.add_argument("--shape-seeds", default="0-1", help="Bug-shape seeds ('' for none). Default: 0-1.")
    p.add_argument("--margin", type=float, default=1.5, help="Threshold = margin x clean max. Default: 1.5.")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes. Default: 2.")
    p.add_argument("--golden-dir", default=None, help="Golden store. Default: the project's golden/.")
    p.add_argument("--runs", default="reports/calibration_runs.jsonl", help="Run cache (JSON lines).")
    p.add_argument("--json", default="reports/calibration.json", help="Output. Default: reports/calibration.json.")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    calib_members = [n for n, m in MEMBERS.items() if m.split == "calibration"]

    t0 = time.perf_counter()
    calib_cases = (population(names(), _seeds(args.calib_seeds), faults=[])
                   + member_population(names(), _seeds(args.member_calib_seeds), calib_members))
    calib = _run(calib_cases, runs, args.jobs, args.golden_dir)
    summary = summarise(ratios(calib))
    derived = derive(summary, args.margin, at_least=EMULATOR_SEEDS_100_139)
    print(f"calibration: {len(calib)} clean checks, emulator seeds {args.calib_seeds} and members "
          f"{', '.join(calib_members)} seeds {args.member_calib_seeds} ({time.perf_counter() - t0:.0f} s)")
    for fam, row in summary.items():
        print(f"  {fam:16s} n={row['count']:7d}  R max {row['r_max']:.3f} (p99.9 {row['r_p999']:.3f})  "
              f"r_tail max {row['tail_max']:.3f} (p99.9 {row['tail_p999']:.3f})  "
              f"r_bias max {row['bias_max']:.3f} (p99.9 {row['bias_p999']:.3f})")
        print(f"           worst R at {row['r_max_at']}; tail at {row['tail_max_at']}; bias at {row['bias_max_at']}")
        if "attn_r_max" in row:
            print(f"           attention taps: R max {row['attn_r_max']:.3f} at {row['attn_r_max_at']}; r_tail max "
                  f"{row['attn_tail_max']:.3f} at {row['attn_tail_max_at']}; r_bias max {row['attn_bias_max']:.3f} "
                  f"at {row['attn_bias_max_at']}")
    limits = [k for k in CALIBRATED_THRESHOLDS if k.endswith("_max")]
    print("derived thresholds:", {k: derived[k] for k in limits})
    print("current thresholds:", {k: CALIBRATED_THRESHOLDS[k] for k in limits})
    maxima = kind_maxima(calib)
    kind_limits = derive_kind_limits(maxima, args.margin)
    for fam, stats in maxima.items():
        for stat, kinds in stats.items():
            if kinds:
                kind, (value, where) = max(kinds.items(), key=lambda kv: kv[1][0])
                print(f"  {fam:20s} {stat:16s} clean max per kind: "
                      + " ".join(f"{k} {v:.2f}" for k, (v, _w) in sorted(kinds.items())) + f"  (worst {where})")
    print("derived KIND_LIMITS:", json.dumps(kind_limits, sort_keys=True))
    print("per-kind limits identical to the shipped KIND_LIMITS:", kind_limits == policies.KIND_LIMITS)
    shipped_kind_limits = json.loads(json.dumps(policies.KIND_LIMITS))
    policies.KIND_LIMITS.clear()
    policies.KIND_LIMITS.update(kind_limits)              # held-out runs are judged under the derived limits

    t1 = time.perf_counter()
    hold = _seeds(args.holdout_seeds)
    held_cases = (population(names(), hold) + member_population(names(), hold, [*MEMBERS, *IMPRECISE])
                  + shape_population(names(), _seeds(args.shape_seeds)))
    held = _run(held_cases, runs, args.jobs, args.golden_dir)
    board = Scoreboard.build(rejudge(held, derived), time.perf_counter() - t1)
    ours = board.rows[OURS]
    print(f"held out: {len(held)} checks. Fault catalogue: false alarms {ours.false_alarms}/{ours.clean_runs}, "
          f"detection {ours.detected}/{ours.fault_runs}, exact localisation {ours.localised}/{ours.fault_runs}")
    for v in board.validation:
        failed, at = v["policies"][OURS]
        what = f"false alarms {failed}/{v['runs']}" if v["expected"] is None else \
            f"failed at {v['expected']} {at}/{v['runs']}"
        print(f"  {v['member']:26s} {v['split']:11s} {what}")
    for sh in board.shapes:
        cells = ", ".join(f"{k} {d}/{n}" for k, (n, d, _l) in sorted(sh["by_phase"].items()))
        print(f"  shape {sh['shape']:10s} detected {cells}")
    for line in board.failures():
        print("  TARGET:", line)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"calibration_seeds": args.calib_seeds, "member_calibration_seeds": args.member_calib_seeds,
                               "calibration_members": calib_members, "holdout_seeds": args.holdout_seeds,
                               "margin": args.margin, "summary": summary, "derived": derived,
                               "kind_maxima": maxima, "kind_limits": kind_limits,
                               "shipped_kind_limits": shipped_kind_limits,
                               "holdout": board.to_dict()}, indent=1))
    print(f"wrote {out}")
    return 0 if board.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
