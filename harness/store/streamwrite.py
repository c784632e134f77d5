"""Phase files written as the reference runs: every file's layout is declared from the spec before the
first tap exists, and each tap is written (and hashed) the moment it is captured, then released.

A phase file holds ``<variant>/<tap>`` for each variant (``fp32`` then ``bf16`` for a golden; ``bf16``
for a local baseline) in canonical tap order (``taps.tap_names``). A run emits taps in hook order, which
differs slightly (Qwen3 fires ``q_norm`` before ``k``), so a tap that arrives early waits, copied, until
its turn: at most a few of one layer's taps are held at once.

Sampled storage keeps only ``rows`` of the prefill phase (``sampled_rows``); decode phases have one row.

Writing and hashing run behind the reference, on a writer thread (file writes and sha256 release the
GIL: on a second core they cost the run nothing): a tap is copied into a queue of at most
``WRITE_BEHIND_BYTES`` (the run reuses its memory), a larger one (the prefill logits) is written inline
once the queue has drained, so the bytes and their order are those of writing inline. Small taps (a
decode step's rows, up to ``BATCH_TAP_BYTES``) are copied back to back into their file's batch and
written in one piece of up to ``BATCH_BYTES``: a decode step has hundreds of them, and writing and
hashing each alone cost more than the copy. The files' bytes are those of writing every tap alone.
"""
from __future__ import annotations

import hashlib
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from harness.fileio import SafetensorsWriter
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec

WRITE_BEHIND_BYTES = 64 << 20  # copies of taps queued for the writer thread (larger taps are written inline)
WRITE_BEHIND_MIN = 256 << 10  # smaller taps (decode steps' single rows) are written inline when the queue is
# empty: handing one to the thread costs more than writing it
BATCH_TAP_BYTES = 64 << 10  # taps up to this size (a decode step's rows but its logits) are written in batches
BATCH_BYTES = 256 << 10  # of up to this many bytes per phase file (33 files: at most 8.3 MB held at once)
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


class _WriteBehind:
    """One writer thread running (writer, key, array) writes in submission order, ``limit`` bytes queued."""

    def __init__(self, limit: int = WRITE_BEHIND_BYTES):
        self.limit, self.queued = limit, 0
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closing = self._busy = False
        self._thread = threading.Thread(target=self._run, name="golden-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return
                write, key, arr = self._items.popleft()
                self._busy = True
            try:
                if self._error is None:
                    write(key, arr)
            except BaseException as exc:  # raised to the caller at its next write, flush or close
                self._error = exc
            with self._cond:
                self.queued -= arr.nbytes
                self._busy = False
                self._cond.notify_all()
            del write, key, arr

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, writer, key: str, arr: np.ndarray) -> None:
        """Queue a write of ``arr`` (copied unless this array owns its memory); inline when it is large."""
        self._submit(writer.write, key, arr, arr.flags.owndata)

    def write_block(self, writer, keys: tuple[str, ...], data: np.ndarray) -> None:
        """Queue ``writer.write_block(keys, data)``; ``data`` is the caller's to give away (no copy)."""
        self._submit(writer.write_block, keys, data, True)

    def _submit(self, write, key, arr: np.ndarray, owned: bool) -> None:
        self._raise()
        if arr.nbytes > self.limit or (arr.nbytes < WRITE_BEHIND_MIN and not self._items and not self._busy):
            self.flush()
            write(key, arr)
            return
        if not owned:
            arr = np.array(arr)  # the run may reuse the tensor's memory once the hook returns
        with self._cond:
            while self.queued and self.queued + arr.nbytes > self.limit:
                self._cond.wait()
            self._items.append((write, key, arr))
            self.queued += arr.nbytes
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            while self._items or self._busy:
                self._cond.wait()
        self._raise()

    def stop(self, drop: bool = False) -> None:
        """End the thread after the queued writes (``flush`` first to see their errors); ``drop``: without them."""
        with self._cond:
            if drop:
                self.queued -= sum(arr.nbytes for _, _, arr in self._items)
                self._items.clear()
            self._closing = True
            self._cond.notify_all()
        self._thread.join()


@dataclass
class _Batch:
    """Small taps of one phase file, copied back to back in file order until written in one piece."""

    data: np.ndarray | None = None
    used: int = 0
    keys: list[str] = field(default_factory=list)


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
        self._behind: _WriteBehind | None = None
        self._batches: dict[str, _Batch] = {}
        features = [tapspec.features(spec, tapspec.parse(name).kind) for name in self.order]
        layouts: dict[int, tuple] = {}  # by rows: every decode step has the same one
        try:
            for phase in phases:
                n = (len(rows) if rows is not None else tokens) if phase == "prefill" else 1
                if n not in layouts:
                    layouts[n] = tuple((f"{v}/{name}", self._dtype(v), (n, f))
                                       for v in variants for name, f in zip(self.order, features))
                self.writers[phase] = SafetensorsWriter(directory / f"{phase}.safetensors", layouts[n])
                self._next[phase], self._pending[phase] = 0, {}
                self._batches[phase] = _Batch()
            self._behind = _WriteBehind()
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
        self._write(phase, key, arr)
        self._next[phase] += 1
        while self._next[phase] < len(self.keys) and self.keys[self._next[phase]] in pending:
            self._write(phase, self.keys[self._next[phase]], pending.pop(self.keys[self._next[phase]]))
            self._next[phase] += 1

    def _write(self, phase: str, key: str, arr: np.ndarray) -> None:
        """Write the phase's next tap: a small one is copied into the phase's batch, written with the taps
        after it in one piece (a decode step has hundreds of one-row taps, each costing more to write
        alone than to copy); a larger one after the batch."""
        writer, batch = self.writers[phase], self._batches[phase]
        if arr.nbytes > BATCH_TAP_BYTES:
            self._flush(phase)
            self._behind.write(writer, key, arr)
            return
        dtype, shape = writer.expects(key)
        if arr.dtype != dtype or arr.shape != shape:  # what the writer checks of a tap written alone
            raise ValueError(f"{phase} {key} is {arr.dtype}{arr.shape}, layout says {dtype}{shape}")
        if batch.data is not None and batch.used + arr.nbytes > batch.data.nbytes:
            self._flush(phase)
            batch = self._batches[phase]
        if batch.data is None:
            batch.data = np.empty(max(BATCH_BYTES, arr.nbytes), np.uint8)
        batch.data[batch.used: batch.used + arr.nbytes] = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        batch.used += arr.nbytes
        batch.keys.append(key)

    def _flush(self, phase: str) -> None:
        batch = self._batches[phase]
        if batch.keys:
            self._behind.write_block(self.writers[phase], tuple(batch.keys), batch.data[:batch.used])
            self._batches[phase] = _Batch()  # the written batch's memory is the writer's now

    def close(self) -> dict[str, dict]:
        """Each file's record (size and block sha256s), by file name; raises if a tap never came."""
        for phase in self.writers:
            self._flush(phase)
        self._behind.flush()
        self._behind.stop()
        return {f"{phase}.safetensors": w.close() for phase, w in self.writers.items()}

    def abort(self) -> None:
        if self._behind is not None:
            self._behind.stop(drop=True)  # the files are being thrown away
        for w in self.writers.values():
            w.abort()
