"""Performance history: runs and their measurements, in SQLite by default or any SQLAlchemy URL.

URL resolution (``resolve_url``): an explicit URL, else ``$NPU_HARNESS_DB_URL``, else
``sqlite:///reports/history.sqlite`` relative to the working directory. ``postgresql://`` URLs are
routed to psycopg 3 (``postgresql+psycopg://``), the driver the project depends on.

Tables: ``perf_run`` (id, time, commit, dirty, source file, machine JSON) and ``perf_measurement``
(run, model, deployment, metric, unit, direction, samples JSON, verdict). ``record`` stores the
verdict of each measurement against the pooled samples of the previous ``DEFAULT_LAST`` runs of the
same series, so a trend table shows where regressions entered.
"""
from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, create_engine, select
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from harness.errors import HarnessError
from harness.perf.benchjson import BenchFile
from harness.perf.stats import compare

ENV_URL = "NPU_HARNESS_DB_URL"
DEFAULT_PATH = Path("reports") / "history.sqlite"
DEFAULT_LAST = 10


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "perf_run"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    commit: Mapped[str | None] = mapped_column(String(64))
    dirty: Mapped[bool | None] = mapped_column(Boolean)
    source: Mapped[str | None] = mapped_column(String(1024))
    machine: Mapped[dict] = mapped_column(JSON)
    measurements: Mapped[list["Measurement"]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Measurement(Base):
    __tablename__ = "perf_measurement"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("perf_run.id"), index=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    deployment: Mapped[str] = mapped_column(String(256))
    metric: Mapped[str] = mapped_column(String(128))
    unit: Mapped[str] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(8))
    samples: Mapped[list] = mapped_column(JSON)
    verdict: Mapped[str | None] = mapped_column(String(16))
    run: Mapped[Run] = relationship(back_populates="measurements")


@dataclass(frozen=True)
class Point:
    """One run's measurement of one series, as a trend query returns it."""

    run_id: int
    time: dt.datetime
    commit: str | None
    dirty: bool | None
    model: str
    deployment: str
    metric: str
    unit: str
    direction: str
    samples: tuple[float, ...]
    verdict: str | None


def resolve_url(url: str | None = None) -> str:
    """Explicit URL, else $NPU_HARNESS_DB_URL, else sqlite:///reports/history.sqlite (cwd-relative)."""
    url = url or os.environ.get(ENV_URL) or f"sqlite:///{DEFAULT_PATH.as_posix()}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix):]
    return url


def git_state(cwd: str | Path = ".") -> tuple[str | None, bool | None]:
    """(commit sha, dirty flag) of the git checkout at ``cwd``, or (None, None) without git."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit.strip(), (bool(status.strip()) if status is not None else None)


def _file_time(bench: BenchFile) -> dt.datetime:
    if bench.datetime:
        try:
            when = dt.datetime.fromisoformat(bench.datetime)
            return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
        except ValueError:
            pass
    return dt.datetime.now(dt.timezone.utc)


class History:
    """A connection to the history database; creates the tables on first use. Use as a context manager."""

    def __init__(self, url: str | None = None) -> None:
        self.url = resolve_url(url)
        try:
            if self.url.startswith("sqlite:///") and self.url != "sqlite:///:memory:":
                Path(self.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url)
            Base.metadata.create_all(self.engine)
        except (ArgumentError, NoSuchModuleError, SQLAlchemyError, OSError, ImportError) as exc:  # ImportError: no driver
            raise HarnessError(f"history database {self._safe_url()}: cannot open ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0]})") from None

    def _safe_url(self) -> str:
        """The URL with any password masked, for messages."""
        try:
            from sqlalchemy.engine import make_url
            return make_url(self.url).render_as_string(hide_password=True)
        except ArgumentError:
            return repr(self.url)

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def record(self, bench: BenchFile, commit: str | None = None, dirty: bool | None = None,
               cwd: str | Path = ".", last: int = DEFAULT_LAST) -> int:
        """Store one pytest-benchmark file as a run; returns its id. Commit/dirty default to git at ``cwd``,
        then to the file's own commit_info."""
        if commit is None and dirty is None:
            commit, dirty = git_state(cwd)
            if commit is None:
                commit, dirty = bench.commit_info.get("id"), bench.commit_info.get("dirty")
        try:
            with Session(self.engine) as session, session.begin():
                run = Run(time=_file_time(bench), commit=commit, dirty=dirty, source=bench.path,
                          machine=bench.machine_info)
                for s in bench.series:
                    prior = self._prior(session, s.model, s.deployment, s.metric, last)
                    verdict = None
                    if prior:
                        verdict = compare([x for p in prior for x in p], s.samples, s.direction,  # type: ignore[arg-type]
                                          label=s.label).verdict.value
                    run.measurements.append(Measurement(
                        model=s.model, deployment=s.deployment, metric=s.metric, unit=s.unit,
                        direction=s.direction, samples=list(s.samples), verdict=verdict))
                session.add(run)
                session.flush()
                return run.id
        except SQLAlchemyError as exc:
            raise HarnessError(f"history database {self._safe_url()}: cannot record {bench.path} "
                               f"({str(exc).splitlines()[0]})") from None

    @staticmethod
    def _prior(session: Session, model: str, deployment: str, metric: str, last: int) -> list[list[float]]:
        rows = session.execute(
            select(Measurement.samples).join(Run)
            .where(Measurement.model == model, Measurement.deployment == deployment, Measurement.metric == metric)
            .order_by(Run.time.desc(), Run.id.desc()).limit(last)).scalars().all()
        return [list(r) for r in rows]

    def trend(self, model: str, metric: str | None = None, deployment: str | None = None,
              last: int | None = None) -> list[Point]:
        """A model's measurements, oldest first; ``last`` keeps the newest N runs of each series."""
        query = (select(Measurement, Run).join(Run).where(Measurement.model == model)
                 .order_by(Run.time, Run.id))
        if metric is not None:
            query = query.where(Measurement.metric == metric)
        if deployment is not None:
            query = query.where(Measurement.deployment == deployment)
        try:
            with Session(self.engine) as session:
                points = [Point(r.id, r.time if r.time.tzinfo else r.time.replace(tzinfo=dt.timezone.utc),
                                r.commit, r.dirty, m.model, m.deployment, m.metric, m.unit, m.direction,
                                tuple(float(x) for x in m.samples), m.verdict)
                          for m, r in session.execute(query).all()]
        except SQLAlchemyError as exc:
            raise HarnessError(f"history database {self._safe_url()}: cannot read "
                               f"({str(exc).splitlines()[0]})") from None
        if last is None:
            return points
        keep = {id(p) for ps in group(points).values() for p in ps[-last:]}
        return [p for p in points if id(p) in keep]


def group(points: Sequence[Point]) -> dict[tuple[str, str], list[Point]]:
    """Points by (deployment, metric), each oldest first."""
    out: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        out.setdefault((p.deployment, p.metric), []).append(p)
    return out
