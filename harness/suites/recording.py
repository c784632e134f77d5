"""Wrap a deployment factory to keep what the gate needs besides taps: returned logits and time spent.

``harness.check`` keeps only metrics per tap; phase 6's teacher-forced KL needs the deployment's own
logits of every step, and the overhead benchmark needs the seconds spent *inside* the deployment.
The wrapper is transparent: same ``prefill``/``decode`` contract, and ``needs_golden`` factories (the
replays) are passed their golden as ``harness.check`` would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from harness.deployment.loader import describe, load_factory


@dataclass
class Recorder:
    """Logits returned per phase (``prefill``, ``decode.0`` ...) and seconds spent in the deployment."""

    logits: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    calls: int = 0
    keep_logits: bool = True


class RecordingDeployment:
    """Forwards to ``inner``; records returned logits (copied) and wall time per call."""

    def __init__(self, inner: Any, recorder: Recorder):
        self._inner, self._rec, self._step = inner, recorder, 0

    def __getattr__(self, name: str) -> Any:  # op_timings() and other extras pass through
        return getattr(self._inner, name)

    def _timed(self, phase: str, fn: Callable, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            out = fn(*args)
        finally:
            self._rec.seconds += time.perf_counter() - start
            self._rec.calls += 1
        if self._rec.keep_logits and isinstance(out, np.ndarray):
            self._rec.logits[phase] = np.array(out, dtype=np.float32, copy=True)
        return out

    def prefill(self, input_ids: Any, tap: Callable) -> Any:
        self._step = 0
        return self._timed("prefill", self._inner.prefill, input_ids, tap)

    def decode(self, token_id: Any, tap: Callable) -> Any:
        phase = f"decode.{self._step}"
        self._step += 1
        return self._timed(phase, self._inner.decode, token_id, tap)


class RecordingFactory:
    """A factory producing RecordingDeployments around ``target``'s deployments (all share ``recorder``)."""

    def __init__(self, target: str | Callable | None, recorder: Recorder | None = None):
        self.inner = load_factory(target)
        self.recorder = recorder or Recorder()
        self.name = describe(target)
        self.needs_golden = bool(getattr(self.inner, "needs_golden", False))

    def __call__(self, spec: Any, weights: Any, **kwargs: Any) -> RecordingDeployment:
        start = time.perf_counter()
        try:
            dep = self.inner(spec, weights, **kwargs)
        finally:  # building the deployment (weight upload, kernel load) is the deployment's time too
            self.recorder.seconds += time.perf_counter() - start
        return RecordingDeployment(dep, self.recorder)
