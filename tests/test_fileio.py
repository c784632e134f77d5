"""The golden store's file layer: block sha256s, the zero-copy safetensors writer and mapped reader."""
import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from harness.fileio import BlockHasher, MappedSafetensors, SafetensorsWriter, block_digest_tasks, block_matches, \
    write_safetensors


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), block=st.integers(1, 700), chunk=st.integers(1, 900))
def test_block_hasher_equals_sha256_of_each_block(data, block, chunk):
    h = BlockHasher(block)
    for i in range(0, len(data), chunk):
        h.update(data[i:i + chunk])
    r = h.result()
    expected = [hashlib.sha256(data[i:i + block]).hexdigest() for i in range(0, len(data), block)]
    assert r["size"] == len(data) and r["sha256"] == (expected or [hashlib.sha256(b"").hexdigest()])


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 9)), min_size=1, max_size=5),
       seed=st.integers(0, 2**31))
def test_writer_output_is_standard_safetensors(tmp_path_factory, shapes, seed):
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, shape in enumerate(shapes):
        x = rng.standard_normal(shape).astype(np.float32)
        tensors[f"fp32/t{i}"] = x
        tensors[f"bf16/t{i}"] = x.astype(ml_dtypes.bfloat16)
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    record = write_safetensors(path, tensors)
    assert all(block_matches(t) for t in block_digest_tasks(path, record))
    mapped = MappedSafetensors(path)
    with safe_open(str(path), framework="numpy") as ref:
        assert sorted(ref.keys()) == sorted(mapped.keys()) == sorted(tensors)
        for name, value in tensors.items():
            np.testing.assert_array_equal(ref.get_tensor(name), value)
            view = mapped.get_tensor(name)
            np.testing.assert_array_equal(view, value)
            assert view.dtype == value.dtype and not view.flags.writeable


def test_a_flipped_byte_fails_its_block_only(tmp_path):
    path = tmp_path / "x.safetensors"
    record = write_safetensors(path, {"a": np.arange(3 * (1 << 22), dtype=np.float32)})  # 48 MiB + header
    data = bytearray(path.read_bytes())
    data[(1 << 24) + 100] ^= 1                                       # a byte of block 1
    path.write_bytes(bytes(data))
    ok = [block_matches(t) for t in block_digest_tasks(path, record)]
    assert len(ok) == 4 and ok == [True, False, True, True]


def test_writer_refuses_out_of_order_and_wrong_shapes(tmp_path):
    w = SafetensorsWriter(tmp_path / "y.safetensors", [("a", np.float32, (2,)), ("b", np.float32, (3,))])
    with pytest.raises(ValueError, match="got 'b', expected a"):
        w.write("b", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"a is float32\(3,\), layout says float32\(2,\)"):
        w.write("a", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="1 tensors never written"):
        w.close()


def _rss_file_kib() -> int:
    """File-backed resident memory of this process (RssFile in /proc/self/status), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("file-backed RSS not measurable here: /proc/self/status has no RssFile (needs Linux >= 4.5); run on Linux to check golden reads")


def test_mapped_reads_do_not_keep_the_file_resident(tmp_path) -> None:
    """Reading every tensor of a 64 MB file through one mapping leaves (almost) none of its pages
    resident in this process: each read copies the tensor out and drops the pages it touched."""
    from harness.fileio import MappedSafetensors, write_safetensors

    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((1024, 2048), dtype=np.float32) for i in range(8)}
    path = tmp_path / "big.safetensors"
    write_safetensors(path, tensors)
    mapped = MappedSafetensors(path)
    before = _rss_file_kib()
    for name, want in tensors.items():
        got = mapped.read_tensor(name)
        assert got.flags.writeable and np.array_equal(got, want)
        del got
    grown_mib = (_rss_file_kib() - before) / 1024
    assert grown_mib < 16, f"file-backed resident memory grew {grown_mib:.0f} MiB reading a 64 MiB file"
    as_f64 = mapped.read_tensor("t0", np.float64)
    assert as_f64.dtype == np.float64 and np.array_equal(as_f64, tensors["t0"])


def test_write_atomic_replaces_whole_and_leaves_nothing_when_it_fails(tmp_path) -> None:
    from harness.fileio import write_atomic

    target = tmp_path / "index.json"
    target.write_text("old")
    write_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    blocked = tmp_path / "a-dir"
    blocked.mkdir()  # a directory where the file should go: the rename fails
    with pytest.raises(OSError):
        write_atomic(blocked, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "index.json"]  # no temporary file left
