"""Run op-level cases on compiled kernels: the NPU counterpart of the emulator's kernels.

The op-level suites (phase 1) build inputs for a case such as ``gemm/M128_K896_N4864`` and call
``backend.run(op, shape_key, inputs)``; with an NPU present the same cases run on the registered
artifact, resolved (and provenance-checked) through the kernel registry.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from harness.deployment.pyxrt.artifacts import Artifact, KernelRegistry
from harness.deployment.pyxrt.runner import LoadedKernel, NpuKernelRunner
from harness.errors import HarnessError


class NpuOpBackend:
    """Runs registered kernels by (op, shape key). ``registry`` is a KernelRegistry or a registry path;
    ``runner`` defaults to a fresh NpuKernelRunner (one lock, one device per process)."""

    def __init__(self, registry: KernelRegistry | str | os.PathLike, runner: NpuKernelRunner | None = None):
        self.registry = registry if isinstance(registry, KernelRegistry) else KernelRegistry(registry)
        self.runner = runner or NpuKernelRunner()
        self._loaded: dict[str, LoadedKernel] = {}

    def has(self, op: str, shape_key: str) -> bool:
        """Whether the registry holds an artifact for this case (fresh or not)."""
        return f"{op}/{shape_key}" in self.registry.keys()

    def _kernel(self, op: str, shape_key: str) -> LoadedKernel:
        key = f"{op}/{shape_key}"
        if key not in self._loaded:
            art: Artifact = self.registry.resolve(op, shape_key)
            if art.is_elf:
                self._loaded[key] = self.runner.load_elf(art.files["elf"], art.args, art.kernel_name, label=key)
            else:
                self._loaded[key] = self.runner.load_xclbin(
                    art.files["xclbin"], art.files["insts"], art.kernel_name, art.args, label=key
                )
        return self._loaded[key]

    def run_all(self, op: str, shape_key: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every out / inout argument of the kernel, by name, in the kernel's dtype."""
        return self.runner.run(self._kernel(op, shape_key), inputs)

    def run(self, op: str, shape_key: str, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The kernel's single output as float32 (integer outputs keep their dtype)."""
        outputs = self.run_all(op, shape_key, inputs)
        if len(outputs) != 1:
            raise HarnessError(f"{op}/{shape_key}: {len(outputs)} outputs ({', '.join(outputs)}); use run_all()")
        (out,) = outputs.values()
        return out.astype(np.float32) if out.dtype.kind in "fV" else out

    def op_timings(self) -> dict[str, dict[str, Any]]:
        """Per case: NPU execution and host transfer times (see NpuKernelRunner.op_timings)."""
        return self.runner.op_timings()

    def provenance(self) -> dict[str, Any]:
        """Toolchain fingerprint and the provenance of every kernel run so far."""
        return self.registry.provenance()
