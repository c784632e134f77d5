"""Time any deployment that meets the deployment contract (docs/contract.md): TTFT, TPOT, tokens/s, per-op splits.

Definitions (as vLLM's benchmarks use them):

* **TTFT** (time to first token): wall time of ``prefill(input_ids, tap)``, which returns the logits
  of the first generated token.
* **TPOT** (time per output token): the steady-state decode latency, the mean per-token time of the
  decode steps *after* the first one; the first decode step is excluded because it carries one-off
  costs (buffer allocation, KV-cache layout switch, instruction upload) that a long generation
  amortises. tokens/s = 1 / TPOT.

Timings run with a no-op tap (``noop_tap``), so no host copies are measured.

Optional per-operation protocol (``OpTimed``): a deployment may define ``op_timings()`` returning
``{op: {"npu_run": s, "write": s, "read": s}}``, the seconds each operation spent on the NPU run and
on buffer write (host -> device sync) and read (device -> host) during the most recent ``prefill`` or
``decode`` call; a missing key means "not measured". The paper's profiler splits time this way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from harness.errors import HarnessError
from harness.perf.benchjson import extra_info

OP_PHASES = ("npu_run", "write", "read")
Clock = Callable[[], float]


def noop_tap(name: str, value: Any) -> Any:
    """The tap timings run with: hands every value straight back."""
    return value


@runtime_checkable
class OpTimed(Protocol):
    """A deployment that reports per-operation timings of its most recent prefill/decode call."""

    def op_timings(self) -> Mapping[str, Mapping[str, float]]: ...


def read_op_timings(dep: Any) -> dict[str, dict[str, float]] | None:
    """``dep.op_timings()`` validated, or None when the deployment does not report them."""
    if not isinstance(dep, OpTimed):
        return None
    raw = dep.op_timings()
    if not isinstance(raw, Mapping):
        raise HarnessError(f"{type(dep).__name__}.op_timings() must return a mapping, got {type(raw).__name__}")
    out: dict[str, dict[str, float]] = {}
    for op, phases in raw.items():
        if not isinstance(phases, Mapping):
            raise HarnessError(f"op_timings()[{op!r}] must map {OP_PHASES} to seconds")
        for phase, secs in phases.items():
            if phase not in OP_PHASES:
                raise HarnessError(f"op_timings()[{op!r}] has unknown phase {phase!r}; known: {OP_PHASES}")
            if not isinstance(secs, (int, float)) or not secs >= 0:
                raise HarnessError(f"op_timings()[{op!r}][{phase!r}] must be seconds >= 0, got {secs!r}")
        out[str(op)] = {p: float(s) for p, s in phases.items()}
    return out


def _sum_ops(steps: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """Flatten a list of per-call op timings to ``{"op.<op>.<phase>": total seconds}``."""
    total: dict[str, float] = {}
    for ops in steps:
        for op, phases in ops.items():
            for phase, secs in phases.items():
                key = f"op.{op}.{phase}"
                total[key] = total.get(key, 0.0) + secs
    return total


def time_prefill(dep: Any, input_ids: np.ndarray, clock: Clock = time.perf_counter) -> float:
    """TTFT in seconds: one ``dep.prefill(input_ids, noop_tap)`` call."""
    start = clock()
    dep.prefill(np.asarray(input_ids), noop_tap)
    return clock() - start


@dataclass(frozen=True)
class DecodeTiming:
    """One generation: TTFT, every decode step's latency, and per-op totals where reported."""

    ttft: float
    latencies: tuple[float, ...]  # per decode step, including the excluded first one
    ops: dict[str, float] | None  # {"op.<op>.<phase>": seconds summed over the steady-state steps}

    @property
    def steady(self) -> tuple[float, ...]:
        """The steady-state latencies: every decode step after the first."""
        return self.latencies[1:]

    @property
    def tpot(self) -> float:
        """Mean steady-state seconds per output token."""
        return float(np.mean(self.steady))

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot


def _next_token(logits: Any) -> int:
    return int(np.argmax(np.asarray(logits)[-1]))


def time_decode(dep: Any, input_ids: np.ndarray, tokens: int | Sequence[int],
                clock: Clock = time.perf_counter) -> DecodeTiming:
    """Prefill, then decode ``tokens`` steps (a count: feed the greedy token; a sequence: feed those).

    Needs at least 2 steps, since the first is excluded from TPOT. The greedy argmax runs outside
    the timed region: it is the host's sampling, not the deployment's work.
    """
    feed = list(tokens) if not isinstance(tokens, (int, np.integer)) else None
    steps = len(feed) if feed is not None else int(tokens)
    if steps < 2:
        raise HarnessError(f"time_decode needs >= 2 decode steps (the first is excluded from TPOT), got {steps}")
    start = clock()
    logits = dep.prefill(np.asarray(input_ids), noop_tap)
    ttft = clock() - start
    latencies, op_steps = [], []
    for i in range(steps):
        token = feed[i] if feed is not None else _next_token(logits)
        start = clock()
        logits = dep.decode(int(token), noop_tap)
        latencies.append(clock() - start)
        ops = read_op_timings(dep)
        if ops is not None and i > 0:
            op_steps.append(ops)
    return DecodeTiming(ttft, tuple(latencies), _sum_ops(op_steps) if op_steps else None)


def bench_prefill(benchmark: Any, dep: Any, input_ids: np.ndarray, *, model: str, deployment: str,
                  rounds: int = 10, warmup_rounds: int = 1) -> None:
    """pytest-benchmark pedantic TTFT suite: ``rounds`` (default 10) timed prefills after warm-up.

    pytest-benchmark's own samples are the TTFTs; per-op timings (per round) go to extra_info.
    """
    if rounds < 10:
        raise HarnessError(f"bench_prefill: rounds must be >= 10 for a regression decision, got {rounds}")
    ids = np.asarray(input_ids)
    per_round: list[dict[str, float]] = []

    def target() -> None:
        dep.prefill(ids, noop_tap)
        ops = read_op_timings(dep)
        if ops is not None:
            per_round.append(_sum_ops([ops]))

    benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    metrics = _op_metrics(per_round[-rounds:], per_token=1)
    benchmark.extra_info.update(extra_info(model, deployment, "ttft", "s", metrics=metrics))


def bench_decode(benchmark: Any, dep: Any, input_ids: np.ndarray, steps: int = 8, *, model: str,
                 deployment: str, rounds: int = 10, warmup_rounds: int = 1, clock: Clock | None = None) -> None:
    """pytest-benchmark pedantic TPOT suite (defaults: 8 steps, 10 rounds, 1 warm-up round).

    Each round's untimed setup runs the prefill and the first decode step (excluded from TPOT); the
    timed target runs ``steps`` more decode steps. Samples: TPOT per round (``tpot``, s) and its
    inverse (``decode_tps``, tok/s); per-op timings per token where reported. ``clock`` defaults to
    the fixture's timer, so ``--benchmark-timer`` applies to the per-step times too.
    """
    if rounds < 10 or steps < 1:
        raise HarnessError(f"bench_decode: need rounds >= 10 and steps >= 1, got rounds={rounds}, steps={steps}")
    ids = np.asarray(input_ids)
    # pytest-benchmark keeps the --benchmark-timer choice only on a private attribute.
    timer: Clock = clock or getattr(benchmark, "_timer", None) or time.perf_counter
    tpots: list[float] = []
    per_round: list[dict[str, float]] = []

    def setup() -> tuple[tuple, dict]:
        logits = dep.decode(_next_token(dep.prefill(ids, noop_tap)), noop_tap)
        return (_next_token(logits),), {}

    def target(token: int) -> None:
        total, op_steps = 0.0, []
        for _ in range(steps):
            start = timer()
            logits = dep.decode(token, noop_tap)
            total += timer() - start
            ops = read_op_timings(dep)
            if ops is not None:
                op_steps.append(ops)
            token = _next_token(logits)
        tpots.append(total / steps)
        if op_steps:
            per_round.append(_sum_ops(op_steps))

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    samples = tpots[-rounds:]  # pedantic also calls the target for the warm-up rounds
    metrics = {"decode_tps": {"unit": "tok/s", "direction": "higher", "samples": [1.0 / t for t in samples]}}
    metrics.update(_op_metrics(per_round[-rounds:], per_token=steps))
    benchmark.extra_info.update(extra_info(model, deployment, "tpot", "s", samples=samples, metrics=metrics))


def _op_metrics(per_round: list[dict[str, float]], per_token: int) -> dict[str, dict[str, Any]]:
    """Per-op series (seconds per token) from per-round totals; ops missing in a round are dropped."""
    if not per_round:
        return {}
    keys = set.intersection(*(set(r) for r in per_round))
    return {k: {"unit": "s", "direction": "lower", "samples": [r[k] / per_token for r in per_round]}
            for k in sorted(keys)}
