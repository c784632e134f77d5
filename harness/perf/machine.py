"""Machine identity for pytest-benchmark's ``machine_info`` and the perf history.

Recorded because the machine's state moves the numbers without any code change (an NPU power
profile took decode from 42.5 to 64.1 tok/s). Every field is best-effort: absent or unreadable
means ``None``, never an exception. Sources (as mlir-aie's device probe): ``/dev/accel/accel*``,
sysfs ``/sys/class/accel/accel*/device/{vbnv,fw_version}``, the driver module's version, ``xrt-smi
examine`` (on PATH or under ``$XILINX_XRT/bin``), and installed package versions.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

Runner = Callable[[list[str]], str | None]


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return text or None


def _run(cmd: list[str]) -> str | None:
    """stdout of ``cmd`` (5 s limit), or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 and proc.stdout.strip() else None


def _cpu_model(root: Path) -> str | None:
    info = _read(root / "proc/cpuinfo") or ""
    match = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or None)


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def _xrt_smi_path() -> str | None:
    found = shutil.which("xrt-smi")
    if found:
        return found
    xrt = os.environ.get("XILINX_XRT")
    candidate = Path(xrt, "bin", "xrt-smi") if xrt else None
    return str(candidate) if candidate and candidate.is_file() else None


def parse_xrt_smi(text: str) -> dict[str, str | None]:
    """XRT version, NPU firmware and power mode from ``xrt-smi examine`` output."""
    def field(pattern: str) -> str | None:
        match = re.search(pattern, text, re.IGNORECASE | re.MULTILINE)
        return match.group(1).strip() if match else None

    return {
        "xrt_version": field(r"^\s*Version\s*:\s*(\S+)"),
        "npu_firmware": field(r"^\s*(?:NPU\s+)?Firmware Version\s*:\s*(\S+)"),
        "npu_power_mode": field(r"^\s*Power Mode\s*:\s*(.+)$"),
    }


def _npu(root: Path, run: Runner) -> dict[str, Any]:
    info: dict[str, Any] = dict.fromkeys(
        ("npu_device", "npu_name", "npu_firmware", "npu_driver", "npu_driver_version", "xrt_version",
         "npu_power_mode"))
    nodes = sorted((root / "dev/accel").glob("accel*")) if (root / "dev/accel").is_dir() else []
    sys_nodes = sorted((root / "sys/class/accel").glob("accel*")) if (root / "sys/class/accel").is_dir() else []
    if nodes:
        info["npu_device"] = "/" + str(nodes[0].relative_to(root))
    # Prefer the node that names its device (vbnv): other accel drivers may share the class.
    named = [n for n in sys_nodes if _read(n / "device/vbnv")]
    node = (named or sys_nodes or [None])[0]
    if node is not None:
        dev = node / "device"
        info["npu_name"] = _read(dev / "vbnv")
        info["npu_firmware"] = _read(dev / "fw_version")
        if (dev / "driver").exists():
            driver = (dev / "driver").resolve().name
            info["npu_driver"] = driver
            info["npu_driver_version"] = _read(root / "sys/module" / driver / "version")
    smi = _xrt_smi_path()
    text = run([smi, "examine"]) if smi else None
    if text:
        parsed = parse_xrt_smi(text)
        info["xrt_version"] = parsed["xrt_version"]
        info["npu_firmware"] = info["npu_firmware"] or parsed["npu_firmware"]
        info["npu_power_mode"] = parsed["npu_power_mode"]
    return info


def machine_info(root: str | Path = "/", run: Runner = _run) -> dict[str, Any]:
    """CPU, power state and NPU stack identity; ``root`` and ``run`` exist so tests can fake a machine."""
    r = Path(root)
    cpu0 = r / "sys/devices/system/cpu/cpu0/cpufreq"
    power = run(["powerprofilesctl", "get"]) if shutil.which("powerprofilesctl") else None
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(r),
        "cpu_count": os.cpu_count(),
        "cpu_governor": _read(cpu0 / "scaling_governor"),
        "cpu_energy_preference": _read(cpu0 / "energy_performance_preference"),
        "platform_profile": _read(r / "sys/firmware/acpi/platform_profile"),
        "power_profile": power.strip() if power else None,
        "pyxrt_version": _version("pyxrt"),
        "mlir_aie_version": _version("mlir_aie", "mlir-aie"),
        "llvm_aie_version": _version("llvm_aie", "llvm-aie"),
    }
    info.update(_npu(r, run))
    return info


def update_machine_info(machine: dict[str, Any]) -> None:
    """For the ``pytest_benchmark_update_machine_info`` hook: add our fields under ``"npu_harness"``."""
    machine["npu_harness"] = machine_info()
