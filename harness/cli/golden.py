"""``harness golden build|verify|sign|list|clean|push|pull``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.cli.exits import CommandGroup
from harness.errors import HarnessError
from harness.cli.common import (DecodeOpt, GoldenCacheMaxOpt, GoldenCacheOpt, GoldenDirOpt, ModelOpt, PromptOpt, RowsOpt, ScaleOpt,
                                WeightsOpt,
                                models_or_all, path_or_none)

golden_app = typer.Typer(cls=CommandGroup, help="Build, verify, list and clean the golden store.",
                        no_args_is_help=True)
console = Console(stderr=True)


class BuildProgress:
    """A rich progress bar that appears only once a build has taken more than ``delay`` seconds."""

    def __init__(self, label: str, delay: float = 2.0):
        self.label, self.delay, self.t0 = label, delay, time.perf_counter()
        self.bar: Progress | None = None
        self.task = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None and time.perf_counter() - self.t0 > self.delay and console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=f"{self.label}: {stage}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@golden_app.command("build")
def build(
    model: Optional[list[str]] = ModelOpt,
    all_models: bool = typer.Option(False, "--all", help="All nine models."),
    scale: str = ScaleOpt,
    seed: list[int] = typer.Option([0], "--seed", help="Seed(s). Default: 0."),
    decode_steps: int = DecodeOpt,
    prompt_len: Optional[int] = PromptOpt,
    weights: Optional[Path] = WeightsOpt,
    rows: str = RowsOpt,
    local: bool = typer.Option(False, "--local", help="Also build the isolated-mode local baseline."),
    golden_dir: Optional[Path] = GoldenDirOpt,
    golden_cache: Optional[Path] = GoldenCacheOpt,
    golden_cache_max: Optional[str] = GoldenCacheMaxOpt,
) -> None:
    """Build (or reuse) and verify golden sets."""
    from harness.store import GoldenRequest, GoldenStore
    from harness.weights import WeightsSource

    store = GoldenStore(golden_dir, cache=golden_cache, cache_max=golden_cache_max)
    for m in models_or_all(model, all_models):
        for s in seed:
            t0 = time.perf_counter()
            req = GoldenRequest(m, scale, s, decode_steps, prompt_len, WeightsSource(path_or_none(weights)), rows)
            bar = BuildProgress(f"{m}/{scale} seed {s}")
            try:
                g = store.get(req, progress=bar)
                if local:
                    g = store.ensure_local(g, progress=bar)
            except OSError as exc:  # a read-only store, a file where a directory belongs, a full disk
                where = exc.filename or store.root
                raise HarnessError(f"golden store {store.root}: cannot write {where} ({exc.strerror or exc})") from None
            finally:
                bar.close()
            typer.echo(f"ok  {m}/{scale} seed {s}  {g.path}  ({time.perf_counter() - t0:.1f}s)")


@golden_app.command("verify")
def verify(
    golden_dir: Optional[Path] = GoldenDirOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model. Default: all."),
) -> None:
    """Check every file of every entry against its manifest's sha256 (and, with a signing key set, each
    manifest's signature); exit 3 naming each bad file or untrusted entry. With an s3:// golden dir the
    remote's objects are checked (streamed, nothing kept)."""
    from harness.models import folder_name
    from harness.store import GoldenStore, verify_dir
    from harness.store.signing import SignatureProblem, signing_key

    store = GoldenStore(golden_dir)
    key = signing_key()
    if store.remote:  # remote entries are streamed and checked, nothing kept
        remote = store.remote
        rels = [rel for rel in remote.entries() if not model or rel.split("/")[0] == folder_name(model)]
        where, checked_in = remote.public, f" in {remote.public}"
        problems_of = [lambda rel=rel: remote.verify(rel, key) for rel in rels]
    else:
        paths = [path for path, _ in store.entries() if not model or path.parent.parent.name == folder_name(model)]
        where, checked_in = f"under {store.root}", ""
        problems_of = [lambda path=path: verify_dir(path, key) for path in paths]
    if not problems_of:
        typer.echo(f"no golden entries {where}", err=True)
        raise typer.Exit(3)
    bad = 0
    for problems in problems_of:
        for problem in problems():
            bad += 1
            # A signature problem means the entry is untrusted (a remote one says so in its message).
            untrusted = isinstance(problem, SignatureProblem) or "not trusted" in problem
            typer.echo(f"{'UNTRUSTED' if untrusted else 'CORRUPT'} {problem}")
    typer.echo(f"{len(problems_of)} entries checked{checked_in}, {bad} problems")
    if bad:
        raise typer.Exit(3)


@golden_app.command("sign")
def sign(
    golden_dir: Optional[Path] = GoldenDirOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model. Default: all."),
) -> None:
    """Sign entries built without a key (NPU_HARNESS_GOLDEN_KEY or _KEY_FILE must be set). Only entries
    whose files match their sha256 are signed; signing vouches for them, so sign only a store you trust."""
    from harness.models import folder_name
    from harness.store import GoldenStore, verify_dir
    from harness.store.golden import baseline_dirs
    from harness.store.signing import KEY_ENV, KEY_FILE_ENV, sign as sign_dir, signing_key

    key = signing_key()
    if key is None:
        typer.echo(f"error: set {KEY_ENV} or {KEY_FILE_ENV} to sign", err=True)
        raise typer.Exit(3)
    signed = bad = 0
    for path, _ in GoldenStore(golden_dir).entries():
        if model and path.parent.parent.name != folder_name(model):
            continue
        problems = verify_dir(path, None)  # the file hashes only: an entry is signed as it is
        if problems:
            bad += 1
            typer.echo(f"NOT SIGNED {problems[0]}")
            continue
        for d in [path] + [b for b in baseline_dirs(path) if b.is_dir()]:
            sign_dir(d, key)
        signed += 1
    typer.echo(f"{signed} entries signed, {bad} refused")
    if bad:
        raise typer.Exit(3)


@golden_app.command("list")
def list_entries(golden_dir: Optional[Path] = GoldenDirOpt) -> None:
    """List golden entries with their size and provenance."""
    from harness.store import GoldenStore

    store = GoldenStore(golden_dir)
    table = Table("model", "scale", "seed", "tokens", "decode", "local", "MB", "weights", "path")
    for path, man in store.entries():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        if man is None:
            table.add_row("?", "?", "?", "?", "?", "?", f"{size:.1f}", "unreadable manifest", str(path))
            continue
        table.add_row(man["model"], man["scale"], str(man["seed"]), str(len(man["input_ids"])),
                      str(len(man["phases"]) - 1), _baselines(path), f"{size:.1f}",
                      man["weights"]["source"], str(path))
    Console().print(table)


def _baselines(path) -> str:
    """The list's "local" column: whether the local baseline is built, and how many chain baselines."""
    from harness.store.golden import CHAIN_PREFIX, baseline_dirs

    chains = sum(d.name.startswith(CHAIN_PREFIX) for d in baseline_dirs(path))
    local = "yes" if (path / "local").is_dir() else "no"
    return local + (f" +{chains} chain" if chains else "")


@golden_app.command("clean")
def clean(
    golden_dir: Optional[Path] = GoldenDirOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model. Default: all."),
    keep_recent: Optional[int] = typer.Option(None, "--keep-recent", min=0,
                                              help="Keep the N most recently used entries, remove the rest. "
                                                   "Default: remove all."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Remove the least recently used entries "
                                           "until the rest fit in SIZE (e.g. 500MB, 2GB). Default: no bound."),
) -> None:
    """Remove golden entries (they are rebuilt on demand); with a keep rule, the least recently used first."""
    from harness.store import GoldenStore
    from harness.sizes import parse_size
    from harness.store.eviction import entry_of, remove, select

    from harness.models import folder_name, get

    if model:
        get(model)  # unknown ids are an error, not a silent no-op
    store = GoldenStore(golden_dir)
    if keep_recent is None and max_size is None:
        try:
            n = store.clean(model)
        except OSError as exc:
            raise HarnessError(f"golden store {store.root}: cannot remove entries ({exc.strerror or exc})") from None
        typer.echo(f"removed {n} entries")
        return
    max_bytes = parse_size(max_size, "--max-size") if max_size is not None else None
    entries = [entry_of(path) for path, _ in store.entries()
               if model is None or path.parent.parent.name == folder_name(model)]
    drop = select(entries, keep_recent=keep_recent, max_bytes=max_bytes)
    n = remove(drop)
    kept = sum(e.size for e in entries if e not in drop)
    typer.echo(f"removed {n} entries ({sum(e.size for e in drop) / 1e6:.1f} MB); kept {len(entries) - n} "
               f"({kept / 1e6:.1f} MB)")


def _remote_store(golden_dir: Optional[Path], golden_cache: Optional[Path], command: str,
                  golden_cache_max: Optional[str] = None):
    from harness.errors import HarnessError
    from harness.store import GoldenStore

    store = GoldenStore(golden_dir, cache=golden_cache, cache_max=golden_cache_max)
    if store.remote is None:
        raise HarnessError(f"golden {command} needs a remote store: --golden-dir s3://bucket/prefix "
                           f"(or NPU_HARNESS_GOLDEN_DIR)")
    return store


@golden_app.command("push")
def push(
    golden_dir: Optional[Path] = GoldenDirOpt,
    source: Optional[Path] = typer.Option(None, "--from", help="Local store to publish. Default: golden/."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model. Default: all."),
) -> None:
    """Publish the entries of a local store to the remote one (each verified first; files uploaded
    first, the manifest last). Entries the remote already has are left as they are."""
    from harness.models import folder_name
    from harness.store import GoldenStore, verify_dir
    from harness.store.golden import project_root

    store = _remote_store(golden_dir, None, "push")
    local = GoldenStore(source or project_root())
    pushed = present = bad = 0
    for path, _ in local.entries():
        if model and path.parent.parent.name != folder_name(model):
            continue
        rel = path.relative_to(local.root).as_posix()
        problems = verify_dir(path)
        if problems:
            bad += 1
            typer.echo(f"NOT PUSHED {problems[0]}")
        elif store.remote.has(rel):
            present += 1
        else:
            store.remote.upload(rel, path)
            pushed += 1
            typer.echo(f"pushed {store.remote.name(rel)}")
    typer.echo(f"{pushed} entries pushed, {present} already in {store.remote.public}, {bad} refused")
    if bad:
        raise typer.Exit(3)


@golden_app.command("pull")
def pull(
    golden_dir: Optional[Path] = GoldenDirOpt,
    golden_cache: Optional[Path] = GoldenCacheOpt,
    golden_cache_max: Optional[str] = GoldenCacheMaxOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model. Default: all."),
) -> None:
    """Download the remote entries into the local cache (each block verified); exit 3 naming a
    tampered object."""
    from harness.models import folder_name
    from harness.store.golden import MANIFEST

    store = _remote_store(golden_dir, golden_cache, "pull", golden_cache_max)
    pulled = cached = 0
    for rel in store.remote.entries():
        if model and rel.split("/")[0] != folder_name(model):
            continue
        path = store.root / rel
        with store._lock(path):
            if (path / MANIFEST).is_file():
                cached += 1
                continue
            store.remote.fill(rel, path, build=None, tmpdir=store._tmpdir)
        pulled += 1
        typer.echo(f"pulled {store.remote.name(rel)} -> {path}")
    typer.echo(f"{pulled} entries pulled, {cached} already in {store.root}")
