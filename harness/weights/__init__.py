"""Weights: local Hugging Face checkpoints (safetensors only) or seeded synthetic weights."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from harness.errors import HarnessError
from harness.spec.model_spec import ModelSpec

SYNTHETIC_VERSION = 2  # bump when synthetic_weights changes its output: it is part of the golden key


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: a checkpoint directory, or synthetic weights of ``seed``."""

    path: str | None = None

    def describe(self) -> str:
        return f"checkpoint:{self.path}" if self.path else "synthetic"


def weights_digest(spec: ModelSpec, source: WeightsSource, seed: int) -> str:
    """A digest that changes whenever the weights would (cheap for synthetic weights)."""
    if source.path:
        from harness.weights.checkpoint import checkpoint_digest

        return "ckpt-" + checkpoint_digest(source.path)
    ident = json.dumps({"v": SYNTHETIC_VERSION, "seed": seed, "config": spec.config}, sort_keys=True)
    return "synth-" + hashlib.sha256(ident.encode()).hexdigest()


def read_weights(spec: ModelSpec, source: WeightsSource | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The source's own weights, read afresh into a dict (small models, tests, calibration)."""
    source = source or WeightsSource()
    if source.path:
        from harness.weights.checkpoint import load_checkpoint

        return load_checkpoint(spec, Path(source.path))
    from harness.weights.synthetic import synthetic_weights

    return synthetic_weights(spec, seed)


# -- deployments' weights: lazy, read-only, shared through one file per model --------------------------
CACHE_ENV = "NPU_HARNESS_WEIGHTS_DIR"


def cache_dir() -> Path:
    """Where synthetic weights are materialised: ``$NPU_HARNESS_WEIGHTS_DIR``, else
    ``$XDG_CACHE_HOME/npu-harness/weights`` (``~/.cache/npu-harness/weights``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "npu-harness" / "weights"


def synthetic_file(spec: ModelSpec, seed: int) -> Path:
    """The float32 safetensors file of ``spec``'s synthetic weights, generated once (tensor by tensor,
    under a file lock, renamed into place complete) and reused by every process after."""
    import torch
    from filelock import FileLock

    from harness.spec.model_spec import folder_name
    from harness.weights.lazy import write_weights_file
    from harness.weights.synthetic import synthetic_plan

    digest = weights_digest(spec, WeightsSource(), seed).removeprefix("synth-")[:16]
    ident = f"{folder_name(spec.id)}-{spec.scale}-seed{seed}-{digest}-torch{torch.__version__.split('+')[0]}"
    root = cache_dir()
    path = root / f"{ident}.safetensors"
    if path.is_file():
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{ident}.lock")):
            if not path.is_file():
                write_weights_file(path, synthetic_plan(spec, seed), np.float32)
    except OSError as exc:
        raise HarnessError(f"weights cache {root}: cannot write ({exc.strerror or exc}); set {CACHE_ENV} "
                           "to a writable directory") from None
    return path


def _bf16_exact_float32(view: np.ndarray) -> np.ndarray:
    """A checkpoint tensor as float32 rounded to bf16, in memory no one can make writeable."""
    from harness.weights.synthetic import bf16_round

    return _immutable(bf16_round(np.asarray(view, dtype=np.float32)))


def _immutable(arr: np.ndarray) -> np.ndarray:
    """``arr`` backed by an immutable ``bytes`` buffer: its WRITEABLE flag cannot be switched back on."""
    arr = np.ascontiguousarray(arr)
    return np.frombuffer(arr.tobytes(), dtype=arr.dtype).reshape(arr.shape)


def load_weights(spec: ModelSpec, source: WeightsSource | None = None, seed: int = 0) -> Mapping[str, np.ndarray]:
    """The weights of ``spec`` (float32, bf16-representable) for a deployment or a check.

    A lazy read-only Mapping: each lookup produces the tensor (nothing is cached beyond what the caller
    keeps), ``keys()``/``in``/``len`` read only file headers, assigning into it raises TypeError (a
    deployment that wants changes copies it, ``dict(weights)``). Values are read-only arrays whose memory
    cannot be made writeable: synthetic weights are views on a read-only map of ``synthetic_file``
    (shared page cache: every process of a gate reads the same pages); checkpoint tensors are converted
    per lookup from a read-only map of the checkpoint's shards. Goldens are never built from these:
    a build regenerates or rereads the source privately (``build_source``).
    """
    from harness.weights.lazy import MappedWeights

    source = source or WeightsSource()
    if source.path:
        return _checkpoint_mapping(spec, Path(source.path), _bf16_exact_float32)
    return MappedWeights([synthetic_file(spec, seed)], what="weights cache file")


def _checkpoint_mapping(spec: ModelSpec, path: Path, convert) -> Mapping[str, np.ndarray]:
    from harness.weights.checkpoint import check_config, shard_files
    from harness.weights.lazy import MappedWeights

    if not path.is_dir():
        raise HarnessError(f"--weights {path}: not a directory")
    check_config(spec, path)
    drop = ("lm_head.weight",) if spec.tied_embeddings else ()
    return MappedWeights(shard_files(path), convert=convert, drop=drop, what="--weights shard")


KEEP_MAPPED_BYTES = 2 << 30  # a build keeps bf16 weights this small whole in memory (<= 1B parameters)


def build_source(spec: ModelSpec, source: WeightsSource, seed: int, workdir: Path) -> Mapping[str, np.ndarray]:
    """The weights a golden build reads, a fresh read of the source no deployment has seen: synthetic
    weights regenerated into ``workdir`` (a bfloat16 file, exact: every value is bf16-rounded; the caller
    deletes it; written by a background thread, ``GeneratingWeights``; a model whose bf16 weights take
    at most ``KEEP_MAPPED_BYTES`` is generated in memory instead, ``GeneratedWeights``), or the
    checkpoint's own shards. Values are bfloat16 or float32 arrays, bf16-exact. Release it with
    ``close_source``."""
    from harness.weights.lazy import GeneratedWeights, GeneratingWeights
    from harness.weights.synthetic import synthetic_plan

    import ml_dtypes

    if source.path:
        return _checkpoint_mapping(spec, Path(source.path), _bf16_view)
    plan = synthetic_plan(spec, seed)
    if sum(int(np.prod(shape)) for _, shape, _ in plan) * 2 <= KEEP_MAPPED_BYTES:
        # Small: a file this size would stay mapped whole anyway; keep the values in memory instead of
        # writing and re-reading a file (fresh page-cache pages cost about 2 s per GB on a VM), made by
        # a background thread while the fp32 reference starts (the caller closes it).
        return GeneratedWeights(plan, ml_dtypes.bfloat16)
    # Larger: written to a private file by a background thread; the fp32 reference reads each tensor
    # as soon as it is there instead of waiting for the whole file.
    return GeneratingWeights(workdir / ".weights.safetensors", plan, ml_dtypes.bfloat16, what="build weights file")


def close_source(weights: Mapping[str, np.ndarray]) -> None:
    """Release what ``build_source`` returned (stop a generator thread still running)."""
    close = getattr(weights, "close", None)
    if close is not None:
        close()


def _bf16_view(view: np.ndarray) -> np.ndarray:
    """A checkpoint tensor as bfloat16 values (zero-copy when stored as bf16; else rounded to bf16)."""
    import ml_dtypes

    if view.dtype == ml_dtypes.bfloat16:
        return view
    return np.asarray(view, dtype=np.float32).astype(ml_dtypes.bfloat16)
