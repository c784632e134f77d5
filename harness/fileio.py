"""File helpers shared by the store, checkpoints and kernel artifacts."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

from harness.errors import HarnessError

CHUNK = 1 << 24


# -- refusing what is not a regular file --------------------------------------------------------------
# Inputs come from users and from files passed around (traces, checkpoints): a FIFO blocks open() and
# read() forever, /dev/zero never ends, a directory or socket is no tensor file. Everything the harness
# reads from such places goes through ``open_regular``: stat first, open non-blocking, fstat again (the
# path may have been swapped between the two), refuse anything but a regular file.

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _label(path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def unreadable(path: Path | str, exc: OSError, what: str = "file") -> HarnessError:
    """One line naming ``path``, what went wrong and the fix, for an OSError raised reading it."""
    fix = {13: "make it readable by this user", 2: "check the path", 20: "a parent of it is not a directory",
           21: "name a file, not a directory"}.get(exc.errno or 0, "check the path and its permissions")
    return HarnessError(f"{_label(path, what)}: cannot read ({exc.strerror or exc}); {fix}")


def os_reason(exc: OSError) -> str:
    """The OS's reason for ``exc``, worded for a path that should have been a directory to write in."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir over a file, or a file in the path
        return "it or a parent is a file, not a directory"
    return exc.strerror or str(exc)


def require_regular(path: Path | str, what: str = "file") -> os.stat_result:
    """``os.stat(path)`` (symlinks followed); HarnessError unless it is a readable regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise unreadable(path, exc, what) from None
    if not stat.S_ISREG(st.st_mode):
        raise HarnessError(f"{_label(path, what)} is {_kind(st.st_mode)}, not a regular file: refused")
    return st


def open_regular(path: Path | str, what: str = "file") -> int:
    """A read-only descriptor of ``path``, which must be a regular file (never blocks on a FIFO)."""
    require_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise unreadable(path, exc, what) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # swapped for something else since the stat
        os.close(fd)
        raise HarnessError(f"{_label(path, what)} is {_kind(mode)}, not a regular file: refused")
    os.set_blocking(fd, True)
    return fd


def read_bounded(path: Path | str, limit: int, what: str = "file") -> bytes:
    """The bytes of regular file ``path``, refused when it is larger than ``limit``."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise HarnessError(f"{_label(path, what)} is {size} bytes, more than the {limit} allowed: refused")
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise HarnessError(f"{_label(path, what)} is more than the {limit} bytes allowed: refused")
    return data


def hash_file_into(h, path: Path) -> None:
    """Feed a regular file's bytes into hash object ``h`` in chunks (files may be GBs)."""
    with os.fdopen(open_regular(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: written beside it under a name of this process, then
    renamed, so readers (and concurrent writers) see the old file or a new one, never half of one. Nothing
    is left behind when the write fails; the OSError is the caller's."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


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
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
    except OSError as exc:
        raise unreadable(path, exc, "golden file") from None
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


@functools.lru_cache(maxsize=8)
def _layout_header(layout: tuple, align: int) -> tuple[bytes, list[str], dict, int]:
    """(header bytes, tensor order, name -> (dtype, shape, data offset), data bytes) of a safetensors
    layout. Cached: a build's decode-step files (32 and more) share one layout of hundreds of tensors."""
    import json

    import numpy as np

    header, offset, dtypes = {}, 0, {}
    for name, dtype, shape in layout:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        dtypes[name] = (np.dtype(dtype), tuple(shape), offset)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)  # tensor data starts ``align``-byte aligned (8 | align)
    return text, [name for name, _, _ in layout], dtypes, offset


class SafetensorsWriter:
    """Write one safetensors file whose tensor list is known up front; arrays arrive in that order.

    ``layout``: [(name, dtype, shape), ...]. ``write(name, array)`` streams the array to the file and
    into the running block hashes; ``close()`` returns the file's record (BlockHasher.result), or None
    with ``hashed=False`` (a file no manifest records: weights).
    """

    def __init__(self, path: Path, layout: list[tuple[str, object, tuple[int, ...]]], align: int = 8,
                 hashed: bool = True):
        import struct

        header, self._order, self._dtypes, data_bytes = _layout_header(tuple(layout), align)
        self._next = 0
        self._hash = BlockHasher() if hashed else None  # unhashed: close() returns None
        self.size = 8 + len(header) + data_bytes  # the complete file's bytes
        self._fh = open(path, "wb", buffering=1 << 20)  # decode steps write thousands of one-row tensors
        self._emit(struct.pack("<Q", len(header)) + header)

    def reserve(self) -> None:
        """Give the file its final size now (the unwritten data reads as zeros until written), its header
        on disk: readers can then map each tensor once it has been written (``flush``)."""
        self._fh.flush()
        os.ftruncate(self._fh.fileno(), self.size)

    def flush(self) -> None:
        """Every tensor written so far is in the file (the page cache) for a reader's map."""
        self._fh.flush()

    def _emit(self, buf) -> None:
        self._fh.write(buf)
        if self._hash is not None:
            self._hash.update(buf)

    def write(self, name: str, array) -> None:
        import numpy as np

        if self._next >= len(self._order) or self._order[self._next] != name:
            raise ValueError(f"safetensors writer: got {name!r}, expected "
                             f"{self._order[self._next] if self._next < len(self._order) else 'no more tensors'}")
        dtype, shape, _ = self._dtypes[name]
        arr = np.asarray(array, order="C")  # ascontiguousarray would make a 0-d array 1-d
        if arr.dtype != dtype or arr.shape != shape:
            raise ValueError(f"safetensors writer: {name} is {arr.dtype}{arr.shape}, layout says {dtype}{shape}")
        self._emit(memoryview(arr.reshape(-1).view(np.uint8)))
        self._next += 1

    def expects(self, name: str) -> tuple:
        """(dtype, shape) tensor ``name`` must have."""
        return self._dtypes[name][:2]

    def span(self, name: str) -> tuple[int, int]:
        """(start, end) of tensor ``name``'s bytes in the data section."""
        import numpy as np

        dtype, shape, start = self._dtypes[name]
        return start, start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def write_block(self, names: tuple[str, ...], data) -> None:
        """The next ``len(names)`` tensors at once: ``data`` holds their bytes back to back, as laid out."""
        end = self._next + len(names)
        if tuple(self._order[self._next:end]) != tuple(names):
            raise ValueError(f"safetensors writer: got a block from {names[0]!r}, expected "
                             f"{self._order[self._next] if self._next < len(self._order) else 'no more tensors'}")
        view = memoryview(data).cast("B")
        if view.nbytes != self.span(names[-1])[1] - self.span(names[0])[0]:
            raise ValueError(f"safetensors writer: a block of {view.nbytes} bytes for {names[0]}..{names[-1]}")
        self._emit(view)
        self._next = end

    def abort(self) -> None:
        """Close without checks (the caller removes the half-written file)."""
        self._fh.close()

    def close(self) -> dict | None:
        if self._next != len(self._order):
            self._fh.close()
            raise ValueError(f"safetensors writer: {len(self._order) - self._next} tensors never written")
        self._fh.close()
        return self._hash.result() if self._hash is not None else None


def write_safetensors(path: Path, tensors: dict) -> dict:
    """Write ``tensors`` (name -> array) as a safetensors file; returns its block-hash record."""
    writer = SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    try:
        for name, value in tensors.items():
            writer.write(name, value)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# Bytes per element of the safetensors dtypes the harness reads (others are refused by name).
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def safetensors_header(path: Path | str, what: str = "safetensors file", fd: int | None = None) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, start of the data) of a safetensors file.

    The file must be a regular file whose size is exactly what its header describes: tensors
    contiguous, each ``data_offsets`` span equal to its shape times its element size. Anything else
    (a file padded with extra bytes, a header claiming more data than the file holds, a /dev/zero
    stand-in) raises HarnessError naming the file, before any tensor byte is read.
    """
    label = _label(path, what)
    own = fd is None
    fd = open_regular(path, what) if own else fd
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise HarnessError(f"{label}: not a readable safetensors file ({size} bytes, shorter than its header)")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER or 8 + n > size:
            raise HarnessError(f"{label}: not a readable safetensors file (header of {n} bytes in a {size}-byte file)")
        raw = os.pread(fd, n, 8)
    finally:
        if own:
            os.close(fd)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HarnessError(f"{label}: not a readable safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise HarnessError(f"{label}: not a readable safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    end = 0
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            count = 1
            for d in shape:
                if d < 0:
                    raise ValueError("negative dimension")
                count *= d
            if ST_ITEMSIZE[dtype] * count != stop - begin or begin < 0:
                raise ValueError(f"data_offsets {[begin, stop]} do not hold {dtype} {shape}")
        except (KeyError, TypeError, ValueError) as exc:
            raise HarnessError(f"{label}: tensor {name!r} has an invalid header entry ({exc})") from None
        spans.append((begin, stop))
    for begin, stop in sorted(spans):
        if begin != end:
            raise HarnessError(f"{label}: not a readable safetensors file (tensor data not contiguous at byte {begin})")
        end = stop
    if size != 8 + n + end:
        raise HarnessError(f"{label} is {size} bytes, its header describes {8 + n + end}: refused")
    return header, 8 + n


class _SafetensorsHeader:
    """What both readers take from a checked header: keys, (dtype, shape) and the NumPy dtype of a tensor."""

    _DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
               "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    _header: dict

    def keys(self) -> list[str]:
        return list(self._header)

    def dtype_shape(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of one tensor, from the header."""
        info = self._header[key]
        return info["dtype"], tuple(int(d) for d in info["shape"])

    def _numpy_dtype(self, info: dict):  # type: ignore[no-untyped-def]
        import ml_dtypes
        import numpy as np

        return ml_dtypes.bfloat16 if info["dtype"] == "BF16" else np.dtype(self._DTYPES[info["dtype"]])


class MappedSafetensors(_SafetensorsHeader):
    """A safetensors file memory-mapped once; ``get_tensor`` returns read-only zero-copy views.

    safetensors' own numpy loader copies every tensor out of its map; golden sets are read whole by
    the verifier anyway, so views keep a load at the cost of one sha256 pass. The file must be a
    regular file whose size matches its header (``safetensors_header``).
    """

    def __init__(self, path: Path, what: str = "safetensors file"):
        import mmap

        fd = open_regular(path, what)
        try:
            self._header, self._start = safetensors_header(path, what, fd=fd)
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def get_tensor(self, key: str):
        import numpy as np

        info = self._header[key]  # KeyError for an unknown key, as safe_open raises
        dtype = self._numpy_dtype(info)
        begin, end = info["data_offsets"]
        flat = np.frombuffer(self._map, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                             offset=self._start + begin)
        return flat.reshape(info["shape"])

    def read_tensor(self, key: str, dtype=None):
        """A private copy of one tensor (as ``dtype``, default its own), after which the mapped pages it
        touched are dropped from this process (MADV_DONTNEED; they stay in the page cache): reading every
        tensor of a large file one after another does not grow resident memory by the file's size."""
        import mmap

        import numpy as np

        view = self.get_tensor(key)
        out = np.array(view, dtype=dtype or view.dtype, copy=True)
        begin, end = self._header[key]["data_offsets"]
        if end > begin and hasattr(self._map, "madvise"):
            start = (self._start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, self._start + end - start)
        return out


class SafetensorsReader(_SafetensorsHeader):
    """A safetensors file from an untrusted place, read tensor by tensor with ``pread`` on one open
    descriptor: the file was checked (regular, size what its header describes) on that descriptor, so
    swapping the path afterwards changes nothing, and a file truncated meanwhile gives a short read and
    a HarnessError where a memory map would crash the process with SIGBUS. Use as a context manager.
    """

    _MAX_READ = 1 << 30  # one pread call reads at most ~2 GiB on Linux

    def __init__(self, path: Path | str, what: str = "safetensors file"):
        self.path, self._what = path, what
        self._fd = open_regular(path, what)
        try:
            self._header, self._start = safetensors_header(path, what, fd=self._fd)
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def get_tensor(self, key: str):
        import numpy as np

        info = self._header[key]
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(self._fd, [view[done:done + self._MAX_READ]], self._start + begin + done)
            if n == 0:
                raise HarnessError(f"{_label(self.path, self._what)}: shorter than its header says (changed while read)")
            done += n
        return np.frombuffer(buf, dtype=self._numpy_dtype(info)).reshape(info["shape"])


def map_tensor(path: Path | str, info: dict, start: int, what: str = "safetensors file"):
    """One tensor of a safetensors file as a read-only NumPy view on its own read-only memory map.

    Only the tensor's pages are mapped, and the map goes away with the last view of it: reading a model
    tensor by tensor keeps one tensor resident, not every page ever touched of one whole-file map. The
    view's memory cannot be made writeable (``arr.flags.writeable = True`` raises). ``info`` and
    ``start`` come from ``safetensors_header`` of the same file.
    """
    import mmap

    import numpy as np

    dtype = _SafetensorsHeader._numpy_dtype(_SafetensorsHeader, info)
    begin, end = info["data_offsets"]
    shape = [int(d) for d in info["shape"]]
    if end == begin:
        return np.zeros(shape, dtype=dtype)  # mmap refuses an empty region
    offset = start + begin
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    fd = open_regular(path, what)
    try:
        # PROT_READ: the memory cannot be written (as ACCESS_READ); MAP_POPULATE: the kernel maps every
        # page in this one call, where faulting them in one by one costs seconds per GB on a VM.
        region = mmap.mmap(fd, offset - aligned + end - begin, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=aligned)
    finally:
        os.close(fd)
    return np.frombuffer(region, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                         offset=offset - aligned).reshape(shape)
