"""Weights as lazy read-only Mappings over safetensors files: a value is produced when it is looked up.

A model's weights never need to be in memory at once: a deployment or the reference reads one layer's
tensors, uses them and lets them go. ``MappedWeights`` maps each tensor on access (its own read-only
memory map, released with the last view of it); ``keys()``, ``in`` and ``len`` only read the headers.
"""
from __future__ import annotations

import os
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
    writer = SafetensorsWriter(tmp, [(name, dtype, shape) for name, shape, _ in plan], align=ALIGN)
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
