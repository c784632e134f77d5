"""Trace directories: an external deployment's recorded taps, replayed as a contract deployment.

Layout (docs/trace-format.md)::

    <dir>/trace.json              {"model", "scale", "seed", "decode_steps"[, "weights"]}
    <dir>/prefill.safetensors     canonical tap name -> [tokens, features] (F32 or BF16)
    <dir>/decode.<i>.safetensors  one per decode step, [1, features]
    <dir>/inputs.safetensors      optional: input_ids int64 [T], decode_tokens int64 [N]
    <dir>/weights.safetensors     optional: HF parameter names, bf16

``read_trace`` validates everything up front (headers only, no tensor data), so a bad trace fails
before any comparison starts, with a message naming the file and the tap. Tensor data is read one
phase at a time (a full-scale prefill holds ~80 MB of logits alone).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  registers numpy's "bfloat16" dtype, which safetensors.numpy needs
import numpy as np
from safetensors.numpy import save_file

from harness.errors import HarnessError, TapError
from harness.fileio import (SafetensorsReader, os_reason, read_bounded, require_regular, safetensors_header,
                            write_atomic)
from harness.spec import model_spec, taps

TRACE_JSON = "trace.json"
INPUTS_FILE = "inputs.safetensors"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"  # written by prepare: the scaled model's Hugging Face config
EXPECTED_FILE = "expected.json"  # written by prepare: every file, tap and shape the trace must hold
# Formats that unpickle on load (torch.save, pickle, joblib, HF *.bin): loading one runs arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TAP_DTYPES = ("F32", "BF16")
MAX_JSON_BYTES = 16 << 20  # trace.json, config.json, a checkpoint index: far above any real one

Tap = Callable[[str, np.ndarray], np.ndarray]


def phase_file(phase: str) -> str:
    """``prefill`` -> ``prefill.safetensors``; ``decode.3`` -> ``decode.3.safetensors``."""
    return f"{phase}.safetensors"


def _inside(root: Path, name: str, what: str) -> Path:
    """``root/name`` resolved, refusing absolute paths, ``..`` and symlinks that lead outside root."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise HarnessError(f"trace {root}: {what} {name!r} points outside the trace directory")
    path = root / rel
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise HarnessError(
            f"trace {root}: {what} {rel} resolves to {resolved}, outside the trace directory"
        )
    return path


def _regular_inside(root: Path, name: str, what: str) -> Path:
    """``_inside`` and a regular file (never a FIFO, device, socket or directory)."""
    path = _inside(root, name, what)
    require_regular(path, f"trace {root}: {what}")
    return path


def _read_json(root: Path) -> dict[str, Any]:
    path = _inside(root, TRACE_JSON, "file")
    if not os.path.lexists(path):
        raise HarnessError(f"trace {root}: {TRACE_JSON} is missing (see docs/trace-format.md)")
    try:
        meta = json.loads(read_bounded(path, MAX_JSON_BYTES, f"trace {root}: file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise HarnessError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in (("model", str), ("scale", str), ("seed", int), ("decode_steps", int)):
        if key not in meta:
            raise HarnessError(f"{path}: missing key {key!r} (needs model, scale, seed, decode_steps)")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise HarnessError(f"{path}: {key!r} must be {kind.__name__}, got {value!r}")
    if meta["decode_steps"] < 0:
        raise HarnessError(f"{path}: 'decode_steps' must be >= 0, got {meta['decode_steps']}")
    if meta.get("weights") is not None and not isinstance(meta["weights"], str):
        raise HarnessError(f"{path}: 'weights' must be a file name inside the directory, got {meta['weights']!r}")
    return meta


def _refuse_pickles(root: Path) -> None:
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.lower().endswith(PICKLE_SUFFIXES):
            raise HarnessError(
                f"trace {root}: {entry.name} refused: pickle-based files ({', '.join(PICKLE_SUFFIXES)}) "
                "can run code when loaded; write the tensors as safetensors (docs/trace-format.md)"
            )


def _open(path: Path) -> SafetensorsReader:
    """A validated safetensors file (regular, its size exactly what its header describes), read with
    pread on the descriptor that was checked."""
    return SafetensorsReader(path, what="")


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), read from the header only."""
    header, _ = safetensors_header(path, what="")
    return {k: (v["dtype"], tuple(int(d) for d in v["shape"])) for k, v in header.items()}


def _check_phase(spec: model_spec.ModelSpec, path: Path, phase: str,
                 header: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> tuple[list[str], int]:
    """Validate one phase file (or its already-read ``header``); its taps in canonical order and
    its token count."""
    header = _header(path) if header is None else header
    order = {name: i for i, name in enumerate(taps.tap_names(spec))}
    for name in header:
        try:
            taps.validate(spec, name)
        except TapError as exc:
            raise TapError(f"{path.name}: {exc}") from None
    if "logits" not in header:
        raise TapError(f"{path.name}: tap 'logits' is missing (it is required in every phase)")
    # Prefill's token count is the logits' rows; a decode step always carries exactly one token.
    logits_shape = header["logits"][1]
    tokens = logits_shape[0] if phase == "prefill" and len(logits_shape) == 2 and logits_shape[0] > 0 else 1
    for name, (dtype, shape) in header.items():
        if dtype not in TAP_DTYPES:
            raise TapError(f"{path.name}: tap {name!r} has dtype {dtype}; expected F32 or BF16")
        expected = taps.shape(spec, name, tokens)
        if shape != expected:
            raise TapError(
                f"{path.name}: tap {name!r} has shape {list(shape)}, expected {list(expected)} "
                f"([tokens, features] for {spec.key}, {phase})"
            )
    return sorted(header, key=order.__getitem__), tokens


@dataclass(frozen=True)
class Trace:
    """A validated trace directory; tensors are loaded per phase by :meth:`load`."""

    path: Path
    model: str
    scale: str
    seed: int
    decode_steps: int
    spec: model_spec.ModelSpec
    phase_taps: Mapping[str, tuple[str, ...]]
    prefill_tokens: int
    weights_path: Path | None = None
    inputs_path: Path | None = None

    @property
    def phases(self) -> list[str]:
        return taps.phase_names(self.decode_steps)

    def expect_model(self, model_id: str, scale: str | None = None) -> None:
        """Raise HarnessError unless the trace names ``model_id`` (and ``scale`` when given)."""
        if self.model != model_id:
            raise HarnessError(f"{self.path / TRACE_JSON}: trace.json names {self.model}, expected {model_id}")
        if scale is not None and self.scale != scale:
            raise HarnessError(
                f"{self.path / TRACE_JSON}: trace.json names scale {self.scale}, expected {scale}"
            )

    def load(self, phase: str) -> dict[str, np.ndarray]:
        """The recorded taps of ``phase`` as float32 arrays, in canonical execution order."""
        if phase not in self.phase_taps:
            raise HarnessError(f"trace {self.path}: no phase {phase!r}; it has {', '.join(self.phases)}")
        path = _regular_inside(self.path, phase_file(phase), "phase file")
        with _open(path) as f:  # re-checked on the very descriptor read: the files may have changed since
            names, _ = _check_phase(self.spec, path, phase, {k: f.dtype_shape(k) for k in f.keys()})
            if tuple(names) != self.phase_taps[phase]:
                raise HarnessError(f"{path}: changed since the trace was read (its taps differ)")
            return {name: f.get_tensor(name).astype(np.float32) for name in names}

    def inputs(self) -> dict[str, np.ndarray] | None:
        """``input_ids`` and ``decode_tokens`` from inputs.safetensors, or None when absent."""
        if self.inputs_path is None:
            return None
        with _open(_regular_inside(self.path, INPUTS_FILE, "file")) as f:
            return {k: f.get_tensor(k).astype(np.int64) for k in f.keys()}

    def load_weights(self) -> dict[str, np.ndarray] | None:
        """The weights the trace names (HF parameter names -> float32; a checkpoint folder's
        ``*.safetensors`` shards are merged), or None."""
        if self.weights_path is None:
            return None
        out: dict[str, np.ndarray] = {}
        for path in _weights_files(self.path, self.weights_path):
            with _open(path) as f:
                out.update({k: f.get_tensor(k).astype(np.float32) for k in f.keys()})
        return out


def _shard_names(root: Path, folder: Path) -> list[str]:
    """The safetensors shards of a checkpoint folder (through its index when sharded), as names
    relative to the trace root; the index itself is read bounded."""
    rel = folder.relative_to(root)
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        _regular_inside(root, str(rel / index.name), "checkpoint index")
        try:
            weight_map = json.loads(read_bounded(index, MAX_JSON_BYTES, "checkpoint index"))["weight_map"]
            names = sorted({str(rel / Path(str(n))) for n in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise HarnessError(f"{index}: not a safetensors index ({exc})") from None
    else:
        names = sorted(str(rel / p.name) for p in folder.glob("*.safetensors"))
    if not names:
        raise HarnessError(f"trace {root}: checkpoint folder {rel} holds no *.safetensors shard")
    return names


def _weights_files(root: Path, weights: Path) -> list[Path]:
    """Every file the trace's weights consist of, each inside the trace and a regular file, its size
    what its safetensors header describes (a checkpoint folder: config.json and every shard, found by
    globbing or through the index)."""
    rel = str(weights.relative_to(root))
    if not weights.is_dir():
        path = _regular_inside(root, rel, "weights file")
        _header(path)
        return [path]
    if weights.resolve() == root.resolve():
        raise HarnessError(f"trace {root}: 'weights' names the trace directory itself; name a checkpoint folder in it")
    _refuse_pickles(weights)
    if not os.path.lexists(weights / "config.json"):
        raise HarnessError(f"trace {root}: checkpoint folder {rel} has no config.json (a Hugging Face checkpoint "
                           "folder holds config.json and *.safetensors)")
    _regular_inside(root, str(Path(rel) / "config.json"), "checkpoint config")
    read_bounded(weights / "config.json", MAX_JSON_BYTES, "checkpoint config")
    shards = [_regular_inside(root, name, "checkpoint shard") for name in _shard_names(root, weights)]
    for shard in shards:
        _header(shard)
    return shards


def _check_inputs(root: Path, meta: dict[str, Any], prefill_tokens: int) -> Path | None:
    path = _inside(root, INPUTS_FILE, "file")
    if not os.path.lexists(path):
        return None
    _regular_inside(root, INPUTS_FILE, "file")
    header = _header(path)
    expected = {"input_ids": (prefill_tokens,), "decode_tokens": (meta["decode_steps"],)}
    for key, shape in expected.items():
        if key not in header:
            raise HarnessError(f"{path.name}: {key!r} is missing")
        dtype, got = header[key]
        if dtype not in ("I64", "I32") or got != shape:
            raise HarnessError(f"{path.name}: {key!r} is {dtype} {list(got)}, expected I64 {list(shape)}")
    return path


def read_trace(directory: str | os.PathLike) -> Trace:
    """Read and validate a trace directory; raises HarnessError naming the file and tap at fault."""
    root = Path(directory)
    if not root.is_dir():
        raise HarnessError(f"trace directory {root} does not exist or is not a directory")
    meta = _read_json(root)
    try:
        spec = model_spec.get(meta["model"], meta["scale"])
    except HarnessError as exc:
        raise HarnessError(f"{root / TRACE_JSON}: {exc}") from None
    _refuse_pickles(root)
    phases = taps.phase_names(meta["decode_steps"])
    phase_taps: dict[str, tuple[str, ...]] = {}
    prefill_tokens = 0
    for phase in phases:
        path = _inside(root, phase_file(phase), "phase file")
        if not os.path.lexists(path):
            raise HarnessError(f"trace {root}: {path.name} is missing (trace.json says decode_steps={meta['decode_steps']})")
        _regular_inside(root, phase_file(phase), "phase file")
        names, tokens = _check_phase(spec, path, phase)
        phase_taps[phase] = tuple(names)
        if phase == "prefill":
            prefill_tokens = tokens
    extra = sorted(
        p.name for p in root.glob("decode.*.safetensors") if p.name[: -len(".safetensors")] not in phases
    )
    if extra:
        raise HarnessError(
            f"trace {root}: unexpected phase file(s) {', '.join(extra)}: trace.json says "
            f"decode_steps={meta['decode_steps']}"
        )
    weights = None
    if meta.get("weights"):
        # A safetensors file (what prepare_inputs writes) or a HF checkpoint folder inside the trace.
        weights = _inside(root, meta["weights"], "weights file")
        if not os.path.lexists(weights):
            raise HarnessError(f"{root / TRACE_JSON}: weights {meta['weights']!r} does not exist")
        _weights_files(root, weights)
    return Trace(
        path=root, model=meta["model"], scale=meta["scale"], seed=meta["seed"],
        decode_steps=meta["decode_steps"], spec=spec, phase_taps=phase_taps,
        prefill_tokens=prefill_tokens, weights_path=weights,
        inputs_path=_check_inputs(root, meta, prefill_tokens),
    )


def gate_settings(directory: str | os.PathLike, model: str, scale: str, weights=None) -> dict[str, Any]:
    """Validate the trace and check it records ``model`` at ``scale`` (HarnessError otherwise, before any
    golden is built); the gate settings that select the golden it is judged against: its seed, decode
    steps, prompt length and, when it names a checkpoint folder, those weights (else ``weights``)."""
    trace = read_trace(directory)
    if (trace.model, trace.scale) != (model, scale):
        raise HarnessError(f"--trace {directory}: trace.json records {trace.model} at scale {trace.scale}, not "
                           f"{model} at scale {scale} (pass --model {trace.model} --scale {trace.scale})")
    folder = trace.weights_path if trace.weights_path is not None and trace.weights_path.is_dir() else None
    return {"seed": trace.seed, "decode_steps": trace.decode_steps, "prompt_len": trace.prefill_tokens,
            "weights": folder or weights}


class TraceDeployment:
    """A contract deployment that replays a trace's recorded tensors through ``tap``.

    Only meaningful in cumulative mode: the recorded values cannot react to golden values handed back
    by an isolated-mode ``tap``.
    """

    supports_isolated = False

    def __init__(self, trace: Trace):
        self.trace = trace
        self._inputs = trace.inputs()
        self._step = 0

    def _replay(self, phase: str, tap: Tap) -> np.ndarray:
        logits = None
        for name, value in self.trace.load(phase).items():
            out = tap(name, value)
            if name == "logits":
                logits = value if out is None else np.asarray(out)
        assert logits is not None  # read_trace guarantees every phase has logits
        return logits

    def prefill(self, input_ids: np.ndarray, tap: Tap) -> np.ndarray:
        """Replay the recorded prefill; starts a new sequence."""
        ids = np.asarray(input_ids).reshape(-1)
        if len(ids) != self.trace.prefill_tokens:
            raise HarnessError(
                f"trace {self.trace.path}: prefill.safetensors holds {self.trace.prefill_tokens} tokens, "
                f"the check asked for {len(ids)}: the trace was recorded for another prompt"
            )
        if self._inputs is not None and not np.array_equal(self._inputs["input_ids"], ids):
            raise HarnessError(
                f"trace {self.trace.path}: {INPUTS_FILE} input_ids differ from the check's prompt "
                f"(first difference at position {int(np.argmax(self._inputs['input_ids'] != ids))})"
            )
        self._step = 0
        return self._replay("prefill", tap)

    def decode(self, token_id: int, tap: Tap) -> np.ndarray:
        """Replay the next recorded decode step."""
        step = self._step
        if step >= self.trace.decode_steps:
            raise HarnessError(
                f"trace {self.trace.path}: holds {self.trace.decode_steps} decode steps; "
                f"decode was called for step {step}"
            )
        if self._inputs is not None and int(self._inputs["decode_tokens"][step]) != int(token_id):
            raise HarnessError(
                f"trace {self.trace.path}: decode step {step} was recorded for token "
                f"{int(self._inputs['decode_tokens'][step])}, the check feeds {int(token_id)}"
            )
        self._step += 1
        return self._replay(f"decode.{step}", tap)


def trace_factory(directory: str | os.PathLike) -> Callable[[model_spec.ModelSpec, Any], TraceDeployment]:
    """A deployment factory ``factory(spec, weights)`` replaying the trace in ``directory``.

    The trace is validated now; the factory refuses a spec naming another model or scale. ``weights``
    is ignored: the recorded tensors already embody the weights the external program used.
    """
    trace = read_trace(directory)

    def factory(spec: model_spec.ModelSpec, weights: Any = None) -> TraceDeployment:
        trace.expect_model(spec.id, spec.scale)
        return TraceDeployment(trace)

    factory.trace = trace  # type: ignore[attr-defined]  # lets callers (CLI, check_trace) read model/scale
    return factory


# -- writing ------------------------------------------------------------------------------------


def _unwritable(root: Path, exc: OSError, what: str = "trace") -> HarnessError:
    return HarnessError(f"{what}: cannot write {exc.filename or root} ({os_reason(exc)}); "
                        "choose a directory this user can write")


def _tap_array(value: np.ndarray) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.dtype(ml_dtypes.bfloat16):
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _save(path: Path, tensors: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _inputs_tensors(input_ids: np.ndarray, decode_tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64).reshape(-1)),
        "decode_tokens": np.ascontiguousarray(np.asarray(decode_tokens, dtype=np.int64).reshape(-1)),
    }


def write_trace(
    directory: str | os.PathLike,
    model: str,
    scale: str,
    seed: int,
    decode_steps: int,
    phases: Mapping[str, Mapping[str, np.ndarray]],
    input_ids: np.ndarray | None = None,
    decode_tokens: np.ndarray | None = None,
    overwrite: bool = False,
) -> Trace:
    """Write a trace directory atomically (temp dir + rename) and return it read back.

    ``phases`` maps ``prefill`` / ``decode.<i>`` to {tap name: [tokens, features]}; bf16 arrays stay
    bf16, anything else is stored as float32. ``input_ids`` / ``decode_tokens`` (optional) go to
    inputs.safetensors so the replay can check it is fed the same tokens. An existing ``directory`` is
    replaced only with ``overwrite=True`` (default False). The result is validated before the rename,
    so a writer bug never leaves a half-valid trace behind.
    """
    root = Path(directory)
    if root.exists() and not overwrite:
        raise HarnessError(f"trace directory {root} already exists (pass overwrite=True to replace it)")
    expected = set(taps.phase_names(decode_steps))
    if set(phases) != expected:
        raise HarnessError(
            f"write_trace({root}): phases {sorted(phases)} do not match decode_steps={decode_steps} "
            f"(expected {sorted(expected)})"
        )
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    except OSError as exc:
        raise _unwritable(root, exc) from None
    try:
        _write_json(tmp / TRACE_JSON, {"model": model, "scale": scale, "seed": seed, "decode_steps": decode_steps})
        for phase, tensors in phases.items():
            _save(tmp / phase_file(phase), {k: _tap_array(v) for k, v in tensors.items()})
        if input_ids is not None and decode_tokens is not None:
            _save(tmp / INPUTS_FILE, _inputs_tensors(input_ids, decode_tokens))
        read_trace(tmp)
        if root.exists():
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old)
        else:
            os.rename(tmp, root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(root, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_trace(root)


def expected_files(spec: model_spec.ModelSpec, seed: int, decode_steps: int, prompt_tokens: int,
                   weights: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """What a trace of ``spec`` must hold, as ``prepare`` writes it to expected.json: the files to
    read (inputs, weights, config) and, per phase file, every tap in execution order with its shape and
    whether the contract requires it."""
    required = set(taps.required_taps(spec))

    def phase(name: str) -> dict[str, Any]:
        tokens = prompt_tokens if name == "prefill" else 1
        return {"file": phase_file(name), "phase": name, "tokens": tokens,
                "taps": [{"name": t, "shape": list(taps.shape(spec, t, tokens)), "required": t in required}
                         for t in taps.tap_names(spec)]}

    return {
        "schema": 1,
        "model": spec.id, "scale": spec.scale, "seed": seed, "decode_steps": decode_steps,
        "prompt_tokens": prompt_tokens,
        "config": CONFIG_FILE,
        "read": {
            INPUTS_FILE: {"input_ids": {"dtype": "I64", "shape": [prompt_tokens]},
                          "decode_tokens": {"dtype": "I64", "shape": [decode_steps]}},
            WEIGHTS_FILE: {name: {"dtype": "BF16", "shape": list(np.shape(v))} for name, v in (weights or {}).items()},
        },
        "write": [phase(name) for name in taps.phase_names(decode_steps)],
        "tap_dtypes": list(TAP_DTYPES),
        "layout": "2-D [tokens, features]; per-head taps flattened head-major (head * head_dim + d)",
    }


def prepare_inputs(
    directory: str | os.PathLike,
    spec: model_spec.ModelSpec,
    seed: int,
    decode_steps: int,
    input_ids: np.ndarray,
    decode_tokens: np.ndarray,
    weights: Mapping[str, np.ndarray],
) -> Path:
    """Write what an external program needs to produce a trace of ``spec``.

    Writes inputs.safetensors (``input_ids`` int64 [T], ``decode_tokens`` int64 [N]),
    weights.safetensors (HF parameter names, bf16), config.json (the scaled model's Hugging Face
    config: heads, head_dim, rope theta, eps ...), expected.json (every file, tap and shape the
    program must write) and, last, a trace.json skeleton naming them; the program then adds one
    safetensors file per phase. Each file is written to a temporary name and renamed. Weights must be
    bf16-representable (the harness's always are), else the program would run other weights than the
    golden: that raises HarnessError. A directory already holding phase files is refused (they would
    be stale).
    """
    root = Path(directory)
    tokens = _inputs_tensors(input_ids, decode_tokens)
    if len(tokens["decode_tokens"]) != decode_steps:
        raise HarnessError(
            f"prepare_inputs({root}): {len(tokens['decode_tokens'])} decode tokens for decode_steps={decode_steps}"
        )
    if tokens["input_ids"].size and (tokens["input_ids"].min() < 0 or tokens["input_ids"].max() >= spec.vocab_size):
        raise HarnessError(f"prepare_inputs({root}): input_ids outside [0, {spec.vocab_size}) for {spec.key}")
    bf16 = {}
    for name, value in weights.items():
        w32 = np.asarray(value, dtype=np.float32)
        w16 = w32.astype(ml_dtypes.bfloat16)
        if not np.array_equal(w16.astype(np.float32), w32, equal_nan=True):
            raise HarnessError(f"prepare_inputs({root}): weight {name!r} is not bf16-representable")
        bf16[name] = np.ascontiguousarray(w16)
    try:
        root.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in root.glob("*.safetensors") if p.name.startswith(("prefill.", "decode.")))
        if stale:
            raise HarnessError(f"trace prepare {root}: already holds phase files ({', '.join(stale[:3])}"
                               f"{' ...' if len(stale) > 3 else ''}) from an earlier run; remove them or "
                               "prepare into an empty directory")
        _save(root / INPUTS_FILE, tokens)
        _save(root / WEIGHTS_FILE, bf16)
        _write_json(root / CONFIG_FILE, spec.config)
        _write_json(root / EXPECTED_FILE, expected_files(spec, seed, decode_steps, len(tokens["input_ids"]), bf16))
        _write_json(  # last: the skeleton names files that now exist
            root / TRACE_JSON,
            {"model": spec.id, "scale": spec.scale, "seed": seed, "decode_steps": decode_steps, "weights": WEIGHTS_FILE},
        )
    except OSError as exc:
        raise _unwritable(root, exc, "trace prepare") from None
    return root
