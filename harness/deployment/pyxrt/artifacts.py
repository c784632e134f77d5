"""Registry of compiled kernel artifacts, keyed by operator and shape, with provenance.

The registry is a JSON file (path is a parameter; e.g. ``kernels/registry.json``); relative paths in it
are relative to its folder::

    {"schema": 1, "kernels": {"gemm[M=128,K=896,N=4864]": {
        "kernel": "MLIR_AIE", "xclbin": "gemm/final.xclbin", "insts": "gemm/insts.bin",   # or "elf"
        "args": [{"name": "a", "direction": "in", "shape": [128, 896], "dtype": "bf16"}, ...],
        "design": "designs/gemm.py", "design_args": ["-M", "128"], "sources": ["kernels/mm.cc"],
        "provenance": {"toolchain": {...}, "sources": {path: sha256}, "artifacts": {role: sha256}, "built": iso}}}}

``resolve`` never hands out a stale artifact: one whose toolchain fingerprint, design sources or
binary differ from what was recorded is rebuilt when mlir-aie is importable, else refused with a
HarnessError naming the artifact and the recorded and current values.

Keys are op-case identities from the op registry (``gemm[M=128,K=896,N=4864]``,
``harness.suites.op_registry``), so phase 1 finds a case's kernel by ``case.id``; the older
``<op>/<shape>`` form (``gemm/M128_K896_N4864``) is still accepted for kernels outside the registry.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import filelock

from harness.deployment.pyxrt import toolchain
from harness.deployment.pyxrt.buffers import ArgSpec
from harness.errors import HarnessError
from harness.fileio import sha256_file, write_atomic

SCHEMA = 1
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.x-]+|\[[A-Za-z0-9_.=,+-]*\])$")


def key_of(op: str, shape_key: str | None = None) -> str:
    """The registry key: ``op`` alone when it is already a whole key (an op-case id), else ``op/shape_key``."""
    return op if shape_key is None else f"{op}/{shape_key}"


def _split(key: str) -> tuple[str, str]:
    """(op, shape part) of ``gemm[M=1,K=2,N=3]`` or ``gemm/M1_K2_N3``."""
    m = re.match(r"^([a-z][a-z0-9_]*)[/\[](.*?)\]?$", key)
    return (m.group(1), m.group(2)) if m else (key, "")
ROLES = ("xclbin", "insts", "elf")


@dataclass(frozen=True)
class Artifact:
    """One compiled kernel: where its binaries are, how to call it and what produced it."""

    key: str
    kernel_name: str
    args: tuple[ArgSpec, ...]
    files: Mapping[str, Path]            # role ("xclbin", "insts" or "elf") -> absolute path
    design: Path | None = None           # the IRON design script (prints MLIR)
    design_args: tuple[str, ...] = ()
    sources: tuple[Path, ...] = ()       # every source whose edit must trigger a rebuild
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return _split(self.key)[0]

    @property
    def shape_key(self) -> str:
        return _split(self.key)[1]

    @property
    def is_elf(self) -> bool:
        return "elf" in self.files


def _hash_sources(sources: Sequence[Path], root: Path, key: str) -> dict[str, str]:
    out = {}
    for src in sources:
        if not src.is_file():
            raise HarnessError(f"kernel artifact {key}: design source {src} is missing")
        out[_rel(src, root)] = sha256_file(src)
    return out


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root) if path.is_absolute() else str(path)


class KernelRegistry:
    """The kernel registry at ``path``. ``fingerprint`` (default: the installed toolchain) and
    ``builder`` (default: mlir-aie's aiecc when importable, else None = refuse stale artifacts) are
    parameters so the policy can be exercised without a toolchain."""

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: Mapping[str, Any] | None = None,
        builder: Callable[[Artifact], None] | None | str = "auto",
    ):
        self.path = Path(path)
        self.root = self.path.resolve().parent
        self._fingerprint = dict(fingerprint) if fingerprint is not None else None
        if builder == "auto":
            builder = self._aiecc_build if toolchain.mlir_aie_available() else None
        self.builder = builder
        self._raw = self._load()
        self._used: dict[str, Artifact] = {}

    # -- file ----------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"schema": SCHEMA, "kernels": {}}
        try:
            raw = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HarnessError(f"kernel registry {self.path}: not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA or not isinstance(raw.get("kernels"), dict):
            raise HarnessError(f"kernel registry {self.path}: expected {{\"schema\": {SCHEMA}, \"kernels\": {{...}}}}")
        for key, entry in raw["kernels"].items():
            self._parse(key, entry)  # validate every entry now, not at first use
        return raw

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self._raw, indent=2, sort_keys=True) + "\n")

    def _abs(self, rel: str) -> Path:
        # normpath, not resolve(): "kernels/../x" must work before kernels/ exists, and symlinks stay as named
        return Path(os.path.normpath(self.root / rel))

    def _parse(self, key: str, entry: Any) -> Artifact:
        where = f"kernel registry {self.path}: entry {key!r}"
        if not _KEY_RE.match(key):
            raise HarnessError(f"{where}: key must be an op-case id, e.g. 'gemm[M=128,K=896,N=4864]', "
                               "or '<op>/<shape>', e.g. 'gemm/M128_K896_N4864'")
        if not isinstance(entry, dict):
            raise HarnessError(f"{where}: expected an object")
        files = {role: self._abs(entry[role]) for role in ROLES if entry.get(role)}
        if set(files) not in ({"xclbin", "insts"}, {"elf"}):
            raise HarnessError(f"{where}: needs 'xclbin' + 'insts', or 'elf' (got {sorted(files) or 'neither'})")
        if not isinstance(entry.get("args"), list) or not entry["args"]:
            raise HarnessError(f"{where}: 'args' must be a non-empty list of argument specs")
        args = tuple(ArgSpec.from_dict(a, f"{where} argument") for a in entry["args"])
        if len({a.name for a in args}) != len(args):
            raise HarnessError(f"{where}: argument names must be unique")
        design = self._abs(entry["design"]) if entry.get("design") else None
        sources = tuple(self._abs(s) for s in entry.get("sources", []))
        if design is not None and design not in sources:
            sources = (design, *sources)
        if not sources:
            raise HarnessError(f"{where}: no 'design' or 'sources': its provenance could not be checked")
        default_name = "main:sequence" if "elf" in files else "MLIR_AIE"
        return Artifact(
            key=key, kernel_name=str(entry.get("kernel", default_name)), args=args, files=files, design=design,
            design_args=tuple(str(a) for a in entry.get("design_args", [])), sources=sources,
            provenance=entry.get("provenance") or {},
        )

    # -- provenance ----------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """The current toolchain fingerprint (computed once per registry)."""
        if self._fingerprint is None:
            self._fingerprint = toolchain.toolchain_fingerprint()
        return dict(self._fingerprint)

    def _current_provenance(self, art: Artifact) -> dict[str, Any]:
        for role, p in art.files.items():
            if not p.is_file():
                raise HarnessError(f"kernel artifact {art.key}: {role} file {p} does not exist")
        return {
            "toolchain": self.fingerprint(),
            "sources": _hash_sources(art.sources, self.root, art.key),
            "artifacts": {role: sha256_file(p) for role, p in art.files.items()},
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def stale_reasons(self, art: Artifact) -> list[str]:
        """Why ``art`` may not be used as is (empty when it is fresh)."""
        reasons = []
        recorded = art.provenance
        for k, (old, new) in toolchain.fingerprint_diff(recorded.get("toolchain", {}), self.fingerprint()).items():
            reasons.append(f"{k} recorded {old!r}, current {new!r}")
        current_sources = _hash_sources(art.sources, self.root, art.key)
        for src, digest in current_sources.items():
            old = recorded.get("sources", {}).get(src)
            if old != digest:
                reasons.append(f"source {src} sha256 recorded {str(old)[:12]}, current {digest[:12]}")
        for role, p in art.files.items():
            if not p.is_file():
                reasons.append(f"{role} file {p} is missing")
                continue
            old = recorded.get("artifacts", {}).get(role)
            digest = sha256_file(p)
            if old != digest:
                reasons.append(f"{role} {p.name} sha256 recorded {str(old)[:12]}, current {digest[:12]}")
        return reasons

    # -- public --------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._raw["kernels"])

    def resolve(self, op: str, shape_key: str | None = None) -> Artifact:
        """The artifact for ``op`` / ``shape_key`` (or the whole key ``op``, e.g. an op-case id), rebuilt
        when stale and mlir-aie is importable."""
        key = key_of(op, shape_key)
        op = _split(key)[0]
        if key not in self._raw["kernels"]:
            same_op = [k for k in self.keys() if _split(k)[0] == op]
            raise HarnessError(
                f"kernel registry {self.path}: no artifact {key!r}"
                + (f"; {op} has {', '.join(same_op)}" if same_op else f"; it has no {op!r} kernels")
            )
        art = self._parse(key, self._raw["kernels"][key])
        reasons = self.stale_reasons(art)
        if reasons:
            if self.builder is None:
                raise HarnessError(
                    f"kernel artifact {key} ({self.path}) is stale and mlir-aie is not importable to rebuild it: "
                    + "; ".join(reasons)
                    + ". Rebuild it with the current toolchain and re-register it; it is never reused as is."
                )
            with filelock.FileLock(str(self.path) + ".lock"):
                self.builder(art)
                art = replace(art, provenance=self._current_provenance(art))
                self._raw["kernels"][key]["provenance"] = art.provenance
                self._save()
        self._used[key] = art
        return art

    def register(
        self,
        op: str,
        shape_key: str | None,
        args: Sequence[ArgSpec],
        files: Mapping[str, str | os.PathLike],
        sources: Sequence[str | os.PathLike] = (),
        design: str | os.PathLike | None = None,
        design_args: Sequence[str] = (),
        kernel_name: str | None = None,
    ) -> Artifact:
        """Add (or replace) an artifact built by the current toolchain, recording its provenance now.
        ``shape_key`` None: ``op`` is the whole key (an op-case id such as ``gemm[M=64,K=896,N=4864]``)."""
        key = key_of(op, shape_key)
        entry: dict[str, Any] = {"args": [a.to_dict() for a in args], "design_args": list(design_args)}
        entry.update({role: _rel(Path(p).resolve(), self.root) for role, p in files.items()})
        entry["sources"] = [_rel(Path(s).resolve(), self.root) for s in sources]
        if design is not None:
            entry["design"] = _rel(Path(design).resolve(), self.root)
        if kernel_name is not None:
            entry["kernel"] = kernel_name
        art = self._parse(key, entry)
        entry["provenance"] = self._current_provenance(art)
        with filelock.FileLock(str(self.path) + ".lock"):
            self._raw["kernels"][key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._save()
        return self._parse(key, entry)

    def provenance(self) -> dict[str, Any]:
        """The current toolchain and the provenance of every artifact resolved so far."""
        return {
            "registry": str(self.path),
            "toolchain": self.fingerprint(),
            "kernels": {k: dict(a.provenance) for k, a in sorted(self._used.items())},
        }

    def _aiecc_build(self, art: Artifact) -> None:
        if art.design is None:
            raise HarnessError(f"kernel artifact {art.key}: stale, and it names no IRON 'design' script to rebuild from")
        work = self.root / ".build" / art.key.replace("/", "__")
        toolchain.build_artifact(art.design, art.design_args, art.files, work)


def provenance(registry: KernelRegistry | None = None) -> dict[str, Any]:
    """What every verdict carries about the NPU stack: toolchain fingerprint, NPU status, kernels used."""
    from harness.deployment.pyxrt.detect import cached_status

    out: dict[str, Any] = {"toolchain": registry.fingerprint() if registry else toolchain.toolchain_fingerprint()}
    out["npu"] = cached_status().to_dict()
    if registry is not None:
        out["kernels"] = registry.provenance()["kernels"]
        out["registry"] = str(registry.path)
    return out
