"""Benchmark: every metric of tap_metrics vs torch.testing.assert_close on the same tensors.

Tensor set at full qwen2.5-0.5b scale: a 128-token prefill's [128, 151936] logits and one layer's taps
([128, 896] x 9, [128, 128] x 3, [128, 4864] x 3), and one decode step's one-row taps of one layer
plus its logits ([1, 896] x 9, [1, 128] x 3, [1, 4864] x 3, [1, 151936]), float32. For the whole
golden set's mix (1,815 taps) see bench_golden.py. The dut is the golden rounded to bf16 (close
but not equal, and passing assert_close at torch's bf16 tolerance); the baseline is a bf16 rounding
of the golden with 0.3% noise. Both sides run interleaved, set by set, best of N repetitions, in one
process.

    .venv/bin/python benchmarks/bench_metrics.py [--reps 7]
"""
from __future__ import annotations

import argparse
import time

import ml_dtypes
import numpy as np
import torch

from harness.compare.metrics import tap_metrics

LAYER = [(896,)] * 9 + [(128,)] * 3 + [(4864,)] * 3
SHAPES = [(128, 151936)] + [(128, *f) for f in LAYER] + [(1, *f) for f in LAYER] + [(1, 151936)]


def tensors(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for shape in SHAPES:
        g = (rng.standard_normal(shape, dtype=np.float32) * 2).astype(np.float32)
        d = g.astype(ml_dtypes.bfloat16).astype(np.float32)
        b = (g * (1 + 3e-3 * rng.standard_normal(shape, dtype=np.float32))).astype(ml_dtypes.bfloat16)
        out.append((d, g, b.astype(np.float32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="repetitions, best taken (default: 7)")
    args = ap.parse_args()
    data = tensors()
    pairs = [(torch.from_numpy(d), torch.from_numpy(g)) for d, g, _ in data]

    def ours(items: slice) -> None:
        for d, g, b in data[items]:
            tap_metrics(d, g, b)

    def theirs(items: slice) -> None:
        for d, g in pairs[items]:
            torch.testing.assert_close(d, g, rtol=1.6e-2, atol=1e-5)

    rows = [("logits [128, 151936]", slice(0, 1)), ("layer taps [128, *] (15)", slice(1, 16)),
            ("decode taps [1, *] (16)", slice(16, None)), ("all", slice(None))]
    best = {(name, side): float("inf") for name, _ in rows for side in ("ours", "theirs")}
    ours(slice(None)), theirs(slice(None))                      # warm-up: scratch buffers, torch threads
    for name, items in rows:             # one set at a time: the logits' threads spin on after them
        for _ in range(args.reps):
            for side, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                fn(items)
                best[(name, side)] = min(best[(name, side)], time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.reps}")
    print(f"{'tensor set':26s} {'tap_metrics ms':>15s} {'assert_close ms':>16s} {'speed-up':>9s}")
    for name, _ in rows:
        a, b = best[(name, "ours")] * 1e3, best[(name, "theirs")] * 1e3
        print(f"{name:26s} {a:15.2f} {b:16.2f} {b / a:8.2f}x")


if __name__ == "__main__":
    main()
