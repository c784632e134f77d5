"""A deployment wrapping a validation member that keeps some taps to itself, for isolated mode's chain baseline
(docs/policies.md, "Taps downstream of an unexposed one").

``factory[member=numpy_bf16_pairwise,drop=act]`` wraps a member of the validation population and does
not hand over the taps of the ``drop`` kinds (``+``-separated, e.g. ``gate+up+act``): the op after
them reads the member's own value even in isolated mode, as a fused kernel's would. ``how=observe``
hands them over with ``tap.observe`` instead (judged, not forced). ``bug=scale`` (any generic bug
shape of harness.selftest.bug_shapes, at ``magnitude``, default 1%) perturbs every tap of kind or name
``bug_tap`` (default ``down``) in every phase before it is handed over: a wrong kernel downstream of a
withheld tap, which the gate must still catch.
"""
from __future__ import annotations

from typing import Any

from harness.deployment import validation
from harness.spec.taps import parse


def factory(spec, weights, member: str = "numpy_bf16_pairwise", drop: str = "attn_residual", how: str = "withhold",
            bug: str | None = None, bug_tap: str = "down", magnitude: float = 0.01, bug_seed: int = 0):
    from harness.errors import HarnessError

    if how not in ("withhold", "observe"):
        raise HarnessError(f"withheld: how={how!r}, expected withhold or observe")
    inner = getattr(validation, member.replace("-", "_"))(spec, weights)
    return Withheld(inner, spec, frozenset(filter(None, str(drop).split("+"))), how, bug, bug_tap,
                    float(magnitude), int(bug_seed))


class Withheld:
    """``inner`` with the taps of ``kinds`` kept to itself, and optionally a bug at ``bug_tap``."""

    def __init__(self, inner, spec, kinds, how, bug, bug_tap, magnitude, bug_seed):
        self.inner, self.spec, self.kinds, self.how = inner, spec, kinds, how
        self.bug, self.bug_tap, self.magnitude, self.bug_seed = bug, bug_tap, magnitude, bug_seed
        self.step = 0

    def _wrap(self, phase: str, tap: Any):
        if tap is None:
            return None

        def hand_over(name: str, value: Any) -> Any:
            kind = parse(name).kind
            if kind in self.kinds:
                observe = getattr(tap, "observe", None)
                return observe(name, value) if self.how == "observe" and observe is not None else value
            if self.bug and self.bug_tap in (kind, name):
                value = self._perturb(phase, name, value)
            return tap(name, value)

        if hasattr(tap, "observe"):
            hand_over.observe = tap.observe  # type: ignore[attr-defined]
        return hand_over

    def _perturb(self, phase: str, name: str, value: Any) -> Any:
        import numpy as np

        from harness.selftest.bug_shapes import ShapeContext, perturb

        arr = np.asarray(value, dtype=np.float32)
        return perturb(arr, ShapeContext(self.spec, phase, name), self.bug, self.magnitude, self.bug_seed)

    def prefill(self, input_ids, tap):
        self.step = 0
        return self.inner.prefill(input_ids, self._wrap("prefill", tap))

    def decode(self, token_id, tap):
        phase = f"decode.{self.step}"
        self.step += 1
        return self.inner.decode(token_id, self._wrap(phase, tap))
