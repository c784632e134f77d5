"""The local cache of a remote golden store: where it lives, and its size bound (least recently used
entries evicted first).

An entry's last use is its directory's mtime, set on every cache hit (no file changes, so its sha256s
and signature still hold; the same rule as ``harness golden clean --keep-recent``); access times are not
used because most filesystems mount ``relatime``. Sizes are decimal (``500MB`` = 500e6 bytes).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from harness import sizes
from harness.store import eviction
from harness.store.eviction import touch

__all__ = ["CACHE_ENV", "CACHE_MAX_ENV", "cache_root", "evict", "parse_size", "touch"]  # touch: one rule for last use

CACHE_ENV = "NPU_HARNESS_GOLDEN_CACHE"
CACHE_MAX_ENV = "NPU_HARNESS_GOLDEN_CACHE_MAX"
MANIFEST = "manifest.json"


def cache_root(url: str, override: str | Path | None = None) -> Path:
    """``override``, else ``$NPU_HARNESS_GOLDEN_CACHE``, else ``$XDG_CACHE_HOME/npu-harness/goldens/<hash
    of the URL>`` (``~/.cache`` without XDG_CACHE_HOME): one cache per remote store."""
    chosen = override or os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "npu-harness" / "goldens" / hashlib.sha256(url.encode()).hexdigest()[:16]


def parse_size(text: str | int | None, what: str = CACHE_MAX_ENV) -> int | None:
    """``"500MB"``, ``"20G"``, ``"16GiB"``, ``"123456"`` (bytes) -> bytes (harness.sizes); None or ``""``:
    unbounded."""
    if text is None or text == "":
        return None
    return text if isinstance(text, int) else sizes.parse_size(str(text), what)


def evict(root: Path, max_bytes: int | None, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries under ``root`` until they total at most ``max_bytes``
    (``keep``, the entry just fetched, stays even if it alone is larger). Returns the removed entries."""
    if max_bytes is None or not root.is_dir():
        return []
    entries = []
    for manifest in root.glob(f"*/*/*/{MANIFEST}"):
        try:
            entries.append(eviction.entry_of(manifest.parent))
        except OSError:  # removed meanwhile by another process's eviction
            continue
    removed = []
    for e in eviction.select(entries, max_bytes=max_bytes, protect=[keep] if keep is not None else []):
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed
