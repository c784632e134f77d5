"""The golden store's size bound: ``harness golden clean --keep-recent / --max-size`` (least recently used
first, never an entry in use) and the automatic eviction of phase 7's re-check goldens."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import HarnessError
from harness.sizes import parse_size as _parse_size
from harness.store.eviction import Entry, remember_rechecks, select

runner = CliRunner()


def _entry(root: Path, model: str, name: str, size: int, age_s: float) -> Path:
    """A fake store entry of ``size`` bytes last used ``age_s`` seconds ago."""
    path = root / model / "tiny" / name
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    (path / "prefill.safetensors").write_bytes(b"\0" * size)
    t = 1_700_000_000 - age_s
    os.utime(path, (t, t))
    return path


def parse_size(text: str) -> int:
    return _parse_size(text, "--max-size")  # as `harness golden clean --max-size` reads it


class _Store:
    def __init__(self, root: Path):
        self.root = root


def test_parse_size() -> None:
    assert parse_size("500MB") == 500_000_000 and parse_size("2G") == 2_000_000_000
    assert parse_size("1.5gb") == 1_500_000_000 and parse_size("1000") == 1000
    # binary units where the user writes them (read as decimal before, 7% short of a GiB)
    assert parse_size("2GiB") == 2 << 30 and parse_size("512Mi") == 512 << 20 and parse_size("1 KiB") == 1024
    assert parse_size("1TiB") == 1 << 40 and parse_size("3kB") == 3000
    with pytest.raises(HarnessError, match="--max-size"):
        parse_size("lots")


@given(st.integers(0, 10**6), st.sampled_from(["", "b", "k", "kB", "M", "MB", "G", "gb", "T", "KiB", "Mi", "GiB",
                                               "ti"]))
def test_parse_size_reads_every_unit_alike(n: int, unit: str) -> None:
    """Decimal units without an i, binary ones with it, in any case, with or without the trailing B."""
    letter = unit[:1].lower() if unit[:1].lower() in "kmgt" else ""
    power = "kmgt".index(letter) + 1 if letter else 0
    base = 1024 if "i" in unit.lower() else 1000
    assert parse_size(f"{n}{unit}") == n * base ** power


entries = st.lists(st.tuples(st.integers(0, 1000), st.floats(0, 1e6, allow_nan=False)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(entries, st.one_of(st.none(), st.integers(0, 12)), st.one_of(st.none(), st.integers(0, 5000)))
def test_select_keeps_the_most_recent_within_bounds(items, keep_recent, max_bytes) -> None:
    es = [Entry(Path(f"/e{i}"), size, used) for i, (size, used) in enumerate(items)]
    drop = select(es, keep_recent=keep_recent, max_bytes=max_bytes)
    kept = [e for e in es if e not in drop]
    if keep_recent is not None:
        assert len(kept) <= keep_recent
    if max_bytes is not None:
        assert sum(e.size for e in kept) <= max_bytes
    if keep_recent is None and max_bytes is None:
        assert drop == []
    # least recently used go first: every kept entry that fits the count rule is newer than any dropped one
    if max_bytes is None and kept and drop:
        assert min(e.last_used for e in kept) >= max(e.last_used for e in drop)


def test_select_never_drops_a_protected_entry() -> None:
    old, new = Entry(Path("/old"), 10, 1.0), Entry(Path("/new"), 10, 2.0)
    assert select([old, new], keep_recent=0, protect=[Path("/old")]) == [new]


def test_golden_clean_keep_recent_and_max_size(tmp_path: Path) -> None:
    root = tmp_path / "store"
    a = _entry(root, "qwen3_0_6b", "seed0-aaaaaaaaaaaaaaaa", 1000, 30)
    b = _entry(root, "qwen3_0_6b", "seed1-bbbbbbbbbbbbbbbb", 1000, 20)
    c = _entry(root, "llama_3_2_1b", "seed0-cccccccccccccccc", 1000, 10)
    res = runner.invoke(app, ["golden", "clean", "--golden-dir", str(root), "--keep-recent", "2"])
    assert res.exit_code == 0, res.output
    assert not a.exists() and b.exists() and c.exists()
    res = runner.invoke(app, ["golden", "clean", "--golden-dir", str(root), "--max-size", "1500"])
    assert res.exit_code == 0, res.output
    assert not b.exists() and c.exists()  # the newest one fits
    assert "removed 1 entries" in res.output
    res = runner.invoke(app, ["golden", "clean", "--golden-dir", str(root), "--model", "qwen3-0.6b",
                              "--keep-recent", "0"])
    assert res.exit_code == 0 and c.exists()  # another model's entry is not touched


def test_recheck_goldens_beyond_the_bound_are_evicted(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = _Store(root)
    main = _entry(root, "qwen3_0_6b", "seed0-mmmmmmmmmmmmmmmm", 10, 100)
    old = [_entry(root, "qwen3_0_6b", f"seed{i + 10}-{i:016d}", 10, 50 - i) for i in range(3)]
    assert remember_rechecks(store, old, keep=8) == []  # recorded (and marked used now)
    for i, p in enumerate(old):  # ... long ago, oldest first
        os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
    new = _entry(root, "qwen3_0_6b", "seed99-nnnnnnnnnnnnnnnn", 10, 1)
    evicted = remember_rechecks(store, [new], protect=[main, new], keep=2)
    assert sorted(evicted) == sorted(str(p.resolve()) for p in old[:2])  # the two least recently used
    assert main.exists() and new.exists() and old[2].exists()  # the main golden was never a re-check one
    assert remember_rechecks(store, [new], keep=2) == []  # within the bound now


def test_recheck_bound_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPU_HARNESS_RECHECK_KEEP", "zero")
    with pytest.raises(HarnessError, match="NPU_HARNESS_RECHECK_KEEP"):
        remember_rechecks(_Store(tmp_path), [])
