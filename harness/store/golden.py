"""The golden store: captured reference taps plus a manifest, written atomically, verified on load.

Layout of one entry (``<root>/<model folder>/<scale>/seed<seed>-<key16>/``):

- ``manifest.json``: model, scale, seed, weights digest, token ids, dtypes, library versions, the full key
  and, per file, its size and the sha256 of every 16 MiB block;
- ``<phase>.safetensors`` per phase (``prefill``, ``decode.0`` ...), keys ``fp32/<tap>`` (the golden) and
  ``bf16/<tap>`` (the HF bf16 run: the cumulative-mode noise baseline, stored as bfloat16, lossless);
- ``local/``: built on first use by isolated mode, the teacher-forced bf16 run (each op in bf16 on the
  golden inputs), with its own manifest;
- ``local-<kinds>/`` (a "chain" baseline, e.g. ``local-act``): built on first use when an isolated-mode
  deployment keeps taps to itself (unexposed or observe-only): the same bf16 run with exactly those taps
  left unforced, so the ops after them read bf16 values as the deployment's read its own
  (``GoldenStore.ensure_chain``; docs/policies.md, "Taps downstream of an unexposed one"). Its manifest
  names the unforced taps; a set that is not "every tap of these kinds in every phase" gets a hash suffix.

The key hashes everything that determines the tensors (model config, seed, weights digest, tokens,
decode steps, library versions, capture version and, for a sampled golden, its storage mode), so a stale
golden is never reused. A build streams: the reference runs block by block on a meta-device model and
every tap is written to phase files declared up front as it is captured (harness/reference/streaming.py,
harness/store/streamwrite.py); ``--rows sampled`` keeps a bounded set of prefill rows. Builds happen in a
temporary directory renamed into place under a file lock: parallel pytest-xdist workers build once, and a
crash leaves nothing half-written. Every file's block sha256s are checked on load: a truncated, edited or missing
file raises GoldenCorrupt naming the file, never a comparison.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes  # noqa: F401  registers NumPy's "bfloat16" dtype, which safetensors needs to read bf16
import numpy as np

from harness.errors import GoldenCorrupt, HarnessError
from harness.store import signing  # optional keyed signatures over manifests
from harness.fileio import MappedSafetensors, block_digest_tasks, block_matches
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec, folder_name, get
from harness.weights import WeightsSource, build_source, close_source, weights_digest

CAPTURE_VERSION = 2  # 2: block-wise sha256 in the manifest
MANIFEST = "manifest.json"
LOCAL_DIR = "local"
CHAIN_PREFIX = "local-"  # chain baselines: local-<kinds joined by +>[-<hash>]
VARIANTS = ("fp32", "bf16")
ENV_DIR = "NPU_HARNESS_GOLDEN_DIR"
HASH_THREADS = 2

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def project_root() -> Path:
    """The project's ``golden/`` folder in a source checkout; for an installed wheel (no
    ``pyproject.toml`` beside the package) ``$XDG_CACHE_HOME/npu-harness/golden`` (``~/.cache/...``), so
    goldens never land inside a virtual environment, where reinstalling the package would delete them."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return checkout / "golden"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "npu-harness" / "golden"


def default_root() -> Path:
    """``$NPU_HARNESS_GOLDEN_DIR``, else the project's ``golden/`` folder."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else project_root()


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from harness.version import __version__

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "harness": __version__,
        "python": platform.python_version(),
        "torch_threads": str(torch.get_num_threads()),  # BLAS fp32 sums split by thread: last-bit effects
    }


@dataclass(frozen=True)
class GoldenRequest:
    """Everything a golden set is built from."""

    model: str
    scale: str = "tiny"
    seed: int = 0
    decode_steps: int = 4
    prompt_len: int | None = None  # None: the scale's default
    weights: WeightsSource = field(default_factory=WeightsSource)
    rows: str = "full"  # "sampled": prefill keeps the first and last tile and a seeded sample (streamwrite)

    @property
    def spec(self) -> ModelSpec:
        return get(self.model, self.scale)

    @property
    def tokens(self) -> int:
        return self.prompt_len or self.spec.default_prompt_len

    def identity(self) -> dict:
        spec = self.spec
        storage = {"storage": self.rows} if self.rows != "full" else {}  # full keys stay what they were
        return {
            **storage,
            "capture_version": CAPTURE_VERSION,
            "model": self.model,
            "scale": self.scale,
            "config": spec.config,
            "seed": self.seed,
            "prompt_len": self.tokens,
            "decode_steps": self.decode_steps,
            "weights_digest": weights_digest(spec, self.weights, self.seed),
            "versions": {k: v for k, v in _versions().items() if k in ("torch", "transformers")},
        }

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


class GoldenSet:
    """A verified golden entry: tokens, phases and lazily memory-mapped tensors."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._handles: dict[Path, object] = {}
        self._local_ok = False
        self._chains_ok: set[str] = set()  # chain baselines (local-<kinds>) verified for this set

    # -- identity --------------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return get(self.manifest["model"], self.manifest["scale"])

    @property
    def input_ids(self) -> np.ndarray:
        return np.asarray(self.manifest["input_ids"], dtype=np.int64)

    @property
    def decode_tokens(self) -> np.ndarray:
        return np.asarray(self.manifest["decode_tokens"], dtype=np.int64)

    @property
    def phases(self) -> list[str]:
        return list(self.manifest["phases"])

    @property
    def has_local(self) -> bool:
        return (self.path / LOCAL_DIR / MANIFEST).is_file()

    # -- tensors ---------------------------------------------------------------------------------
    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            if not path.is_file():
                raise GoldenCorrupt(f"golden file missing: {path}")
            handle = self._handles[path] = MappedSafetensors(path)
        return handle

    def tap_names(self, phase: str) -> list[str]:
        keys = self._open(self.path / f"{phase}.safetensors").keys()
        return [k.split("/", 1)[1] for k in keys if k.startswith("fp32/")]

    def tensor(self, phase: str, tap: str, variant: str = "fp32") -> np.ndarray:
        """One tap of one phase: ``fp32`` golden, ``bf16`` baseline, ``local`` teacher-forced baseline or a
        ``local-<kinds>`` chain baseline (GoldenStore.ensure_chain)."""
        if variant == "local":
            if not self._local_ok:
                raise HarnessError(f"{self.path}: local baseline not built (GoldenStore.ensure_local)")
            path, key = self.path / LOCAL_DIR / f"{phase}.safetensors", f"bf16/{tap}"
        elif variant.startswith(CHAIN_PREFIX):
            if variant not in self._chains_ok:
                raise HarnessError(f"{self.path}: chain baseline {variant} not built (GoldenStore.ensure_chain)")
            path, key = self.path / variant / f"{phase}.safetensors", f"bf16/{tap}"
        else:
            path, key = self.path / f"{phase}.safetensors", f"{variant}/{tap}"
        handle = self._open(path)
        try:
            return handle.read_tensor(key, np.float32)  # a copy; the mapped pages leave resident memory
        except KeyError:
            raise HarnessError(f"{path}: no tensor {key!r}") from None

    def rows(self, phase: str) -> np.ndarray | None:
        """The prompt rows a sampled golden stores for ``phase`` (sorted int64 indices), or None when
        the phase's taps are stored whole."""
        rows = self.manifest.get("rows", {}).get(phase)
        return None if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def sampled(self) -> bool:
        return self.manifest.get("storage") == "sampled"

    def phase_tensors(self, phase: str, variant: str = "fp32") -> dict[str, np.ndarray]:
        return {name: self.tensor(phase, name, variant) for name in self.tap_names(phase)}

    def close(self) -> None:
        self._handles.clear()


_KEY_FROM_ENV = object()


def baseline_dirs(path: Path) -> list[Path]:
    """The baseline directories inside entry ``path``: ``local/`` and every chain baseline ``local-*/``
    (a build's temporary ``.tmp-local-*`` is not one)."""
    dirs = [path / LOCAL_DIR] if (path / LOCAL_DIR).exists() else []
    return dirs + sorted(d for d in path.glob(CHAIN_PREFIX + "*") if d.is_dir())


def chain_name(spec: ModelSpec, phases: list[str], unforced: dict[str, set[str] | list[str]]) -> str:
    """The directory of the chain baseline that leaves ``unforced`` (phase -> tap names) unforced:
    ``local-<kinds sorted, joined by +>`` when that is every tap of those kinds in every phase, else the
    same with ``-<12 hex digits>`` of the exact set appended."""
    kinds = sorted({tapspec.parse(n).kind for names in unforced.values() for n in names})
    if not kinds:
        raise HarnessError("a chain baseline needs at least one unforced tap")
    name = CHAIN_PREFIX + "+".join(kinds)
    every = {n for n in tapspec.tap_names(spec) if tapspec.parse(n).kind in kinds}
    if all(set(unforced.get(p, ())) == every for p in phases) and set(unforced) <= set(phases):
        return name
    exact = json.dumps({p: sorted(unforced[p]) for p in sorted(unforced) if unforced[p]}, sort_keys=True)
    return f"{name}-{hashlib.sha256(exact.encode()).hexdigest()[:12]}"


def verify_dir(path: Path, key: bytes | None | object = _KEY_FROM_ENV) -> list[str]:
    """Problems of one entry directory (and its baselines, ``baseline_dirs``): each names the file.
    Empty = intact.

    With a signing key (``key``, by default the configured one: harness.store.signing) each manifest
    must also carry a valid signature; those problems are ``signing.SignatureProblem`` strings.
    """
    key = signing.signing_key() if key is _KEY_FROM_ENV else key
    problems: list[str] = []
    for d in [path] + baseline_dirs(path):
        problems.extend(_verify_one(d, key))
    return problems


def _verify_one(d: Path, key: bytes | None) -> list[str]:
    """Problems of one directory holding a manifest and the files it lists."""
    mpath = d / MANIFEST
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
        files = manifest["files"]
        for record in files.values():  # {"size", "block", "sha256": [one per block]}
            int(record["size"]), int(record["block"]), list(record["sha256"])
    except FileNotFoundError:
        return [f"{mpath}: manifest missing"]
    except OSError as exc:
        return [f"{mpath}: cannot read ({exc.strerror or exc}); make the store readable by this user"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"{mpath}: manifest unreadable ({type(exc).__name__}: {exc})"]
    present = {name: d / name for name in files if (d / name).is_file()}
    problems = [f"{d / name}: missing" for name in files if name not in present]
    wrong_size = {name for name in present if present[name].stat().st_size != files[name]["size"]}
    tasks = [t for name in present if name not in wrong_size for t in block_digest_tasks(present[name], files[name])]
    # One sha256 per 16 MiB block: both cores verify even the one big prefill file.
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        bad = {task[0] for task, ok in zip(tasks, pool.map(block_matches, tasks)) if not ok}
    problems.extend(f"{present[name]}: sha256 mismatch (truncated or edited)"
                    for name in files if name in wrong_size or present.get(name) in bad)
    problems.extend(signing.problems(d, raw, key))
    return problems


def _write_manifest(tmp: Path, manifest: dict) -> None:
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


@contextmanager
def _store_errors(root: Path, action: str = "write to"):
    """An OSError while building or cleaning (read-only store, a parent that is a file, disk full)
    becomes one HarnessError naming the path and the fix."""
    from harness.fileio import os_reason

    try:
        yield
    except OSError as exc:
        where = exc.filename or root
        raise HarnessError(f"golden store {root}: cannot {action} {where} ({os_reason(exc)}); use a writable "
                           f"directory: --golden-dir DIR or {ENV_DIR}") from None


class GoldenStore:
    """Golden entries under ``root`` (default: ``$NPU_HARNESS_GOLDEN_DIR`` or ``golden/``)."""

    def __init__(self, root: str | Path | None = None, *, cache: str | Path | None = None,
                 cache_max: str | int | None = None):
        # Fleet: an s3:// (fsspec) root is a remote store served through a local cache (harness/store/remote.py).
        from harness.store.remote import RemoteStore, remote_url

        url = remote_url(root or os.environ.get(ENV_DIR))
        self.remote = RemoteStore(url, cache_dir=cache, cache_max=cache_max) if url else None
        self.root = self.remote.cache_root if self.remote else Path(root) if root else default_root()

    # -- paths and locking -------------------------------------------------------------------------
    def entry_dir(self, request: GoldenRequest) -> Path:
        return self.root / folder_name(request.model) / request.scale / f"seed{request.seed}-{request.key()[:16]}"

    @contextmanager
    def _lock(self, path: Path):
        """Hold the entry's file lock; an OSError from here to the end of the block (the lock, the
        build's writes) is one HarnessError naming the path and the fix (``_store_errors``)."""
        from filelock import FileLock

        with _store_errors(self.root):
            lock_dir = self.root / ".locks"
            lock_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock_dir / (path.name + "-" + path.parent.parent.name + ".lock"))):
                yield

    # -- public API --------------------------------------------------------------------------------
    def load(self, path: str | Path) -> GoldenSet:
        """Load and verify an entry; raises GoldenCorrupt naming the first bad file."""
        path = Path(path)
        key = signing.signing_key()
        problems = verify_dir(path, key)
        if problems:
            what = "not trusted" if all(isinstance(p, signing.SignatureProblem) for p in problems) else "corrupt"
            raise GoldenCorrupt(f"golden entry is {what}: " + "; ".join(problems))
        raw = (path / MANIFEST).read_bytes()
        if signing.problems(path, raw, key):  # the manifest used is the one whose signature was checked
            raise GoldenCorrupt(f"golden entry is not trusted: {path / MANIFEST} changed while it was verified")
        golden = GoldenSet(path, json.loads(raw))
        golden._local_ok = golden.has_local
        return golden

    def has(self, request: GoldenRequest) -> bool:
        """Whether ``request``'s entry is in this store's local directory (a complete one: its manifest,
        written last, is there). Nothing is verified or downloaded."""
        return (self.entry_dir(request) / MANIFEST).is_file()

    def get(self, request: GoldenRequest, *, build: bool = True, progress: Progress | None = None) -> GoldenSet:
        """The golden set of ``request``, built once (under a lock) if absent and ``build``. An entry found
        in the store (or downloaded) is verified here; one this call built is not read back (its hashes
        are of the bytes it handed to its files): the next load, and phase 0 of any gate, verify it."""
        from harness.store.bounds import check_machine, check_request

        from harness.store.streamwrite import check_rows

        check_rows(request.rows)
        check_request(request.spec, request.seed, request.prompt_len, request.decode_steps)
        path = self.entry_dir(request)
        if self.has(request):
            from harness.store.eviction import touch

            touch(path)  # last use: least recently used entries leave first (golden clean, the remote's cache)
            return self.load(path)
        if not build and not self.remote:
            raise HarnessError(f"no golden for {request.model}/{request.scale} seed {request.seed} in {self.root} "
                               f"(run `harness golden build --model {request.model} --scale {request.scale}`)")
        check_machine(request.spec, request.tokens, request.decode_steps, self.root, request.rows)  # before anything is written
        built = False
        with self._lock(path):
            if not (path / MANIFEST).is_file():
                if self.remote:  # download it, or build it once across machines and publish it
                    self.remote.fill(path.relative_to(self.root).as_posix(), path, tmpdir=self._tmpdir,
                                     build=(lambda: self._build(request, path, progress)) if build else None)
                else:
                    self._build(request, path, progress)
                    built = True
        if built:  # re-hashing every byte just written (2.3 GB at 2048 tokens) would only read the page cache
            return GoldenSet(path, json.loads((path / MANIFEST).read_bytes()))
        return self.load(path)

    def ensure_local(self, golden: GoldenSet, progress: Progress | None = None) -> GoldenSet:
        """Build the isolated-mode local baseline of ``golden`` if absent (atomic, locked)."""
        if golden.has_local:
            golden._local_ok = True
            return golden
        with self._lock(golden.path):
            if not golden.has_local:
                self._build_local(golden, progress)
                if self.remote:  # fleet: publish it for the other machines
                    self.remote.upload(golden.path.relative_to(self.root).as_posix(), golden.path, local_only=True)
        return self.load(golden.path)

    def ensure_chain(self, golden: GoldenSet, unforced: dict[str, set[str] | list[str]],
                     progress: Progress | None = None) -> str:
        """The chain baseline of ``golden`` that leaves the taps ``unforced`` (phase -> names) unforced and
        forces every other tap to the fp32 golden, built once if absent (atomic, locked) and verified;
        returns its variant name for ``GoldenSet.tensor`` (``local-<kinds>``, ``chain_name``). Built in
        this store only (a remote store's chain baselines stay in the machine's cache)."""
        name = chain_name(golden.spec, golden.phases, unforced)
        wanted = {p: sorted(v) for p, v in sorted(unforced.items()) if v}
        if name in golden._chains_ok:
            return name
        d = golden.path / name
        if not (d / MANIFEST).is_file():
            with self._lock(golden.path):
                if not (d / MANIFEST).is_file():
                    self._build_chain(golden, name, wanted, progress)
        problems = _verify_one(d, signing.signing_key())
        if problems:
            raise GoldenCorrupt("chain baseline is corrupt: " + "; ".join(problems))
        try:
            manifest = json.loads((d / MANIFEST).read_bytes())
        except (OSError, json.JSONDecodeError) as exc:
            raise GoldenCorrupt(f"{d / MANIFEST}: unreadable ({exc})") from None
        if manifest.get("unforced") != wanted or manifest.get("key") != golden.manifest["key"]:
            raise GoldenCorrupt(f"{d / MANIFEST}: not the chain baseline of this entry with these unforced taps "
                                f"(edited); remove {d} to rebuild it")
        golden._chains_ok.add(name)
        return name

    def entries(self) -> Iterator[tuple[Path, dict | None]]:
        """Every entry directory with its manifest (None when unreadable)."""
        if not self.root.is_dir():
            return
        for mpath in sorted(self.root.glob(f"*/*/*/{MANIFEST}")):
            try:
                yield mpath.parent, json.loads(mpath.read_text())
            except (json.JSONDecodeError, OSError):
                yield mpath.parent, None
        for d in sorted(self.root.glob("*/*/seed*")):
            if d.is_dir() and not (d / MANIFEST).exists() and not d.name.startswith(".tmp"):
                yield d, None

    def clean(self, model: str | None = None) -> int:
        """Remove entries (of ``model``, or all); returns how many."""
        n = 0
        for path, _ in list(self.entries()):
            if model is None or path.parent.parent.name == folder_name(model):
                with _store_errors(self.root, "remove"):
                    shutil.rmtree(path)
                n += 1
        for tmp in self.root.glob("*/*/.tmp-*") if self.root.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)
        return n

    # -- building ----------------------------------------------------------------------------------
    def _tmpdir(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def _build(self, request: GoldenRequest, path: Path, progress: Progress | None) -> None:
        """Stream the fp32 then the bf16 reference through the entry's phase files, layer by layer."""
        import torch

        from harness.memory import release
        from harness.reference.capture import run_reference
        from harness.reference.prompts import prompt_ids
        from harness.reference.streaming import build_streaming_model
        from harness.store.bounds import build_rooms
        from harness.store.streamwrite import PhaseFiles, sampled_rows

        step = progress or (lambda stage, done, total: None)
        t0 = time.perf_counter()
        key = signing.signing_key()  # an unusable key fails before the build, not after
        spec = request.spec
        ids = prompt_ids(spec, request.seed, request.tokens)
        phases = tapspec.phase_names(request.decode_steps)
        rows = sampled_rows(request.tokens, request.key()) if request.rows == "sampled" else None
        # Before any write: the room the fp32 run keeps converted tensors in, and the larger room its decode
        # steps have once the prompt's activations and logits are gone (a long prompt's are gigabytes).
        resident, decoding = build_rooms(spec, request.tokens, request.decode_steps, request.rows)
        tmp = self._tmpdir(path)
        files: PhaseFiles | None = None
        weights = None
        try:
            step("weights", 0, 4)
            # The source's own weights, read afresh into this build's private copy: never the file or
            # arrays a deployment is handed (harness.weights.build_source).
            weights = build_source(spec, request.weights, request.seed, tmp)
            files = PhaseFiles(tmp, spec, phases, request.tokens, VARIANTS, rows)
            step("fp32 reference", 1, 4)
            fp32 = build_streaming_model(spec, weights, torch.float32, resident, decoding)
            golden = run_reference(fp32, spec, ids, decode_steps=request.decode_steps,
                                   sink=lambda phase, name, t: files.put("fp32", phase, name, t))
            del fp32  # the model and the tensors it kept
            release()  # freed heap goes back before the bf16 run
            step("bf16 reference", 2, 4)
            # Fed known tokens, the bf16 run goes layer-first: each layer's weights (zero-copy views of the
            # bf16 source) are mapped once for every phase, not once per forward, so it keeps nothing.
            run_reference(build_streaming_model(spec, weights, torch.bfloat16), spec, ids,
                          decode_steps=request.decode_steps, decode_tokens=golden.decode_tokens,
                          sink=lambda phase, name, t: files.put("bf16", phase, name, t), layer_first=True)
            step("writing", 3, 4)
            records = files.close()
            close_source(weights)
            weights = None
            (tmp / ".weights.safetensors").unlink(missing_ok=True)
            identity = request.identity()
            manifest = {
                "schema": 1,
                "key": request.key(),
                "model": request.model,
                "scale": request.scale,
                "seed": request.seed,
                "weights": {"source": request.weights.describe(), "digest": identity["weights_digest"]},
                "input_ids": ids.tolist(),
                "decode_tokens": golden.decode_tokens.tolist(),
                "phases": phases,
                "dtypes": {"fp32": "float32", "bf16": "bfloat16"},
                "storage": request.rows,
                **({"rows": {"prefill": rows.tolist()}} if rows is not None else {}),
                "versions": _versions(),
                "identity": identity,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.perf_counter() - t0, 3),
                "files": records,
            }
            _write_manifest(tmp, manifest)
            if key is not None:
                signing.sign(tmp, key)
            os.rename(tmp, path)
        except BaseException:
            if weights is not None:
                close_source(weights)
            if files is not None:
                files.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        step("done", 4, 4)

    def _build_local(self, golden: GoldenSet, progress: Progress | None) -> None:
        """The teacher-forced bf16 run, each op fed the stored fp32 golden's inputs, streamed to disk."""
        self._build_baseline(golden, LOCAL_DIR, lambda phase, name: golden.tensor(phase, name),
                             {"kind": "teacher-forced bf16 baseline"}, "local bf16 baseline", progress)

    def _build_chain(self, golden: GoldenSet, name: str, unforced: dict[str, list[str]],
                     progress: Progress | None) -> None:
        """The bf16 run with the taps of ``unforced`` left to the model and every other tap forced to the
        fp32 golden: the ops after an unforced tap read bf16 values, like a deployment's ops after a tap
        it kept to itself."""
        keep = {p: frozenset(v) for p, v in unforced.items()}
        self._build_baseline(golden, name,
                             lambda phase, tap: None if tap in keep.get(phase, ()) else golden.tensor(phase, tap),
                             {"kind": "chain bf16 baseline", "unforced": unforced}, f"chain bf16 baseline {name}",
                             progress)

    def _build_baseline(self, golden: GoldenSet, dirname: str, force, extra: dict, stage: str,
                        progress: Progress | None) -> None:
        """A bf16 run of ``golden``'s model with ``force(phase, tap)`` (the value to force, or None),
        streamed into ``<entry>/<dirname>/`` with its own manifest (``extra`` added), atomically."""
        import torch

        from harness.reference.capture import run_reference
        from harness.reference.streaming import build_streaming_model
        from harness.store.streamwrite import PhaseFiles

        if golden.manifest.get("storage", "full") != "full":
            raise HarnessError(f"{golden.path}: a sampled golden has no local baseline (isolated mode teacher-forces "
                               "every row, which it does not store); judge it in cumulative mode or build it "
                               "with --rows full")
        step = progress or (lambda stage, done, total: None)
        key = signing.signing_key()
        spec = golden.spec
        source = WeightsSource(golden.manifest["weights"]["source"].removeprefix("checkpoint:")
                               if golden.manifest["weights"]["source"].startswith("checkpoint:") else None)
        steps = len(golden.phases) - 1
        final = golden.path / dirname
        tmp = golden.path / f".tmp-{dirname}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files: PhaseFiles | None = None
        weights = None
        try:
            weights = build_source(spec, source, golden.manifest["seed"], tmp)
            step(stage, 0, 2)
            files = PhaseFiles(tmp, spec, golden.phases, len(golden.input_ids), ("bf16",))
            # Layer-first (the tokens are known): each layer is mapped once for every phase, and nothing
            # is kept beyond it - a gate may build this while a deployment's child holds memory.
            run_reference(build_streaming_model(spec, weights, torch.bfloat16), spec, golden.input_ids,
                          decode_steps=steps, decode_tokens=golden.decode_tokens, force=force,
                          sink=lambda phase, name, t: files.put("bf16", phase, name, t), layer_first=True)
            records = files.close()
            close_source(weights)
            weights = None
            (tmp / ".weights.safetensors").unlink(missing_ok=True)
            _write_manifest(tmp, {"schema": 1, **extra, "key": golden.manifest["key"], "files": records})
            if key is not None:
                signing.sign(tmp, key)
            os.rename(tmp, final)
        except BaseException:
            if weights is not None:
                close_source(weights)
            if files is not None:
                files.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        step("done", 2, 2)
