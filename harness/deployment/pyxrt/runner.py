"""Run compiled IRON / mlir-aie kernels on an XDNA NPU through pyxrt, one operator at a time.

pyxrt is imported lazily (inside functions), so importing this module works everywhere. The device is
opened once per process. Every NPU command (load, and write + run + read) runs under one exclusive
file lock shared by all processes of the machine: the paper's deployments serialised NPU commands
because concurrent jobs corrupted the firmware mailbox.

Two load paths, as mlir-aie's XRT host runtime has them:

- xclbin + instruction stream: ``register_xclbin``, ``hw_context(device, uuid)``, ``kernel(ctx, name)``;
  the instructions go in a cacheable BO and the run is ``kernel(3, insts_bo, n_insts, *bos)``
  (opcode 3, instruction count in 32-bit words);
- full ELF (newer, NPU2): ``hw_context(device, elf)``, ``ext.kernel(ctx, "main:sequence")``,
  ``ext.bo`` buffers and ``run.set_arg`` / ``start``.

Output buffers carry a sentinel-filled guard band (buffers.py) checked after every run.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from harness.deployment.pyxrt.buffers import (
    DEFAULT_TAIL_GUARD,
    ArgSpec,
    GuardBandViolation,
    GuardLayout,
    check_guards,
    guarded_buffer,
    read_insts,
    to_device_array,
    unwritten_words,
)
from harness.errors import HarnessError

OPCODE = 3  # mlir-aie's "run the instruction stream" opcode for NPU kernels
LOCK_ENV = "NPU_HARNESS_LOCK"
DEFAULT_LOCK_TIMEOUT_S = 600.0  # a wedged NPU job should fail a run, not hang CI forever


def default_lock_path() -> Path:
    """``$NPU_HARNESS_LOCK``, else ``<tmp>/npu-harness-xdna.lock`` (one per machine)."""
    return Path(os.environ.get(LOCK_ENV) or Path(tempfile.gettempdir()) / "npu-harness-xdna.lock")


def import_pyxrt() -> Any:
    """The pyxrt module, or HarnessError saying how to get it."""
    try:
        import pyxrt  # noqa: PLC0415  lazy: most machines have no XRT
    except ImportError as exc:
        raise HarnessError(
            f"pyxrt is not importable ({exc}): the NPU runner needs XRT's Python bindings; "
            "install XRT and source its setup.sh (detect_npu() gives the full reason)"
        ) from None
    return pyxrt


_DEVICE_LOCK = threading.Lock()
_DEVICE: tuple[Any, Any] | None = None  # (pyxrt module, device): one device handle per process


def open_device() -> Any:
    """``pyxrt.device(0)``, opened once per process."""
    global _DEVICE
    pyxrt = import_pyxrt()
    with _DEVICE_LOCK:
        if _DEVICE is None or _DEVICE[0] is not pyxrt:
            _DEVICE = (pyxrt, pyxrt.device(0))
        return _DEVICE[1]


@dataclass
class LoadedKernel:
    """A kernel ready to run: its pyxrt handles and argument specs."""

    label: str
    kernel_name: str
    args: tuple[ArgSpec, ...]
    kernel: Any
    context: Any
    is_elf: bool
    xclbin: Any = None
    insts: np.ndarray | None = None
    insts_bo: Any = None


@dataclass
class _Timing:
    runs: int = 0
    write_s: float = 0.0
    run_s: float = 0.0
    read_s: float = 0.0
    run_s_min: float = float("inf")
    last: dict[str, float] = field(default_factory=dict)


class NpuKernelRunner:
    """Loads kernels and runs them on NumPy arrays with guard-banded outputs.

    Defaults: lock at :func:`default_lock_path`, a 4 KiB tail guard and no head guard on outputs
    (a head guard needs sub-buffers; enable with ``head_guard=4096``), unwritten-output detection on
    for float outputs, ``timeout_ms=0`` (wait as long as XRT does).
    """

    def __init__(
        self,
        lock_path: str | os.PathLike | None = None,
        tail_guard: int = DEFAULT_TAIL_GUARD,
        head_guard: int = 0,
        check_unwritten: bool = True,
        timeout_ms: int = 0,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ):
        self.lock_path = Path(lock_path) if lock_path else default_lock_path()
        self._lock = filelock.FileLock(str(self.lock_path), timeout=lock_timeout_s)
        self.tail_guard, self.head_guard = tail_guard, head_guard
        self.check_unwritten = check_unwritten
        self.timeout_ms = timeout_ms
        self._timings: dict[str, _Timing] = {}

    # -- locking -------------------------------------------------------------------------------
    def _exclusive(self):
        try:
            return self._lock.acquire()
        except filelock.Timeout:
            raise HarnessError(
                f"NPU lock {self.lock_path} still held by another process after {self._lock.timeout:.0f} s"
            ) from None

    # -- loading -------------------------------------------------------------------------------
    def load_xclbin(
        self,
        xclbin_path: str | os.PathLike,
        insts_path: str | os.PathLike,
        kernel_name: str,
        args: Sequence[ArgSpec],
        label: str | None = None,
    ) -> LoadedKernel:
        """Register an xclbin, open a hardware context and stage its instruction stream."""
        pyxrt = import_pyxrt()
        xclbin_path = Path(xclbin_path)
        if not xclbin_path.is_file():
            raise HarnessError(f"xclbin {xclbin_path} does not exist")
        insts = read_insts(insts_path)
        label = label or kernel_name
        with self._exclusive():
            device = open_device()
            xclbin = pyxrt.xclbin(str(xclbin_path))
            found = {k.get_name(): k for k in xclbin.get_kernels()}
            if kernel_name not in found:
                raise HarnessError(f"{xclbin_path}: no kernel {kernel_name!r} (it has {', '.join(found) or 'none'})")
            # opcode, insts, n_insts come first; passing more BOs than declared segfaults inside XRT.
            declared = found[kernel_name].get_num_args() - 3
            if len(args) > declared:
                raise HarnessError(
                    f"{label}: {len(args)} buffer arguments, but {xclbin_path.name} declares {declared}"
                )
            device.register_xclbin(xclbin)
            context = pyxrt.hw_context(device, xclbin.get_uuid())
            kernel = pyxrt.kernel(context, kernel_name)
            insts_bo = pyxrt.bo(device, insts.nbytes, pyxrt.bo.cacheable, kernel.group_id(1))
            insts_bo.write(insts.tobytes(), 0)
            insts_bo.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE)
        return LoadedKernel(label, kernel_name, tuple(args), kernel, context, False, xclbin, insts, insts_bo)

    def load_elf(
        self,
        elf_path: str | os.PathLike,
        args: Sequence[ArgSpec],
        kernel_name: str = "main:sequence",
        label: str | None = None,
    ) -> LoadedKernel:
        """Open a hardware context from a full ELF (PDIs and control code in one file)."""
        pyxrt = import_pyxrt()
        elf_path = Path(elf_path)
        if not elf_path.is_file():
            raise HarnessError(f"ELF {elf_path} does not exist")
        with self._exclusive():
            device = open_device()
            context = pyxrt.hw_context(device, pyxrt.elf(str(elf_path)))
            kernel = pyxrt.ext.kernel(context, kernel_name)
        return LoadedKernel(label or kernel_name, kernel_name, tuple(args), kernel, context, True)

    # -- running -------------------------------------------------------------------------------
    def _layout(self, spec: ArgSpec) -> GuardLayout:
        if spec.is_output:
            return GuardLayout(spec.nbytes, self.head_guard, self.tail_guard)
        return GuardLayout(spec.nbytes, 0, 0)

    def _alloc(self, pyxrt: Any, device: Any, k: LoadedKernel, index: int, nbytes: int) -> Any:
        if k.is_elf:
            return pyxrt.ext.bo(device, nbytes)
        # Buffer i is kernel argument 3 + i (after opcode, insts BO and instruction count).
        return pyxrt.bo(device, nbytes, pyxrt.bo.host_only, k.kernel.group_id(3 + index))

    def run(self, k: LoadedKernel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``k`` on ``inputs`` (by argument name); returns its out / inout arguments by name.

        Raises HarnessError when the run does not complete, GuardBandViolation when a kernel wrote past
        an output buffer or left float output words unwritten.
        """
        unknown = sorted(set(inputs) - {a.name for a in k.args})
        if unknown:
            raise HarnessError(f"{k.label}: unknown argument(s) {unknown}; it takes {[a.name for a in k.args]}")
        host: list[np.ndarray] = []
        for spec in k.args:
            if spec.is_input and spec.name not in inputs:
                raise HarnessError(f"{k.label}: missing input {spec.name!r}")
            payload = to_device_array(spec, inputs[spec.name]) if spec.is_input else None
            host.append(guarded_buffer(self._layout(spec), payload))
        pyxrt = import_pyxrt()
        to_dev = pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
        from_dev = pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE
        with self._exclusive():
            device = open_device()
            t0 = time.perf_counter()
            parents, views = [], []
            for i, (spec, image) in enumerate(zip(k.args, host)):
                layout = self._layout(spec)
                bo = self._alloc(pyxrt, device, k, i, layout.total)
                bo.write(image, 0)
                bo.sync(to_dev)
                parents.append(bo)
                # The kernel must see the payload at offset 0: a head guard means passing a sub-buffer.
                views.append(pyxrt.bo(bo, layout.payload + layout.tail, layout.head) if layout.head else bo)
            t1 = time.perf_counter()
            state = self._execute(pyxrt, k, views)
            t2 = time.perf_counter()
            if state != pyxrt.ert_cmd_state.ERT_CMD_STATE_COMPLETED:
                raise HarnessError(f"{k.label}: NPU run ended in state {state}, not ERT_CMD_STATE_COMPLETED")
            raw = {}
            for spec, bo in zip(k.args, parents):
                if spec.is_output:
                    bo.sync(from_dev)
                    raw[spec.name] = np.asarray(bo.read(self._layout(spec).total, 0)).view(np.uint8).reshape(-1)
            t3 = time.perf_counter()
        self._record(k.label, t1 - t0, t2 - t1, t3 - t2)
        return {name: self._unpack(k, name, buf) for name, buf in raw.items()}

    def _execute(self, pyxrt: Any, k: LoadedKernel, bos: list[Any]) -> Any:
        if k.is_elf:
            run = pyxrt.run(k.kernel)
            for i, bo in enumerate(bos):
                run.set_arg(i, bo)
            run.start()
        else:
            run = k.kernel(OPCODE, k.insts_bo, len(k.insts), *bos)
        return run.wait(self.timeout_ms) if self.timeout_ms else run.wait()

    def _unpack(self, k: LoadedKernel, name: str, buf: np.ndarray) -> np.ndarray:
        spec = next(a for a in k.args if a.name == name)
        layout = self._layout(spec)
        check_guards(buf, layout, name, k.label)
        if self.check_unwritten and spec.direction == "out" and spec.np_dtype.kind in "fV":
            missing = unwritten_words(buf, layout)
            if missing:
                raise GuardBandViolation(
                    f"{k.label}: output {name!r}: {missing} of {layout.payload // 4} words were never written "
                    "(tile remainder skipped, or a stale / aliased buffer)"
                )
        payload = buf[layout.head : layout.head + layout.payload]
        return payload.view(spec.np_dtype).reshape(spec.shape).copy()

    # -- timings -------------------------------------------------------------------------------
    def _record(self, label: str, write_s: float, run_s: float, read_s: float) -> None:
        t = self._timings.setdefault(label, _Timing())
        t.runs += 1
        t.write_s += write_s
        t.run_s += run_s
        t.read_s += read_s
        t.run_s_min = min(t.run_s_min, run_s)
        t.last = {"write_s": write_s, "run_s": run_s, "read_s": read_s}

    def op_timings(self) -> dict[str, dict[str, float]]:
        """Per kernel label: runs, total ``write_s`` (host -> BO + sync), ``run_s`` (NPU execution),
        ``read_s`` (sync + BO -> host), ``run_s_min`` and the ``last`` run's three figures."""
        return {
            label: {
                "runs": t.runs, "write_s": t.write_s, "run_s": t.run_s, "read_s": t.read_s,
                "run_s_min": t.run_s_min, "last": dict(t.last),
            }
            for label, t in self._timings.items()
        }
