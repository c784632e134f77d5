"""NpuKernelRunner's call sequence against a pyxrt test double, and a real-NPU GEMM test.

``FakePyxrt`` below is a TEST DOUBLE of XRT's Python bindings, injected through ``sys.modules``: it
records every call and "executes" a kernel by calling a Python function on the BO memory the kernel
would see, so guard bands, sentinels and command states can be exercised without hardware.
"""
from __future__ import annotations

import enum
import os
import subprocess
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from harness.deployment.pyxrt import runner as rn
from harness.deployment.pyxrt.artifacts import KernelRegistry
from harness.deployment.pyxrt.buffers import ArgSpec, GuardBandViolation
from harness.deployment.pyxrt.detect import require_npu
from harness.deployment.pyxrt.op_backend import NpuOpBackend
from harness.errors import HarnessError

BF16 = ml_dtypes.bfloat16
M, K, N = 4, 8, 16


def gemm_args(m=M, k=K, n=N) -> list[ArgSpec]:
    return [ArgSpec("a", "in", (m, k)), ArgSpec("b", "in", (k, n)), ArgSpec("c", "out", (m, n))]


def gemm_compute(overrun: int = 0, skip_last_row: bool = False):
    """A 'kernel': C = A @ B in fp32, stored bf16, optionally writing ``overrun`` bytes past C."""

    def compute(views: list[np.ndarray]) -> None:
        a = views[0][: M * K * 2].view(BF16).astype(np.float32).reshape(M, K)
        b = views[1][: K * N * 2].view(BF16).astype(np.float32).reshape(K, N)
        c = (a @ b).astype(BF16)
        rows = M - 1 if skip_last_row else M
        views[2][: rows * N * 2] = c[:rows].reshape(-1).view(np.uint8)
        views[2][M * N * 2 : M * N * 2 + overrun] = 0

    return compute


def make_fake_pyxrt(compute, kernels=("MLIR_AIE",), num_args=6, final_state="ERT_CMD_STATE_COMPLETED"):
    """Build the pyxrt test double; ``m.log`` records the calls in order."""
    m = types.ModuleType("pyxrt")
    log: list[tuple] = []
    m.log = log

    class ert_cmd_state(enum.Enum):
        ERT_CMD_STATE_COMPLETED = 4
        ERT_CMD_STATE_ERROR = 5
        ERT_CMD_STATE_TIMEOUT = 8

    class xclBOSyncDirection(enum.Enum):
        XCL_BO_SYNC_BO_TO_DEVICE = 0
        XCL_BO_SYNC_BO_FROM_DEVICE = 1

    class device:
        def __init__(self, index):
            log.append(("device", index))

        def register_xclbin(self, xclbin):
            log.append(("register_xclbin", xclbin.path))

    class _XclbinKernel:
        def __init__(self, name):
            self.name = name

        def get_name(self):
            return self.name

        def get_num_args(self):
            return num_args

    class xclbin:
        def __init__(self, path):
            self.path = path

        def get_uuid(self):
            return "uuid-1"

        def get_kernels(self):
            return [_XclbinKernel(k) for k in kernels]

    class elf:
        def __init__(self, path):
            self.path = path

    class hw_context:
        def __init__(self, dev, handle):
            log.append(("hw_context", handle if isinstance(handle, str) else type(handle).__name__))

    class bo:
        host_only, cacheable, normal = "host_only", "cacheable", "normal"

        def __init__(self, first, size, flags_or_offset=0, group=None):
            if isinstance(first, bo):  # sub-buffer: (parent, size, offset) shares the parent's memory
                self.mem = first.mem[flags_or_offset : flags_or_offset + size]
                log.append(("sub_bo", size, flags_or_offset))
            else:
                self.mem = np.zeros(size, np.uint8)
                log.append(("bo", size, flags_or_offset, group))

        def write(self, data, offset):
            raw = np.frombuffer(memoryview(data).cast("B"), np.uint8)
            self.mem[offset : offset + raw.size] = raw

        def read(self, size, offset):
            return self.mem[offset : offset + size].view(np.int8).copy()  # pyxrt returns a char array

        def sync(self, direction):
            log.append(("sync", direction.name))

    class run:
        def __init__(self, kernel):
            self.kernel, self.args = kernel, {}

        def set_arg(self, i, value):
            self.args[i] = value

        def start(self):
            log.append(("start", len(self.args)))
            compute([self.args[i].mem for i in sorted(self.args)])

        def wait(self, timeout_ms=None):
            log.append(("wait", timeout_ms))
            return ert_cmd_state[final_state]

    class kernel:
        def __init__(self, ctx, name):
            log.append(("kernel", name))

        def group_id(self, i):
            return 100 + i

        def __call__(self, opcode, insts_bo, n_insts, *bos):
            log.append(("call", opcode, n_insts, len(bos)))
            r = run(self)
            for i, b in enumerate(bos):
                r.args[i] = b
            compute([b.mem for b in bos])
            return r

    class ext_kernel(kernel):
        pass

    m.ert_cmd_state, m.xclBOSyncDirection = ert_cmd_state, xclBOSyncDirection
    m.device, m.xclbin, m.elf, m.hw_context, m.bo, m.run, m.kernel = device, xclbin, elf, hw_context, bo, run, kernel
    m.ext = types.SimpleNamespace(kernel=ext_kernel, bo=lambda dev, n: bo(dev, n, "normal", None))
    return m


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "final.xclbin").write_bytes(b"xclbin")
    (tmp_path / "insts.bin").write_bytes(np.arange(10, dtype="<u4").tobytes())
    (tmp_path / "full.elf").write_bytes(b"\x7fELF")
    return {"xclbin": tmp_path / "final.xclbin", "insts": tmp_path / "insts.bin", "elf": tmp_path / "full.elf"}


def fake(monkeypatch: pytest.MonkeyPatch, **kw) -> types.ModuleType:
    mod = make_fake_pyxrt(kw.pop("compute", gemm_compute()), **kw)
    monkeypatch.setitem(sys.modules, "pyxrt", mod)
    return mod


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((M, K)).astype(np.float32), "b": rng.standard_normal((K, N)).astype(np.float32)}


def expected_gemm(x: dict[str, np.ndarray]) -> np.ndarray:
    a, b = (x[k].astype(BF16).astype(np.float32) for k in "ab")
    return (a @ b).astype(BF16)


def test_import_is_lazy_and_the_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    probe = "import sys, harness.deployment.pyxrt as p; p.NpuKernelRunner(); print('pyxrt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "pyxrt", None)  # makes `import pyxrt` raise ImportError
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock")
    with pytest.raises(HarnessError, match="pyxrt is not importable .*source its setup.sh"):
        r.load_xclbin(tmp_path / "x.xclbin", tmp_path / "i.bin", "MLIR_AIE", gemm_args())


def test_xclbin_call_sequence_and_result(monkeypatch, files, tmp_path):
    mod = fake(monkeypatch)
    r = rn.NpuKernelRunner(lock_path=tmp_path / "npu.lock")
    k = r.load_xclbin(files["xclbin"], files["insts"], "MLIR_AIE", gemm_args(), label="gemm/M4_K8_N16")
    x = inputs()
    out = r.run(k, x)
    np.testing.assert_array_equal(out["c"], expected_gemm(x))
    assert out["c"].dtype == BF16 and list(out) == ["c"]
    log = mod.log
    assert log[:5] == [
        ("device", 0), ("register_xclbin", str(files["xclbin"])), ("hw_context", "uuid-1"), ("kernel", "MLIR_AIE"),
        ("bo", 40, "cacheable", 101),  # 10 instruction words in a cacheable BO on argument 1's bank
    ]
    # Buffers: argument i is kernel argument 3 + i; the output carries a 4 KiB guard tail.
    assert ("bo", M * K * 2, "host_only", 103) in log and ("bo", M * N * 2 + 4096, "host_only", 105) in log
    assert ("call", 3, 10, 3) in log  # opcode 3, instruction count in words, three buffers
    assert log[-1] == ("sync", "XCL_BO_SYNC_BO_FROM_DEVICE")
    assert (tmp_path / "npu.lock").exists()
    # A second run reuses the opened device: pyxrt.device(0) was called once.
    r.run(k, inputs(1))
    assert sum(1 for e in log if e[0] == "device") == 1
    t = r.op_timings()["gemm/M4_K8_N16"]
    assert t["runs"] == 2 and set(t["last"]) == {"write_s", "run_s", "read_s"}
    assert all(t[key] >= 0 for key in ("write_s", "run_s", "read_s", "run_s_min"))


def test_out_of_bounds_write_raises(monkeypatch, files, tmp_path):
    fake(monkeypatch, compute=gemm_compute(overrun=6))
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock")
    k = r.load_xclbin(files["xclbin"], files["insts"], "MLIR_AIE", gemm_args(), label="gemm")
    with pytest.raises(GuardBandViolation, match=r"gemm: out-of-bounds write after output 'c': 6 guard byte\(s\) changed, first at byte \+0 past the end"):
        r.run(k, inputs())


def test_unwritten_output_rows_raise(monkeypatch, files, tmp_path):
    fake(monkeypatch, compute=gemm_compute(skip_last_row=True))
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock")
    k = r.load_xclbin(files["xclbin"], files["insts"], "MLIR_AIE", gemm_args(), label="gemm")
    with pytest.raises(GuardBandViolation, match=f"output 'c': {N // 2} of {M * N // 2} words were never written"):
        r.run(k, inputs())


def test_head_guard_passes_a_sub_buffer(monkeypatch, files, tmp_path):
    mod = fake(monkeypatch)
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock", head_guard=64, tail_guard=64)
    k = r.load_xclbin(files["xclbin"], files["insts"], "MLIR_AIE", gemm_args())
    x = inputs()
    np.testing.assert_array_equal(r.run(k, x)["c"], expected_gemm(x))
    assert ("sub_bo", M * N * 2 + 64, 64) in mod.log


def test_incomplete_run_raises(monkeypatch, files, tmp_path):
    fake(monkeypatch, final_state="ERT_CMD_STATE_TIMEOUT")
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock", timeout_ms=50)
    k = r.load_xclbin(files["xclbin"], files["insts"], "MLIR_AIE", gemm_args(), label="gemm")
    with pytest.raises(HarnessError, match="gemm: NPU run ended in state .*TIMEOUT"):
        r.run(k, inputs())


def test_load_checks_kernel_name_and_argument_count(monkeypatch, files, tmp_path):
    fake(monkeypatch, num_args=5)
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock")
    with pytest.raises(HarnessError, match="no kernel 'GEMM' \\(it has MLIR_AIE\\)"):
        r.load_xclbin(files["xclbin"], files["insts"], "GEMM", gemm_args())
    with pytest.raises(HarnessError, match="3 buffer arguments, but final.xclbin declares 2"):
        r.load_xclbin(files["xclbin"], files["insts"], "MLIR_AIE", gemm_args())
    with pytest.raises(HarnessError, match="xclbin .*nope.xclbin does not exist"):
        r.load_xclbin(tmp_path / "nope.xclbin", files["insts"], "MLIR_AIE", gemm_args())


def test_run_checks_inputs(monkeypatch, files, tmp_path):
    fake(monkeypatch)
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock")
    k = r.load_xclbin(files["xclbin"], files["insts"], "MLIR_AIE", gemm_args(), label="gemm")
    with pytest.raises(HarnessError, match="gemm: missing input 'b'"):
        r.run(k, {"a": inputs()["a"]})
    with pytest.raises(HarnessError, match=r"unknown argument\(s\) \['bias'\]"):
        r.run(k, inputs() | {"bias": np.zeros(3)})
    with pytest.raises(HarnessError, match=r"argument 'a': shape \[8, 4\]"):
        r.run(k, {"a": np.zeros((K, M)), "b": inputs()["b"]})


def test_elf_path(monkeypatch, files, tmp_path):
    mod = fake(monkeypatch)
    r = rn.NpuKernelRunner(lock_path=tmp_path / "lock")
    k = r.load_elf(files["elf"], gemm_args(), label="gemm-elf")
    x = inputs()
    np.testing.assert_array_equal(r.run(k, x)["c"], expected_gemm(x))
    assert ("hw_context", "elf") in mod.log and ("kernel", "main:sequence") in mod.log
    assert ("start", 3) in mod.log and not any(e[0] == "call" for e in mod.log)


def test_op_backend_runs_a_registered_artifact(monkeypatch, files, tmp_path):
    fake(monkeypatch)
    design = tmp_path / "gemm_design.py"
    design.write_text("print('module {}')\n")
    fp = {"mlir_aie": "1.2", "llvm_aie": "19.0", "pyxrt": None, "xrt": "2.19.0"}
    reg = KernelRegistry(tmp_path / "registry.json", fingerprint=fp, builder=None)
    reg.register("gemm", "M4_K8_N16", gemm_args(), {"xclbin": files["xclbin"], "insts": files["insts"]}, design=design)
    backend = NpuOpBackend(KernelRegistry(tmp_path / "registry.json", fingerprint=fp, builder=None),
                           rn.NpuKernelRunner(lock_path=tmp_path / "lock"))
    assert backend.has("gemm/M4_K8_N16") and not backend.has("gemm/M8_K8_N16")
    x = inputs()
    got = backend.run_key("gemm/M4_K8_N16", x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected_gemm(x).astype(np.float32))
    prov = backend.provenance()
    assert prov["toolchain"] == fp and set(prov["kernels"]) == {"gemm/M4_K8_N16"}
    assert set(prov["kernels"]["gemm/M4_K8_N16"]["artifacts"]) == {"xclbin", "insts"}
    assert backend.op_timings()["gemm/M4_K8_N16"]["runs"] == 1


@pytest.mark.npu
def test_registered_gemm_on_the_npu():
    """Run the first registered GEMM artifact on the real NPU and compare with an fp32 reference.

    Registry: ``$NPU_HARNESS_REGISTRY`` (default ``kernels/registry.json``). Tolerance: the paper's
    kernel registry for fp32-accumulate GEMM, rtol 1.6e-2 / atol 1.5e-3 on bf16 outputs, 0% misses.
    """
    require_npu()
    path = Path(os.environ.get("NPU_HARNESS_REGISTRY", "kernels/registry.json"))
    registry = KernelRegistry(path)
    gemms = [k for k in registry.keys() if k.startswith("gemm/")]
    if not gemms:
        pytest.skip(f"no gemm/* artifact registered in {path}: add one with KernelRegistry.register (docs/npu.md) "
                    "or set NPU_HARNESS_REGISTRY to a registry that has one")
    op, shape_key = gemms[0].split("/", 1)
    backend = NpuOpBackend(registry)
    art = registry.resolve(op, shape_key)
    (a_spec, b_spec) = [s for s in art.args if s.is_input][:2]
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_spec.shape).astype(BF16).astype(np.float32)
    b = (rng.standard_normal(b_spec.shape) / np.sqrt(a_spec.shape[-1])).astype(BF16).astype(np.float32)
    got = backend.run_key(gemms[0], {a_spec.name: a, b_spec.name: b})
    want = (a @ b).astype(BF16).astype(np.float32)
    close = np.isclose(got, want, rtol=1.6e-2, atol=1.5e-3)
    assert close.all(), f"{gemms[0]}: {np.count_nonzero(~close)} / {close.size} elements outside rtol 1.6e-2 atol 1.5e-3"
