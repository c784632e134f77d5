"""Local Hugging Face checkpoints: sharded safetensors load offline; pickle and mismatches are refused."""
import json
import os

import numpy as np
import pytest
import torch

import harness
from harness.errors import HarnessError
from harness.reference.hf_model import build_hf_model
from harness.weights import WeightsSource, load_weights, weights_digest
from harness.weights.checkpoint import load_checkpoint
from harness.weights.synthetic import synthetic_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A sharded checkpoint written by transformers' own save_pretrained (qwen2.5 tiny: has biases)."""
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    w = synthetic_weights(spec, 5)
    path = tmp_path_factory.mktemp("ckpt")
    build_hf_model(spec, w).save_pretrained(path, max_shard_size="1MB")
    return spec, w, path


def test_sharded_checkpoint_round_trip(checkpoint):
    spec, w, path = checkpoint
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    loaded = load_checkpoint(spec, path)
    assert loaded.keys() == w.keys()
    for name in w:
        np.testing.assert_array_equal(loaded[name], w[name], err_msg=name)


def test_checkpoint_weights_drive_the_golden(checkpoint, tmp_path):
    spec, _, path = checkpoint
    from harness.deployment.replay import bf16_replay, check_replay

    v = check_replay(spec.id, bf16_replay, scale="tiny", seed=0, decode_steps=1, weights=path, golden_dir=tmp_path)
    assert v.passed
    assert v.provenance["golden"]["weights"]["source"] == f"checkpoint:{path}"
    assert weights_digest(spec, WeightsSource(str(path)), 0).startswith("ckpt-")


def test_pickle_checkpoint_refused(tmp_path):
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    (tmp_path / "config.json").write_text(json.dumps(spec.config))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(HarnessError, match="pickle checkpoints found .*pytorch_model.bin.*refused"):
        load_checkpoint(spec, tmp_path)


def test_config_of_another_model_refused(checkpoint):
    _, _, path = checkpoint
    other = harness.models.get("qwen3-0.6b", "tiny")
    with pytest.raises(HarnessError, match=r"config.json: model_type = 'qwen2', but qwen3-0.6b"):
        load_checkpoint(other, path)


def test_missing_dir_and_config(tmp_path):
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    with pytest.raises(HarnessError, match="not a directory"):
        load_checkpoint(spec, tmp_path / "nope")
    with pytest.raises(HarnessError, match="no config.json"):
        load_checkpoint(spec, tmp_path)


def test_weights_are_read_only():
    spec = harness.models.get("qwen3-0.6b", "tiny")
    w = load_weights(spec, None, 0)
    with pytest.raises(ValueError):
        w["model.norm.weight"][0] = 1.0


def _count_hashing(monkeypatch) -> list[str]:
    import harness.weights.checkpoint as ck

    read: list[str] = []
    real = ck.hash_file_into
    monkeypatch.setattr(ck, "hash_file_into", lambda h, f: (read.append(f.name), real(h, f)))
    return read


def test_a_settled_checkpoint_is_hashed_once_per_process(checkpoint, monkeypatch, tmp_path):
    import shutil
    import time

    import harness.weights.checkpoint as ck

    _, _, path = checkpoint
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    monkeypatch.setattr(ck, "_DIGESTS", {})
    read = _count_hashing(monkeypatch)
    first = ck.checkpoint_digest(copy)  # just written: racy, hashed again next time
    assert ck.checkpoint_digest(copy) == first and read.count("config.json") == 2
    later = time.time_ns() + 2 * ck.RACY_NS  # the files as seen two seconds from now: settled
    monkeypatch.setattr(ck.time, "time_ns", lambda: later)
    assert ck.checkpoint_digest(copy) == first and read.count("config.json") == 3
    assert ck.checkpoint_digest(copy) == first and read.count("config.json") == 3  # served from memory

    # Rewritten in place, same size, its old mtime put back: ctime moves, so the bytes are hashed again.
    shard = sorted(copy.glob("*.safetensors"))[-1]
    st = shard.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_mtime_ns == st.st_mtime_ns and shard.stat().st_size == st.st_size
    assert ck.checkpoint_digest(copy) != first and read.count("config.json") == 4


def _settled_copy(checkpoint, tmp_path, monkeypatch):
    """A copy of the checkpoint, seen as settled (hashed two seconds after it was written)."""
    import shutil
    import time

    import harness.weights.checkpoint as ck

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint[2], copy)
    later = time.time_ns() + 2 * ck.RACY_NS
    monkeypatch.setattr(ck.time, "time_ns", lambda: later)
    return copy


def test_a_digest_is_kept_for_the_next_process(checkpoint, monkeypatch, tmp_path):
    import harness.weights.checkpoint as ck

    cache = tmp_path / "digests.json"
    monkeypatch.setenv("NPU_HARNESS_DIGEST_CACHE", str(cache))
    copy = _settled_copy(checkpoint, tmp_path, monkeypatch)
    monkeypatch.setattr(ck, "_DIGESTS", {})
    read = _count_hashing(monkeypatch)
    first = ck.checkpoint_digest(copy)
    assert read.count("config.json") == 1 and cache.is_file()
    monkeypatch.setattr(ck, "_DIGESTS", {})  # a new process: nothing in memory
    assert ck.checkpoint_digest(copy) == first and read.count("config.json") == 1  # served from the file

    # Any write moves ctime: the changed checkpoint is hashed again, and its old digest is not served.
    shard = sorted(copy.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(ck, "_DIGESTS", {})
    changed = ck.checkpoint_digest(copy)
    assert changed != first and read.count("config.json") == 2


def test_a_racy_digest_is_not_kept(checkpoint, monkeypatch, tmp_path):
    import shutil

    import harness.weights.checkpoint as ck

    cache = tmp_path / "digests.json"
    monkeypatch.setenv("NPU_HARNESS_DIGEST_CACHE", str(cache))
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint[2], copy)  # just written: hashed inside its files' last clock second
    monkeypatch.setattr(ck, "_DIGESTS", {})
    ck.checkpoint_digest(copy)
    assert not cache.exists()


@pytest.mark.parametrize("content", [b"{not json", b'{"schema": 1, "entries": {"x": {"digest": 5}}}',
                                     b'{"schema": 99, "entries": {}}', b"\x00" * 10])
def test_a_damaged_digest_cache_is_ignored_and_replaced(checkpoint, monkeypatch, tmp_path, content):
    import harness.weights.checkpoint as ck

    cache = tmp_path / "digests.json"
    cache.write_bytes(content)
    monkeypatch.setenv("NPU_HARNESS_DIGEST_CACHE", str(cache))
    copy = _settled_copy(checkpoint, tmp_path, monkeypatch)
    monkeypatch.setattr(ck, "_DIGESTS", {})
    read = _count_hashing(monkeypatch)
    digest = ck.checkpoint_digest(copy)
    assert read.count("config.json") == 1
    assert list(json.loads(cache.read_text())["entries"].values())[0]["digest"] == digest


def test_digest_cache_off_and_unwritable(checkpoint, monkeypatch, tmp_path):
    import harness.weights.checkpoint as ck

    copy = _settled_copy(checkpoint, tmp_path, monkeypatch)
    read = _count_hashing(monkeypatch)
    monkeypatch.setenv("NPU_HARNESS_DIGEST_CACHE", "off")
    for _ in range(2):
        monkeypatch.setattr(ck, "_DIGESTS", {})
        ck.checkpoint_digest(copy)
    assert read.count("config.json") == 2 and not list(tmp_path.glob("*.json"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NPU_HARNESS_DIGEST_CACHE", str(blocker / "digests.json"))  # its parent is a file
    monkeypatch.setattr(ck, "_DIGESTS", {})
    assert ck.checkpoint_digest(copy) == ck.checkpoint_digest(copy)  # computed, nothing raised


def test_the_digest_cache_keeps_the_most_recent_entries(monkeypatch, tmp_path):
    from harness.weights import digest_cache

    monkeypatch.setenv("NPU_HARNESS_DIGEST_CACHE", str(tmp_path / "d.json"))
    monkeypatch.setattr(digest_cache, "MAX_ENTRIES", 3)
    for i in range(5):
        digest_cache.remember((f"/ckpt{i}", 1, i), f"{i:064x}")
    kept = [digest_cache.lookup((f"/ckpt{i}", 1, i)) for i in range(5)]
    assert kept == [None, None] + [f"{i:064x}" for i in (2, 3, 4)]


def test_a_digest_crosses_processes(checkpoint, tmp_path):
    """Two real processes: the second reads the digest the first computed instead of hashing."""
    import shutil
    import subprocess
    import sys
    import time

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint[2], copy)
    time.sleep(1.1)  # settled
    code = ("import sys, harness.weights.checkpoint as ck; n = []; real = ck.hash_file_into;"
            "ck.hash_file_into = lambda h, f: (n.append(f), real(h, f));"
            "print(ck.checkpoint_digest(sys.argv[1]), len(n))")
    env = {**os.environ, "NPU_HARNESS_DIGEST_CACHE": str(tmp_path / "d.json")}
    runs = [subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, env=env,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == runs[1][0] and int(runs[0][1]) > 1 and runs[1][1] == "0"
