"""Reference replays: deployments that hand back a stored reference, for tests, demos and calibration.

- ``bf16_replay``: the HF bf16 run (in isolated mode: the teacher-forced bf16 run). Must pass.
- ``fp32_replay``: the fp32 golden itself. Must pass (R = 0).
- ``perturbed_replay(phase, tap, rel=0.01)``: the fp32 golden with one tap scaled by (1 + rel). Must fail
  exactly at that tap in isolated mode.

They need the golden set, which a gated deployment never gets: ``harness.check``, ``harness gate`` and the
pytest plugin refuse any factory with ``needs_golden = True``. Replays (and test fixtures built like them,
called as ``factory(spec, weights, golden=..., mode=...)``) are judged only through ``check_replay``, whose
verdict says ``"reference_replay": true`` in its provenance: a reference of the harness, never a gate pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.spec import taps as tapspec


class ReplayDeployment:
    """Replays stored taps in canonical order; ``tap`` sees each, and the logits are returned."""

    def __init__(self, golden, variant: str, perturb: tuple[str, str, float] | None = None):
        self.golden = golden
        self.variant = variant
        self.perturb = perturb
        self._step = 0
        self._order = tapspec.tap_names(golden.spec)

    def _play(self, phase: str, tap):
        present = set(self.golden.tap_names(phase))
        logits = None
        for name in self._order:
            if name not in present:
                continue
            value = self.golden.tensor(phase, name, self.variant)
            if self.perturb and self.perturb[:2] == (phase, name):
                value = (value * np.float32(1.0 + self.perturb[2])).astype(np.float32)
            value = tap(name, value)
            if name == "logits":
                logits = value
        return logits

    def prefill(self, input_ids, tap):
        ids = np.asarray(input_ids)
        if not np.array_equal(ids, self.golden.input_ids):
            raise ValueError("replay deployments only know the golden prompt")
        self._step = 0
        return self._play("prefill", tap)

    def decode(self, token_id, tap):
        phase = f"decode.{self._step}"
        self._step += 1
        return self._play(phase, tap)


@dataclass
class ReplayFactory:
    """A factory of replays; ``variant`` ``baseline`` means bf16 (cumulative) or local bf16 (isolated)."""

    variant: str
    perturb: tuple[str, str, float] | None = None
    needs_golden = True

    @property
    def name(self) -> str:
        base = f"replay-{self.variant}"
        return base if not self.perturb else f"{base}+perturb({self.perturb[0]}/{self.perturb[1]},{self.perturb[2]:g})"

    def __call__(self, spec, weights, *, golden=None, mode: str = "cumulative"):
        if golden is None:
            raise ValueError(f"{self.name} needs the golden set; judge it with check_replay")
        variant = self.variant
        if variant == "baseline":
            variant = "local" if mode == "isolated" else "bf16"
        return ReplayDeployment(golden, variant, self.perturb)


bf16_replay = ReplayFactory("baseline")
fp32_replay = ReplayFactory("fp32")


def perturbed_replay(phase: str, tap: str, rel: float = 0.01) -> ReplayFactory:
    """The fp32 golden with ``tap`` of ``phase`` scaled by ``1 + rel``."""
    return ReplayFactory("fp32", (phase, tap, rel))


def check_replay(model: str, replay, *, seed: int = 0, scale: str = "tiny", **kwargs):
    """Judge a reference replay with ``harness.check``'s judging (same goldens, policies, localisation).

    ``replay(spec, weights, golden=..., mode=...)`` builds it; it runs in this process. The verdict's
    provenance carries ``"reference_replay": true``; keyword arguments are ``harness.check``'s (``mode``,
    ``decode_steps``, ``weights``, ``prompt_len``, ``policy``, ``golden_dir``, ``progress``).
    """
    from harness.checker import judge_deployment
    from harness.deployment.loader import describe
    from harness.weights import load_weights

    def deploy(spec, golden, source, mode):
        return replay(spec, load_weights(spec, source, seed), golden=golden, mode=mode), None

    return judge_deployment(model, deploy, describe(replay), seed=seed, scale=scale,
                            extra_provenance={"reference_replay": True}, **kwargs)
