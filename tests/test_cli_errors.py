"""Every ``harness`` subcommand with bad input ends in exit 3 and one line naming the cause; ``-h`` and
``--version`` work; only a measured performance regression exits 2 (issue 12.3, the CLI probes of 16).

The probes that need a store that cannot be written use a file where a directory is expected: the tests
run as root, and neither chmod nor os.access stops root, while ENOTDIR does (the OS really refuses the
write). ``golden clean`` on a read-only store is simulated by an rmtree that raises EROFS - that proves the
mapping of the OS error to one line and exit 3, not that a read-only mount is detected.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()
MODEL = "qwen3-0.6b"


def _lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


def _refused(args: list[str], *words: str) -> str:
    """Run ``harness ARGS``: exit 3 and exactly one line, naming every one of ``words``."""
    res = runner.invoke(app, args, env={"COLUMNS": "300"})
    lines = _lines(res.output)
    assert res.exit_code == 3, (args, res.exit_code, res.output)
    assert len(lines) == 1, (args, res.output)
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in res.output
    for w in words:
        assert w in lines[0], (args, lines[0])
    return lines[0]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a directory\n")
    return f


USAGE = [
    ([], "missing command"),
    (["bogus"], "bogus"),
    (["gate", "--phase", "9", "-m", MODEL], "--phase"),
    (["gate", "--bogus"], "--bogus"),
    (["gate", "-m", "gpt-5"], "gpt-5"),
    (["gate"], "--model"),
    (["gate", "-m", MODEL, "--mode", "sideways"], "--mode"),
    (["gate", "-m", MODEL, "-d", "replay-fp32", "--fault", "interleaved_rope"], "--fault"),
    (["gate", "-m", MODEL, "--fault", "no_such_fault"], "no_such_fault"),
    (["gate", "-m", MODEL, "--recheck-seed", "-1"], "--recheck-seed"),
    (["gate", "-m", MODEL, "--phase", "x"], "--phase"),
    (["golden"], "missing command"),
    (["golden", "build"], "--model"),
    (["golden", "build", "-m", MODEL, "--scale", "huge"], "huge"),
    (["golden", "clean", "--max-size", "3x"], "--max-size"),
    (["golden", "clean", "--keep-recent", "-1"], "--keep-recent"),
    (["golden", "clean", "-m", "gpt-5"], "gpt-5"),
    (["golden", "list", "--bogus"], "--bogus"),
    (["golden", "verify", "--bogus"], "--bogus"),
    (["trace"], "missing command"),
    (["trace", "prepare", "-m", MODEL], "out"),
    (["trace", "prepare", "out", "-m", "gpt-5"], "gpt-5"),
    (["trace", "dump", "out"], "--model"),
    (["perf"], "missing command"),
    (["perf", "record"], "files"),
    (["perf", "history"], "--model"),
    (["perf", "compare"], "compare takes"),
    (["perf", "compare", "a.json", "b.json", "--threshold", "abc"], "--threshold"),
    (["selftest", "--models", "gpt-5"], "gpt-5"),
    (["selftest", "--seeds", "0"], "--seeds"),
    (["list", "--bogus"], "--bogus"),
    (["explain"], "tap"),
    (["explain", "layers.0.nonsense"], "layers.0.nonsense"),
]


@pytest.mark.parametrize("args, word", USAGE, ids=[" ".join(a) or "(none)" for a, _ in USAGE])
def test_usage_errors_exit_3_in_one_line(args: list[str], word: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing a refused command might write lands in the repository
    monkeypatch.setenv("NPU_HARNESS_GOLDEN_DIR", str(tmp_path / "golden"))
    _refused(args, word)


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["gate", "-h"], ["golden", "build", "-h"], ["golden", "-h"],
                                  ["trace", "dump", "-h"], ["perf", "compare", "-h"], ["selftest", "-h"],
                                  ["explain", "-h"], ["list", "-h"]])
def test_help_exits_0(args: list[str]) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_version_exits_0() -> None:
    from harness.version import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"harness {__version__}"


# -- hostile inputs of issue 16: refused before anything is written ---------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--seed", "-5"], ["--seed -5"]),
    (["--decode-steps", "-1"], ["--decode-steps -1"]),
    (["--decode-steps", "1000000000"], ["--decode-steps 1000000000", "context length"]),
    (["--prompt-len", "100000"], ["--prompt-len 100000", "context length"]),
])
def test_golden_build_refuses_bad_inputs_and_creates_nothing(tmp_path: Path, args: list[str],
                                                             words: list[str]) -> None:
    root = tmp_path / "store"
    _refused(["golden", "build", "-m", MODEL, "--golden-dir", str(root), *args], *words)
    assert not root.exists()  # no entry, no .tmp entry, not even the lock directory


def test_gate_refuses_huge_decode_before_running(tmp_path: Path) -> None:
    root = tmp_path / "store"
    res = runner.invoke(app, ["gate", "-m", MODEL, "--golden-dir", str(root), "--decode-steps", "1000000000"])
    assert res.exit_code == 3, res.output
    assert "context length" in res.output and "Traceback" not in res.output
    assert "PASS" not in res.output
    assert not root.exists()


def test_golden_build_on_an_unwritable_store(a_file: Path) -> None:
    _refused(["golden", "build", "-m", MODEL, "--golden-dir", str(a_file / "store")], "cannot write",
             "not a directory")


def test_golden_clean_on_a_read_only_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = tmp_path / "store" / "qwen3_0_6b" / "tiny" / "seed0-0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(shutil, "rmtree", read_only)
    _refused(["golden", "clean", "--golden-dir", str(tmp_path / "store")], "Read-only file system")
    _refused(["golden", "clean", "--golden-dir", str(tmp_path / "store"), "--keep-recent", "0"],
             "Read-only file system")


@pytest.mark.parametrize("option", ["--json", "--junit"])
def test_gate_report_path_checked_before_the_run(a_file: Path, tmp_path: Path, option: str) -> None:
    """An unwritable --json/--junit is refused before anything runs (no golden built, no PASS printed)."""
    root = tmp_path / "store"
    line = _refused(["gate", "-m", MODEL, "--golden-dir", str(root), option, str(a_file / "out.x")],
                    option, "cannot write")
    assert "PASS" not in line
    assert not root.exists()
    _refused(["gate", "-m", MODEL, "--golden-dir", str(root), option, str(tmp_path)], option, "is a directory")


def test_perf_compare_json_path_checked_first(load_file, a_file: Path, tmp_path: Path) -> None:
    helpers = load_file("tests/test_perf_cli.py")
    base, cand = helpers.bench_json(tmp_path / "b.json", 1.0, 0), helpers.bench_json(tmp_path / "c.json", 1.15, 1)
    _refused(["perf", "compare", base, cand, "--json", str(a_file / "out.json")], "--json", "cannot write")


@pytest.mark.parametrize("args", [
    ["gate", "-m", MODEL, "--perf", "--db", "mysql://user@localhost/history"],
    ["gate", "-m", MODEL, "--db", "nosuchdialect://x"],
    ["perf", "history", "--model", MODEL, "--db", "mysql://user@localhost/history"],
])
def test_unusable_history_database_exits_3(args: list[str], tmp_path: Path) -> None:
    _refused([*args, "--golden-dir", str(tmp_path / "g")] if args[0] == "gate" else args, "history database")


def test_uncaught_exception_is_one_line_exit_3(monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.spec.model_spec as ms

    def boom():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ms, "names", boom)
    line = _refused(["list"], "RuntimeError", "disk on fire")
    assert "could not run" in line

    def oom():
        raise MemoryError()

    monkeypatch.setattr(ms, "names", oom)
    _refused(["list"], "out of memory")


def test_only_a_measured_regression_exits_2(load_file, tmp_path: Path) -> None:
    """Exit 2 is reserved: the probes above never give it; a measured slowdown does."""
    helpers = load_file("tests/test_perf_cli.py")
    base = helpers.bench_json(tmp_path / "b.json", 1.0, 0)
    slow = helpers.bench_json(tmp_path / "c.json", 1.15, 1)
    same = helpers.bench_json(tmp_path / "d.json", 1.0, 2)
    assert runner.invoke(app, ["perf", "compare", base, slow]).exit_code == 2
    assert runner.invoke(app, ["perf", "compare", base, same]).exit_code == 0
    for args, _ in USAGE:
        assert runner.invoke(app, args).exit_code != 2, args
