"""Phase 0's reference checks, kept with the golden entry they judged, so a later gate need not rerun them.

``residual_identity``, ``decode_matches_prefill`` and ``bf16_top1`` read nothing but the entry (and the
weights its key names): on the same bytes, with the same harness, torch and transformers, they give the
same result. ``decode_matches_prefill`` reruns a longer fp32 prefill each time (5 minutes of a qwen3-4b
gate at 2048 tokens; with the transformers import, 2.4-2.6 s of a tiny gate's phase 0). The first gate on an
entry writes their results to ``<entry>/sanity.json``, bound to the sha256 of the entry's
``manifest.json`` (which carries every file's block sha256s), to those versions and to the harness's own
code that ran them; a later gate reuses them only after ``golden_integrity`` has verified every file
against that manifest in the same run, and says so in each check's message.

Like the manifest, the record is trusted by whoever can write the store: with a signing key configured
(harness.store.signing) it carries an HMAC under that key and is ignored without a valid one. A record
that is missing, damaged, unsigned under a key, or written for other bytes or versions is ignored (the
checks run and a new record replaces it); a store that cannot be written only loses the saving.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import time
from pathlib import Path

from harness.fileio import write_atomic
from harness.store import signing
from harness.store.golden import MANIFEST, GoldenSet, _versions
from harness.suites.phases import Check

RECORD = "sanity.json"
SCHEMA = 1
MAX_BYTES = 1 << 20
VERSIONS = ("harness", "torch", "transformers")  # as the golden's manifest records them

# The harness's own code the three checks run (their thresholds, the fp32 reference they rerun, how taps
# are read): a record made by other code is not reused, even under one version number (a checkout).
CODE = ("suites/sanity.py", "reference/capture.py", "reference/streaming.py", "reference/hf_model.py",
        "reference/layer_first.py", "store/golden.py")


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in CODE:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()


def _binding(golden: GoldenSet) -> dict:
    """What the record's checks were computed on: the entry's exact manifest, and the code that ran them."""
    return {"manifest_sha256": hashlib.sha256((golden.path / MANIFEST).read_bytes()).hexdigest(),
            "versions": {**{k: v for k, v in _versions().items() if k in VERSIONS}, "code": _code_digest()}}


def _mac(key: bytes, body: dict) -> str:
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def load(golden: GoldenSet, names: tuple[str, ...]) -> list[Check] | None:
    """The stored checks ``names`` of ``golden``, or None when no valid record holds them all."""
    try:
        with open(golden.path / RECORD, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
        record = json.loads(raw) if len(raw) <= MAX_BYTES else None
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            return None
        body = {k: v for k, v in record.items() if k != "mac"}
        key = signing.signing_key()
        if key is not None and not hmac.compare_digest(str(record.get("mac", "")), _mac(key, body)):
            return None
        if {k: record.get(k) for k in ("manifest_sha256", "versions")} != _binding(golden):
            return None
        stored = {c["name"]: c for c in record["checks"]}
        note = f" (computed {record['created']} by an earlier gate on these very files: {RECORD})"
        return [Check(n, bool(stored[n]["passed"]), str(stored[n]["message"]) + note,
                      {**stored[n]["metrics"], "reused": True}) for n in names]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save(golden: GoldenSet, checks: list[Check]) -> None:
    """Write the record of ``checks`` (atomically); a failure to write only loses the saving."""
    body = {"schema": SCHEMA, **_binding(golden), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checks": [{"name": c.id, "passed": bool(c.passed), "message": c.message, "metrics": c.metrics}
                       for c in checks]}
    key = signing.signing_key()
    record = {**body, "mac": _mac(key, body)} if key is not None else body
    try:
        write_atomic(golden.path / RECORD, json.dumps(record, indent=1))
    except (OSError, TypeError, ValueError):
        pass
