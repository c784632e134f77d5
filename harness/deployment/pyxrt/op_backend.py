"""The op backend of a pyxrt deployment: phase 1's op cases run on compiled kernels on the NPU.

The kernel registry is keyed by op-case identity (``gemm[M=128,K=896,N=4864]``, see
``harness.suites.op_registry``): ``run(case, inputs)`` resolves ``case.id`` (provenance-checked), feeds
the case's inputs to the kernel's arguments of the same names and returns its single output. A
deployment offers it to phase 1 from its factory::

    factory.op_backend = lambda spec: NpuOpBackend("kernels/registry.json")

Cases without a registered kernel are reported as not run (``supports``). pyxrt is only imported when a
kernel is loaded, so building the backend works on any machine.
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
    """Runs registered kernels by key. ``registry`` is a KernelRegistry or a registry path; ``runner``
    defaults to a fresh NpuKernelRunner (one lock, one device per process)."""

    def __init__(self, registry: KernelRegistry | str | os.PathLike, runner: NpuKernelRunner | None = None):
        self.registry = registry if isinstance(registry, KernelRegistry) else KernelRegistry(registry)
        self.runner = runner or NpuKernelRunner()
        self._loaded: dict[str, LoadedKernel] = {}

    # -- the OpBackend protocol (harness.suites.op_registry) ------------------------------------------
    def supports(self, case: Any) -> bool:
        """Whether the registry holds a kernel for ``case`` (fresh or not: a stale one raises at run)."""
        return self.has(case.id)

    def run(self, case: Any, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """``case`` on its registered kernel, as float32."""
        return self.run_key(case.id, inputs)

    # -- by registry key -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.registry.keys()

    def _kernel(self, key: str) -> LoadedKernel:
        if key not in self._loaded:
            art: Artifact = self.registry.resolve(key)
            if art.is_elf:
                self._loaded[key] = self.runner.load_elf(art.files["elf"], art.args, art.kernel_name, label=key)
            else:
                self._loaded[key] = self.runner.load_xclbin(
                    art.files["xclbin"], art.files["insts"], art.kernel_name, art.args, label=key
                )
        return self._loaded[key]

    def run_all(self, key: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every out / inout argument of the kernel registered under ``key``, by name, in its dtype."""
        return self.runner.run(self._kernel(key), inputs)

    def run_key(self, key: str, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The single output of the kernel under ``key`` as float32 (integer outputs keep their dtype)."""
        outputs = self.run_all(key, inputs)
        if len(outputs) != 1:
            raise HarnessError(f"{key}: {len(outputs)} outputs ({', '.join(outputs)}); use run_all()")
        (out,) = outputs.values()
        return out.astype(np.float32) if out.dtype.kind in "fV" else out

    def op_timings(self) -> dict[str, dict[str, Any]]:
        """Per key: NPU execution and host transfer times (see NpuKernelRunner.op_timings)."""
        return self.runner.op_timings()

    def provenance(self) -> dict[str, Any]:
        """Toolchain fingerprint and the provenance of every kernel run so far."""
        return self.registry.provenance()
