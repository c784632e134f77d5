"""Machine identity (harness.perf.machine) on a faked sysfs tree."""
from __future__ import annotations

import os

from harness.perf import machine

XRT_SMI = """
System Configuration
  OS Name              : Linux
XRT
  Version              : 2.19.0
  Branch               : master
  NPU Firmware Version : 1.0.0.166
Device(s) Present
Power Mode             : Turbo
"""


def fake_root(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor : 0\nmodel name : AMD Ryzen AI 9 HX 370\n")
    cpu = tmp_path / "sys/devices/system/cpu/cpu0/cpufreq"
    cpu.mkdir(parents=True)
    (cpu / "scaling_governor").write_text("performance\n")
    (tmp_path / "sys/firmware/acpi").mkdir(parents=True)
    (tmp_path / "sys/firmware/acpi/platform_profile").write_text("balanced\n")
    (tmp_path / "dev/accel").mkdir(parents=True)
    (tmp_path / "dev/accel/accel0").write_text("")
    dev = tmp_path / "sys/bus/pci/devices/0000:c5:00.1"
    dev.mkdir(parents=True)
    (dev / "vbnv").write_text("RyzenAI-npu4\n")
    (dev / "fw_version").write_text("1.0.0.166\n")
    drv = tmp_path / "sys/bus/pci/drivers/amdxdna"
    drv.mkdir(parents=True)
    os.symlink(drv, dev / "driver")
    (tmp_path / "sys/module/amdxdna").mkdir(parents=True)
    (tmp_path / "sys/module/amdxdna/version").write_text("0.1\n")
    node = tmp_path / "sys/class/accel/accel0"
    node.mkdir(parents=True)
    os.symlink(dev, node / "device")
    return tmp_path


def test_reads_npu_identity_from_sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_xrt_smi_path", lambda: "/opt/xilinx/xrt/bin/xrt-smi")
    seen = []
    info = machine.machine_info(fake_root(tmp_path), run=lambda cmd: seen.append(cmd) or XRT_SMI)
    assert info["cpu_model"] == "AMD Ryzen AI 9 HX 370"
    assert info["cpu_governor"] == "performance" and info["platform_profile"] == "balanced"
    assert info["npu_device"] == "/dev/accel/accel0"
    assert info["npu_name"] == "RyzenAI-npu4" and info["npu_firmware"] == "1.0.0.166"
    assert info["npu_driver"] == "amdxdna" and info["npu_driver_version"] == "0.1"
    assert info["xrt_version"] == "2.19.0" and info["npu_power_mode"] == "Turbo"
    assert ["/opt/xilinx/xrt/bin/xrt-smi", "examine"] in seen


def test_absent_everything_is_null_not_an_exception(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_xrt_smi_path", lambda: None)
    info = machine.machine_info(tmp_path, run=lambda cmd: None)
    for key in ("cpu_governor", "platform_profile", "npu_device", "npu_name", "npu_firmware", "npu_driver",
                "xrt_version", "npu_power_mode", "mlir_aie_version"):
        assert info[key] is None, key
    assert info["cpu_count"] == os.cpu_count()


def test_failing_xrt_smi_is_null(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_xrt_smi_path", lambda: str(tmp_path / "missing-xrt-smi"))
    info = machine.machine_info(tmp_path)  # the real runner: the binary does not exist
    assert info["xrt_version"] is None


def test_parse_xrt_smi_and_update_hook():
    assert machine.parse_xrt_smi("nothing here") == {"xrt_version": None, "npu_firmware": None,
                                                     "npu_power_mode": None}
    mi: dict = {"cpu": {}}
    machine.update_machine_info(mi)
    assert "cpu_model" in mi["npu_harness"] and mi["cpu"] == {}
