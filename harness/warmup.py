"""Compile the numba kernels ahead of the first gate: ``python -m harness.warmup`` (scripts/setup.sh runs it).

The metric kernels (harness.compare.kernel) and the emulator's (harness.deployment.emulator.kernels)
compile on first use and are cached beside the package (numba's ``cache=True``). A fresh install's first
gate spent ~30 s compiling them; so did every process a fresh checkout's tests started before the cache
was written (CI runs on a clean clone). Each variant a gate can take is compiled here once: a small tap
(every element a quantile candidate), a large one with NaN on the serial and the two-thread pass, the
per-head sums, and one emulator prefill and decode step of a tiny model.
"""
from __future__ import annotations

import sys
import time


def compile_kernels() -> float:
    """Compile (or load from the cache) every numba kernel a gate runs; returns the seconds it took."""
    import numba
    import numpy as np

    from harness.compare import metrics
    from harness.deployment.emulator.model import make_factory
    from harness.spec.model_spec import get
    from harness.weights import load_weights

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for rows, features in ((4, 64), (64, 2048)):  # under and over metrics' sampling and threading sizes
        g = rng.standard_normal((rows, features), dtype=np.float32)
        d = g + np.float32(1e-3) * rng.standard_normal((rows, features), dtype=np.float32)
        d[0, 0] = np.nan
        metrics.tap_metrics(d, g, g.copy(), block=32, medians=True)
        if numba.get_num_threads() > 1:  # the serial pass as well (the large tap took the threaded one)
            threads = numba.get_num_threads()
            numba.set_num_threads(1)
            try:
                metrics.tap_metrics(d, g, g.copy(), block=32, medians=True)
            finally:
                numba.set_num_threads(threads)
    spec = get("qwen3-0.6b", "tiny")
    emulator = make_factory()(spec, load_weights(spec))
    emulator.prefill(np.arange(3, 11), lambda name, value: value)
    emulator.decode(5, lambda name, value: value)
    return time.perf_counter() - start


def main() -> int:
    try:
        seconds = compile_kernels()
    except Exception as exc:  # a warm-up that cannot run must not fail the set-up: the first gate compiles
        print(f"npu-harness: kernels not compiled ahead ({type(exc).__name__}: {exc}); the first gate "
              "compiles them", file=sys.stderr)
        return 0
    print(f"npu-harness: kernels ready in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
