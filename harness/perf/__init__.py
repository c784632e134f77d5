"""Performance tracking: timing deployments, machine identity, history, and the regression decision.

``timing`` measures TTFT / TPOT / tokens per second (and per-op splits) of any deployment;
``benchjson`` reads pytest-benchmark JSON; ``history`` stores runs in SQLite or PostgreSQL;
``stats`` decides regression / improvement / unchanged / inconclusive and finds change points.
"""
from harness.perf.benchjson import BenchFile, Series, load, pair
from harness.perf.machine import machine_info
from harness.perf.stats import ChangePoint, Comparison, Verdict, change_points, compare
from harness.perf.timing import DecodeTiming, OpTimed, noop_tap, time_decode, time_prefill

__all__ = [
    "BenchFile", "ChangePoint", "Comparison", "DecodeTiming", "OpTimed", "Series", "Verdict",
    "change_points", "compare", "load", "machine_info", "noop_tap", "pair", "time_decode", "time_prefill",
]
