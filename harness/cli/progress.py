"""``harness gate --progress``: a line on stderr when each phase starts and ends, and at each stage of a
golden build, with the time since the gate started.

A full-scale gate runs for an hour or more (qwen3-4b at 2048 tokens on the emulator) and prints its
verdict only at the end; these lines say where it is. They go to stderr, so stdout keeps the verdict
alone; on by default when stderr is a terminal.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from harness.suites.phases import PASS, PHASES

MESSAGE_CHARS = 200  # a phase's message (its first failure, its error) is cut here: the summary has it whole


class GateProgress:
    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter):
        self.stream, self.clock = stream, clock
        self.t0 = clock()
        self.model: str | None = None

    def _line(self, text: str) -> None:
        secs = int(self.clock() - self.t0)
        stamp = f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        print(f"[{stamp}] {text}", file=self.stream or sys.stderr, flush=True)

    def phase(self, model: str, phase: int, outcome: Any | None) -> None:
        """RunOptions.on_phase: ``outcome`` None when phase ``phase`` starts, its PhaseOutcome when it ends."""
        self.model = model
        head = f"{model} phase {phase} {PHASES[phase][0]}"
        if outcome is None:
            self._line(f"{head}: started")
            return
        why = f": {outcome.message[:MESSAGE_CHARS]}" if outcome.status != PASS and outcome.message else ""
        self._line(f"{head}: {outcome.status} in {outcome.seconds:.0f} s{why}")

    def build(self, stage: str, done: int, total: int) -> None:
        """RunOptions.progress: a golden or baseline build's stage."""
        self._line(f"{self.model or ''} golden build: {stage} ({done}/{total})".lstrip())
