"""Reproduce the calibration of CALIBRATED_THRESHOLDS (harness/compare/policies.py, docs/policies.md).

1. Clean emulator runs on the calibration seeds (default 100-139), all nine models, both modes, prefill
   and 4 decode steps: R, r_tail and r_bias of every tap -> count, max, p99.9 per phase kind.
2. Thresholds = margin (default 1.5) x the maxima, rounded up (R to 0.25, tail and bias to 0.5).
3. Held out: the self-test's population (clean seeds 0-19 the calibration never saw, every fault on
   every applicable model) re-judged under the derived thresholds: false alarms, detection and exact
   localisation, scored as `harness selftest` scores them.

    .venv/bin/python benchmarks/calibrate_policy.py [--calib-seeds 100-139] [--holdout-seeds 0-19]
        [--margin 1.5] [--jobs 2] [--golden-dir DIR] [--json reports/calibration.json]

Takes about 8 minutes on 2 cores when the goldens are not built yet.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    from harness.compare.policies import CALIBRATED_THRESHOLDS
    from harness.selftest.calibration import derive, ratios, rejudge, summarise
    from harness.selftest.runner import population, run_cases
    from harness.selftest.scoreboard import Scoreboard
    from harness.spec.model_spec import names

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-seeds", default="100-139", help="Calibration seeds, 'a-b' or 'a,b,c'. Default: 100-139.")
    p.add_argument("--holdout-seeds", default="0-19", help="Held-out clean seeds. Default: 0-19 (the self-test's).")
    p.add_argument("--margin", type=float, default=1.5, help="Threshold = margin x clean max. Default: 1.5.")
    p.add_argument("--jobs", type=int, default=0, help="Worker processes. Default: every core.")
    p.add_argument("--golden-dir", default=None, help="Golden store. Default: the project's golden/.")
    p.add_argument("--json", default="reports/calibration.json", help="Output. Default: reports/calibration.json.")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    calib = run_cases(population(names(), _seeds(args.calib_seeds), faults=[]), jobs=args.jobs or None,
                      golden_dir=args.golden_dir, keep_taps=True)
    summary = summarise(ratios(calib))
    derived = derive(summary, args.margin)
    print(f"calibration: {len(calib)} clean checks ({time.perf_counter() - t0:.0f} s)")
    for fam, row in summary.items():
        print(f"  {fam:15s} n={row['count']:7d}  R max {row['r_max']:.3f} (p99.9 {row['r_p999']:.3f})  "
              f"r_tail max {row['tail_max']:.3f} (p99.9 {row['tail_p999']:.3f})  "
              f"r_bias max {row['bias_max']:.3f} (p99.9 {row['bias_p999']:.3f})")
        print(f"          worst R at {row['r_max_at']}; worst tail at {row['tail_max_at']}; "
              f"worst bias at {row['bias_max_at']}")
    limits = [k for k in CALIBRATED_THRESHOLDS if k.endswith("_max")]
    print("derived thresholds:", {k: derived[k] for k in limits})
    print("current thresholds:", {k: CALIBRATED_THRESHOLDS[k] for k in limits})

    t1 = time.perf_counter()
    held = run_cases(population(names(), _seeds(args.holdout_seeds)), jobs=args.jobs or None,
                     golden_dir=args.golden_dir, keep_taps=True)
    board = Scoreboard.build(rejudge(held, derived), time.perf_counter() - t1)
    ours = board.rows["calibrated"]
    print(f"held out: {len(held)} checks: false alarms {ours.false_alarms}/{ours.clean_runs}, detection "
          f"{ours.detected}/{ours.fault_runs}, exact localisation {ours.localised}/{ours.fault_runs}")
    for line in board.misses:
        print("  ", line)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"calibration_seeds": args.calib_seeds, "holdout_seeds": args.holdout_seeds,
                               "margin": args.margin, "summary": summary, "derived": derived,
                               "holdout": board.rows["calibrated"].to_dict(), "misses": board.misses}, indent=1))
    print(f"wrote {out}")
    return 0 if not ours.false_alarms and ours.detected == ours.fault_runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
