"""Checkpoint digests kept across processes, by the files' full stat (git's index, for weights).

Every gate and build of a checkpoint needs its sha256 for the golden's key: 6 GB read and hashed for a
3B model, in every process. ``checkpoint_digest`` keeps a digest in memory for its process; this file
keeps it for the next processes, under the same stamp (path, device, inode, size, mtime and ctime of
every file: ``checkpoint._stamp``) and only for files that had settled when they were hashed. Any write
to a file moves its ctime, which no user can set back, so a changed checkpoint is hashed again.

Where: ``$NPU_HARNESS_DIGEST_CACHE`` (a file path; ``off`` keeps digests in memory only), else
``$XDG_CACHE_HOME/npu-harness/checkpoint-digests.json`` (``~/.cache/...``). The cache only ever saves
time: an unreadable, damaged or unwritable one is ignored (and replaced when it can be), never an error.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from harness.fileio import write_atomic

ENV = "NPU_HARNESS_DIGEST_CACHE"
MAX_ENTRIES = 256  # a few dozen checkpoints in practice; the least recently used leave first
MAX_BYTES = 1 << 20  # 256 entries of a sharded checkpoint's stamps stay far below this
SCHEMA = 1


def cache_path() -> Path | None:
    """The cache file, or None when it is turned off."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "npu-harness" / "checkpoint-digests.json"


def _key(stamp: tuple) -> str:
    return json.dumps(stamp, separators=(",", ":"))


def _read(path: Path) -> dict[str, dict]:
    """The entries (stamp key -> {"digest", "used"}); empty for a missing or damaged file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_BYTES else None
        entries = data.get("entries") if isinstance(data, dict) and data.get("schema") == SCHEMA else None
        return {k: v for k, v in entries.items()
                if isinstance(v, dict) and isinstance(v.get("digest"), str) and len(v["digest"]) == 64}
    except (OSError, ValueError, AttributeError):
        return {}


def lookup(stamp: tuple) -> str | None:
    """The digest stored for exactly this stamp, or None."""
    path = cache_path()
    if path is None:
        return None
    entry = _read(path).get(_key(stamp))
    return entry["digest"] if entry else None


def remember(stamp: tuple, digest: str) -> None:
    """Store ``digest`` under ``stamp`` (atomically, under a lock); a failure only loses the saving."""
    path = cache_path()
    if path is None:
        return
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=10):
            entries = _read(path)
            entries[_key(stamp)] = {"digest": digest, "used": time.time()}
            kept = dict(sorted(entries.items(), key=lambda kv: kv[1].get("used", 0))[-MAX_ENTRIES:])
            write_atomic(path, json.dumps({"schema": SCHEMA, "entries": kept}))
    except (OSError, Timeout):
        pass
