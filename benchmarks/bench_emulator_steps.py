"""Emulator speed at full scale, this checkout against a git revision, side by side: ms per prefill token,
s per decode step, peak resident memory, and a check that both give bit-identical logits and taps.

Each variant runs in a child process of its own (so each peak RSS is its own), alternating variant after
variant for ``--rounds`` rounds; the median of each figure over the rounds is printed. The baseline is
``git archive REV harness`` unpacked into a temporary directory and put first on the child's PYTHONPATH;
"this checkout" is the ``harness`` package beside this script. Weights are the gate's own: the lazy
mapping of ``load_weights`` (synthetic seed 0, generated once into the weights cache).

Per child: build (construction), first prefill (includes preparing the layers kept within the budget),
``--steps`` decode steps, a second prefill (the steady state), then an untimed prefill and the same
decode steps through a tap that hashes every tap value and the logits (the bit-identity check).

Run (the figures in docs/emulator.md, "Speed")::

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_emulator_steps.py --base REV
    .venv/bin/python benchmarks/bench_emulator_steps.py --base REV   # torch's default threads (2 here)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(model: str, tokens: int, steps: int) -> dict:
    """One variant's run in this process (the ``harness`` package on sys.path is the variant's)."""
    import hashlib
    import resource
    import time

    import numpy as np
    import torch

    from harness.deployment.emulator import factory
    from harness.reference.prompts import prompt_ids
    from harness.spec.model_spec import get
    from harness.weights import load_weights

    spec = get(model, "full")
    weights = load_weights(spec)
    ids = prompt_ids(spec, 0, tokens)

    def noop(name, value):
        return value

    start = time.perf_counter()
    emu = factory(spec, weights)
    build = time.perf_counter() - start
    start = time.perf_counter()
    logits = emu.prefill(ids, noop)
    first = time.perf_counter() - start
    decode = []
    token = int(np.argmax(logits[-1]))
    for _ in range(steps):
        start = time.perf_counter()
        out = emu.decode(token, noop)
        decode.append(time.perf_counter() - start)
        token = int(np.argmax(out[-1]))
    start = time.perf_counter()
    emu.prefill(ids, noop)
    steady = time.perf_counter() - start

    digest = hashlib.sha256()

    def hashing(name, value):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
        return value

    out = emu.prefill(ids, hashing)
    digest.update(np.ascontiguousarray(out).tobytes())
    token = int(np.argmax(out[-1]))
    for _ in range(steps):
        out = emu.decode(token, hashing)
        digest.update(np.ascontiguousarray(out).tobytes())
        token = int(np.argmax(out[-1]))
    return {"build_s": build, "first_prefill_ms_per_token": first / tokens * 1e3,
            "prefill_ms_per_token": steady / tokens * 1e3, "decode_s_per_step": statistics.median(decode),
            "decode_steps_s": decode, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "torch_threads": torch.get_num_threads(), "digest": digest.hexdigest()}


def _baseline(rev: str, into: Path) -> Path:
    """``harness`` of git revision ``rev`` unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "harness"], check=True,
                             capture_output=True).stdout
    tar_path = into / "base.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into


def _run(root: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", args.model,
           "--tokens", str(args.tokens), "--steps", str(args.steps)]
    done = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child for {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


FIGURES = (("build_s", "build, s", "{:.2f}"), ("first_prefill_ms_per_token", "first prefill, ms/token", "{:.1f}"),
           ("prefill_ms_per_token", "prefill, ms/token", "{:.1f}"), ("decode_s_per_step", "decode, s/step", "{:.3f}"),
           ("peak_rss_gb", "peak RSS, GB", "{:.2f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="git revision to compare against (omit: this checkout only)")
    parser.add_argument("--model", default="qwen3-0.6b", help="model id, full scale. Default: qwen3-0.6b")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length. Default: 128")
    parser.add_argument("--steps", type=int, default=4, help="decode steps per run. Default: 4")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, alternating. Default: 2")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.tokens, args.steps)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-emu-") as tmp:
        variants = {"this checkout": ROOT}
        if args.base:
            variants = {f"base {args.base}": _baseline(args.base, Path(tmp)), **variants}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, root in variants.items():
                runs[name].append(_run(root, args))
                print(f"round {r + 1} {name}: " + json.dumps({k: v for k, v in runs[name][-1].items()
                                                               if k != "digest"}), flush=True)
    print(f"\n{args.model} full, {args.tokens}-token prompt, {args.steps} decode steps, median of {args.rounds} "
          f"run(s) per variant, alternating; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"{os.environ.get('NPU_HARNESS_EMULATOR_THREADS', '-')} emulator threads set")
    names = list(variants)
    print(f"| figure | {' | '.join(names)} |" + (" ratio |" if len(names) == 2 else ""))
    print("|---|" + "---|" * (len(names) + (len(names) == 2)))
    for key, label, fmt in FIGURES:
        values = [statistics.median(run[key] for run in runs[n]) for n in names]
        ratio = f" {values[0] / values[1]:.2f}x |" if len(names) == 2 and values[1] else ""
        print(f"| {label} | {' | '.join(fmt.format(v) for v in values)} |{ratio}")
    print(f"| torch threads of the process | {' | '.join(str(runs[n][0]['torch_threads']) for n in names)} |")
    digests = {run["digest"] for n in names for run in runs[n]}
    print(f"\nlogits and every tap bit-identical across variants and rounds: {'yes' if len(digests) == 1 else 'NO'}")
    if len(digests) != 1:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
