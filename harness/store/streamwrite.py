"""Phase files written as the reference runs: every file's layout is declared from the spec before the
first tap exists, and each tap is written (and hashed) the moment it is captured, then released.

A phase file holds ``<variant>/<tap>`` for each variant (``fp32`` then ``bf16`` for a golden; ``bf16``
for a local baseline) in canonical tap order (``taps.tap_names``). A run emits taps in hook order, which
differs slightly (Qwen3 fires ``q_norm`` before ``k``), so a tap that arrives early waits, copied, until
its turn: at most a few of one layer's taps are held at once.

Sampled storage keeps only ``rows`` of the prefill phase (``sampled_rows``); decode phases have one row.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np

from harness.fileio import SafetensorsWriter
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec

TILE = 128  # rows of a prefill tile on the NPU: first and last tile are kept whole
SAMPLED_MIDDLE = 256  # seeded sample of the rows between them
STORAGE_MODES = ("full", "sampled")


def check_rows(rows: str) -> None:
    """HarnessError unless ``rows`` is a storage mode."""
    from harness.errors import HarnessError

    if rows not in STORAGE_MODES:
        raise HarnessError(f"--rows {rows!r}: expected one of {', '.join(STORAGE_MODES)}")


def sampled_rows(tokens: int, key: str) -> np.ndarray:
    """The prefill rows a sampled golden keeps (sorted int64): every row of the first and the last
    128-row tile of the prompt, plus ``SAMPLED_MIDDLE`` rows drawn between them, seeded by the golden key
    (so one golden always keeps the same rows, and a deployment cannot know them from the spec alone)."""
    first = np.arange(min(TILE, tokens))
    last_start = max(((tokens - 1) // TILE) * TILE, len(first))
    last = np.arange(last_start, tokens)
    middle = np.arange(len(first), last_start)
    if len(middle) > SAMPLED_MIDDLE:
        seed = int.from_bytes(hashlib.sha256(f"sampled-rows|{key}".encode()).digest()[:8], "big")
        middle = np.sort(np.random.default_rng(seed).choice(middle, size=SAMPLED_MIDDLE, replace=False))
    return np.concatenate([first, middle, last]).astype(np.int64)


class PhaseFiles:
    """The phase files of one entry (or local baseline) in ``directory``, filled tap by tap."""

    def __init__(self, directory: Path, spec: ModelSpec, phases: list[str], tokens: int,
                 variants: tuple[str, ...], rows: np.ndarray | None = None):
        self.order = tapspec.tap_names(spec)
        self.rows = rows
        self.variants = variants
        self.writers: dict[str, SafetensorsWriter] = {}
        self._next: dict[str, int] = {}
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self.keys = [f"{v}/{name}" for v in variants for name in self.order]
        try:
            for phase in phases:
                n = (len(rows) if rows is not None else tokens) if phase == "prefill" else 1
                layout = [(f"{v}/{name}", self._dtype(v), (n, tapspec.features(spec, tapspec.parse(name).kind)))
                          for v in variants for name in self.order]
                self.writers[phase] = SafetensorsWriter(directory / f"{phase}.safetensors", layout)
                self._next[phase], self._pending[phase] = 0, {}
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _dtype(variant: str):
        return np.float32 if variant == "fp32" else ml_dtypes.bfloat16

    def put(self, variant: str, phase: str, name: str, value) -> None:
        """Write tap ``name`` of ``phase`` (a torch tensor or array, [T, features]) for ``variant``."""
        from harness.reference.capture import to_numpy

        arr = to_numpy(value, keep_bf16=True) if not isinstance(value, np.ndarray) else value
        dtype = self._dtype(variant)
        if arr.dtype != dtype:
            arr = arr.astype(dtype)  # exact for a bf16 run's values
        if self.rows is not None and phase == "prefill":
            arr = arr[self.rows]
        key = f"{variant}/{name}"
        writer, pending = self.writers[phase], self._pending[phase]
        if self.keys[self._next[phase]] != key:
            pending[key] = np.array(arr)  # early: keep a copy (the run may reuse the tensor's memory)
            return
        writer.write(key, arr)
        self._next[phase] += 1
        while self._next[phase] < len(self.keys) and self.keys[self._next[phase]] in pending:
            writer.write(self.keys[self._next[phase]], pending.pop(self.keys[self._next[phase]]))
            self._next[phase] += 1

    def close(self) -> dict[str, dict]:
        """Each file's record (size and block sha256s), by file name; raises if a tap never came."""
        return {f"{phase}.safetensors": w.close() for phase, w in self.writers.items()}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
