"""Read pytest-benchmark JSON (``--benchmark-json`` or ``--benchmark-save`` + ``--benchmark-save-data``).

Each benchmark becomes one or more ``Series`` (model, deployment, metric, unit, direction, raw
samples). The perf suites describe their benchmarks in ``benchmark.extra_info`` (see ``extra_info``):

* ``model``, ``deployment``, ``metric`` (default: the benchmark's name), ``unit`` (default ``"s"``),
  ``direction`` (default: ``"higher"`` for units ending in ``/s``, else ``"lower"``);
* ``samples``: the metric's raw samples when they are not pytest-benchmark's own per-round wall times
  (e.g. TPOT = round time / decode steps); otherwise ``stats.data`` is used;
* ``metrics``: more series measured in the same rounds, ``{name: {"unit", "direction", "samples"}}``
  (tokens/s, per-operation ``op.<op>.<npu_run|write|read>`` timings).

Missing ``model`` / ``deployment`` fall back to the benchmark's ``params`` of the same name, then
``"unknown"``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from harness.errors import HarnessError


@dataclass(frozen=True)
class Series:
    """One metric's raw samples from one benchmark."""

    name: str  # the benchmark's fullname
    model: str
    deployment: str
    metric: str
    unit: str
    direction: str  # "lower" or "higher" is better
    samples: tuple[float, ...]

    @property
    def key(self) -> tuple[str, str, str]:
        """(model, deployment, metric): the series' identity in files and in the history."""
        return (self.model, self.deployment, self.metric)

    @property
    def label(self) -> str:
        return "/".join(self.key)


@dataclass(frozen=True)
class BenchFile:
    """A parsed pytest-benchmark JSON file."""

    path: str
    datetime: str | None
    machine_info: dict = field(default_factory=dict)
    commit_info: dict = field(default_factory=dict)
    series: tuple[Series, ...] = ()


def default_direction(unit: str) -> str:
    """Throughput units (``tok/s``, ``GB/s``, anything per second) are higher-is-better."""
    return "higher" if unit.strip().endswith("/s") else "lower"


def extra_info(model: str, deployment: str, metric: str, unit: str = "s", direction: str | None = None,
               samples: list[float] | None = None,
               metrics: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """The ``benchmark.extra_info`` entries this module reads; suites ``.update()`` with it."""
    info: dict[str, Any] = {"model": model, "deployment": deployment, "metric": metric, "unit": unit,
                            "direction": direction or default_direction(unit)}
    if samples is not None:
        info["samples"] = [float(s) for s in samples]
    if metrics:
        info["metrics"] = {k: dict(v) for k, v in metrics.items()}
    return info


def _samples(raw: Any, where: str) -> tuple[float, ...]:
    if not isinstance(raw, list) or not raw:
        raise HarnessError(f"{where}: no raw samples; rerun pytest with --benchmark-save-data "
                           "(or write the file with --benchmark-json)")
    try:
        return tuple(float(x) for x in raw)
    except (TypeError, ValueError):
        raise HarnessError(f"{where}: samples are not numbers") from None


def _one_benchmark(bench: Any, source: str) -> list[Series]:
    if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict):
        raise HarnessError(f"{source}: a benchmark entry has no 'stats' object; not pytest-benchmark JSON")
    name = str(bench.get("fullname") or bench.get("name") or "?")
    info = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    where = f"{source}: benchmark {name!r}"

    def pick(key: str) -> str:
        return str(info.get(key) or params.get(key) or "unknown")

    model, deployment = pick("model"), pick("deployment")
    unit = str(info.get("unit") or "s")
    direction = str(info.get("direction") or default_direction(unit))
    raw = info["samples"] if "samples" in info else bench["stats"].get("data")
    out = [Series(name, model, deployment, str(info.get("metric") or bench.get("name") or name), unit,
                  direction, _samples(raw, where))]
    for metric, spec in (info.get("metrics") or {}).items():
        if not isinstance(spec, dict):
            raise HarnessError(f"{where}: extra_info.metrics[{metric!r}] must be an object")
        m_unit = str(spec.get("unit") or "s")
        out.append(Series(name, model, deployment, str(metric), m_unit,
                          str(spec.get("direction") or default_direction(m_unit)),
                          _samples(spec.get("samples"), f"{where} metric {metric!r}")))
    for s in out:
        if s.direction not in ("lower", "higher"):
            raise HarnessError(f"{where}: direction of {s.metric!r} must be 'lower' or 'higher', "
                               f"not {s.direction!r}")
    return out


def parse(doc: Any, source: str = "<json>") -> BenchFile:
    """Parse an already-decoded pytest-benchmark document; ``source`` names it in errors."""
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise HarnessError(f"{source}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    if not doc["benchmarks"]:
        raise HarnessError(f"{source}: holds no benchmarks")
    series = [s for b in doc["benchmarks"] for s in _one_benchmark(b, source)]
    keys = [s.key for s in series]
    dupes = sorted({"/".join(k) for k in keys if keys.count(k) > 1})
    if dupes:
        raise HarnessError(f"{source}: several benchmarks report the same model/deployment/metric "
                           f"{dupes}; set extra_info model/deployment/metric to tell them apart")
    return BenchFile(source, doc.get("datetime"), dict(doc.get("machine_info") or {}),
                     dict(doc.get("commit_info") or {}), tuple(series))


def load(path: str | Path) -> BenchFile:
    """Read one pytest-benchmark JSON file; HarnessError naming the file when it is not one."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise HarnessError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{p}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return parse(doc, str(p))


def pair(base: BenchFile, cand: BenchFile) -> tuple[list[tuple[Series, Series]], list[Series], list[Series]]:
    """Match series of two files: by (model, deployment, metric), then by (model, metric) where that
    is unique on both sides (comparing two deployments of one model). Returns (pairs, base-only,
    candidate-only)."""
    b_by = {s.key: s for s in base.series}
    c_by = {s.key: s for s in cand.series}
    pairs = [(b_by[k], c_by[k]) for k in b_by if k in c_by]
    left_b = [s for k, s in b_by.items() if k not in c_by]
    left_c = [s for k, s in c_by.items() if k not in b_by]

    def unique(items: list[Series]) -> dict[tuple[str, str], Series]:
        keys = [(s.model, s.metric) for s in items]
        return {k: s for k, s in zip(keys, items) if keys.count(k) == 1}

    ub, uc = unique(left_b), unique(left_c)
    loose = [(ub[k], uc[k]) for k in ub if k in uc]
    used = {id(s) for p in loose for s in p}
    return (pairs + loose, [s for s in left_b if id(s) not in used], [s for s in left_c if id(s) not in used])
