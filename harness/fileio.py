"""File helpers shared by the store, checkpoints and kernel artifacts."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 24


def hash_file_into(h, path: Path) -> None:
    """Feed a file's bytes into hash object ``h`` in chunks (files may be GBs)."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's contents."""
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


BLOCK = 1 << 24  # 16 MiB: golden files carry one sha256 per block, so several threads verify one file


class BlockHasher:
    """sha256 of every ``BLOCK`` bytes of a stream (the last block may be short)."""

    def __init__(self, block: int = BLOCK):
        self.block, self.digests, self.size = block, [], 0
        self._h, self._filled = hashlib.sha256(), 0

    def update(self, buf) -> None:
        view = memoryview(buf).cast("B")
        while len(view):
            take = min(len(view), self.block - self._filled)
            self._h.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == self.block:
                self.digests.append(self._h.hexdigest())
                self._h, self._filled = hashlib.sha256(), 0

    def result(self) -> dict:
        """``{"size", "block", "sha256": [...]}``: what a manifest records for one file."""
        digests = self.digests + ([self._h.hexdigest()] if self._filled or not self.digests else [])
        return {"size": self.size, "block": self.block, "sha256": digests}


def block_digest_tasks(path: Path, record: dict) -> list[tuple[Path, int, int, str]]:
    """(path, offset, length, expected sha256) per block of ``record`` (see BlockHasher.result)."""
    block, size = record["block"], record["size"]
    return [(path, i * block, min(block, size - i * block), digest) for i, digest in enumerate(record["sha256"])]


def block_matches(task: tuple[Path, int, int, str]) -> bool:
    """Does one block of a file hash to its recorded sha256? (hashlib releases the GIL: run in threads)."""
    path, offset, length, digest = task
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    return len(data) == length and hashlib.sha256(data).hexdigest() == digest


# -- safetensors, written zero-copy ------------------------------------------------------------------
# The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets}} padded to 8 bytes, then the raw buffers back to back.
# Writing it directly streams each array's own memory to disk and into sha256 at once, where
# safetensors.numpy.save first copies everything into one bytes object (0.5 s per 560 MB golden set).

def _st_dtype(dtype) -> str:
    import ml_dtypes
    import numpy as np

    table = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
    try:
        return table[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"safetensors writer: unsupported dtype {dtype}") from None


class SafetensorsWriter:
    """Write one safetensors file whose tensor list is known up front; arrays arrive in that order.

    ``layout``: [(name, dtype, shape), ...]. ``write(name, array)`` streams the array to the file and
    into the running block hashes; ``close()`` returns the file's record (BlockHasher.result).
    """

    def __init__(self, path: Path, layout: list[tuple[str, object, tuple[int, ...]]]):
        import json
        import struct

        import numpy as np

        self._order = [name for name, _, _ in layout]
        self._next = 0
        header, offset = {}, 0
        self._dtypes = {}
        for name, dtype, shape in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._dtypes[name] = (np.dtype(dtype), tuple(shape))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._hash = BlockHasher()
        self._fh = open(path, "wb")
        self._emit(struct.pack("<Q", len(text)) + text)

    def _emit(self, buf) -> None:
        self._fh.write(buf)
        self._hash.update(buf)

    def write(self, name: str, array) -> None:
        import numpy as np

        if self._next >= len(self._order) or self._order[self._next] != name:
            raise ValueError(f"safetensors writer: got {name!r}, expected "
                             f"{self._order[self._next] if self._next < len(self._order) else 'no more tensors'}")
        dtype, shape = self._dtypes[name]
        arr = np.ascontiguousarray(array)
        if arr.dtype != dtype or arr.shape != shape:
            raise ValueError(f"safetensors writer: {name} is {arr.dtype}{arr.shape}, layout says {dtype}{shape}")
        self._emit(memoryview(arr.reshape(-1).view(np.uint8)))
        self._next += 1

    def abort(self) -> None:
        """Close without checks (the caller removes the half-written file)."""
        self._fh.close()

    def close(self) -> str:
        if self._next != len(self._order):
            self._fh.close()
            raise ValueError(f"safetensors writer: {len(self._order) - self._next} tensors never written")
        self._fh.close()
        return self._hash.result()


def write_safetensors(path: Path, tensors: dict) -> dict:
    """Write ``tensors`` (name -> array) as a safetensors file; returns its block-hash record."""
    writer = SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for name, value in tensors.items():
        writer.write(name, value)
    return writer.close()


class MappedSafetensors:
    """A safetensors file memory-mapped once; ``get_tensor`` returns read-only zero-copy views.

    safetensors' own numpy loader copies every tensor out of its map; golden sets are read whole by
    the verifier anyway, so views keep a load at the cost of one sha256 pass.
    """

    _DTYPES = {"F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "U8": "uint8"}

    def __init__(self, path: Path):
        import json
        import mmap
        import struct

        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (n,) = struct.unpack("<Q", self._map[:8])
            header = json.loads(self._map[8:8 + n])
        except (struct.error, ValueError) as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._header = header

    def keys(self) -> list[str]:
        return list(self._header)

    def get_tensor(self, key: str):
        import ml_dtypes
        import numpy as np

        info = self._header[key]  # KeyError for an unknown key, as safe_open raises
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else np.dtype(self._DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        flat = np.frombuffer(self._map, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                             offset=self._start + begin)
        return flat.reshape(info["shape"])
