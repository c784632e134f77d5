"""Weights as lazy read-only Mappings over safetensors files: a value is produced when it is looked up.

A model's weights never need to be in memory at once: a deployment or the reference reads one layer's
tensors, uses them and lets them go. ``MappedWeights`` maps each tensor on access (its own read-only
memory map, released with the last view of it); ``keys()``, ``in`` and ``len`` only read the headers.
"""
from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from harness.fileio import MappedSafetensors, SafetensorsWriter, map_tensor, safetensors_header


ALIGN = 64


class MappedWeights(Mapping):
    """name -> tensor of one or more safetensors files, each tensor mapped when looked up.

    ``convert`` (optional) turns the mapped view into the value handed out (checkpoints: float32 rounded
    to bf16); without it the value is the read-only view itself, zero-copy.
    """

    def __init__(self, files: Iterable[Path | str], *, convert: Callable[[np.ndarray], np.ndarray] | None = None,
                 drop: Iterable[str] = (), what: str = "weights file", keep_mapped_below: int = 0):
        self._where: dict[str, tuple[str, dict, int]] = {}
        self._convert, self._what = convert, what
        self._whole: dict[str, MappedSafetensors] = {}
        files = [str(f) for f in files]
        for f in files:
            header, start = safetensors_header(f, what)
            for name, info in header.items():
                self._where[name] = (f, info, start)
        for name in drop:
            self._where.pop(name, None)
        if files and sum(os.path.getsize(f) for f in files) <= keep_mapped_below:
            # Small enough to stay mapped: one map per file, its pages mapped once, instead of mapping
            # every tensor again on each lookup (a decode step looks every tensor up).
            self._whole = {f: MappedSafetensors(Path(f), what) for f in files}

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, start = self._where[name]  # KeyError for an unknown name, as a dict raises
        whole = self._whole.get(path)
        view = whole.get_tensor(name) if whole is not None else map_tensor(path, info, start, self._what)
        return view if self._convert is None else self._convert(view)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the header (nothing is read)."""
        return tuple(int(d) for d in self._where[name][1]["shape"])

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} tensors, read on access>"


def write_weights_file(path: Path, plan: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
                       dtype) -> None:
    """Write ``plan`` ((name, shape, make) per tensor, made in order) to ``path`` as ``dtype``, one tensor
    in memory at a time. The file appears complete or not at all (written beside it, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Data 64-byte aligned: BLAS kernels pick their code path (and so their rounding) by alignment, so
    # zero-copy tensors must sit where torch's own allocations would (see streaming._as_torch).
    writer = SafetensorsWriter(tmp, [(name, dtype, shape) for name, shape, _ in plan], align=ALIGN, hashed=False)
    try:
        for name, _, make in plan:
            value = make()
            writer.write(name, value if value.dtype == np.dtype(dtype) else value.astype(dtype))
            del value
        writer.close()
        os.chmod(tmp, 0o444)  # nobody writes weights: a stray open for writing fails
        os.replace(tmp, path)
    except BaseException:
        writer.abort()
        tmp.unlink(missing_ok=True)
        raise


class _GeneratorThread(Mapping):
    """name -> tensor of a generation ``plan`` ((name, shape, make) per tensor, made in order) that a
    background thread makes while the caller already reads the first tensors; a lookup waits until its
    tensor is there (a generator error is raised there). Subclasses keep a made tensor (``_keep``), serve
    it (``_serve``) and end (``_finish``)."""

    def __init__(self, plan: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], dtype):
        import threading

        self._shapes = {name: tuple(shape) for name, shape, _ in plan}
        self._made: set[str] = set()
        self._error: BaseException | None = None
        self._stop = False
        self._ready = threading.Condition()
        self._dtype = np.dtype(dtype)
        # Not a daemon: an interpreter exiting mid-generation waits for the tensor being made (a daemon
        # thread inside torch at shutdown aborts the process).
        self._thread = threading.Thread(target=self._run, args=(plan,), name="weights-generator")
        self._thread.start()

    @abstractmethod
    def _keep(self, name: str, value: np.ndarray) -> None:
        """Hold a tensor just made (on the generator thread)."""

    @abstractmethod
    def _serve(self, name: str) -> np.ndarray:
        """A tensor already made, for a lookup."""

    def _finish(self, complete: bool) -> None:
        """The thread ends: every tensor made (``complete``), or stopped or failed."""

    def _run(self, plan) -> None:
        try:
            for name, _, make in plan:
                if self._stop:
                    break
                value = make()
                self._keep(name, value if value.dtype == self._dtype else value.astype(self._dtype))
                del value
                with self._ready:
                    self._made.add(name)
                    self._ready.notify_all()
            self._finish(not self._stop)
            if self._stop:  # a lookup after close raises instead of waiting for a tensor never made
                raise RuntimeError(f"{type(self).__name__} closed before every tensor was made")
        except BaseException as exc:  # handed to the reader, who raises it
            try:
                self._finish(False)
            except BaseException:  # noqa: S110  the first error is the one a reader must see
                pass
            with self._ready:
                self._error = exc
                self._ready.notify_all()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(name)
        if name not in self._made:
            with self._ready:
                while name not in self._made and self._error is None:
                    self._ready.wait()
                if name not in self._made:
                    raise self._error  # type: ignore[misc]
        return self._serve(name)

    def close(self) -> None:
        """Stop generating (after the tensor being made) and wait for the thread."""
        self._stop = True
        self._thread.join()

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} tensors, {len(self._made)} made>"


class GeneratedWeights(_GeneratorThread):
    """A generation ``plan`` held in memory, made by a background thread (``_GeneratorThread``).

    Values are read-only bfloat16 arrays in torch's own 64-byte aligned memory (zero-copy for a bf16
    run, see streaming._as_torch). For a build's private weights of a small model: the same values as
    the file ``write_weights_file`` would write, without writing (and re-reading) it, and the generation
    runs beside the fp32 reference on a second core instead of before it.
    """

    def __init__(self, plan: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], dtype):
        self._values: dict[str, np.ndarray] = {}
        super().__init__(plan, dtype)

    def _keep(self, name: str, value: np.ndarray) -> None:
        value.flags.writeable = False
        self._values[name] = value

    def _serve(self, name: str) -> np.ndarray:
        return self._values[name]


class GeneratingWeights(_GeneratorThread):
    """A generation ``plan`` written to the safetensors file ``path`` by a background thread
    (``_GeneratorThread``), each tensor mapped (read-only, zero-copy, ``MappedWeights``) once it has been
    written: the caller reads the first layers while the last are still being made, where
    ``write_weights_file`` made it wait for the whole file. For a build's private weights of a larger
    model (the file is the caller's to delete after ``close``); the file is the one
    ``write_weights_file`` writes, byte for byte.
    """

    def __init__(self, path: Path, plan: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], dtype,
                 what: str = "weights file"):
        self._writer = SafetensorsWriter(path, [(name, dtype, shape) for name, shape, _ in plan], align=ALIGN,
                                         hashed=False)
        try:
            self._writer.reserve()  # the final size: the header's check passes, tensors map as written
            self._mapped = MappedWeights([path], what=what)
        except BaseException:
            self._writer.abort()
            raise
        super().__init__(plan, dtype)

    def _keep(self, name: str, value: np.ndarray) -> None:
        self._writer.write(name, value)
        self._writer.flush()  # in the page cache before a reader maps it

    def _serve(self, name: str) -> np.ndarray:
        return self._mapped[name]

    def _finish(self, complete: bool) -> None:
        if complete:
            self._writer.close()
        else:
            self._writer.abort()
