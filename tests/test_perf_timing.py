"""Timing deployments (harness.perf.timing): TTFT, TPOT, tokens/s, per-op splits, pedantic suites."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.perf import timing


class FakeClock:
    """Advances only when the fake deployment says work happened, so timings are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeDeployment:
    """Meets the deployment contract; prefill costs 0.5 s, the first decode 0.3 s, later ones 0.1 s."""

    def __init__(self, clock: FakeClock | None = None, vocab: int = 8, ops: bool = True) -> None:
        self.clock, self.vocab, self.with_ops = clock, vocab, ops
        self.fed: list[int] = []
        self.taps: list[str] = []
        self._ops: dict = {}

    def _spend(self, secs: float) -> None:
        if self.clock is not None:
            self.clock.now += secs
        self._ops = {"gemm": {"npu_run": secs * 0.8, "write": secs * 0.1, "read": secs * 0.1}}

    def prefill(self, input_ids, tap):
        self.fed, self.step = [], 0
        self._spend(0.5)
        tap("embed", np.zeros((len(input_ids), 4)))
        logits = np.zeros((len(input_ids), self.vocab))
        logits[-1, 3] = 1.0
        return logits

    def decode(self, token_id, tap):
        self.fed.append(token_id)
        self._spend(0.3 if self.step == 0 else 0.1)
        self.step += 1
        logits = np.zeros((1, self.vocab))
        logits[0, (token_id + 1) % self.vocab] = 1.0
        return logits

    def op_timings(self):
        if not self.with_ops:
            raise AssertionError("not reported")
        return self._ops


class NoOps:
    def prefill(self, input_ids, tap):
        return np.ones((len(input_ids), 4))

    def decode(self, token_id, tap):
        return np.ones((1, 4))


def test_time_prefill_is_the_prefill_wall_time():
    clock = FakeClock()
    assert timing.time_prefill(FakeDeployment(clock), np.arange(5), clock=clock) == pytest.approx(0.5)


def test_time_decode_excludes_the_first_step_and_feeds_greedy_tokens():
    clock = FakeClock()
    dep = FakeDeployment(clock)
    t = timing.time_decode(dep, np.arange(5), 4, clock=clock)
    assert t.ttft == pytest.approx(0.5)
    assert t.latencies == pytest.approx((0.3, 0.1, 0.1, 0.1))
    assert t.tpot == pytest.approx(0.1) and t.tokens_per_s == pytest.approx(10.0)
    assert dep.fed == [3, 4, 5, 6]  # argmax of each step's logits
    assert t.ops == pytest.approx({"op.gemm.npu_run": 0.24, "op.gemm.write": 0.03, "op.gemm.read": 0.03})


def test_time_decode_with_given_tokens_and_without_op_timings():
    dep = FakeDeployment(FakeClock())
    t = timing.time_decode(dep, np.arange(3), [7, 1, 2])
    assert dep.fed == [7, 1, 2] and len(t.latencies) == 3
    assert timing.time_decode(NoOps(), np.arange(3), 2).ops is None
    with pytest.raises(HarnessError, match=">= 2 decode steps"):
        timing.time_decode(NoOps(), np.arange(3), 1)


@pytest.mark.parametrize("ops, match", [
    ([1, 2], "must return a mapping"),
    ({"gemm": 1.0}, "must map"),
    ({"gemm": {"dma": 1.0}}, "unknown phase 'dma'"),
    ({"gemm": {"read": -1.0}}, "seconds >= 0"),
])
def test_op_timings_protocol_is_validated(ops, match):
    class Bad(NoOps):
        def op_timings(self):
            return ops

    with pytest.raises(HarnessError, match=match):
        timing.read_op_timings(Bad())
    assert timing.read_op_timings(NoOps()) is None


class FakeBenchmark:
    """The parts of pytest-benchmark's fixture the pedantic suites use."""

    def __init__(self) -> None:
        self.extra_info: dict = {}
        self.calls: list[dict] = []

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        self.calls.append({"rounds": rounds, "warmup": warmup_rounds, "iterations": iterations})
        for _ in range(warmup_rounds + rounds):
            a, k = setup() if setup else (args, kwargs or {})
            target(*a, **k)


def test_bench_prefill_records_ttft_and_per_op_series():
    b = FakeBenchmark()
    timing.bench_prefill(b, FakeDeployment(), np.arange(4), model="m", deployment="emu")
    assert b.calls == [{"rounds": 10, "warmup": 1, "iterations": 1}]
    assert b.extra_info["metric"] == "ttft" and b.extra_info["model"] == "m"
    assert "samples" not in b.extra_info  # pytest-benchmark's own samples are the TTFTs
    assert b.extra_info["metrics"]["op.gemm.npu_run"]["samples"] == pytest.approx([0.4] * 10)


def test_bench_decode_records_tpot_tokens_per_s_and_ops():
    b = FakeBenchmark()
    dep = FakeDeployment()
    timing.bench_decode(b, dep, np.arange(4), steps=3, model="m", deployment="emu", rounds=12)
    info = b.extra_info
    assert info["metric"] == "tpot" and len(info["samples"]) == 12  # warm-up round dropped
    assert all(s > 0 for s in info["samples"])
    tps = info["metrics"]["decode_tps"]
    assert tps["direction"] == "higher"
    assert tps["samples"] == pytest.approx([1 / s for s in info["samples"]])
    # per token, steady state only: every timed step is a 0.1 s step
    assert info["metrics"]["op.gemm.npu_run"]["samples"] == pytest.approx([0.08] * 12)
    assert len(dep.fed) == 4  # one excluded first step in setup + 3 timed steps in the last round


def test_bench_needs_ten_rounds():
    with pytest.raises(HarnessError, match="rounds"):
        timing.bench_prefill(FakeBenchmark(), NoOps(), np.arange(2), model="m", deployment="d", rounds=5)
    with pytest.raises(HarnessError, match="rounds"):
        timing.bench_decode(FakeBenchmark(), NoOps(), np.arange(2), model="m", deployment="d", rounds=9)


def test_noop_tap_returns_its_value():
    v = object()
    assert timing.noop_tap("x", v) is v
    assert list(itertools.islice(iter(timing.OP_PHASES), 3)) == ["npu_run", "write", "read"]


class Sleepy(NoOps):
    """A deployment whose prefill sleeps ``first`` seconds the first time (the warm-up round's), ``rest``
    after."""

    def __init__(self, first: float = 0.02, rest: float = 0.02):
        self.first, self.rest, self.calls = first, rest, 0

    def prefill(self, input_ids, tap):
        import time

        self.calls += 1
        time.sleep(self.first if self.calls == 1 else self.rest)
        return super().prefill(input_ids, tap)


def test_measured_only_timing_stops_at_its_budget_after_three_rounds_or_one_after_a_long_warmup() -> None:
    """Without --perf the gate decides nothing on timings, so it stops adding rounds past a budget
    (pytest-benchmark's max_time); a comparison (no budget) always gets every round."""
    from harness.suites import perfgate

    ids = np.arange(4)
    assert [len(v) for v in perfgate.measure(Sleepy(), ids, 10).values()] == [10, 10, 10]
    quick_warmup, slow_warmup = Sleepy(first=0.0, rest=0.2), Sleepy(first=0.2, rest=0.2)
    assert len(perfgate.measure(quick_warmup, ids, 10, budget_s=0.1)["ttft"]) == perfgate.MEASURE_MIN_ROUNDS
    # A warm-up longer than the whole budget: one timed round (a generation of 20 minutes at full scale).
    samples = perfgate.measure(slow_warmup, ids, 10, budget_s=0.1)
    assert len(samples["ttft"]) == 1
    assert len(perfgate.measure(Sleepy(), ids, 10, budget_s=60.0)["ttft"]) == 10
    short = perfgate.judge("m", "d", perfgate.measure(Sleepy(first=0.0, rest=0.2), ids, 10, budget_s=0.1),
                           compare=False)[0]
    assert "over 3 rounds" in short[4][0].message and "budget" in short[4][0].message
    one = perfgate.judge("m", "d", samples, compare=False)[0]
    assert "over 1 round (measured" in one[4][0].message
    full = perfgate.judge("m", "d", perfgate.measure(NoOps(), ids, 10), compare=False)[0]
    assert "over 10 rounds (measured; no comparison)" in full[4][0].message
