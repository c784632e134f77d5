"""What the build does to save time must not change a bit: synthetic weights drawn into one reused
buffer, a small model's private weights generated in memory on a thread, taps written behind the run."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import harness
from harness.fileio import SafetensorsWriter
from harness.store.streamwrite import WRITE_BEHIND_MIN, _WriteBehind
from harness.weights import WeightsSource, build_source, close_source
from harness.weights.lazy import GeneratedWeights, GeneratingWeights, MappedWeights, write_weights_file
from harness.weights.synthetic import synthetic_plan

# sha256 (first 32 hex digits) of every tensor of the plan, seed 5, as the implementation before the
# reused draw buffer made them (commit 0385e71): the values are part of every golden's key.
PLAN_DIGESTS = {
    "qwen2.5-0.5b": "9c892089684c933f71b468325ba5ac58",
    "qwen3-0.6b": "d066454e252d23c4bdb8a9c7f36a71f7",
    "llama-3.2-3b": "71c2f7198c8dd9688c215228b01176dd",
    "smollm2-1.7b": "13dca1a5a89c78c11211623c86322b84",
}


@pytest.mark.parametrize("model", sorted(PLAN_DIGESTS))
def test_synthetic_values_are_unchanged(model: str) -> None:
    h = hashlib.sha256()
    for name, _, make in synthetic_plan(harness.models.get(model, "tiny"), 5):
        h.update(name.encode())
        h.update(make().tobytes())
    assert h.hexdigest()[:32] == PLAN_DIGESTS[model]


def test_generated_weights_are_the_weights_file(tmp_path: Path) -> None:
    spec = harness.models.get("qwen3-0.6b", "tiny")
    write_weights_file(tmp_path / "w.safetensors", synthetic_plan(spec, 3), ml_dtypes.bfloat16)
    want = MappedWeights([tmp_path / "w.safetensors"])
    got = build_source(spec, WeightsSource(), 3, tmp_path / "unused")  # small: in memory, nothing written
    try:
        assert isinstance(got, GeneratedWeights) and not (tmp_path / "unused").exists()
        _assert_served_as_written(got, want, list(want))
    finally:
        close_source(got)


def _assert_served_as_written(got, want, order: list[str]) -> None:
    """Every tensor of ``got``, looked up in ``order``: ``want``'s bf16 bits, read-only, 64-byte aligned."""
    assert list(got) == list(want) and len(got) == len(want)
    for name in order:
        value = got[name]
        assert value.dtype == ml_dtypes.bfloat16 and got.shape(name) == value.shape
        assert np.array_equal(value.view(np.int16), want[name].view(np.int16)), name
        assert value.ctypes.data % 64 == 0  # zero-copy for the bf16 run (streaming._as_torch)
        with pytest.raises(ValueError):
            value[...] = 0
    with pytest.raises(KeyError):
        got["model.nope"]


def test_a_larger_models_weights_file_is_read_while_it_is_written(tmp_path: Path, monkeypatch) -> None:
    """Past KEEP_MAPPED_BYTES the private weights go to a file a thread writes: every tensor read as it
    is there is the value write_weights_file writes, and the finished file is that file byte for byte."""
    import harness.weights as weights_pkg

    spec = harness.models.get("llama-3.2-1b", "tiny")
    write_weights_file(tmp_path / "want.safetensors", synthetic_plan(spec, 3), ml_dtypes.bfloat16)
    want = MappedWeights([tmp_path / "want.safetensors"])
    monkeypatch.setattr(weights_pkg, "KEEP_MAPPED_BYTES", 0)
    (tmp_path / "build").mkdir()
    got = build_source(spec, WeightsSource(), 3, tmp_path / "build")
    try:
        assert isinstance(got, GeneratingWeights)
        _assert_served_as_written(got, want, list(want))  # in plan order: most lookups wait for the thread
    finally:
        close_source(got)
    written = tmp_path / "build" / ".weights.safetensors"
    assert written.read_bytes() == (tmp_path / "want.safetensors").read_bytes()


def test_a_golden_read_from_a_weights_file_being_written_is_the_same_golden(tmp_path: Path, monkeypatch) -> None:
    import harness.weights as weights_pkg
    from harness.store import GoldenRequest, GoldenStore

    request = GoldenRequest("llama-3.2-1b", "tiny", 0, 2, 16)
    in_memory = GoldenStore(tmp_path / "a").get(request)
    monkeypatch.setattr(weights_pkg, "KEEP_MAPPED_BYTES", 0)  # the private weights go through the file
    written: list[str] = []
    keep = GeneratingWeights._keep
    monkeypatch.setattr(GeneratingWeights, "_keep", lambda self, name, value: (written.append(name),
                                                                                keep(self, name, value)))
    from_file = GoldenStore(tmp_path / "b").get(request)
    assert len(written) == len(synthetic_plan(request.spec, 0))
    assert not list(from_file.path.glob(".weights*"))  # deleted once the entry is complete
    names = sorted(p.name for p in in_memory.path.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in from_file.path.glob("*.safetensors"))
    for name in names:
        assert (in_memory.path / name).read_bytes() == (from_file.path / name).read_bytes(), name


def _generator(kind: str, plan, tmp_path: Path):
    if kind == "in memory":
        return GeneratedWeights(plan, ml_dtypes.bfloat16)
    return GeneratingWeights(tmp_path / "w.safetensors", plan, ml_dtypes.bfloat16)


@pytest.mark.parametrize("kind", ["in memory", "to a file"])
def test_a_generator_error_is_raised_at_the_lookup_and_close_stops_it(kind: str, tmp_path: Path) -> None:
    spec = harness.models.get("qwen3-0.6b", "tiny")
    plan = synthetic_plan(spec, 0)

    def broken():
        raise MemoryError("no room for this tensor")

    bad = plan[:3] + [(plan[3][0], plan[3][1], broken)] + plan[4:]
    w = _generator(kind, bad, tmp_path)
    assert w[plan[0][0]].shape == plan[0][1]  # made before the failure: served
    with pytest.raises(MemoryError, match="no room"):
        w[plan[5][0]]
    w.close()

    started, release, made = threading.Event(), threading.Event(), []

    def first():
        started.set()
        release.wait(30)
        made.append(plan[0][0])
        return plan[0][2]()

    (tmp_path / "w.safetensors").unlink(missing_ok=True)
    slow = _generator(kind, [(plan[0][0], plan[0][1], first)] +
                      [(n, s, (lambda m=m, n=n: made.append(n) or m())) for n, s, m in plan[1:]], tmp_path)
    assert started.wait(30)
    threading.Timer(0.2, release.set).start()
    slow.close()  # a build that failed: the thread stops after the tensor it is making
    assert made == [plan[0][0]]
    with pytest.raises(RuntimeError, match="closed before"):
        slow[plan[1][0]]  # never made: raised, not waited for


def _layout():
    rng = np.random.default_rng(0)
    sizes = [(1, 7), (300, 1000), (3, 5), (2000, 600), (1, 9), (64, 64)]  # below and above WRITE_BEHIND_MIN
    return [(f"t{i}", rng.standard_normal(s).astype(np.float32)) for i, s in enumerate(sizes)]


def test_write_behind_gives_the_bytes_of_writing_inline(tmp_path: Path) -> None:
    arrays = _layout()
    assert any(a.nbytes < WRITE_BEHIND_MIN for _, a in arrays) and any(a.nbytes > WRITE_BEHIND_MIN for _, a in arrays)
    layout = [(n, a.dtype, a.shape) for n, a in arrays]
    inline = SafetensorsWriter(tmp_path / "inline.safetensors", layout)
    for n, a in arrays:
        inline.write(n, a)
    behind_writer = SafetensorsWriter(tmp_path / "behind.safetensors", layout)
    behind = _WriteBehind(limit=3 << 20)  # the 4.8 MB tensor goes inline, after the queue drains
    for i, (n, a) in enumerate(arrays):
        if i % 2:
            behind.write(behind_writer, n, a.copy())  # owns its memory: queued as is
            continue
        live = a.copy()
        behind.write(behind_writer, n, live[:])  # a view (a tap on the run's memory): copied first
        live[...] = -1  # the run reuses the memory: the queued copy keeps the value
    behind.flush()
    behind.stop()
    assert behind_writer.close() == inline.close()
    assert (tmp_path / "behind.safetensors").read_bytes() == (tmp_path / "inline.safetensors").read_bytes()


def test_a_failed_write_behind_is_raised_to_the_caller(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.float32, (400, 400)), ("b", np.float32, (2,))])
    behind = _WriteBehind()
    behind.write(writer, "a", np.zeros((400, 300), np.float32))  # wrong shape, queued (480 KB)
    with pytest.raises(ValueError, match="layout says"):
        behind.flush()
    behind.stop(drop=True)
    writer.abort()
