"""Golden-store benchmark: build vs plain forward passes, load vs build, compare vs build.

Full-scale qwen2.5-0.5b (random synthetic weights), 128-token prompt, 4 decode steps, fp32 and bf16.
All figures are measured side by side in one run and printed as ratios:

- build / plain: building the golden set (both reference runs with every tap captured, written with
  sha256) against the two plain forward passes (HF models built the same way, no hooks). Target <= 1.3.
- build / load: loading the set back (manifest + sha256 of every file + every tensor read). Target >= 10.
- compare / build: judging every tap of every phase (metrics + default policy) against the build. Target <= 0.15.
- assert_close / metrics: torch.testing.assert_close on every tap of the set against computing every
  metric of every tap (tap_metrics), the same tensors. Target >= 3. Reported twice: at torch's bf16
  defaults (rtol 1.6e-2, atol 1e-5; it fails on some taps and then builds its message, as a user
  running it would see) and at a tolerance every tap passes (the check alone).

Weights are generated once up front and shared by every measurement (they are the same input to all).
Run: .venv/bin/python benchmarks/bench_golden.py [--model qwen2.5-0.5b] [--scale full] [--repeat 2]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
import torch


def plain_passes(spec, weights, ids, steps):
    """Two plain HF runs (fp32, bf16): model build + prefill + greedy decode with the KV cache."""
    from transformers import DynamicCache

    from harness.reference.hf_model import build_hf_model

    tokens = None
    for dtype in (torch.float32, torch.bfloat16):
        model = build_hf_model(spec, weights, dtype)
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=torch.as_tensor(ids)[None], cache=cache, use_cache=True)
            chosen = []
            for step in range(steps):
                nxt = int(out.logits[0, -1].argmax()) if tokens is None else tokens[step]
                chosen.append(nxt)
                out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
        tokens = tokens or chosen
        del model, out, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--scale", default="full")
    ap.add_argument("--repeat", type=int, default=2, help="Best of N for each measurement. Default: 2.")
    args = ap.parse_args()

    import harness
    from harness.checker import judge_tap, policies_for
    from harness.reference.prompts import prompt_ids
    from harness.spec import taps as tapspec
    from harness.store import GoldenRequest, GoldenStore
    from harness.weights import load_weights

    spec = harness.models.get(args.model, args.scale)
    t = time.perf_counter()
    weights = load_weights(spec, None, 0)
    print(f"{spec.id}/{spec.scale}: {sum(v.size for v in weights.values()) / 1e6:.0f}M parameters, "
          f"weights generated in {time.perf_counter() - t:.1f}s (shared by all measurements)")
    req = GoldenRequest(args.model, args.scale, 0, 4, 128)
    ids = prompt_ids(spec, 0, 128)

    def best(fn):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    plain = best(lambda: plain_passes(spec, weights, ids, 4))
    roots = []

    def build():
        root = tempfile.mkdtemp(prefix="bench-golden-")
        roots.append(root)
        GoldenStore(root).get(req)

    built = best(build)
    store = GoldenStore(roots[-1])

    def load():
        g = store.get(req)
        for phase in g.phases:
            for name in g.tap_names(phase):
                g.tensor(phase, name, "fp32")
                g.tensor(phase, name, "bf16")
        g.close()

    loaded = best(load)
    golden = store.get(req)
    size = sum(f.stat().st_size for f in golden.path.iterdir()) / 1e6
    policies = policies_for(spec)
    tensors = [(phase, name, tapspec.parse(name).kind, golden.tensor(phase, name), golden.tensor(phase, name, "bf16"))
               for phase in golden.phases for name in golden.tap_names(phase)]
    # The DUT is the bf16 run itself (a passing deployment): every metric is computed, none short-cut.

    def compare():
        for phase, name, kind, g, b in tensors:
            judge_tap(policies, phase, name, kind, b, g, b)

    compared = best(compare)

    from harness.compare.metrics import tap_metrics

    def metrics_only():
        for _phase, _name, _kind, g, b in tensors:
            tap_metrics(b, g, b)

    pairs = [(torch.from_numpy(np.asarray(b)), torch.from_numpy(np.asarray(g))) for *_, g, b in tensors]

    def assert_close(rtol, atol):
        failed = 0
        for b, g in pairs:
            try:
                torch.testing.assert_close(b, g, rtol=rtol, atol=atol)
            except AssertionError:
                failed += 1
        return failed

    metrics_s = best(metrics_only)
    ac_default = best(lambda: assert_close(1.6e-2, 1e-5))
    ac_pass = best(lambda: assert_close(1.0, 1.0))
    n_failed = assert_close(1.6e-2, 1e-5)
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)
    print(f"golden set: {size:.0f} MB on disk, {len(tensors)} taps over {len(golden.phases)} phases")
    print(f"{'measurement':<44}{'seconds':>9}")
    print(f"{'two plain forward passes (fp32 + bf16)':<44}{plain:>9.2f}")
    print(f"{'build golden set (capture + write + sha256)':<44}{built:>9.2f}")
    print(f"{'load golden set (verify + read every tensor)':<44}{loaded:>9.2f}")
    print(f"{'compare every tap (metrics + policy)':<44}{compared:>9.2f}")
    print(f"build / plain   = {built / plain:5.2f}   (target <= 1.30)")
    print(f"build / load    = {built / loaded:5.1f}   (target >= 10)")
    print(f"{'every metric of every tap (tap_metrics)':<44}{metrics_s:>9.2f}")
    print(f"{'assert_close every tap, bf16 defaults':<44}{ac_default:>9.2f}   ({n_failed} of {len(pairs)} taps fail)")
    print(f"{'assert_close every tap, passing tolerance':<44}{ac_pass:>9.2f}")
    print(f"compare / build = {compared / built:5.3f}  (target <= 0.15)")
    print(f"assert_close / metrics = {ac_default / metrics_s:5.2f} at bf16 defaults, "
          f"{ac_pass / metrics_s:5.2f} passing  (target >= 3)")


if __name__ == "__main__":
    main()
