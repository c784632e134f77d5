"""Phase 7's false-alarm rate on clean emulator runs: how often the re-check fails a deployment that is
correct (the clean emulator) at the seed and prompt length phase 7 derives.

For each model and each base seed (``--seed``, which changes the golden key and so the derived re-check),
the re-check runs exactly as ``harness gate --phase 7`` does (``ModelRun.recheck`` in both modes) and
counts a false alarm when it does not pass. Bounded: ``--models`` x ``--seeds`` x ``--modes`` checks,
each a tiny-scale golden build plus one check. Writes ``reports/phase7_false_alarms.json``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/phase7_false_alarms.py --seeds 3 --golden-dir /tmp/g7``
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from harness.spec.model_spec import MODEL_IDS
from harness.suites.run import ModelRun, RunOptions


def wilson_upper(failures: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson interval of a rate (what "0 of N" still allows)."""
    if n == 0:
        return 1.0
    p = failures / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_IDS), help="comma-separated ids. Default: all nine")
    parser.add_argument("--seeds", type=int, default=3, help="base seeds 0..N-1 per model. Default: 3")
    parser.add_argument("--modes", default="cumulative,isolated", help="Default: cumulative,isolated")
    parser.add_argument("--golden-dir", default=None, help="golden store. Default: the project's golden/")
    parser.add_argument("--out", default="reports/phase7_false_alarms.json", help="JSON report path")
    args = parser.parse_args()

    rows = []
    t0 = time.perf_counter()
    for model in args.models.split(","):
        for seed in range(args.seeds):
            run = ModelRun(model, RunOptions(seed=seed, golden_dir=args.golden_dir))
            rseed, plen = run.recheck_params()
            for mode in args.modes.split(","):
                t1 = time.perf_counter()
                v = run.recheck(mode)
                ff = v.first_failure
                rows.append({"model": model, "base_seed": seed, "recheck_seed": rseed, "prompt_len": plen,
                             "mode": mode, "passed": v.passed, "taps": len(v.results),
                             "first_failure": f"{ff.phase} {ff.tap}" if ff else None,
                             "seconds": round(time.perf_counter() - t1, 2)})
                r = rows[-1]
                print(f"{model:14s} seed {seed} -> recheck {rseed:>10d} prompt {plen:3d} {mode:10s} "
                      f"{'pass' if r['passed'] else 'FALSE ALARM ' + str(r['first_failure'])} ({r['seconds']} s)",
                      flush=True)
    alarms = sum(not r["passed"] for r in rows)
    summary = {"checks": len(rows), "false_alarms": alarms, "rate": alarms / len(rows) if rows else None,
               "rate_upper95": wilson_upper(alarms, len(rows)), "elapsed_s": round(time.perf_counter() - t0, 1)}
    print(f"phase 7 false alarms on the clean emulator: {alarms} of {len(rows)} re-checks "
          f"(95% upper bound {summary['rate_upper95']:.1%}), {summary['elapsed_s']} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
