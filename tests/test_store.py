"""The golden store: complete, reproducible, reused, and never silently corrupt."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import harness
from harness.errors import GoldenCorrupt, HarnessError
from harness.spec import taps as tapspec
from harness.store import GoldenRequest, GoldenStore, verify_dir
from harness.store.golden import default_root

REQ = GoldenRequest("qwen3-0.6b", "tiny", seed=0, decode_steps=2)


def test_build_is_complete_and_reused(store):
    g = store.get(REQ)
    spec = harness.models.get("qwen3-0.6b", "tiny")
    assert g.phases == ["prefill", "decode.0", "decode.1"]
    for phase in g.phases:
        assert sorted(g.tap_names(phase)) == sorted(tapspec.tap_names(spec))
    m = g.manifest
    for key in ("model", "scale", "seed", "weights", "input_ids", "decode_tokens", "dtypes", "versions", "files", "key"):
        assert key in m
    assert set(m["versions"]) >= {"torch", "transformers", "harness"}
    assert len(m["input_ids"]) == spec.default_prompt_len
    bf16 = g.tensor("prefill", "logits", "bf16")
    assert np.array_equal(bf16, bf16.astype(np.float32))
    mtime = (g.path / "manifest.json").stat().st_mtime_ns
    again = store.get(REQ)
    assert again.path == g.path and (g.path / "manifest.json").stat().st_mtime_ns == mtime


def test_key_changes_with_what_determines_tensors(store):
    keys = {GoldenRequest("qwen3-0.6b", "tiny", s, d, p).key() for s, d, p in
            [(0, 2, None), (1, 2, None), (0, 3, None), (0, 2, 70)]}
    assert len(keys) == 4
    assert GoldenRequest("qwen3-0.6b", "tiny", 0, 2).key() == REQ.key()


def test_reproducible(tmp_path, store):
    """Same request, same tensors. Bit-exact only at the same torch thread count: BLAS splits its fp32
    sums by thread, which moves the last fp32 bits (~1e-7 relative), four orders below bf16 noise."""
    a = store.get(REQ)
    b = GoldenStore(tmp_path).get(REQ)
    assert a.manifest["input_ids"] == b.manifest["input_ids"]
    assert a.manifest["decode_tokens"] == b.manifest["decode_tokens"]
    for phase in a.phases:
        for name in ("layers.1.q_rope", "logits"):
            x, y = a.tensor(phase, name), b.tensor(phase, name)
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(x).max())
            x, y = a.tensor(phase, name, "bf16"), b.tensor(phase, name, "bf16")
            np.testing.assert_allclose(x, y, rtol=2.0 ** -7, atol=2.0 ** -7 * np.abs(x).max())


def test_local_baseline_is_lazy_and_verified(tmp_path):
    s = GoldenStore(tmp_path)
    g = s.get(GoldenRequest("llama-3.2-1b", "tiny", 0, 1))
    assert not g.has_local
    with pytest.raises(HarnessError, match="local baseline not built"):
        g.tensor("prefill", "logits", "local")
    g = s.ensure_local(g)
    assert g.has_local and verify_dir(g.path) == []
    assert g.tensor("decode.0", "logits", "local").shape == (1, 2048)


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete", "manifest"])
def test_corruption_is_named_and_never_compared(tmp_path, damage):
    s = GoldenStore(tmp_path)
    g = s.get(GoldenRequest("qwen3-0.6b", "tiny", 0, 1))
    victim = g.path / "decode.0.safetensors"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "edit":
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        victim = g.path / "manifest.json"
        victim.write_text("{not json")
    problems = verify_dir(g.path)
    assert problems and victim.name in problems[0]
    with pytest.raises(GoldenCorrupt, match=victim.name):
        s.get(GoldenRequest("qwen3-0.6b", "tiny", 0, 1))
    with pytest.raises(GoldenCorrupt):
        harness.check("qwen3-0.6b", "emulator", decode_steps=1, golden_dir=tmp_path)


def test_a_build_is_not_read_back_its_first_use_verifies_it(tmp_path, monkeypatch):
    """The build hashes the bytes it hands to its files and does not read them back; what a writer bug
    (or the disk) would put there instead is caught by the next load and by phase 0's integrity check."""
    import harness.store.golden as golden_mod
    from harness.fileio import SafetensorsWriter
    from harness.suites.sanity import golden_integrity

    verified = []
    real_verify = golden_mod.verify_dir
    monkeypatch.setattr(golden_mod, "verify_dir", lambda path, *a: (verified.append(path), real_verify(path, *a))[1])
    real_close = SafetensorsWriter.close

    def close_then_damage(self):  # a writer whose file ends up holding other bytes than it hashed
        record = real_close(self)
        if self._fh.name.endswith("decode.0.safetensors"):
            with open(self._fh.name, "r+b") as fh:
                fh.seek(-3, os.SEEK_END)
                fh.write(b"\x7f\x7f\x7f")
        return record

    monkeypatch.setattr(SafetensorsWriter, "close", close_then_damage)
    request = GoldenRequest("qwen3-0.6b", "tiny", 0, 1)
    g = GoldenStore(tmp_path).get(request)
    assert verified == [] and g.manifest["key"] == request.key()
    check = golden_integrity(g)  # phase 0 of a gate
    assert not check.passed and "decode.0.safetensors: sha256 mismatch" in check.message
    with pytest.raises(GoldenCorrupt, match="decode.0.safetensors"):
        GoldenStore(tmp_path).get(request)  # every load verifies


def test_corruption_through_cli_exits_nonzero_naming_file(tmp_path):
    s = GoldenStore(tmp_path)
    g = s.get(GoldenRequest("qwen3-0.6b", "tiny", 0, 1))
    env = {**os.environ, "NPU_HARNESS_GOLDEN_DIR": str(tmp_path)}
    harness_bin = os.path.join(os.path.dirname(sys.executable), "harness")
    ok = subprocess.run([harness_bin, "golden", "verify"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    victim = g.path / "prefill.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    bad = subprocess.run([harness_bin, "golden", "verify"], env=env, capture_output=True, text=True)
    assert bad.returncode == 3
    assert "prefill.safetensors" in bad.stdout and "sha256 mismatch" in bad.stdout


def test_env_var_and_no_build(tmp_path, monkeypatch):
    monkeypatch.setenv("NPU_HARNESS_GOLDEN_DIR", str(tmp_path))
    assert default_root() == tmp_path and GoldenStore().root == tmp_path
    with pytest.raises(HarnessError, match="no golden for qwen3-0.6b/tiny"):
        GoldenStore().get(REQ, build=False)


BUILD_SNIPPET = (
    "import sys; from harness.store import GoldenStore, GoldenRequest; "
    "print(GoldenStore(sys.argv[1]).get(GoldenRequest('smollm2-1.7b', 'tiny', 0, 1)).path)"
)


def test_parallel_builders_build_once(tmp_path):
    """Two processes asking at once (as pytest-xdist workers do) get one entry, built once."""
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SNIPPET, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert paths[0] == paths[1]
    entries = list(GoldenStore(tmp_path).entries())
    assert len(entries) == 1 and verify_dir(entries[0][0]) == []
    assert not list(tmp_path.rglob(".tmp-*"))


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import harness.store.golden as golden_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(golden_mod, "_write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        GoldenStore(tmp_path).get(GoldenRequest("qwen3-0.6b", "tiny", 0, 1))
    leftovers = [p for p in tmp_path.rglob("*") if p.is_dir() and p.name.startswith((".tmp", "seed"))]
    assert leftovers == []


def test_clean_and_list(tmp_path):
    s = GoldenStore(tmp_path)
    s.get(GoldenRequest("qwen3-0.6b", "tiny", 0, 1))
    s.get(GoldenRequest("smollm2-1.7b", "tiny", 0, 1))
    assert len(list(s.entries())) == 2
    assert s.clean("qwen3-0.6b") == 1
    manifests = [m for _, m in s.entries()]
    assert [m["model"] for m in manifests] == ["smollm2-1.7b"]
    assert json.loads(json.dumps(manifests[0]))["seed"] == 0


# -- errors a user can fix: one line naming the path and the fix (exit 3 from the CLI) -----------------
# As root, chmod stops nothing, so a read-only store is simulated two ways: a golden directory under a
# regular file (the OS really refuses: ENOTDIR), and a monkeypatched PermissionError (proves the mapping
# of EACCES to the message, not that the OS raises it).

def test_golden_dir_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    store = GoldenStore(tmp_path / "file" / "golden")
    with pytest.raises(HarnessError, match=r"golden store .*file/golden: cannot write to .*\(it or a parent is a file, not a directory\); "
                                           r"use a writable directory: --golden-dir DIR or NPU_HARNESS_GOLDEN_DIR"):
        store.get(REQ)


def test_golden_dir_under_a_regular_file_through_the_cli(tmp_path, capsys):
    """Through the CLI's entry point (harness.cli.main, what the `harness` script runs), in-process."""
    from harness.cli import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        main(["golden", "build", "--model", "qwen3-0.6b", "--decode-steps", "1",
              "--golden-dir", str(tmp_path / "file" / "golden")])
    assert info.value.code == 3
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and "cannot write to" in lines[0] and "--golden-dir DIR" in lines[0], lines


def test_permission_denied_while_building_and_cleaning(tmp_path, monkeypatch):
    import errno
    import shutil

    import harness.store.golden as golden_mod

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(golden_mod.GoldenStore, "_tmpdir", lambda self, final: denied(final.parent / ".tmp-x"))
    with pytest.raises(HarnessError, match=r"cannot write to .*\.tmp-x \(Permission denied\); use a writable"):
        GoldenStore(tmp_path).get(REQ)
    entry = tmp_path / "qwen3-0_6b" / "tiny" / "seed0-0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    monkeypatch.setattr(shutil, "rmtree", denied)
    with pytest.raises(HarnessError, match=r"cannot remove .*seed0-0123456789abcdef \(Permission denied\)"):
        GoldenStore(tmp_path).clean()


def test_unreadable_golden_files_are_named(store, monkeypatch):
    import builtins
    import errno

    g = store.get(REQ)
    real_open = builtins.open

    def deny(path, *a, **k):
        if str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(HarnessError, match=r"golden file .*\.safetensors: cannot read \(Permission denied\); "
                                           r"make it readable by this user"):
        verify_dir(g.path)
