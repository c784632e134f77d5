"""The toolchain fingerprint of compiled kernels, and rebuilding a kernel with mlir-aie.

A compiled kernel is only as trustworthy as the compiler that built it: the paper's own cache was not
keyed on the compiler version and let stale kernels pass. The fingerprint names the versions that
change generated code or its loading: mlir-aie, llvm-aie (Peano) and XRT. Absent pieces are None.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

# Keys whose change makes a compiled artifact stale. pyxrt is recorded but follows XRT's version.
STALE_KEYS = ("mlir_aie", "llvm_aie", "xrt")
_DISTS = {"mlir_aie": ("mlir_aie", "mlir-aie"), "llvm_aie": ("llvm-aie", "llvm_aie"), "pyxrt": ("pyxrt",)}
TOOL_TIMEOUT_S = 20.0


def _dist_version(names: Sequence[str]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def xrt_version(env: Mapping[str, str] | None = None, which: Callable[[str], str | None] = shutil.which) -> str | None:
    """XRT's version from ``$XILINX_XRT/version.json``, else from ``xrt-smi --version``; None if absent."""
    env = os.environ if env is None else env
    root = env.get("XILINX_XRT")
    if root:
        try:
            meta = json.loads((Path(root) / "version.json").read_text())
            version = meta.get("BUILD_VERSION") or meta.get("version")
            if version:
                return str(version)
        except (OSError, ValueError, AttributeError):
            pass
    from harness.deployment.pyxrt.detect import find_xrt_smi

    smi = find_xrt_smi(env, which)
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--version"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^\s*(?:XRT\s+)?Version\s*:\s*(\S+)", out.stdout, re.IGNORECASE | re.MULTILINE)
    return m.group(1) if m else None


def _peano_version(env: Mapping[str, str]) -> str | None:
    """llvm-aie's clang version when it is installed as a directory (``$PEANO_INSTALL_DIR``), not a wheel."""
    root = env.get("PEANO_INSTALL_DIR")
    clang = Path(root) / "bin" / "clang" if root else None
    return _first_line([str(clang), "--version"]) if clang and clang.is_file() else None


def toolchain_fingerprint(
    env: Mapping[str, str] | None = None, which: Callable[[str], str | None] = shutil.which
) -> dict[str, str | None]:
    """``{"mlir_aie", "llvm_aie", "pyxrt", "xrt"}`` -> installed version, or None when absent."""
    env = os.environ if env is None else env
    return {
        "mlir_aie": _dist_version(_DISTS["mlir_aie"]),
        "llvm_aie": _dist_version(_DISTS["llvm_aie"]) or _peano_version(env),
        "pyxrt": _dist_version(_DISTS["pyxrt"]),
        "xrt": xrt_version(env, which),
    }


def fingerprint_diff(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The STALE_KEYS on which ``recorded`` and ``current`` differ: key -> (recorded, current)."""
    return {k: (recorded.get(k), current.get(k)) for k in STALE_KEYS if recorded.get(k) != current.get(k)}


def mlir_aie_available() -> bool:
    """Whether mlir-aie's Python package (``aie``) can be imported, so kernels can be rebuilt."""
    return importlib.util.find_spec("aie") is not None


def build_artifact(
    design: Path,
    design_args: Sequence[str],
    outputs: Mapping[str, Path],
    work_dir: Path,
) -> None:
    """Rebuild one kernel: run the IRON design script (it prints MLIR), then compile with aiecc.

    ``outputs`` has ``xclbin`` + ``insts``, or ``elf`` (a full ELF). Uses mlir-aie's Python API
    (``aie.utils.compile.compile_mlir_module``) when this mlir-aie has it, else the ``aiecc.py`` CLI.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    gen = subprocess.run(
        [sys.executable, str(design), *design_args], capture_output=True, text=True, cwd=design.parent, check=False
    )
    if gen.returncode != 0 or not gen.stdout.strip():
        raise HarnessError(f"IRON design {design} failed (exit {gen.returncode}): {gen.stderr.strip()[-2000:]}")
    mlir = work_dir / "aie.mlir"
    mlir.write_text(gen.stdout)
    for path in outputs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from aie.utils.compile import compile_mlir_module  # noqa: PLC0415  only with mlir-aie installed
    except ImportError:
        compile_mlir_module = None
    if compile_mlir_module is not None:
        try:
            if "elf" in outputs:
                compile_mlir_module(gen.stdout, full_elf_path=str(outputs["elf"]), work_dir=str(work_dir))
            else:
                compile_mlir_module(
                    gen.stdout, insts_path=str(outputs["insts"]), xclbin_path=str(outputs["xclbin"]), work_dir=str(work_dir)
                )
        except Exception as exc:  # noqa: BLE001  aiecc raises RuntimeError; anything else is as fatal
            raise HarnessError(f"aiecc failed on {design}: {exc}") from None
        return
    aiecc = shutil.which("aiecc.py") or shutil.which("aiecc")
    if aiecc is None:
        raise HarnessError(f"cannot rebuild {design}: mlir-aie has neither compile_mlir_module nor aiecc on PATH")
    if "elf" in outputs:
        flags = ["--aie-generate-full-elf", f"--full-elf-name={outputs['elf']}"]
    else:
        flags = [
            "--aie-generate-xclbin", f"--xclbin-name={outputs['xclbin']}",
            "--aie-generate-npu-insts", f"--npu-insts-name={outputs['insts']}",
        ]
    cmd = [aiecc, "--no-compile-host", "--no-xchesscc", "--no-xbridge", f"--tmpdir={work_dir}", *flags, str(mlir)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise HarnessError(f"aiecc failed on {design} (exit {out.returncode}): {(out.stderr or out.stdout)[-2000:]}")
