"""Cost of running the deployment in a child process, on the warm gate (goldens cached), side by side.

Per repeat, in one run and alternating so both see the same machine load:

- **own**: the emulator's own run time inside the inline gate: seconds spent in its factory, prefill and
  decode calls, minus the judging of its taps that happens inside those calls (``judge_s``);
- **inline**: ``run_gate(..., isolation="inline")`` wall time;
- **process**: ``run_gate(..., isolation="process")`` wall time (one child serves every phase);
- **in child**: seconds inside the deployment's calls as the child measured them (in isolated mode they
  include waiting for the parent's golden answers).

Target: process / own <= 1.5. Also printed: the child's start-up (spawn, imports, weights and emulator
build: first ``open`` on a fresh host minus a second ``open`` on the warm one).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_isolation.py [--model qwen3-0.6b] [--phase 6] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from harness.suites.gate import run_gate


def own_seconds(result) -> float:
    """Seconds inside the deployment's calls, less the tap judging done inside them (inline only)."""
    judged = sum(v["provenance"].get("judge_s", 0.0) for v in result.verdicts.values())
    return result.deployment_s - judged


def startup_seconds(model: str) -> float:
    import harness
    from harness.deployment.isolation import DeploymentHost
    from harness.weights import WeightsSource

    spec = harness.models.get(model, "tiny")
    with DeploymentHost("process") as host:
        t0 = time.perf_counter()
        host.open("emulator", spec, WeightsSource(), 0).close()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        host.open("emulator", spec, WeightsSource(), 0).close()
        return first - (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--phase", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--golden-dir", default=None, help="Default: a fresh temporary store (warmed first).")
    args = ap.parse_args()
    golden_dir = args.golden_dir or tempfile.mkdtemp(prefix="bench-isolation-")
    t0 = time.perf_counter()
    warm = run_gate(args.model, phase=args.phase, golden_dir=golden_dir, isolation="inline")
    print(f"warm-up (golden builds): {time.perf_counter() - t0:.1f} s, exit {warm.exit_code}")
    rows = []
    for _ in range(args.repeats):
        inline = run_gate(args.model, phase=args.phase, golden_dir=golden_dir, isolation="inline")
        process = run_gate(args.model, phase=args.phase, golden_dir=golden_dir, isolation="process")
        assert inline.exit_code == process.exit_code, (inline.exit_code, process.exit_code)
        rows.append((own_seconds(inline), inline.elapsed_s, process.elapsed_s, process.deployment_s))
    print(f"{'run':>3} {'own s':>7} {'inline s':>9} {'process s':>10} {'in child s':>11} {'inline/own':>11} "
          f"{'process/own':>12} {'process-inline s':>17}")
    for i, (own, inl, proc, child) in enumerate(rows):
        print(f"{i:>3} {own:>7.2f} {inl:>9.2f} {proc:>10.2f} {child:>11.2f} {inl / own:>11.2f} {proc / own:>12.2f} "
              f"{proc - inl:>17.2f}")
    ratio = statistics.median(p / o for o, _, p, _ in rows)
    extra = statistics.median(p - i for _, i, p, _ in rows)
    print(f"child start-up (spawn, imports, weights, build): {startup_seconds(args.model):.2f} s")
    print(f"median process / own = {ratio:.2f}; isolation adds {extra:.2f} s per gate run over inline; "
          f"{'meets' if ratio <= 1.5 else 'misses'} the 1.5x target")


if __name__ == "__main__":
    main()
