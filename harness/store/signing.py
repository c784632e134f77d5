"""Optional keyed signatures over golden manifests (HMAC-SHA256), for stores several people can write.

The block sha256s in a manifest catch accidents (a truncated copy, a flipped bit, a missing file), but
anyone who can write the store can edit a tensor and re-hash the manifest. With a key configured the
store also keeps ``manifest.sig`` next to each ``manifest.json``: an HMAC-SHA256 of the manifest's exact
bytes (which carry every file's size and block sha256s), so an edit needs the key, not just write access.

The key comes from ``NPU_HARNESS_GOLDEN_KEY`` (the key itself) or ``NPU_HARNESS_GOLDEN_KEY_FILE`` (a
file holding it); at least 16 bytes. Without either, nothing is signed or checked, and existing
``manifest.sig`` files are ignored. An ed25519 key pair (verify-only machines) would need the
``cryptography`` package, which the harness does not depend on.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from harness.errors import HarnessError
from harness.fileio import read_bounded, write_atomic

KEY_ENV = "NPU_HARNESS_GOLDEN_KEY"
KEY_FILE_ENV = "NPU_HARNESS_GOLDEN_KEY_FILE"
SIGNATURE = "manifest.sig"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
MAX_SIGNATURE_BYTES = 4096
KEY_HINT = "e.g. `openssl rand -hex 32`"


class SignatureProblem(str):
    """A verification problem about the signature (not the file hashes): the entry is untrusted."""


def signing_key() -> bytes | None:
    """The configured key, or None; HarnessError (naming the variable) for an unusable one."""
    text, path = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if text and path:
        raise HarnessError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set only one of them")
    if path:
        key = read_bounded(path, MAX_KEY_BYTES, KEY_FILE_ENV).strip()
        source = f"{KEY_FILE_ENV} ({path})"
    elif text:
        key, source = text.strip().encode(), KEY_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise HarnessError(f"{source}: the key is {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes "
                           f"({KEY_HINT})")
    return key


def key_id(key: bytes) -> str:
    """A short name of ``key`` that reveals nothing about it (tells 'another key' from 'edited')."""
    return hmac.new(key, b"npu-harness golden key id", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, manifest: bytes) -> str:
    return hmac.new(key, manifest, hashlib.sha256).hexdigest()


def sign(directory: Path, key: bytes, manifest: bytes | None = None) -> None:
    """Write ``directory/manifest.sig`` for the manifest's bytes (read from disk unless given)."""
    data = (directory / "manifest.json").read_bytes() if manifest is None else manifest
    record = {"alg": ALGORITHM, "key_id": key_id(key), "mac": _mac(key, data)}
    write_atomic(directory / SIGNATURE, json.dumps(record) + "\n")


def problems(directory: Path, manifest: bytes, key: bytes | None) -> list[SignatureProblem]:
    """Why ``manifest`` (the bytes of ``directory/manifest.json``) is not signed by ``key``; empty when
    it is, or when no key is configured (then nothing is checked)."""
    if key is None:
        return []
    path = directory / SIGNATURE
    fix = "`harness golden clean` and rebuild it, or vouch for it with `harness golden sign`"
    if not os.path.lexists(path):
        return [SignatureProblem(f"{directory}: not signed, and {KEY_ENV} is set ({fix})")]
    try:
        record = json.loads(read_bounded(path, MAX_SIGNATURE_BYTES, "signature"))
        alg, kid, mac = record["alg"], record["key_id"], record["mac"]
    except (HarnessError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        return [SignatureProblem(f"{path}: unreadable signature ({exc}; {fix})")]
    if alg != ALGORITHM:
        return [SignatureProblem(f"{path}: signature algorithm {alg!r}, expected {ALGORITHM}")]
    if kid != key_id(key):
        return [SignatureProblem(f"{directory}: signed with another key (key id {kid}, the configured key is "
                                 f"{key_id(key)})")]
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, manifest)):
        return [SignatureProblem(f"{directory}: manifest.json does not match its signature: edited after "
                                 f"it was signed; do not trust it ({fix})")]
    return []
