"""Signed goldens: what sha256 alone lets through (a deliberate edit with a re-hashed manifest) and what
a configured key stops (that edit, unsigned entries, another key)."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

import harness
from harness.errors import GoldenCorrupt, HarnessError
from harness.fileio import BlockHasher, MappedSafetensors
from harness.store import GoldenRequest, GoldenStore, verify_dir
from harness.store import signing
from harness.store.signing import KEY_ENV, KEY_FILE_ENV, SignatureProblem

REQ = GoldenRequest("qwen3-0.6b", "tiny", seed=0, decode_steps=1)
KEY = "k" * 32
OTHER_KEY = "o" * 32


@pytest.fixture(scope="module")
def signed_store(tmp_path_factory) -> Path:
    """A store holding one entry built with KEY (and its local baseline)."""
    root = tmp_path_factory.mktemp("signed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        mp.delenv(KEY_FILE_ENV, raising=False)
        store = GoldenStore(root)
        store.ensure_local(store.get(REQ))
    return root


@pytest.fixture
def store_copy(signed_store: Path, tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    root = tmp_path / "store"
    shutil.copytree(signed_store, root)
    return root


def entry(root: Path) -> Path:
    (path, _), = GoldenStore(root).entries()
    return path


def tamper_and_rehash(path: Path, value: float = 5.0) -> float:
    """What someone with write access can do without the key: change one golden logit, then re-hash the
    manifest so every sha256 matches again. Returns the logit's old value."""
    f = path / "decode.0.safetensors"
    mapped = MappedSafetensors(f)
    offset = mapped._start + mapped._header["fp32/logits"]["data_offsets"][0]
    data = bytearray(f.read_bytes())
    (old,) = struct.unpack_from("<f", data, offset)
    struct.pack_into("<f", data, offset, value)
    f.write_bytes(bytes(data))
    manifest = json.loads((path / "manifest.json").read_text())
    hasher = BlockHasher()
    hasher.update(bytes(data))
    manifest["files"][f.name] = hasher.result()
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return old


def test_signed_build_verifies_only_with_its_key(store_copy: Path, monkeypatch):
    path = entry(store_copy)
    assert (path / signing.SIGNATURE).is_file() and (path / "local" / signing.SIGNATURE).is_file()
    assert verify_dir(path, KEY.encode()) == []
    assert verify_dir(path, None) == []  # no key: the signature is not checked
    wrong = verify_dir(path, OTHER_KEY.encode())
    assert len(wrong) == 2 and all(isinstance(p, SignatureProblem) and "signed with another key" in p for p in wrong)
    monkeypatch.setenv(KEY_ENV, OTHER_KEY)
    with pytest.raises(GoldenCorrupt, match="golden entry is not trusted: .*signed with another key"):
        GoldenStore(store_copy).get(REQ, build=False)


def test_rehashed_tamper_passes_sha256_alone_but_not_the_signature(store_copy: Path, monkeypatch):
    path = entry(store_copy)
    old = tamper_and_rehash(path)
    # Without a key, sha256 alone cannot tell: the edited golden is served (the documented limit).
    assert verify_dir(path, None) == []
    golden = GoldenStore(store_copy).get(REQ, build=False)
    assert golden.tensor("decode.0", "logits")[0, 0] == 5.0 != old
    # With the key, the edit is refused, naming the entry.
    problems = verify_dir(path, KEY.encode())
    assert problems == [f"{path}: manifest.json does not match its signature: edited after it was signed; do "
                        "not trust it (`harness golden clean` and rebuild it, or vouch for it with `harness golden "
                        "sign`)"]
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(GoldenCorrupt, match="not trusted: .*does not match its signature"):
        GoldenStore(store_copy).get(REQ)
    with pytest.raises(GoldenCorrupt, match="does not match its signature"):
        harness.check("qwen3-0.6b", decode_steps=1, golden_dir=store_copy)


def test_unsigned_entry_is_refused_when_a_key_is_set_until_signed(store_copy: Path, monkeypatch, tmp_path):
    path = entry(store_copy)
    (path / signing.SIGNATURE).unlink()
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))  # the key file form; trailing newline ignored
    problems = verify_dir(path)
    assert problems == [SignatureProblem(f"{path}: not signed, and {KEY_ENV} is set (`harness golden clean` and "
                                         "rebuild it, or vouch for it with `harness golden sign`)")]
    signing.sign(path, signing.signing_key())
    assert verify_dir(path) == []


def test_cli_verify_and_sign(store_copy: Path, monkeypatch, capsys):
    from harness.cli import main

    path = entry(store_copy)
    monkeypatch.setenv("NPU_HARNESS_GOLDEN_DIR", str(store_copy))

    def run(*args, key=KEY) -> tuple[int, str, str]:
        if key:
            monkeypatch.setenv(KEY_ENV, key)
        else:
            monkeypatch.delenv(KEY_ENV, raising=False)
        try:
            main(["golden", *args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    tamper_and_rehash(path)
    code, out, err = run("verify", key=None)
    assert code == 0, out + err  # sha256 alone: accepted
    code, out, err = run("verify")
    assert code == 3
    assert [ln for ln in out.splitlines() if ln.startswith("UNTRUSTED")] == [
        f"UNTRUSTED {path}: manifest.json does not match its signature: edited after it was signed; do not trust "
        "it (`harness golden clean` and rebuild it, or vouch for it with `harness golden sign`)"]
    # `golden sign` vouches for what is there (the hashes match): the key holder's decision, explicit.
    code, out, err = run("sign")
    assert code == 0 and "1 entries signed" in out, out + err
    assert run("verify")[0] == 0
    code, out, err = run("verify", key="short")
    assert code == 3 and err.strip() == f"error: {KEY_ENV}: the key is 5 bytes; use at least 16 random bytes " \
                                        "(e.g. `openssl rand -hex 32`)"
    assert run("sign", key=None)[0] == 3


def test_gate_refuses_an_untrusted_golden(store_copy: Path, monkeypatch):
    from harness.suites.gate import run_gate

    tamper_and_rehash(entry(store_copy))
    monkeypatch.setenv(KEY_ENV, KEY)
    result = run_gate("qwen3-0.6b", phase=0, decode_steps=1, golden_dir=store_copy)
    assert result.exit_code == 3
    assert "does not match its signature" in result.outcomes[0].message
    # Without the key the sha256 check passes; phase 0's own sanity checks may still notice an edit this
    # crude (decode logits no longer match a longer prefill), but nothing vouches for the values.
    monkeypatch.delenv(KEY_ENV)
    unkeyed = run_gate("qwen3-0.6b", phase=0, decode_steps=1, golden_dir=store_copy).outcomes[0]
    integrity = next(c for c in unkeyed.checks if c.id == "golden_integrity")
    assert integrity.passed


def test_key_configuration_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "k"))
    with pytest.raises(HarnessError, match="set only one of them"):
        signing.signing_key()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(HarnessError, match=f"{KEY_FILE_ENV} .*/k: cannot read"):
        signing.signing_key()
    os.mkfifo(tmp_path / "k")
    with pytest.raises(HarnessError, match="is a FIFO"):
        signing.signing_key()
    monkeypatch.delenv(KEY_FILE_ENV)
    assert signing.signing_key() is None
    assert signing.key_id(b"a" * 16) != signing.key_id(b"b" * 16)
    assert "a" * 16 not in signing.key_id(b"a" * 16)
