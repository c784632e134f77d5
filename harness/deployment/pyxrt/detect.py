"""XDNA NPU detection, probing in mlir-aie's order; never raises.

1. ``/dev/accel/accel*`` (the amdxdna driver's device nodes);
2. sysfs ``vbnv`` / ``fw_version`` under ``/sys/class/accel/accel*/device`` (device name, firmware);
3. ``xrt-smi examine`` on PATH or under ``$XILINX_XRT/bin`` (device name, XRT / firmware / driver);
4. ``import pyxrt`` (the runtime the runner needs).

The first probe that fails gives the one-line reason; later probes only add details.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Device-name keywords per generation, as xrt-smi / sysfs / pyxrt report them (mlir-aie's table).
# npu2 models are checked first and Strix Halo before Strix: the longer names contain the shorter.
_MODELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("npu2", "npu5", ("npu5", "Strix Halo")),
    ("npu2", "npu6", ("npu6", "Krackan", "Gorgon Point")),
    ("npu2", "npu4", ("npu4", "Strix")),
    ("npu1", "npu1", ("npu1", "Phoenix", "Hawk Point")),
)
XRT_SMI_TIMEOUT_S = 20.0  # examine takes ~1 s; a hung driver must not hang test collection


@dataclass(frozen=True)
class NpuStatus:
    """What detection found. ``reason`` is a one-line explanation when ``present`` is False."""

    present: bool
    reason: str = ""
    device: str | None = None      # e.g. "NPU Strix" or "RyzenAI-npu4"
    family: str | None = None      # "npu1" (Phoenix / Hawk Point) or "npu2" (Strix, Strix Halo, Krackan)
    model: str | None = None       # "npu1", "npu4", "npu5", "npu6"
    firmware: str | None = None
    driver: str | None = None
    xrt_version: str | None = None
    nodes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nodes"] = list(self.nodes)
        return d


def npu_family(device_name: str) -> tuple[str | None, str | None]:
    """Map a device name to (family, model): ``"NPU Strix"`` -> ("npu2", "npu4"); unknown -> (None, None)."""
    for family, model, keywords in _MODELS:
        if any(k.lower() in device_name.lower() for k in keywords):
            return family, model
    return None, None


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def _sysfs(sys_root: Path, node: str) -> dict[str, str | None]:
    dev = sys_root / "class" / "accel" / node / "device"
    driver = None
    try:
        driver = os.path.basename(os.readlink(dev / "driver"))
    except OSError:
        pass
    version = _read(sys_root / "module" / driver / "version") if driver else None
    return {
        "device": _read(dev / "vbnv"),
        "firmware": _read(dev / "fw_version"),
        "driver": f"{driver} {version}" if driver and version else driver,
    }


def find_xrt_smi(env: Mapping[str, str] | None = None, which: Callable[[str], str | None] = shutil.which) -> str | None:
    """``xrt-smi`` on PATH, else under ``$XILINX_XRT/bin``; None when neither exists."""
    env = os.environ if env is None else env
    found = which("xrt-smi")
    if found:
        return found
    root = env.get("XILINX_XRT")
    if root and (Path(root) / "bin" / "xrt-smi").is_file():
        return str(Path(root) / "bin" / "xrt-smi")
    return None


def parse_xrt_smi(text: str) -> dict[str, str | None]:
    """Pick XRT version, firmware, driver and device name out of ``xrt-smi examine`` output."""

    def field_(pattern: str) -> str | None:
        m = re.search(pattern, text, re.IGNORECASE | re.MULTILINE)
        return m.group(1).strip() if m else None

    device = field_(r"^\|\[[0-9a-f:.]+\]\s*\|\s*([^|]+?)\s*\|") or field_(r"^\s*Name\s*:\s*(NPU.*)$")
    return {
        "xrt_version": field_(r"^\s*(?:XRT\s+)?Version\s*:\s*(\S+)"),
        "firmware": field_(r"^\s*(?:NPU\s+)?Firmware Version\s*:\s*(\S+)"),
        "driver": f"amdxdna {driver}" if (driver := field_(r"^\s*amdxdna\s+Version\s*:\s*(\S+)")) else None,
        "device": device,
    }


def _xrt_smi(path: str) -> dict[str, str | None]:
    try:
        out = subprocess.run([path, "examine"], capture_output=True, text=True, timeout=XRT_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_xrt_smi(out.stdout + out.stderr)


def detect_npu(
    dev_root: str | os.PathLike = "/dev",
    sys_root: str | os.PathLike = "/sys",
    env: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    import_module: Callable[[str], Any] = importlib.import_module,
) -> NpuStatus:
    """Probe for an XDNA NPU (roots and hooks are parameters so tests can fake a machine). Never raises."""
    try:
        return _detect(Path(dev_root), Path(sys_root), env, which, import_module)
    except Exception as exc:  # noqa: BLE001  detection must never take a test session down
        return NpuStatus(False, f"NPU detection failed: {type(exc).__name__}: {exc}")


def _detect(dev_root, sys_root, env, which, import_module) -> NpuStatus:
    nodes = tuple(sorted(str(p) for p in (dev_root / "accel").glob("accel*")))
    if not nodes:
        return NpuStatus(False, f"no XDNA NPU: no {dev_root}/accel/accel* device node (amdxdna driver not loaded?)")
    info: dict[str, str | None] = {"device": None, "firmware": None, "driver": None, "xrt_version": None}
    for node in nodes:
        for key, value in _sysfs(sys_root, Path(node).name).items():
            info[key] = info[key] or value
    smi = find_xrt_smi(env, which)
    if smi:
        for key, value in _xrt_smi(smi).items():
            info[key] = info[key] or value
    family, model = npu_family(info["device"] or "")
    details = dict(info, family=family, model=model, nodes=nodes)
    try:
        import_module("pyxrt")
    except Exception as exc:  # noqa: BLE001  ImportError, or a broken XRT install raising anything else
        return NpuStatus(
            False, f"NPU node {nodes[0]} present but pyxrt is not importable ({type(exc).__name__}: {exc}); "
            "source XRT's setup.sh", **details,
        )
    if family is None and info["device"]:
        return NpuStatus(False, f"unknown NPU device {info['device']!r} (not npu1 / npu4 / npu5 / npu6)", **details)
    return NpuStatus(True, "", **details)


@functools.lru_cache(maxsize=1)
def cached_status() -> NpuStatus:
    """``detect_npu()`` on the real machine, probed once per process."""
    return detect_npu()


def require_npu() -> NpuStatus:
    """In a pytest test: skip with the one-line reason unless a usable NPU is present."""
    import pytest

    status = cached_status()
    if not status.present:
        pytest.skip(status.reason)
    return status
