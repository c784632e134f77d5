"""NPU detection on fake machines (device nodes and sysfs under tmp_path), xrt-smi parsing, require_npu."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness.deployment.pyxrt import detect


def fake_machine(tmp_path: Path, vbnv: str | None = "RyzenAI-npu4", fw: str = "1.0.0.166") -> tuple[Path, Path]:
    dev, sys_ = tmp_path / "dev", tmp_path / "sys"
    (dev / "accel").mkdir(parents=True)
    (dev / "accel" / "accel0").touch()
    device = sys_ / "class" / "accel" / "accel0" / "device"
    device.mkdir(parents=True)
    if vbnv is not None:
        (device / "vbnv").write_text(vbnv + "\n")
    (device / "fw_version").write_text(fw + "\n")
    drivers = sys_ / "bus" / "pci" / "drivers" / "amdxdna"
    drivers.mkdir(parents=True)
    os.symlink(drivers, device / "driver")
    (sys_ / "module" / "amdxdna").mkdir(parents=True)
    (sys_ / "module" / "amdxdna" / "version").write_text("0.6\n")
    return dev, sys_


def importer(ok: bool):
    def imp(name: str):
        if not ok:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return object()

    return imp


def no_which(_name: str) -> None:
    return None


@pytest.mark.parametrize(
    ("name", "family", "model"),
    [
        ("RyzenAI-npu1", "npu1", "npu1"), ("NPU Phoenix", "npu1", "npu1"),
        ("NPU Strix", "npu2", "npu4"), ("RyzenAI-npu4", "npu2", "npu4"),
        ("NPU Strix Halo", "npu2", "npu5"), ("RyzenAI-npu5", "npu2", "npu5"),
        ("NPU Krackan", "npu2", "npu6"), ("NPU Gorgon Point", "npu2", "npu6"),
        ("Alveo U250", None, None),
    ],
)
def test_device_names_map_to_families(name: str, family, model):
    assert detect.npu_family(name) == (family, model)


def test_no_device_node_gives_one_line_reason(tmp_path: Path):
    status = detect.detect_npu(tmp_path / "dev", tmp_path / "sys", env={}, which=no_which, import_module=importer(True))
    assert not status.present
    assert "no XDNA NPU" in status.reason and "accel" in status.reason and "\n" not in status.reason


def test_sysfs_gives_device_firmware_and_driver(tmp_path: Path):
    dev, sys_ = fake_machine(tmp_path)
    status = detect.detect_npu(dev, sys_, env={}, which=no_which, import_module=importer(True))
    assert status.present and status.reason == ""
    assert (status.device, status.family, status.model) == ("RyzenAI-npu4", "npu2", "npu4")
    assert status.firmware == "1.0.0.166" and status.driver == "amdxdna 0.6"
    assert status.nodes == (str(dev / "accel" / "accel0"),)
    assert status.to_dict()["nodes"] == [str(dev / "accel" / "accel0")]


def test_pyxrt_not_importable_is_the_reason(tmp_path: Path):
    dev, sys_ = fake_machine(tmp_path)
    status = detect.detect_npu(dev, sys_, env={}, which=no_which, import_module=importer(False))
    assert not status.present
    assert status.reason.startswith("NPU node ") and "pyxrt is not importable" in status.reason
    assert status.family == "npu2"  # details are still reported


def test_unknown_device_is_not_usable(tmp_path: Path):
    dev, sys_ = fake_machine(tmp_path, vbnv="Mystery Accelerator")
    status = detect.detect_npu(dev, sys_, env={}, which=no_which, import_module=importer(True))
    assert not status.present and "unknown NPU device 'Mystery Accelerator'" in status.reason


XRT_SMI_EXAMINE = """\
System Configuration
  OS Name              : Linux
XRT
  Version              : 2.19.0
  Branch               : master
  amdxdna Version      : 2.19.0_20250101
  NPU Firmware Version : 1.0.7.97
Device(s) Present
|BDF             |Name         |
|----------------|-------------|
|[0000:c5:00.1]  |NPU Strix    |
"""


def test_parse_xrt_smi_examine():
    got = detect.parse_xrt_smi(XRT_SMI_EXAMINE)
    assert got == {
        "xrt_version": "2.19.0", "firmware": "1.0.7.97", "driver": "amdxdna 2.19.0_20250101",
        "device": "NPU Strix",
    }


def test_xrt_smi_under_xilinx_xrt_fills_missing_fields(tmp_path: Path):
    dev, sys_ = fake_machine(tmp_path, vbnv=None)
    xrt = tmp_path / "xrt"
    (xrt / "bin").mkdir(parents=True)
    smi = xrt / "bin" / "xrt-smi"
    smi.write_text("#!/bin/sh\ncat <<'EOF'\n" + XRT_SMI_EXAMINE + "EOF\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    status = detect.detect_npu(dev, sys_, env={"XILINX_XRT": str(xrt)}, which=no_which, import_module=importer(True))
    assert status.present
    assert (status.device, status.model, status.xrt_version) == ("NPU Strix", "npu4", "2.19.0")
    assert status.firmware == "1.0.0.166"  # sysfs came first and wins


def test_detection_never_raises(tmp_path: Path):
    def boom(_name):
        raise RuntimeError("which exploded")

    dev, sys_ = fake_machine(tmp_path)
    status = detect.detect_npu(dev, sys_, env={}, which=boom, import_module=importer(True))
    assert not status.present and status.reason == "NPU detection failed: RuntimeError: which exploded"


def test_require_npu_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(detect, "cached_status", lambda: detect.NpuStatus(False, "no XDNA NPU: test"))
    with pytest.raises(pytest.skip.Exception, match="no XDNA NPU: test"):
        detect.require_npu()
    present = detect.NpuStatus(True, device="NPU Strix", family="npu2", model="npu4")
    monkeypatch.setattr(detect, "cached_status", lambda: present)
    assert detect.require_npu() is present
