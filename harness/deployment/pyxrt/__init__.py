"""Compiled IRON / mlir-aie kernels on a real XDNA NPU through pyxrt.

Importing this package never imports pyxrt: detection, artifacts and host-side buffer logic work on
any machine; only running a kernel needs the NPU.
"""
from harness.deployment.pyxrt.artifacts import Artifact, KernelRegistry, provenance
from harness.deployment.pyxrt.buffers import ArgSpec, GuardBandViolation, GuardLayout, read_insts
from harness.deployment.pyxrt.detect import NpuStatus, detect_npu, npu_family, require_npu
from harness.deployment.pyxrt.op_backend import NpuOpBackend
from harness.deployment.pyxrt.runner import LoadedKernel, NpuKernelRunner, open_device
from harness.deployment.pyxrt.toolchain import toolchain_fingerprint

__all__ = [
    "ArgSpec", "Artifact", "GuardBandViolation", "GuardLayout", "KernelRegistry", "LoadedKernel",
    "NpuKernelRunner", "NpuOpBackend", "NpuStatus", "detect_npu", "npu_family", "open_device",
    "provenance", "read_insts", "require_npu", "toolchain_fingerprint",
]
