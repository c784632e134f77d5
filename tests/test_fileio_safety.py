"""fileio's guards for files that come from users: regular files only, reads bounded, safetensors sizes
exactly what their headers describe, OSErrors turned into one line naming the path and the fix."""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import fileio
from harness.errors import HarnessError
from harness.fileio import MappedSafetensors, open_regular, read_bounded, safetensors_header, write_safetensors


def test_open_regular_refuses_what_is_not_a_regular_file(tmp_path: Path):
    os.mkfifo(tmp_path / "fifo")  # open() for reading would block until a writer appears
    with pytest.raises(HarnessError, match="fifo is a FIFO, not a regular file: refused"):
        open_regular(tmp_path / "fifo")
    with pytest.raises(HarnessError, match="is a directory, not a regular file"):
        open_regular(tmp_path)
    with pytest.raises(HarnessError, match="/dev/zero is a character device"):
        open_regular("/dev/zero")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        with pytest.raises(HarnessError, match="sock is a socket"):
            open_regular(tmp_path / "sock")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")  # symlinks are followed, then judged
    with pytest.raises(HarnessError, match="link is a FIFO"):
        read_bounded(tmp_path / "link", 10)
    with pytest.raises(HarnessError, match=r"missing: cannot read \(No such file or directory\); check the path"):
        open_regular(tmp_path / "missing")


def test_read_bounded_refuses_larger_files(tmp_path: Path):
    (tmp_path / "f").write_bytes(b"x" * 11)
    assert read_bounded(tmp_path / "f", 11) == b"x" * 11
    with pytest.raises(HarnessError, match=r"f is 11 bytes, more than the 10 allowed: refused"):
        read_bounded(tmp_path / "f", 10, what="")


def test_permission_denied_is_one_line_with_the_fix(tmp_path: Path, monkeypatch):
    """As root nothing is unreadable, so os.open is made to fail as it would for another user: this
    proves the mapping of EACCES to the message, not the OS behaviour."""
    (tmp_path / "f").write_bytes(b"x")

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(fileio.os, "open", denied)
    with pytest.raises(HarnessError) as info:
        read_bounded(tmp_path / "f", 10, what="trace file")
    assert str(info.value) == f"trace file {tmp_path / 'f'}: cannot read (Permission denied); make it readable by this user"


def _write(path: Path, tensors: dict) -> None:
    write_safetensors(path, tensors)


def _raw_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def test_header_must_describe_the_file_exactly(tmp_path: Path):
    f = tmp_path / "t.safetensors"
    _write(f, {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, ml_dtypes.bfloat16)})
    header, start = safetensors_header(f)
    assert header["a"]["shape"] == [2, 3] and start > 8
    m = MappedSafetensors(f)
    assert m.dtype_shape("b") == ("BF16", (4,)) and m.get_tensor("a").sum() == 6
    head, body = _raw_header(f)

    cases = {
        "a span not matching its shape": ({**head, "a": {**head["a"], "shape": [2, 4]}}, body, "invalid header entry"),
        "an unknown dtype": ({**head, "a": {**head["a"], "dtype": "F128"}}, body, "invalid header entry"),
        "a negative dimension": ({**head, "b": {**head["b"], "shape": [-4]}}, body, "invalid header entry"),
        "a gap between tensors": ({"b": {**head["b"], "data_offsets": [32, 40]}}, body, "not contiguous"),
        "a header naming more data than the file holds": (head, body[:-1], "its header describes"),
        "a file padded past its tensors": (head, body + b"\0" * 8, "its header describes"),
    }
    for why, (h, b, message) in cases.items():
        _rewrite(f, h, b)
        with pytest.raises(HarnessError, match=message):
            safetensors_header(f)
        with pytest.raises(HarnessError, match=message):
            MappedSafetensors(f)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # a header length far beyond the file
    with pytest.raises(HarnessError, match="not a readable safetensors file"):
        safetensors_header(f)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(HarnessError, match="shorter than its header"):
        safetensors_header(f)


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=4),
       change=st.integers(-16, 16).filter(lambda n: n != 0))
def test_any_written_file_reads_and_any_size_change_is_refused(tmp_path_factory, shapes, change):
    f = tmp_path_factory.mktemp("st") / "t.safetensors"
    tensors = {f"t{i}": np.arange(int(np.prod(s)), dtype=np.float32).reshape(s) for i, s in enumerate(shapes)}
    _write(f, tensors)
    m = MappedSafetensors(f)
    for name, value in tensors.items():
        np.testing.assert_array_equal(m.get_tensor(name), value)
    del m  # unmap before the file changes size
    data = f.read_bytes()
    f.write_bytes(data + b"\0" * change if change > 0 else data[:change])
    with pytest.raises(HarnessError):
        safetensors_header(f)


def test_reader_reads_the_checked_descriptor_and_reports_truncation(tmp_path: Path):
    from harness.fileio import SafetensorsReader

    f = tmp_path / "t.safetensors"
    _write(f, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16)})
    with SafetensorsReader(f) as r:
        f.unlink()
        os.mkfifo(f)  # the path now names a FIFO: the open descriptor still reads the checked file
        np.testing.assert_array_equal(r.get_tensor("a"), np.arange(6).reshape(2, 3))
        assert r.dtype_shape("b") == ("BF16", (4,)) and r.get_tensor("b").dtype == ml_dtypes.bfloat16
    g = tmp_path / "g.safetensors"
    _write(g, {"a": np.zeros(64, np.float32)})
    with SafetensorsReader(g) as r:
        os.truncate(g, g.stat().st_size - 200)  # cut short while open: a short read, not a SIGBUS
        with pytest.raises(HarnessError, match="shorter than its header says"):
            r.get_tensor("a")
