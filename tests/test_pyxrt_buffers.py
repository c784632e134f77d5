"""Host-side runner logic without hardware: argument specs, instruction files, guard bands."""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.deployment.pyxrt.buffers import (
    DTYPES,
    SENTINEL,
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

ITEMSIZE = {"bf16": 2, "f32": 4, "i8": 1, "i16": 2, "i32": 4, "u8": 1, "u16": 2, "u32": 4}


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 64), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(sorted(DTYPES)),
    direction=st.sampled_from(["in", "out", "inout"]),
)
def test_argspec_sizes_follow_shape_and_dtype(shape, dtype, direction):
    spec = ArgSpec("x", direction, shape, dtype)
    assert spec.numel == int(np.prod(shape))
    assert spec.nbytes == spec.numel * ITEMSIZE[dtype]
    assert spec.is_input == (direction != "out") and spec.is_output == (direction != "in")
    assert ArgSpec.from_dict(spec.to_dict()) == spec


def test_argspec_defaults_to_bf16_and_rejects_bad_specs():
    assert ArgSpec.from_dict({"name": "a", "direction": "in", "shape": [4, 8]}).nbytes == 64
    with pytest.raises(HarnessError, match="direction 'output'"):
        ArgSpec("c", "output", (4,))
    with pytest.raises(HarnessError, match="dtype 'fp8'"):
        ArgSpec("c", "out", (4,), "fp8")
    with pytest.raises(HarnessError, match=r"shape \[4, 0\]"):
        ArgSpec("c", "out", (4, 0))
    with pytest.raises(HarnessError, match="needs name, direction, shape"):
        ArgSpec.from_dict({"name": "a"}, "gemm entry")


def test_to_device_array_checks_shape_and_rounds_to_bf16():
    spec = ArgSpec("a", "in", (2, 2))
    out = to_device_array(spec, np.array([[1.0, 1.0 + 2**-9], [3.0, -0.5]], np.float32))
    assert out.dtype == ml_dtypes.bfloat16 and float(out[0, 1]) == 1.0  # 1 + 2^-9 rounds to even
    with pytest.raises(HarnessError, match=r"argument 'a': shape \[4\], the kernel expects \[2, 2\]"):
        to_device_array(spec, np.zeros(4))
    with pytest.raises(HarnessError, match="float64 values for an integer"):
        to_device_array(ArgSpec("i", "in", (2,), "i32"), np.zeros(2))


def test_read_insts_bin_and_txt(tmp_path: Path):
    words = np.array([0x06030100, 0x00000105, 0xDEADBEEF], dtype="<u4")
    (tmp_path / "insts.bin").write_bytes(words.tobytes())
    np.testing.assert_array_equal(read_insts(tmp_path / "insts.bin"), words)
    (tmp_path / "insts.txt").write_text("06030100\n00000105\nDEADBEEF\n")
    got = read_insts(tmp_path / "insts.txt")
    assert got.dtype == np.uint32 and list(got) == list(words)


def test_read_insts_errors_name_the_file(tmp_path: Path):
    with pytest.raises(HarnessError, match="instruction file .*missing.bin"):
        read_insts(tmp_path / "missing.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(HarnessError, match="odd.bin: 6 bytes is not a whole number of 32-bit words"):
        read_insts(tmp_path / "odd.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(HarnessError, match="empty.bin is empty"):
        read_insts(tmp_path / "empty.bin")
    (tmp_path / "bad.txt").write_text("xyz\n")
    with pytest.raises(HarnessError, match="bad.txt: not hex words"):
        read_insts(tmp_path / "bad.txt")


def test_guarded_output_starts_as_sentinel_everywhere():
    layout = GuardLayout(payload=12, head=8, tail=16)
    buf = guarded_buffer(layout, None)
    assert buf.size == 36 and bytes(buf[:4]) == SENTINEL
    assert unwritten_words(buf, layout) == 3
    check_guards(buf, layout, "c")  # untouched guards pass
    # The sentinel is a NaN in both float formats a kernel may write, so correct outputs never match it.
    assert np.isnan(np.frombuffer(SENTINEL, ml_dtypes.bfloat16).astype(np.float32)).all()
    assert np.isnan(np.frombuffer(SENTINEL, np.float32)).all()


def test_input_payload_is_placed_between_guards():
    layout = GuardLayout(payload=6, head=4, tail=8)
    buf = guarded_buffer(layout, bytes(range(6)))
    assert list(buf[4:10]) == list(range(6))
    with pytest.raises(HarnessError, match="payload of 3 bytes for a 6-byte buffer"):
        guarded_buffer(layout, b"abc")
    with pytest.raises(HarnessError, match="multiples of 4"):
        GuardLayout(8, head=2)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.integers(1, 200),
    head=st.sampled_from([0, 4, 64]),
    tail=st.sampled_from([4, 64, 4096]),
    data=st.data(),
)
def test_any_write_outside_the_payload_is_caught(payload, head, tail, data):
    layout = GuardLayout(payload, head, tail)
    buf = guarded_buffer(layout, None)
    buf[head : head + payload] = 0  # a full, in-bounds write passes
    check_guards(buf, layout, "c")
    assert unwritten_words(buf, layout) == 0
    outside = [i for i in range(layout.total) if not head <= i < head + payload]
    pos = data.draw(st.sampled_from(outside))
    buf[pos] ^= 0xFF
    side = "before" if pos < head else "after"
    with pytest.raises(GuardBandViolation, match=rf"out-of-bounds write {side} output 'c'"):
        check_guards(buf, layout, "c", "gemm/M4")


def test_violation_message_gives_offset_past_the_end():
    layout = GuardLayout(payload=16, tail=64)
    buf = guarded_buffer(layout, None)
    buf[16 + 8 : 16 + 12] = 0
    with pytest.raises(GuardBandViolation, match=r"gemm: out-of-bounds write after output 'c': 4 guard byte\(s\) changed, first at byte \+8 past the end of the 16-byte buffer"):
        check_guards(buf, layout, "c", "gemm")


def test_partially_written_output_is_counted():
    layout = GuardLayout(payload=32, tail=4)
    buf = guarded_buffer(layout, None)
    buf[:20] = 1  # 5 of 8 words written: a skipped tile remainder
    assert unwritten_words(buf, layout) == 3
