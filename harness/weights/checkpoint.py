"""Load a local Hugging Face checkpoint directory (config.json + safetensors shards), offline.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt`` ...) are refused: loading them runs arbitrary
code. The checkpoint's config must describe the requested model at the requested scale.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.fileio import hash_file_into, read_bounded, require_regular, safetensors_header
from harness.spec.model_spec import ModelSpec
from harness.weights import digest_cache
from harness.weights.synthetic import bf16_round

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Config keys that must agree between the checkpoint and the spec (they fix every tensor shape and
# the numerics that matter).
MAX_JSON_BYTES = 16 << 20  # config.json, the shard index: far above any real one
MATCH_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta",
)


def _config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise HarnessError(f"--weights {path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        return json.loads(read_bounded(cfg_path, MAX_JSON_BYTES, "--weights config"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{cfg_path}: not valid JSON ({exc})") from None


def check_config(spec: ModelSpec, path: Path) -> None:
    """Raise HarnessError naming the key when the checkpoint's config is not ``spec``'s model."""
    cfg = _config(path)
    # transformers 5 writes RoPE settings as rope_parameters (theta inside); older files as rope_theta.
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta"))
    cfg.setdefault("head_dim", cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads", 1), 1))
    for key in MATCH_KEYS:
        want, got = spec.config.get(key), cfg.get(key)
        if key == "rope_theta" and got is not None and want is not None:
            same = float(got) == float(want)
        else:
            same = got == want
        if not same:
            raise HarnessError(
                f"{path / 'config.json'}: {key} = {got!r}, but {spec.id} at scale {spec.scale} has {want!r}; "
                "the checkpoint is not this model"
            )


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (through the index when sharded); each must be a regular
    file (a FIFO or device would block or never end), wherever a symlink leads."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(read_bounded(index, MAX_JSON_BYTES, "--weights index"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise HarnessError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted({path / name for name in weight_map.values()})
        for f in files:
            if f.resolve().parent != path.resolve() or not f.is_file():
                raise HarnessError(f"{index}: shard {f.name} is missing or outside {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        require_regular(f, "--weights shard")
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise HarnessError(
            f"--weights {path}: only pickle checkpoints found ({', '.join(pickles)}); they are refused because "
            "loading them runs arbitrary code. Convert to safetensors (save_pretrained(safe_serialization=True))."
        )
    raise HarnessError(f"--weights {path}: no *.safetensors files")


def load_checkpoint(spec: ModelSpec, path: str | Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32, rounded to bf16 so fp32 and bf16 runs share them."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise HarnessError(f"--weights {path}: not a directory")
    check_config(spec, path)
    weights: dict[str, np.ndarray] = {}
    for f in shard_files(path):
        safetensors_header(f, "--weights shard")  # a regular file whose size its header describes
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    weights[name] = bf16_round(np.asarray(st.get_tensor(name), dtype=np.float32))
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise HarnessError(f"{f}: cannot read safetensors file ({exc})") from None
    if spec.tied_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


# Digests already computed by this process, by the files' full stat: a golden's key is asked for several
# times per build and gate, and each hash of a 3B checkpoint reads 6 GB.
_DIGESTS: dict[tuple, str] = {}
RACY_NS = 1_000_000_000  # a file changed this recently is hashed every time (timestamps are clock ticks)


def _stamp(files: list[Path]) -> tuple | None:
    """What changes whenever a file's content can have: identity, size and both times (None when a file
    cannot be stat'ed: the hashing names it). ``st_ctime_ns`` is set by the kernel on every write and on
    every ``utime``: a file rewritten with its old mtime restored still gets a new ctime, so a stale
    digest cannot be served for changed bytes."""
    stats = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            return None
        stats.append((str(f.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stats)


def checkpoint_digest(path: str | Path) -> str:
    """sha256 over the checkpoint's config and safetensors files (names and contents); computed once for
    files whose stat has not changed since (``_stamp``): in memory for this process, and in the digest
    cache (``harness.weights.digest_cache``) for the next ones."""
    path = Path(path)
    files = [path / "config.json", *shard_files(path)]
    stamp = _stamp(files)
    digest = _DIGESTS.get(stamp) if stamp is not None else None
    if digest is None and stamp is not None:
        digest = digest_cache.lookup(stamp)  # hashed by an earlier process, every file as it was then
        if digest is not None:
            _DIGESTS[stamp] = digest
    if digest is None:
        started = time.time_ns()
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            hash_file_into(h, f)
        digest = h.hexdigest()
        # Kept only if nothing changed while it was read, and no file changed in the second before: a
        # write in the same clock tick as the last one leaves ctime as it was (git's "racy" entries).
        settled = stamp is not None and all(s[-1] < started - RACY_NS for s in stamp)
        if settled and _stamp(files) == stamp:
            _DIGESTS[stamp] = digest
            digest_cache.remember(stamp, digest)
    return digest
