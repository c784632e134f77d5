"""Handing freed memory back to the operating system between a gate's phases and a deployment's calls.

glibc's allocator keeps freed heap memory for reuse instead of returning it: after phase 0's streamed
reference or a full-scale prefill's activations, a process kept ~2 GB resident that it no longer used
(qwen3-4b at 2048 tokens), which counts against the machine's memory like live data. ``release()`` frees
what Python holds in reference cycles and asks glibc to trim its heaps (``malloc_trim``); elsewhere
(another C library) it only collects.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release() -> bool:
    """Collect garbage and return the heap's free memory to the OS; True when the heap was trimmed."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
