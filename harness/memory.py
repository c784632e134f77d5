"""Handing freed memory back to the operating system between a gate's phases and a deployment's calls.

glibc's allocator keeps freed heap memory for reuse instead of returning it: after phase 0's streamed
reference or a full-scale prefill's activations, a process kept ~2 GB resident that it no longer used
(qwen3-4b at 2048 tokens), which counts against the machine's memory like live data. ``release()`` frees
what Python holds in reference cycles and asks glibc to trim its heaps (``malloc_trim``); elsewhere
(another C library) it only collects.

The collection is skipped while glibc reports less than ``COLLECT_FLOOR`` in use: garbage held in
cycles is part of that figure, so it could give back less than the floor, and with torch loaded a full
collection costs 0.1-0.6 s: at tiny scale, where a gate releases after every phase, it took 63 s of
three gate-heavy test files' 230 s.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


COLLECT_FLOOR = 512 << 20  # bytes of heap in use below which a full collection cannot pay


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33, all fields size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@lru_cache(maxsize=None)
def _libc(function: str, argtypes: tuple, restype):
    """A glibc function, or None where the C library lacks it (not glibc; mallinfo2 before 2.33)."""
    name = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def heap_in_use() -> int | None:
    """Bytes glibc's allocator has handed out and not had back (small blocks and mmapped large ones:
    arrays and tensors), or None when that cannot be asked."""
    info = _libc("mallinfo2", (), _Mallinfo2)
    if info is None:
        return None
    m = info()
    return int(m.uordblks + m.hblkhd)


def release() -> bool:
    """Collect garbage (when enough heap is in use for it to matter) and return the heap's free memory to
    the OS; True when the heap was trimmed."""
    in_use = heap_in_use()
    if in_use is None or in_use >= COLLECT_FLOOR:
        gc.collect()
    trim = _libc("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    return bool(trim(0)) if trim is not None else False
