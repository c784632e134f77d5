"""A size bound on the golden store: ``harness golden clean --keep-recent N / --max-size SIZE`` and the
automatic eviction of phase 7's re-check goldens.

Entries are ranked by last use (the entry directory's mtime, which ``touch`` refreshes whenever the gate
or a check loads the entry); eviction removes the least recently used first and never an entry in use.
Phase 7 records the re-check goldens it used in ``<root>/.recheck.json``; beyond ``RECHECK_KEEP`` of them
(``$NPU_HARNESS_RECHECK_KEEP``) the least recently used are removed, so repeated gates of many
deployments do not fill the disk.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from harness.errors import HarnessError
from harness.fileio import write_atomic

RECHECK_INDEX = ".recheck.json"
RECHECK_KEEP_ENV = "NPU_HARNESS_RECHECK_KEEP"
RECHECK_KEEP = 8


@dataclass(frozen=True)
class Entry:
    """One golden entry directory: its size in bytes and when it was last used (epoch seconds)."""

    path: Path
    size: int
    last_used: float


def touch(path: Path) -> None:
    """Mark an entry as used now (a read-only store keeps its old time: that only affects eviction order)."""
    try:
        os.utime(path)
    except OSError:
        pass


def entry_of(path: Path) -> Entry:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return Entry(path, size, path.stat().st_mtime)


def select(entries: Iterable[Entry], keep_recent: int | None = None, max_bytes: int | None = None,
           protect: Iterable[Path] = ()) -> list[Entry]:
    """The entries to remove so that at most ``keep_recent`` remain and they total at most ``max_bytes``:
    least recently used first; ``protect``ed entries are never removed (they still count)."""
    if keep_recent is not None and keep_recent < 0:
        raise HarnessError(f"--keep-recent {keep_recent}: must be >= 0")
    if max_bytes is not None and max_bytes < 0:
        raise HarnessError(f"--max-size {max_bytes}: must be >= 0")
    kept = {Path(p).resolve() for p in protect}
    newest_first = sorted(entries, key=lambda e: e.last_used, reverse=True)
    keep: list[Entry] = [e for e in newest_first if e.path.resolve() in kept]
    drop: list[Entry] = []
    for e in newest_first:
        if e.path.resolve() in kept:
            continue
        fits_count = keep_recent is None or len(keep) < keep_recent
        fits_size = max_bytes is None or sum(k.size for k in keep) + e.size <= max_bytes
        (keep if fits_count and fits_size else drop).append(e)
    return drop


def remove(entries: Iterable[Entry]) -> int:
    """Remove entry directories; returns how many. A store that cannot be written is a HarnessError."""
    n = 0
    for e in entries:
        try:
            shutil.rmtree(e.path)
        except OSError as exc:
            raise HarnessError(f"cannot remove golden entry {e.path}: {exc.strerror or exc}") from None
        n += 1
    return n


def _keep_bound() -> int:
    text = os.environ.get(RECHECK_KEEP_ENV)
    if not text:
        return RECHECK_KEEP
    try:
        value = int(text)
    except ValueError:
        raise HarnessError(f"${RECHECK_KEEP_ENV}={text!r}: expected a whole number") from None
    if value < 1:
        raise HarnessError(f"${RECHECK_KEEP_ENV}={value}: must be >= 1")
    return value


def remember_rechecks(store, paths: Iterable[Path], protect: Iterable[Path] = (), keep: int | None = None) -> list[str]:
    """Record phase 7's re-check goldens in the store's index and evict the least recently used beyond
    ``keep`` (default ``$NPU_HARNESS_RECHECK_KEEP`` or 8). Returns the evicted paths. Best effort on a
    read-only store: nothing is recorded or evicted there."""
    keep = _keep_bound() if keep is None else keep
    root = Path(store.root)
    try:
        from filelock import FileLock

        (root / ".locks").mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / ".locks" / "recheck-index.lock"))
        with lock:
            return _remember(root, [Path(p) for p in paths], [Path(p) for p in protect], keep)
    except OSError:
        return []  # a read-only store: nothing recorded, nothing evicted


def _remember(root: Path, paths: list[Path], protect: list[Path], keep: int) -> list[str]:
    index_path = root / RECHECK_INDEX
    try:
        known = json.loads(index_path.read_text())["entries"] if index_path.is_file() else []
        if not isinstance(known, list):
            known = []
    except (OSError, ValueError, KeyError, TypeError):
        known = []  # a damaged index only forgets which entries were re-checks
    now = [str(Path(p).resolve()) for p in paths]
    for p in now:
        touch(Path(p))
    listed = [p for p in dict.fromkeys([*known, *now]) if Path(p).is_dir()]
    drop = select([entry_of(Path(p)) for p in listed], keep_recent=keep, protect=[*protect, *paths])
    evicted = []
    for e in drop:
        try:
            shutil.rmtree(e.path)
            evicted.append(str(e.path))
        except OSError:
            pass
    remaining = [p for p in listed if p not in evicted]
    try:
        write_atomic(index_path, json.dumps({"entries": remaining, "updated": time.time()}))
    except OSError:
        pass
    return evicted
