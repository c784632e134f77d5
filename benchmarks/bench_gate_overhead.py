"""Harness overhead of ``harness gate`` through phase 6, goldens cached.

Prints, side by side from one run: the gate's wall time, the seconds spent inside the emulator
(its factory, prefill and decode calls, timed where the deployment runs: its child process by default,
see harness.deployment.isolation), and their ratio. ``benchmarks/bench_isolation.py`` compares the
isolated gate with the inline one and the emulator's own run. Target: ratio <= 1.5 (harness overhead <= 50% of the emulator's own run time).

    .venv/bin/python benchmarks/bench_gate_overhead.py [--model qwen3-0.6b] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from harness.suites.gate import run_gate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--phase", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--golden-dir", default=None, help="Default: a fresh temporary store (warmed first).")
    args = ap.parse_args()
    golden_dir = args.golden_dir or tempfile.mkdtemp(prefix="bench-gate-")
    t0 = time.perf_counter()
    warm = run_gate(args.model, phase=args.phase, golden_dir=golden_dir)  # builds and caches the goldens
    print(f"warm-up (golden builds): {time.perf_counter() - t0:.1f} s, exit {warm.exit_code}")
    rows = []
    for _ in range(args.repeats):
        r = run_gate(args.model, phase=args.phase, golden_dir=golden_dir)
        per_phase = {n: o.seconds for n, o in r.outcomes.items()}
        rows.append((r.elapsed_s, r.deployment_s, per_phase))
    print(f"{'run':>3} {'gate s':>8} {'emulator s':>11} {'ratio':>6}  per phase (s)")
    for i, (gate_s, emu_s, per) in enumerate(rows):
        phases = " ".join(f"{n}:{s:.2f}" for n, s in sorted(per.items()))
        print(f"{i:>3} {gate_s:>8.2f} {emu_s:>11.2f} {gate_s / emu_s:>6.2f}  {phases}")
    ratio = statistics.median(g / e for g, e, _ in rows)
    verdict = "meets" if ratio <= 1.5 else "misses"
    print(f"median ratio gate / emulator = {ratio:.2f} (harness overhead {ratio - 1:.0%}); {verdict} the 1.5x target")


if __name__ == "__main__":
    main()
