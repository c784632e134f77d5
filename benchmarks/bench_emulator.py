"""Emulator speed: full-scale qwen2.5-0.5b prefill (128 tokens) against the HF fp32 forward, side by side.

Weights come from ``synthetic_weights`` on the full spec; building either model is excluded from the
timings. Each side runs ``--repeats`` times (default 3) after one warm-up; the best time is compared.
Target: emulator / HF <= 3. Both sides compute on the process's torch threads (the emulator's own default
is one thread, ``NPU_HARNESS_EMULATOR_THREADS``; this benchmark sets it to 0 unless it is set, so the
ratio compares like with like). Run: ``.venv/bin/python benchmarks/bench_emulator.py``.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from harness.deployment.emulator import factory
from harness.reference.hf_model import build_hf_model
from harness.reference.prompts import prompt_ids
from harness.spec.model_spec import get
from harness.weights.synthetic import synthetic_weights

TARGET_RATIO = 3.0


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and BLAS thread start-up are not the steady state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="model id. Default: qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length. Default: 128")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side. Default: 3")
    args = parser.parse_args()
    from harness.deployment.emulator.model import THREADS_ENV, compute_threads

    os.environ.setdefault(THREADS_ENV, "0")  # the process's threads, as the HF forward uses

    spec = get(args.model, "full")
    weights = synthetic_weights(spec, seed=0)
    ids = prompt_ids(spec, 0, args.tokens)
    hf = build_hf_model(spec, weights, torch.float32)
    emu = factory(spec, weights)
    ids_t = torch.as_tensor(ids)[None, :]

    def run_hf() -> None:
        with torch.inference_mode():
            hf(input_ids=ids_t, use_cache=True)

    def run_emu() -> None:
        with torch.inference_mode():
            emu.prefill(ids, lambda name, value: value)

    t_hf = _best(run_hf, args.repeats)
    t_emu = _best(run_emu, args.repeats)
    ratio = t_emu / t_hf
    emu_threads = compute_threads() or torch.get_num_threads()
    print(f"{args.model} full, prefill {args.tokens} tokens, torch threads: HF {torch.get_num_threads()}, "
          f"emulator {emu_threads}")
    print(f"HF fp32 forward : {t_hf * 1e3:8.1f} ms")
    print(f"emulator prefill: {t_emu * 1e3:8.1f} ms")
    print(f"ratio emulator / HF = {ratio:.2f} (target <= {TARGET_RATIO:.0f}): {'OK' if ratio <= TARGET_RATIO else 'TOO SLOW'}")


if __name__ == "__main__":
    main()
