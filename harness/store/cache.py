"""The local cache of a remote golden store: where it lives, and its size bound (least recently used
entries evicted first).

An entry's last use is its directory's mtime, set on every cache hit (no file changes, so its sha256s
and signature still hold; the same rule as ``harness golden clean --keep-recent``); access times are not
used because most filesystems mount ``relatime``. Sizes are decimal (``500MB`` = 500e6 bytes).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from harness.errors import HarnessError

CACHE_ENV = "NPU_HARNESS_GOLDEN_CACHE"
CACHE_MAX_ENV = "NPU_HARNESS_GOLDEN_CACHE_MAX"
MANIFEST = "manifest.json"
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def cache_root(url: str, override: str | Path | None = None) -> Path:
    """``override``, else ``$NPU_HARNESS_GOLDEN_CACHE``, else ``$XDG_CACHE_HOME/npu-harness/goldens/<hash
    of the URL>`` (``~/.cache`` without XDG_CACHE_HOME): one cache per remote store."""
    chosen = override or os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "npu-harness" / "goldens" / hashlib.sha256(url.encode()).hexdigest()[:16]


def parse_size(text: str | int | None, what: str = CACHE_MAX_ENV) -> int | None:
    """``"500MB"``, ``"20G"``, ``"1.5GB"``, ``"123456"`` (bytes) -> bytes; None or ``""``: unbounded."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise HarnessError(f"{what}: {text!r} is not a size; use bytes or a number with K, M, G or T (e.g. 20G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def touch(entry: Path) -> None:
    """Mark ``entry`` as just used (its directory's mtime); a read-only cache is left as it is."""
    try:
        os.utime(entry)
    except OSError:
        pass


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())


def evict(root: Path, max_bytes: int | None, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries under ``root`` until they total at most ``max_bytes``
    (``keep``, the entry just fetched, stays even if it alone is larger). Returns the removed entries."""
    if max_bytes is None or not root.is_dir():
        return []
    entries = []
    for manifest in root.glob(f"*/*/*/{MANIFEST}"):
        try:
            entries.append((manifest.parent.stat().st_mtime, manifest.parent, _size(manifest.parent)))
        except OSError:  # removed meanwhile by another process's eviction
            continue
    total = sum(size for _, _, size in entries)
    removed = []
    for _, entry, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and entry.resolve() == keep.resolve():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed
