"""Kernel registry: fresh, stale by toolchain, stale by source edit, missing files, bad registry, rebuild."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.deployment.pyxrt import artifacts, toolchain
from harness.deployment.pyxrt.artifacts import Artifact, KernelRegistry
from harness.deployment.pyxrt.buffers import ArgSpec
from harness.errors import HarnessError

FP = {"mlir_aie": "1.2.0", "llvm_aie": "19.1.0", "pyxrt": None, "xrt": "2.19.0"}
ARGS = [ArgSpec("a", "in", (128, 896)), ArgSpec("b", "in", (896, 4864)), ArgSpec("c", "out", (128, 4864))]
KEY = ("gemm", "M128_K896_N4864")


@pytest.fixture
def reg_path(tmp_path: Path) -> Path:
    """A registry with one GEMM artifact built (per its provenance) by toolchain FP."""
    (tmp_path / "designs").mkdir()
    (tmp_path / "designs" / "gemm.py").write_text("print('module {}')\n")
    (tmp_path / "designs" / "mm.cc").write_text("// kernel\n")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "final.xclbin").write_bytes(b"xclbin-v1")
    (tmp_path / "build" / "insts.bin").write_bytes(np.arange(4, dtype="<u4").tobytes())
    path = tmp_path / "registry.json"
    KernelRegistry(path, fingerprint=FP, builder=None).register(
        *KEY, ARGS, {"xclbin": tmp_path / "build" / "final.xclbin", "insts": tmp_path / "build" / "insts.bin"},
        sources=[tmp_path / "designs" / "mm.cc"], design=tmp_path / "designs" / "gemm.py",
        design_args=["-M", "128"], kernel_name="MLIR_AIE",
    )
    return path


def test_registry_file_is_relative_and_complete(reg_path: Path):
    entry = json.loads(reg_path.read_text())["kernels"]["gemm/M128_K896_N4864"]
    assert entry["xclbin"] == "build/final.xclbin" and entry["design"] == "designs/gemm.py"
    prov = entry["provenance"]
    assert prov["toolchain"] == FP
    assert set(prov["sources"]) == {"designs/gemm.py", "designs/mm.cc"}
    assert set(prov["artifacts"]) == {"xclbin", "insts"} and len(prov["artifacts"]["xclbin"]) == 64


def test_fresh_artifact_resolves(reg_path: Path):
    reg = KernelRegistry(reg_path, fingerprint=FP, builder=None)
    art = reg.resolve(*KEY)
    assert isinstance(art, Artifact) and art.op == "gemm" and art.shape_key == "M128_K896_N4864"
    assert art.kernel_name == "MLIR_AIE" and art.args == tuple(ARGS) and not art.is_elf
    assert art.files["xclbin"] == reg_path.parent / "build" / "final.xclbin"
    assert art.design_args == ("-M", "128")
    assert reg.stale_reasons(art) == []
    assert set(reg.provenance()["kernels"]) == {"gemm/M128_K896_N4864"}


def test_stale_by_toolchain_is_refused_naming_recorded_and_current(reg_path: Path):
    reg = KernelRegistry(reg_path, fingerprint=FP | {"mlir_aie": "1.3.0"}, builder=None)
    with pytest.raises(HarnessError) as exc:
        reg.resolve(*KEY)
    msg = str(exc.value)
    assert "kernel artifact gemm/M128_K896_N4864" in msg and "is stale" in msg
    assert "mlir_aie recorded '1.2.0', current '1.3.0'" in msg and "never reused" in msg


def test_absent_toolchain_counts_as_a_different_one(reg_path: Path):
    reg = KernelRegistry(reg_path, fingerprint=FP | {"xrt": None}, builder=None)
    with pytest.raises(HarnessError, match="xrt recorded '2.19.0', current None"):
        reg.resolve(*KEY)


def test_stale_by_source_edit(reg_path: Path):
    (reg_path.parent / "designs" / "mm.cc").write_text("// kernel, edited\n")
    with pytest.raises(HarnessError, match=r"source designs/mm.cc sha256 recorded [0-9a-f]{12}, current [0-9a-f]{12}"):
        KernelRegistry(reg_path, fingerprint=FP, builder=None).resolve(*KEY)


def test_replaced_binary_is_refused(reg_path: Path):
    (reg_path.parent / "build" / "final.xclbin").write_bytes(b"xclbin-from-elsewhere")
    with pytest.raises(HarnessError, match="xclbin final.xclbin sha256 recorded"):
        KernelRegistry(reg_path, fingerprint=FP, builder=None).resolve(*KEY)


def test_missing_files(reg_path: Path):
    (reg_path.parent / "build" / "insts.bin").unlink()
    with pytest.raises(HarnessError, match="insts file .*insts.bin is missing"):
        KernelRegistry(reg_path, fingerprint=FP, builder=None).resolve(*KEY)
    (reg_path.parent / "designs" / "gemm.py").unlink()
    with pytest.raises(HarnessError, match="design source .*gemm.py is missing"):
        KernelRegistry(reg_path, fingerprint=FP, builder=None).resolve(*KEY)


def test_unknown_key_lists_what_exists(reg_path: Path):
    reg = KernelRegistry(reg_path, fingerprint=FP, builder=None)
    with pytest.raises(HarnessError, match="no artifact 'gemm/M64_K896_N4864'; gemm has gemm/M128_K896_N4864"):
        reg.resolve("gemm", "M64_K896_N4864")
    with pytest.raises(HarnessError, match="it has no 'rope' kernels"):
        reg.resolve("rope", "T64")


def test_stale_artifact_is_rebuilt_when_a_builder_exists(reg_path: Path):
    built: list[str] = []

    def builder(art: Artifact) -> None:
        built.append(art.key)
        art.files["xclbin"].write_bytes(b"xclbin-v2")

    new_fp = FP | {"llvm_aie": "20.0.0"}
    art = KernelRegistry(reg_path, fingerprint=new_fp, builder=builder).resolve(*KEY)
    assert built == ["gemm/M128_K896_N4864"]
    assert art.provenance["toolchain"] == new_fp
    # The new provenance was written back, so the next resolve is fresh and builds nothing.
    again = KernelRegistry(reg_path, fingerprint=new_fp, builder=builder).resolve(*KEY)
    assert built == ["gemm/M128_K896_N4864"] and again.provenance == art.provenance


def test_builder_that_leaves_no_binary_fails(reg_path: Path):
    def builder(art: Artifact) -> None:
        art.files["insts"].unlink()

    with pytest.raises(HarnessError, match="insts file .*does not exist"):
        KernelRegistry(reg_path, fingerprint=FP | {"xrt": "2.20.0"}, builder=builder).resolve(*KEY)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{broken", "not valid JSON"),
        ('{"schema": 2, "kernels": {}}', r'expected \{"schema": 1'),
        ('{"schema": 1, "kernels": {"gemm": {}}}', "key must be an op-case id, e.g. 'gemm\\[M=128"),
        ('{"schema": 1, "kernels": {"gemm/M1": {"elf": "a.elf", "xclbin": "b"}}}', "needs 'xclbin' \\+ 'insts', or 'elf'"),
        ('{"schema": 1, "kernels": {"gemm/M1": {"elf": "a.elf", "args": []}}}', "'args' must be a non-empty list"),
        ('{"schema": 1, "kernels": {"gemm/M1": {"elf": "a.elf", "args": [{"name": "a"}]}}}', "needs name, direction, shape"),
        ('{"schema": 1, "kernels": {"gemm/M1": {"elf": "a.elf", "args": [{"name": "a", "direction": "in", "shape": [2]}]}}}',
         "no 'design' or 'sources'"),
    ],
)
def test_bad_registry_file(tmp_path: Path, content: str, match: str):
    path = tmp_path / "registry.json"
    path.write_text(content)
    with pytest.raises(HarnessError, match=match) as exc:
        KernelRegistry(path, fingerprint=FP, builder=None)
    assert str(path) in str(exc.value)


def test_missing_registry_is_empty_and_elf_entries_default_to_main_sequence(tmp_path: Path):
    reg = KernelRegistry(tmp_path / "kernels" / "registry.json", fingerprint=FP, builder=None)
    assert reg.keys() == []
    (tmp_path / "k.elf").write_bytes(b"\x7fELF")
    (tmp_path / "rms.py").write_text("print('module {}')\n")
    art = reg.register("rmsnorm", "T64_H896", [ArgSpec("x", "in", (64, 896)), ArgSpec("y", "out", (64, 896))],
                       {"elf": tmp_path / "k.elf"}, design=tmp_path / "rms.py")
    assert art.is_elf and art.kernel_name == "main:sequence"
    assert KernelRegistry(tmp_path / "kernels" / "registry.json", fingerprint=FP, builder=None).keys() == ["rmsnorm/T64_H896"]


def test_toolchain_fingerprint_reads_xrt_version_json(tmp_path: Path):
    (tmp_path / "version.json").write_text(json.dumps({"BUILD_VERSION": "2.19.0", "BUILD_BRANCH": "master"}))
    assert toolchain.xrt_version({"XILINX_XRT": str(tmp_path)}, which=lambda _n: None) == "2.19.0"
    assert toolchain.xrt_version({}, which=lambda _n: None) is None
    fp = toolchain.toolchain_fingerprint({"XILINX_XRT": str(tmp_path)}, which=lambda _n: None)
    assert set(fp) == {"mlir_aie", "llvm_aie", "pyxrt", "xrt"} and fp["xrt"] == "2.19.0"


def test_fingerprint_diff_only_counts_stale_keys():
    assert toolchain.fingerprint_diff(FP, FP | {"pyxrt": "2.19"}) == {}
    assert toolchain.fingerprint_diff(FP, FP | {"mlir_aie": None}) == {"mlir_aie": ("1.2.0", None)}


def test_provenance_carries_toolchain_npu_and_kernels(reg_path: Path):
    reg = KernelRegistry(reg_path, fingerprint=FP, builder=None)
    reg.resolve(*KEY)
    prov = artifacts.provenance(reg)
    assert prov["toolchain"] == FP and "present" in prov["npu"] and "reason" in prov["npu"]
    assert prov["kernels"]["gemm/M128_K896_N4864"]["toolchain"] == FP
    json.dumps(prov)  # verdicts serialise it
    assert set(artifacts.provenance()) == {"toolchain", "npu"}


def fake_aiecc(bin_dir: Path) -> None:
    """A stand-in ``aiecc.py`` on PATH: writes each --*-name=<path> output and logs its argv."""
    bin_dir.mkdir()
    script = bin_dir / "aiecc.py"
    script.write_text(
        "#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/argv\"\n"
        "for a in \"$@\"; do case \"$a\" in --*-name=*) echo built > \"${a#*=}\";; esac; done\n"
    )
    script.chmod(0o755)


def test_build_artifact_runs_the_design_then_aiecc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_aiecc(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setitem(sys.modules, "aie.utils.compile", None)  # force the CLI path even where mlir-aie exists
    design = tmp_path / "gemm.py"
    design.write_text("import sys\nprint('module { // M=' + sys.argv[2] + ' }')\n")
    out = {"xclbin": tmp_path / "out" / "final.xclbin", "insts": tmp_path / "out" / "insts.bin"}
    toolchain.build_artifact(design, ["-M", "128"], out, tmp_path / "work")
    assert (tmp_path / "work" / "aie.mlir").read_text().strip() == "module { // M=128 }"
    assert out["xclbin"].read_text() == out["insts"].read_text() == "built\n"
    argv = (tmp_path / "bin" / "argv").read_text()
    assert "--aie-generate-xclbin" in argv and "--aie-generate-npu-insts" in argv and "--no-compile-host" in argv


def test_build_artifact_reports_a_failing_design(tmp_path: Path):
    design = tmp_path / "bad.py"
    design.write_text("raise SystemExit('tile_n must divide N')\n")
    with pytest.raises(HarnessError, match="IRON design .*bad.py failed \\(exit 1\\): tile_n must divide N"):
        toolchain.build_artifact(design, [], {"elf": tmp_path / "k.elf"}, tmp_path / "work")
