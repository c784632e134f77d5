"""A deployment wrapper that keeps a float32 copy of every tap value it hands over, keyed by phase:
what the self-test, the bug-shape sweep and the hint scorer replay their judgements from."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


class Recording:
    """Wraps a deployment; ``store[phase][tap]`` holds a copy of each value the deployment hands over."""

    def __init__(self, inner: Any, store: dict[str, dict[str, np.ndarray]] | None = None):
        self.inner, self.step = inner, 0
        self.store: dict[str, dict[str, np.ndarray]] = {} if store is None else store

    @property
    def taps(self) -> dict[str, dict[str, np.ndarray]]:
        return self.store

    def _tap(self, phase: str, tap: Callable) -> Callable:
        kept = self.store.setdefault(phase, {})

        def record(name: str, value: Any) -> Any:
            v = value.detach().cpu().float().numpy() if hasattr(value, "detach") else value
            kept[name] = np.array(v, dtype=np.float32, copy=True)
            return tap(name, value)
        return record

    def prefill(self, input_ids, tap):  # type: ignore[no-untyped-def]
        self.step = 0
        return self.inner.prefill(input_ids, self._tap("prefill", tap))

    def decode(self, token_id, tap):  # type: ignore[no-untyped-def]
        phase = f"decode.{self.step}"
        self.step += 1
        return self.inner.decode(token_id, self._tap(phase, tap))
