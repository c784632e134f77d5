"""Op timings: phase 1's op cases of a model, timed on a deployment's own op backend.

Correctness and performance come from the same cases (``harness.suites.op_registry``): the ids printed
here are the ids phase 1 judges. Each case runs ``--rounds`` times after ``--warmup`` untimed runs on
the inputs phase 1 uses; the median and minimum wall time of ``backend.run`` are reported. Cases the
backend does not support are left out. Run:
``.venv/bin/python benchmarks/bench_ops.py --model qwen3-0.6b --scale tiny [--deployment emulator] [--json ops.json]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.errors import EXIT_ERROR, HarnessError
from harness.spec.model_spec import get
from harness.suites.op_registry import cases_for, time_cases
from harness.suites.ops_phase import op_backend_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b", help="model id. Default: qwen3-0.6b")
    parser.add_argument("--scale", default="tiny", choices=("tiny", "small", "full"), help="Default: tiny")
    parser.add_argument("--deployment", default="emulator", help="MODULE:FACTORY or a built-in name. Default: emulator")
    parser.add_argument("--tokens", type=int, default=None, help="prompt length. Default: the scale's")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per case. Default: 5")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first. Default: 1")
    parser.add_argument("--json", type=Path, default=None, help="write the timings here. Default: none")
    args = parser.parse_args()
    try:
        spec = get(args.model, args.scale)
        backend = op_backend_of(args.deployment, spec)
        if backend is None:
            raise HarnessError(f"--deployment {args.deployment}: not applicable: no op backend (nothing to time)")
        times = time_cases(cases_for(spec, args.tokens), backend, rounds=args.rounds, warmup=args.warmup)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    width = max(map(len, times), default=10)
    print(f"{'case':<{width}}  {'median ms':>10}  {'min ms':>10}")
    for cid, t in times.items():
        print(f"{cid:<{width}}  {t['median_s'] * 1e3:10.3f}  {t['min_s'] * 1e3:10.3f}")
    if args.json is not None:
        doc = {"model": args.model, "scale": args.scale, "deployment": args.deployment, "cases": times}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
