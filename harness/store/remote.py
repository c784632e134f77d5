"""Golden sets shared across machines through S3-compatible object storage (fsspec; s3fs for ``s3://``).

``GoldenStore("s3://bucket/prefix")`` keeps entries in a local cache (harness.store.cache) and in the
remote, under the same relative keys as a local store (``<model folder>/<scale>/seed<seed>-<key16>/``):

- **visible only when complete**: an upload puts the phase files first, ``local/`` next, the signature
  and ``manifest.json`` last; readers look for the manifest, so an interrupted upload is invisible;
- **verified on download**: each file is streamed block by block against the manifest's sha256 of
  every 16 MiB block (and, with a signing key, the manifest against its signature) into a temporary
  directory renamed into the cache; a tampered object raises GoldenCorrupt naming it;
- **built once across machines**: a builder first creates ``<entry>.lock`` next to the entry with a
  conditional create (S3 ``If-None-Match: *``); others wait for the entry's manifest and download it.
  A lock older than ``NPU_HARNESS_GOLDEN_LOCK_STALE`` seconds (default 7200) is a dead builder's and is
  taken over.

Credentials come from the standard AWS variables or fsspec configuration and the endpoint from
``AWS_ENDPOINT_URL``; they are handed to s3fs only, never written anywhere. A URL carrying
``user:secret@`` is refused without repeating it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from harness.errors import GoldenCorrupt, HarnessError
from harness.store import cache, signing

MANIFEST = "manifest.json"
LOCAL_DIR = "local"
SCHEMES = ("s3", "s3a", "gs", "gcs", "memory")  # fsspec protocols accepted as a golden dir
LOCK_STALE_ENV = "NPU_HARNESS_GOLDEN_LOCK_STALE"
LOCK_POLL_SECONDS = 1.0
TRANSFER_THREADS = 2
S3_EXTRA = "pip install 'npu-harness[s3]' (s3fs)"


def remote_url(root: str | Path | None) -> str | None:
    """The remote URL ``root`` names (``s3://bucket/prefix``; also as mangled by ``Path``, which folds
    ``//`` into ``/``), or None for a local directory."""
    if not root:
        return None
    m = re.fullmatch(r"([A-Za-z][\w+.-]*):/+(.*?)/*", str(root))
    if not m or m.group(1).lower() not in SCHEMES:
        return None
    if _CREDENTIALS.match(m.group(2)):  # the message must not repeat them
        raise HarnessError("golden dir: the URL carries credentials (user:secret@); set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or an AWS profile) instead")
    if not m.group(2):
        raise HarnessError(f"golden dir {root!r}: name a bucket, e.g. s3://bucket/goldens")
    return f"{m.group(1).lower()}://{m.group(2)}"


_CREDENTIALS = re.compile(r"[^:@/]*:.*@")  # user:secret@ (a secret may hold '/', AWS secrets often do)


def public_url(url: str) -> str:
    """``url`` without credentials (``s3://key:secret@bucket/p`` -> ``s3://bucket/p``)."""
    m = re.match(r"([\w+.-]+:/+)(.*)", url)
    return m.group(1) + _CREDENTIALS.sub("", m.group(2), count=1) if m else url


def _filesystem(protocol: str):
    """The fsspec filesystem of ``protocol``; s3 with the endpoint of ``AWS_ENDPOINT_URL`` and no caches
    (another machine's upload must be seen at once)."""
    if protocol in ("s3", "s3a"):
        try:
            import s3fs
        except ImportError:
            raise HarnessError(f"s3:// golden stores need s3fs: {S3_EXTRA}") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                 client_kwargs={"endpoint_url": endpoint} if endpoint else {})
    import fsspec

    try:
        return fsspec.filesystem(protocol, **({} if protocol == "memory" else {"skip_instance_cache": True}))
    except ImportError as exc:
        raise HarnessError(f"{protocol}:// golden stores need an fsspec backend: {exc}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RemoteStore:
    """Entries of one remote prefix, and the local cache directory that serves them."""

    def __init__(self, url: str, *, cache_dir: str | Path | None = None, cache_max: str | int | None = None):
        self.url = url
        self.public = public_url(url)
        self.protocol, _, rest = url.partition("://")
        self.base = rest.rstrip("/")  # remote_url refuses credentials in the URL
        self.cache_root = cache.cache_root(self.public, cache_dir)
        self.cache_max = cache.parse_size(cache_max if cache_max is not None else os.environ.get(cache.CACHE_MAX_ENV))
        self.fs = _filesystem(self.protocol)
        self.events: list[tuple[str, str]] = []  # (what happened, entry): "downloaded", "built", "waited"

    # -- keys --------------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return "/".join([self.base, *(p for p in parts if p)])

    def name(self, *parts: str) -> str:
        """An object as shown to people (no credentials)."""
        return f"{self.protocol}://" + self.key(*parts)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Any failure talking to the remote (no endpoint, bad credentials, no bucket) is one line."""
        try:
            yield
        except HarnessError:
            raise
        except Exception as exc:
            raise HarnessError(f"golden remote {self.public}: cannot {action} ({_reason(exc)}); check the "
                               f"bucket, AWS_ENDPOINT_URL and the AWS credentials") from None

    # -- reading -----------------------------------------------------------------------------------
    def has(self, rel: str) -> bool:
        """Is the entry complete on the remote (its manifest, uploaded last, present)?"""
        with self._errors(f"look up {rel}"):
            return self.fs.exists(self.key(rel, MANIFEST))

    def entries(self) -> list[str]:
        """Relative keys of the complete remote entries."""
        with self._errors("list entries"):
            found = self.fs.glob(self.key("*", "*", "*", MANIFEST))
        prefix = self.base + "/"
        rels = (p.removeprefix(prefix).removesuffix("/" + MANIFEST) for p in found)
        return sorted(r for r in rels if all(part and not part.startswith(".") for part in r.split("/")))

    def _manifest(self, rel: str, sub: str, key: bytes | None, into: Path | None) -> tuple[bytes, dict]:
        """A remote manifest's bytes and content, its signature checked when ``key`` is set (and copied
        to ``into``)."""
        with self._errors(f"read {self.name(rel, sub, MANIFEST)}"):
            raw = self.fs.cat_file(self.key(rel, sub, MANIFEST))
            sig = None  # kept even without a key: the cached entry stays verifiable once a key is set
            if self.fs.exists(self.key(rel, sub, signing.SIGNATURE)):
                sig = self.fs.cat_file(self.key(rel, sub, signing.SIGNATURE))
        if into is not None and sig is not None:
            (into / signing.SIGNATURE).write_bytes(sig)
        if key is not None:
            problems = (_signature_problems_of(sig, raw, key, self.name(rel, sub)) if into is None else
                        [p.replace(str(into), self.name(rel, sub)) for p in signing.problems(into, raw, key)])
            if problems:
                raise GoldenCorrupt(f"remote golden entry is not trusted: {self.name(rel, sub, MANIFEST)}: "
                                    + "; ".join(problems))
        try:
            manifest = json.loads(raw)
            files = {name: (int(r["size"]), int(r["block"]), list(r["sha256"])) for name, r in manifest["files"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GoldenCorrupt(f"{self.name(rel, sub, MANIFEST)}: manifest unreadable ({_reason(exc)})") from None
        for name in files:
            if "/" in name or name in ("", ".", "..") or name.startswith("."):
                raise GoldenCorrupt(f"{self.name(rel, sub, MANIFEST)}: file name {name!r} is not a plain name")
        return raw, files

    def _stream(self, obj: str, record: tuple[int, int, list[str]], sink: Callable[[bytes], None]) -> None:
        """Read ``obj`` block by block, each block checked against its sha256 before ``sink`` gets it."""
        size, block, digests = record
        with self._errors(f"read {self.protocol}://{obj}"):
            with self.fs.open(obj, "rb", block_size=block, cache_type="none") as src:
                for i, digest in enumerate(digests):
                    length = min(block, size - i * block)
                    data = _read_exactly(src, length)
                    if len(data) != length or hashlib.sha256(data).hexdigest() != digest:
                        raise GoldenCorrupt(f"{self.protocol}://{obj}: block {i} does not match its sha256 in the "
                                            f"manifest (remote object truncated or edited); refused")
                    sink(data)
                if src.read(1):
                    raise GoldenCorrupt(f"{self.protocol}://{obj}: longer than its manifest says (edited); refused")

    def download(self, rel: str, dest: Path, key: bytes | None) -> None:
        """Copy the complete remote entry ``rel`` into the empty directory ``dest``, every block verified;
        manifests written last."""
        subs = [""]
        with self._errors(f"look up {self.name(rel, LOCAL_DIR)}"):
            if self.fs.exists(self.key(rel, LOCAL_DIR, MANIFEST)):
                subs.append(LOCAL_DIR)
        for sub in subs:
            target = dest / sub
            target.mkdir(exist_ok=True)
            raw, files = self._manifest(rel, sub, key, target)

            def fetch(name: str) -> None:
                with open(target / name, "wb") as out:
                    self._stream(self.key(rel, sub, name), files[name], out.write)

            with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
                list(pool.map(fetch, files))
            (target / MANIFEST).write_bytes(raw)

    def verify(self, rel: str, key: bytes | None) -> list[str]:
        """Problems of the remote entry ``rel`` (each names the object); empty when every block matches."""
        problems: list[str] = []
        with self._errors(f"look up {self.name(rel, LOCAL_DIR)}"):
            subs = [""] + ([LOCAL_DIR] if self.fs.exists(self.key(rel, LOCAL_DIR, MANIFEST)) else [])
        for sub in subs:
            try:
                _, files = self._manifest(rel, sub, key, None)
            except GoldenCorrupt as exc:
                problems.append(str(exc))
                continue
            for name, record in files.items():
                try:
                    self._stream(self.key(rel, sub, name), record, lambda data: None)
                except GoldenCorrupt as exc:
                    problems.append(str(exc))
                except HarnessError as exc:
                    problems.append(f"{self.name(rel, sub, name)}: missing or unreadable ({exc})")
        return problems

    # -- writing -----------------------------------------------------------------------------------
    def upload(self, rel: str, entry: Path, *, local_only: bool = False) -> None:
        """Publish the local entry directory ``entry`` as ``rel``: files, then ``local/``, then the
        signature and the manifest last (the manifest makes the entry visible)."""
        subs = ([LOCAL_DIR] if (entry / LOCAL_DIR / MANIFEST).is_file() else []) + ([] if local_only else [""])
        with self._errors(f"upload {self.name(rel)}"):
            for sub in subs:
                d = entry / sub
                names = list(json.loads((d / MANIFEST).read_bytes())["files"])
                with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
                    list(pool.map(lambda n: self.fs.put_file(str(d / n), self.key(rel, sub, n)), names))
                if (d / signing.SIGNATURE).is_file():
                    self.fs.put_file(str(d / signing.SIGNATURE), self.key(rel, sub, signing.SIGNATURE))
                self.fs.put_file(str(d / MANIFEST), self.key(rel, sub, MANIFEST))

    @contextmanager
    def build_lock(self, rel: str) -> Iterator[bool]:
        """Yield True holding ``<rel>.lock`` (this machine builds), or False once another machine's entry
        has appeared (download it). A lock older than the stale timeout is taken over."""
        obj = self.key(rel) + ".lock"
        stale = float(os.environ.get(LOCK_STALE_ENV) or 7200)
        body = json.dumps({"owner": f"{socket.gethostname()}:{os.getpid()}", "time": time.time()}).encode()
        while True:
            if self.has(rel):
                yield False
                return
            if self._create(obj, body):
                break
            with self._errors(f"read the lock {self.protocol}://{obj}"):
                try:
                    raw = self.fs.cat_file(obj)
                except FileNotFoundError:
                    continue  # released meanwhile: try again
            try:
                since = float(json.loads(raw)["time"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                since = 0.0  # not a lock this code wrote: treated as stale
            if ("waited", rel) not in self.events:
                self.events.append(("waited", rel))
            if time.time() - since > stale:
                with self._errors(f"remove the stale lock {self.protocol}://{obj}"):
                    self.fs.rm_file(obj)
                continue
            time.sleep(LOCK_POLL_SECONDS)
        try:
            yield True
        finally:
            try:
                self.fs.rm_file(obj)
            except Exception:  # an expired lock someone took over: theirs now
                pass

    def _create(self, obj: str, body: bytes) -> bool:
        """Create ``obj`` only if absent (S3 If-None-Match: *); False when it exists."""
        try:
            with self._errors_passing_exists(f"create the lock {self.protocol}://{obj}"):
                self.fs.pipe_file(obj, body, mode="create")
            return True
        except FileExistsError:
            return False

    @contextmanager
    def _errors_passing_exists(self, action: str) -> Iterator[None]:
        try:
            yield
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno == errno.EINVAL and "condition" in str(exc).lower():  # a 412 without its Condition
                raise FileExistsError(str(exc)) from None
            with self._errors(action):
                raise
        except Exception:
            with self._errors(action):
                raise

    # -- the store's hook --------------------------------------------------------------------------
    def fill(self, rel: str, path: Path, *, build: Callable[[], None] | None, tmpdir: Callable[[Path], Path]) -> str:
        """Make ``path`` (the cache entry of ``rel``) complete: download the remote entry, or build it
        (``build`` writes ``path``) under the remote lock and publish it. Returns what happened."""
        key = signing.signing_key()
        if not self.has(rel):
            if build is None:
                raise HarnessError(f"no golden {rel} in {self.public} (build it: `harness golden build` with "
                                   f"--golden-dir {self.public})")
            with self.build_lock(rel) as owner:
                if owner and not self.has(rel):
                    build()
                    self.upload(rel, path)
                    self._done("built", rel, path)
                    return "built"
        tmp = tmpdir(path)
        try:
            self.download(rel, tmp, key)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._done("downloaded", rel, path)
        return "downloaded"

    def _done(self, what: str, rel: str, path: Path) -> None:
        self.events.append((what, rel))
        cache.evict(self.cache_root, self.cache_max, keep=path)


def _read_exactly(src, length: int) -> bytes:
    parts, got = [], 0
    while got < length:
        chunk = src.read(length - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _signature_problems_of(sig: bytes | None, raw: bytes, key: bytes, where: str) -> list[str]:
    """signing.problems for a signature held in memory (remote verify keeps nothing)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if sig is not None:
            Path(tmp, signing.SIGNATURE).write_bytes(sig)
        return [p.replace(tmp, where) for p in signing.problems(Path(tmp), raw, key)]
