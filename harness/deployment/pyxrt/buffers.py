"""Host-side buffer logic of the runner: argument specs, instruction files, guard bands.

Nothing here touches pyxrt, so all of it is tested on machines without an NPU.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from harness.errors import HarnessError

DTYPES: dict[str, np.dtype] = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f32": np.dtype(np.float32),
    "i8": np.dtype(np.int8),
    "i16": np.dtype(np.int16),
    "i32": np.dtype(np.int32),
    "u8": np.dtype(np.uint8),
    "u16": np.dtype(np.uint16),
    "u32": np.dtype(np.uint32),
}
DIRECTIONS = ("in", "out", "inout")

# Guard pattern, little-endian word 0x7FA17FA1: a quiet NaN both as two bf16 and as one f32, so a
# correct float kernel never writes it; it doubles as the "never written" marker of output payloads.
SENTINEL = bytes.fromhex("a17fa17f")
# A page of guard after every output: tile-remainder bugs write up to a tile past the end
# (e.g. 64 x 64 bf16 = 8 KiB would need more, but a partial row or two lands within the first page).
DEFAULT_TAIL_GUARD = 4096


@dataclass(frozen=True)
class ArgSpec:
    """One runtime argument of a kernel, as IRON declares it: direction, shape, dtype (default bf16)."""

    name: str
    direction: str
    shape: tuple[int, ...]
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise HarnessError(f"argument {self.name!r}: direction {self.direction!r} is not one of {DIRECTIONS}")
        if self.dtype not in DTYPES:
            raise HarnessError(f"argument {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not self.shape or any(not isinstance(d, int) or d <= 0 for d in self.shape):
            raise HarnessError(f"argument {self.name!r}: shape {list(self.shape)} must be positive integers")

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * self.np_dtype.itemsize

    @property
    def is_input(self) -> bool:
        return self.direction in ("in", "inout")

    @property
    def is_output(self) -> bool:
        return self.direction in ("out", "inout")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "direction": self.direction, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "argument") -> "ArgSpec":
        try:
            return cls(str(d["name"]), str(d["direction"]), tuple(d["shape"]), str(d.get("dtype", "bf16")))
        except (KeyError, TypeError) as exc:
            raise HarnessError(f"{where}: needs name, direction, shape[, dtype]; got {dict(d)!r} ({exc})") from None


def to_device_array(spec: ArgSpec, value: np.ndarray) -> np.ndarray:
    """``value`` checked against ``spec``'s shape and cast to its dtype (float -> bf16 rounds to nearest)."""
    arr = np.asarray(value)
    if arr.shape != spec.shape:
        raise HarnessError(f"argument {spec.name!r}: shape {list(arr.shape)}, the kernel expects {list(spec.shape)}")
    if np.issubdtype(spec.np_dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer):
        raise HarnessError(f"argument {spec.name!r}: {arr.dtype} values for an integer ({spec.dtype}) argument")
    return np.ascontiguousarray(arr.astype(spec.np_dtype, copy=False))


def read_insts(path: str | os.PathLike) -> np.ndarray:
    """An NPU instruction stream as uint32 words: ``insts.bin`` (raw little-endian) or ``insts.txt`` (hex lines)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise HarnessError(f"instruction file {p}: {exc.strerror or exc}") from None
    if p.suffix == ".txt":
        try:
            words = [int(line, 16) for line in raw.decode().split() if line]
        except ValueError as exc:
            raise HarnessError(f"instruction file {p}: not hex words, one per line ({exc})") from None
        insts = np.array(words, dtype=np.uint32)
    else:
        if len(raw) % 4:
            raise HarnessError(f"instruction file {p}: {len(raw)} bytes is not a whole number of 32-bit words")
        insts = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    if insts.size == 0:
        raise HarnessError(f"instruction file {p} is empty")
    return insts


@dataclass(frozen=True)
class GuardLayout:
    """Byte layout of a guarded buffer: ``head`` guard, the payload, ``tail`` guard (sentinel-filled)."""

    payload: int
    head: int = 0
    tail: int = DEFAULT_TAIL_GUARD

    def __post_init__(self) -> None:
        if self.head % 4 or self.tail % 4 or min(self.head, self.tail, self.payload) < 0:
            raise HarnessError(f"guard bands must be non-negative multiples of 4 bytes, got {self.head} / {self.tail}")

    @property
    def total(self) -> int:
        return self.head + self.payload + self.tail


def _pattern(n: int) -> np.ndarray:
    reps = -(-n // len(SENTINEL))
    return np.frombuffer(SENTINEL * reps, dtype=np.uint8)[:n]


def guarded_buffer(layout: GuardLayout, payload: bytes | np.ndarray | None) -> np.ndarray:
    """The host image of a guarded BO: guards hold the sentinel; payload is ``payload`` or, when None
    (an output), the sentinel too, so words the kernel never writes can be found afterwards."""
    buf = _pattern(layout.total).copy()
    if payload is not None:
        data = np.frombuffer(payload if isinstance(payload, bytes) else np.ascontiguousarray(payload).tobytes(), np.uint8)
        if data.size != layout.payload:
            raise HarnessError(f"payload of {data.size} bytes for a {layout.payload}-byte buffer")
        buf[layout.head : layout.head + layout.payload] = data
    return buf


class GuardBandViolation(HarnessError):
    """A kernel wrote outside its output buffer (or left part of it unwritten)."""


def check_guards(buf: np.ndarray, layout: GuardLayout, name: str, kernel: str = "kernel") -> None:
    """Raise GuardBandViolation naming the argument, side, first offset and byte count when a guard changed."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if buf.size != layout.total:
        raise HarnessError(f"{kernel}: read back {buf.size} bytes of {name!r}, expected {layout.total}")
    expected = _pattern(layout.total)  # the pattern is laid from byte 0, so compare at absolute offsets
    for side, start, size in (("before", 0, layout.head), ("after", layout.head + layout.payload, layout.tail)):
        bad = np.flatnonzero(buf[start : start + size] != expected[start : start + size])
        if bad.size:
            offset = int(bad[0]) - size if side == "before" else int(bad[0])
            raise GuardBandViolation(
                f"{kernel}: out-of-bounds write {side} output {name!r}: {bad.size} guard byte(s) changed, "
                f"first at byte {offset:+d} {'from the start' if side == 'before' else 'past the end'} "
                f"of the {layout.payload}-byte buffer"
            )


def unwritten_words(buf: np.ndarray, layout: GuardLayout) -> int:
    """How many 4-byte payload words still hold the sentinel (never written by the kernel)."""
    payload = np.asarray(buf, dtype=np.uint8).reshape(-1)[layout.head : layout.head + layout.payload]
    whole = payload[: payload.size - payload.size % 4].view("<u4")
    return int(np.count_nonzero(whole == np.frombuffer(SENTINEL, "<u4")[0]))
