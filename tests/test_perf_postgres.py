"""The history against a real PostgreSQL server, started in a temp dir for this module and stopped after.

The server refuses to run as root, so as root it runs as the ``postgres`` user via ``runuser``; it
listens only on a unix socket inside the temp dir. Needs Debian's ``postgresql`` package
(``apt-get install -y postgresql``); skipped with that reason only when the binaries are missing.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.perf import history

from .test_perf_history import bench_file, fill


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


@pytest.fixture(scope="module")
def pg_url():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found; install with: apt-get install -y postgresql")
    prefix: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="npu-harness-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
        os.chown(tmp, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", user.pw_name, "--"]
    data, log = tmp / "data", tmp / "server.log"

    def run(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            detail = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr}{proc.stdout}{detail}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
            "-o", f"-k {tmp} -c listen_addresses='' -p 5432 -F", "start")
        try:
            yield f"postgresql://postgres@/postgres?host={tmp}&port=5432"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_record_and_read_back_in_postgresql(pg_url):
    with history.History(pg_url) as hist:
        assert hist.url.startswith("postgresql+psycopg://")
        ids = fill(hist, [1.0, 1.0, 1.0, 1.3])
    with history.History(pg_url) as hist:
        ttft = hist.trend("qwen3-0.6b", metric="ttft")
        assert [p.run_id for p in ttft] == ids
        assert [p.verdict for p in ttft] == [None, "unchanged", "unchanged", "regression"]
        assert ttft[0].samples == bench_file(1.0, 0, "x").series[0].samples  # JSON keeps every digit
        assert ttft[0].time.tzinfo is not None and ttft[-1].commit == "c3"
        assert len(hist.trend("qwen3-0.6b", last=2)) == 4


def test_environment_variable_points_at_postgresql(pg_url, monkeypatch):
    monkeypatch.setenv(history.ENV_URL, pg_url)
    with history.History() as hist:
        run_id = hist.record(bench_file(1.0, 7, "2026-07-01T00:00:00+00:00", model="smollm2-1.7b"),
                             commit="e", dirty=False)
        assert [p.run_id for p in hist.trend("smollm2-1.7b")] == [run_id, run_id]
