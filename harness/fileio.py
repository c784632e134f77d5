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
