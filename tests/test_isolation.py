"""Deployments run isolated: crashes and hangs become errors naming phase and tap (exit 3), teacher forcing
through the child matches inline, nothing a deployment does reaches the store, no deployment gets the
goldens, and the logits a deployment returns are judged like its logits tap."""
from __future__ import annotations

import hashlib
import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import harness
from harness.cli import app
from harness.deployment.isolation import DeploymentCrash, DeploymentHost, Deadlines, pack, unpack
from harness.deployment.loader import DeploymentError
from harness.errors import HarnessError

MODEL = "qwen3-0.6b"
runner = CliRunner()

# Importable by the child process (the test puts its folder on sys.path before the child starts).
HOSTILE = '''
import ctypes, os, sys, time

import numpy as np

from harness.deployment.emulator import factory as emulator


class Misbehave:
    """The emulator, doing ``how`` in prefill right after handing over tap ``where``."""

    def __init__(self, inner, how, where="layers.0.q"):
        self.inner, self.how, self.where = inner, how, where

    def prefill(self, ids, tap):
        def watched(name, value):
            out = tap(name, value)
            if name == self.where:
                self.misbehave()
            return out
        logits = self.inner.prefill(ids, watched)
        if self.how == "nan_logits":  # honest taps, a NaN row in what it returns
            logits = np.array(logits, copy=True)
            logits[-1] = np.nan
        return logits

    def decode(self, token, tap):
        return self.inner.decode(token, tap)

    def misbehave(self):
        if self.how == "abort":
            os.abort()
        if self.how == "segv":
            ctypes.string_at(0)
        if self.how == "exit":
            sys.exit(7)
        if self.how == "os_exit":
            os._exit(5)
        if self.how == "sleep":
            time.sleep(3600)


def make(how):
    def factory(spec, weights):
        return Misbehave(emulator(spec, weights), how)
    return factory


abort, segv, exit, os_exit, sleep, nan_logits = map(make, ("abort", "segv", "exit", "os_exit", "sleep", "nan_logits"))


def poison(spec, weights):
    """Tries every way to change the weights it was handed, then deploys honestly."""
    try:
        weights["model.norm.weight"] = weights["model.norm.weight"] * 0
    except TypeError:
        pass
    for arr in list(weights.values()):
        for target in (arr, arr.base):
            try:
                target.flags.writeable = True
                target[...] = 0
            except (ValueError, TypeError, AttributeError):
                pass
    return emulator(spec, weights)


class GoldenReplay:  # the five-line cheat: ask for the goldens and hand them back
    needs_golden = True

    def __call__(self, spec, weights, *, golden=None, mode="cumulative"):
        from harness.deployment.replay import ReplayDeployment
        return ReplayDeployment(golden, "fp32")


replay = GoldenReplay()
'''


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "hostile_dep.py").write_text(textwrap.dedent(HOSTILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "hostile_dep"


def _check(golden_root: Path, target: str, **kw):
    return harness.check(MODEL, target, decode_steps=kw.pop("decode_steps", 1), golden_dir=golden_root, **kw)


def _segments(pid: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"npuh{pid}-*"))


@pytest.mark.parametrize("how, words", [
    ("abort", "SIGABRT"), ("segv", "SIGSEGV"), ("exit", "exited with code 7"), ("os_exit", "exited with code 5"),
])
def test_a_crash_is_an_error_naming_phase_and_last_tap(golden_root: Path, hostile: str, how: str, words: str):
    host = DeploymentHost("process")
    with pytest.raises(DeploymentCrash) as info:
        _check(golden_root, f"{hostile}:{how}", isolation=host)
    message = str(info.value)
    assert "crashed in prefill" in message and "last tap seen: prefill layers.0.q" in message and words in message
    assert host.pid is None  # the child was reaped; the next open starts a fresh one
    if how != "segv":
        return
    v = _check(golden_root, "emulator", isolation=host)  # the host recovers
    assert v.passed
    pid = v.provenance["isolation"]["pid"]
    host.close()
    assert not _segments(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_crash_and_hang_exit_3_at_the_cli(golden_root: Path, hostile: str):
    res = runner.invoke(app, ["gate", "--model", MODEL, "--phase", "2", "--mode", "cumulative", "-d",
                              f"{hostile}:segv", "--golden-dir", str(golden_root)])
    assert res.exit_code == 3, res.output
    assert "crashed in prefill" in res.output and "SIGSEGV" in res.output and "layers.0.q" in res.output
    t0 = time.monotonic()
    res = runner.invoke(app, ["gate", "--model", MODEL, "--phase", "2", "--mode", "cumulative", "-d",
                              f"{hostile}:sleep", "--timeout", "3", "--golden-dir", str(golden_root)])
    assert res.exit_code == 3, res.output
    assert "did not finish prefill within its deadline of 3 s" in res.output and "layers.0.q" in res.output
    assert time.monotonic() - t0 < 60  # the deadline plus the child's start-up and emulator build


def test_inline_isolation_runs_in_this_process(golden_root: Path, hostile: str):
    with pytest.raises(HarnessError, match="--isolation 'sideways'"):
        _check(golden_root, "emulator", isolation="sideways")
    with pytest.raises(HarnessError, match="--timeout"):
        _check(golden_root, "emulator", timeout=-1)
    v = _check(golden_root, "emulator", isolation="inline")
    assert v.passed and v.provenance["isolation"] == {"mode": "inline"}


def test_an_unpicklable_factory_runs_inline_and_says_so(golden_root: Path):
    from harness.deployment.emulator import factory as emulator

    v = _check(golden_root, lambda spec, weights: emulator(spec, weights))
    assert v.passed and v.provenance["isolation"]["mode"] == "inline"
    assert "cannot be pickled" in v.provenance["isolation"]["reason"]


@pytest.mark.parametrize("mode", ["isolated", "cumulative"])
def test_teacher_forcing_through_the_child_matches_inline(golden_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                         mode: str):
    """Tap by tap the same verdict, with every tap above 4 KiB sent through shared memory both ways."""
    monkeypatch.setenv("NPU_HARNESS_PIPE_MAX", "4096")
    inline = _check(golden_root, "emulator[faults=stale_kv_cache]", mode=mode, decode_steps=2, isolation="inline")
    child = _check(golden_root, "emulator[faults=stale_kv_cache]", mode=mode, decode_steps=2)
    assert child.provenance["isolation"]["mode"] == "process"
    assert [(r.phase, r.tap, r.passed) for r in child.results] == [(r.phase, r.tap, r.passed) for r in inline.results]
    for a, b in zip(child.results, inline.results):  # the same numbers, bit for bit
        assert json.dumps(a.metrics, sort_keys=True, default=str) == json.dumps(b.metrics, sort_keys=True,
                                                                                default=str), a.id
    assert (child.first_failure.phase, child.first_failure.tap) == (inline.first_failure.phase, inline.first_failure.tap)
    assert not _segments(child.provenance["isolation"]["pid"])


def test_shared_memory_round_trip_unlinks_its_segment():
    import itertools

    a = np.arange(600_000, dtype=np.float32).reshape(600, 1000)
    packed = pack(a, "npuhtest-", itertools.count())
    assert packed[0] == "shm" and Path("/dev/shm", packed[1]).exists()
    np.testing.assert_array_equal(unpack(packed), a)
    assert not Path("/dev/shm", packed[1]).exists()
    assert pack(a[:10], "npuhtest-", itertools.count())[0] == "pipe"


def test_a_shared_array_crosses_without_a_copy_and_goes_with_its_last_view(monkeypatch: pytest.MonkeyPatch):
    """In a child, ``shared_array`` lives in a segment the parent maps as it is ("owned"): the logits of a
    full-scale prefill (1.2 GB) are not copied on their way out. The segment goes with the array."""
    import gc
    import itertools

    from harness.deployment import isolation

    assert type(isolation.shared_array((600, 1000))) is np.ndarray  # not in a child: plain memory
    monkeypatch.setitem(isolation._CHILD, "prefix", "npuhtest-")
    monkeypatch.setitem(isolation._CHILD, "counter", itertools.count())
    a = isolation.shared_array((600, 1000))
    a[...] = np.arange(600_000, dtype=np.float32).reshape(600, 1000)
    packed = pack(a, "npuhtest-", itertools.count())
    assert packed[0] == "owned" and Path("/dev/shm", packed[1]).exists()
    seen = unpack(packed)
    np.testing.assert_array_equal(seen, a)
    assert Path("/dev/shm", packed[1]).exists()  # the child still owns it
    part = pack(a[1:], "npuhtest-", itertools.count())
    assert part[0] == "shm"  # a part of it is copied as before
    np.testing.assert_array_equal(unpack(part), a[1:])  # (and its segment unlinked)
    assert pack(isolation.shared_array((4, 4)), "npuhtest-", itertools.count())[0] == "pipe"  # small: plain
    del a
    gc.collect()
    assert not Path("/dev/shm", packed[1]).exists()
    np.testing.assert_array_equal(seen[1], np.arange(1000, 2000, dtype=np.float32))  # the map outlives the name


def test_default_deadlines_grow_with_the_work():
    small, full = harness.models.get(MODEL, "tiny"), harness.models.get(MODEL, "full")
    d = Deadlines()
    assert 60 <= d.call(small, 64) < 65 and d.call(full, 2048) > 10 * d.call(full, 1) > 60
    assert d.build(full) > d.build(small) >= 120
    assert Deadlines(5).call(full, 2048) == 5 and Deadlines(5).build(small) >= 120


def _store_bytes(root: Path) -> dict[str, str]:
    """sha256 of every tensor file, keyed by path in the store (manifests carry build times)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


def test_a_poisoning_deployment_leaves_the_store_byte_identical(tmp_path: Path, hostile: str):
    from harness.store import GoldenRequest, GoldenStore

    dirty, clean = tmp_path / "dirty", tmp_path / "clean"
    v = harness.check(MODEL, f"{hostile}:poison", decode_steps=1, golden_dir=dirty, isolation="inline")
    assert v.passed  # it got nothing changed: the emulator ran on the honest weights
    GoldenStore(dirty).get(GoldenRequest(MODEL, "tiny", 0, 2))  # a later build in the poisoned process
    GoldenStore(clean).get(GoldenRequest(MODEL, "tiny", 0, 1))
    GoldenStore(clean).get(GoldenRequest(MODEL, "tiny", 0, 2))
    assert _store_bytes(dirty) == _store_bytes(clean) and len(_store_bytes(clean)) == 2 + 3


def test_weights_handed_out_are_read_only_and_per_call():
    from harness.weights import load_weights

    spec = harness.models.get(MODEL, "tiny")
    w1, w2 = load_weights(spec), load_weights(spec)
    assert w1 is not w2 and w1.keys() == w2.keys()
    with pytest.raises(TypeError):
        w1["model.norm.weight"] = np.zeros(3, np.float32)  # type: ignore[index]
    arr = w1["model.norm.weight"]
    with pytest.raises(ValueError):
        arr[0] = 1.0
    with pytest.raises(ValueError):
        arr.flags.writeable = True
    changed = dict(w1)  # a deployment that wants changes edits its own copy
    changed["model.norm.weight"] = arr * 0
    assert load_weights(spec)["model.norm.weight"].any()


def test_a_golden_asking_factory_cannot_pass_the_gate(golden_root: Path, hostile: str):
    res = runner.invoke(app, ["gate", "--model", MODEL, "--phase", "3", "-d", f"{hostile}:replay",
                              "--golden-dir", str(golden_root)])
    assert res.exit_code == 3 and "asks for the goldens" in res.output, res.output
    res = runner.invoke(app, ["gate", "--model", MODEL, "--phase", "0", "-d", "replay-fp32",
                              "--golden-dir", str(golden_root)])
    assert res.exit_code == 3 and "asks for the goldens" in res.output, res.output
    with pytest.raises(DeploymentError, match="asks for the goldens"):
        _check(golden_root, f"{hostile}:replay")  # refused in the child, by name
    from harness.deployment.replay import check_replay, fp32_replay

    v = check_replay(MODEL, fp32_replay, decode_steps=1, golden_dir=golden_root)
    assert v.passed and v.provenance["reference_replay"] is True


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_nan_returned_logits_fail_like_the_logits_tap(golden_root: Path, hostile: str, isolation: str):
    v = _check(golden_root, f"{hostile}:nan_logits", isolation=isolation)
    assert not v.passed
    failed = [r for r in v.failures]
    assert [(r.phase, r.tap) for r in failed] == [("prefill", "logits")]
    assert failed[0].message.startswith("prefill logits (returned):")
    assert failed[0].judgement["tapped"]["passed"] is True  # the tap itself was honest


def test_torch_taps_of_any_float_dtype_and_a_batch_dimension_are_judged(golden_root: Path):
    """A torch deployment may hand over bf16 / fp16 tensors with a leading batch dimension of 1."""
    import torch

    from harness.deployment.emulator import factory as emulator

    class Torchy:
        def __init__(self, inner):
            self.inner = inner

        def _tap(self, tap):
            def t(name, value):  # float64 holds every float32 exactly: the judgement must be the same
                tensor = torch.from_numpy(np.array(value, dtype=np.float32))[None].to(torch.float64)
                out = tap(name, tensor)
                return value if out is tensor else out
            return t

        def prefill(self, ids, tap):
            return torch.from_numpy(np.array(self.inner.prefill(ids, self._tap(tap))))[None]

        def decode(self, token, tap):
            return self.inner.decode(token, self._tap(tap))

    v = _check(golden_root, lambda spec, weights: Torchy(emulator(spec, weights)))
    assert v.passed, v.summary()

    def bad(spec, weights):
        class Ints(Torchy):
            def _tap(self, tap):
                return lambda name, value: tap(name, torch.zeros(np.shape(value), dtype=torch.int32))
        return Ints(emulator(spec, weights))

    v = _check(golden_root, bad)
    assert not v.passed and "expected a floating-point tensor" in v.first_failure.message


def test_unpacked_segment_is_mapped_not_copied_and_writable():
    """A large tap arrives as the segment's own pages (no second copy); writing to it is the receiver's
    business (the name is gone, nobody else sees the pages)."""
    import itertools

    a = np.arange(600_000, dtype=np.float32).reshape(600, 1000)
    packed = pack(a, "npuhtest-", itertools.count())
    got = unpack(packed)
    assert not got.flags.owndata and got.flags.writeable and not Path("/dev/shm", packed[1]).exists()
    got[0, 0] = -1.0
    np.testing.assert_array_equal(got[1:], a[1:])


BUSY = '''
import os, time
from pathlib import Path


class Busy:
    """Writes its pid where the test looks, then stays busy in prefill (not waiting on the pipe)."""

    def prefill(self, ids, tap):
        Path(os.environ["BUSY_MARKER"]).write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)

    def decode(self, token, tap):
        raise AssertionError("never reached")


def factory(spec, weights):
    return Busy()
'''


def test_a_busy_child_ends_with_its_killed_gate(golden_root: Path, tmp_path: Path) -> None:
    """A gate killed outright (SIGKILL, a CI timeout's SIGTERM) never tells its child; a child in the middle
    of a long call would compute on for the rest of the call. It watches for its parent and goes too."""
    import signal
    import subprocess
    import sys

    (tmp_path / "busy_dep.py").write_text(BUSY)
    marker = tmp_path / "child.pid"
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import harness; "
            f"harness.check({MODEL!r}, 'busy_dep:factory', decode_steps=1, golden_dir={str(golden_root)!r}, "
            "timeout=3600)")
    gate = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "BUSY_MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and gate.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the deployment never started its prefill"
        child = int(marker.read_text())
        gate.send_signal(signal.SIGKILL)
        gate.wait()
        deadline = time.monotonic() + 15
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            status = Path(f"/proc/{child}/status").read_text() if Path(f"/proc/{child}/status").exists() else ""
            if "zombie" in status:  # ended; its new parent reaps it
                break
            time.sleep(0.1)
        status = Path(f"/proc/{child}/status").read_text() if Path(f"/proc/{child}/status").exists() else ""
        assert not status or "zombie" in status, f"child {child} still running after its gate was killed"
    finally:
        if gate.poll() is None:
            gate.kill()


LIFECYCLE = '''
import os


class Logged:
    def __init__(self, n):
        self.n = n
        self._say(f"built {n}")

    def _say(self, what):
        with open(os.environ["LIFECYCLE_LOG"], "a") as f:
            f.write(what + "\\n")

    def prefill(self, ids, tap):
        raise AssertionError("never called")

    def decode(self, token, tap):
        raise AssertionError("never called")

    def __del__(self):
        self._say(f"freed {self.n}")


def factory(spec, weights):
    built = sum(line.startswith("built") for line in open(os.environ["LIFECYCLE_LOG"]))
    return Logged(built + 1)
'''


def test_a_dropped_deployment_is_freed_before_the_next_is_built(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The child used to keep the last built deployment in a local of its loop: a dropped full-scale
    emulator stayed resident while the next one was built beside it (the peak of a qwen3-4b gate)."""
    from harness.spec.model_spec import get
    from harness.weights import WeightsSource

    (tmp_path / "lifecycle_dep.py").write_text(LIFECYCLE)
    log = tmp_path / "life.log"
    log.write_text("")
    monkeypatch.setenv("LIFECYCLE_LOG", str(log))
    monkeypatch.syspath_prepend(str(tmp_path))
    with DeploymentHost("process") as host:
        first = host.open("lifecycle_dep:factory", get(MODEL), WeightsSource(None), 0)
        first.close()
        second = host.open("lifecycle_dep:factory", get(MODEL), WeightsSource(None), 0)
        second.close()
        host.open("lifecycle_dep:factory", get(MODEL), WeightsSource(None), 0)  # a third request orders the log
    assert log.read_text().splitlines()[:4] == ["built 1", "freed 1", "built 2", "freed 2"]


GOES_ON = '''
import os

import numpy as np


class GoesOn:
    """Hands over one shared-memory-sized tap, then leaves a mark as soon as the tap call returns."""

    def prefill(self, ids, tap):
        tap("layers.0.q", np.ones((512, 1024), np.float32))  # 2 MiB: over the pipe's limit
        with open(os.environ["GOES_ON_MARK"], "w") as f:
            f.write("went on")
        tap("layers.0.k", np.ones(4, np.float32))
        return np.zeros((len(ids), 8), np.float32)

    def decode(self, token, tap):
        raise AssertionError("never called")


def factory(spec, weights):
    return GoesOn()
'''


@pytest.mark.parametrize("early", [True, False])
def test_a_shared_memory_tap_is_acknowledged_before_it_is_judged_unless_too_large(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool) -> None:
    """In cumulative mode the child waited while the parent judged each shared-memory tap: judging (a third
    of a full-scale cumulative check at 256 tokens) never overlapped the deployment's compute. The ack now
    comes once the segment is mapped; a tap over EARLY_ACK_MAX still waits, so two never coexist."""
    from harness.deployment import isolation
    from harness.spec.model_spec import get
    from harness.weights import WeightsSource

    (tmp_path / "goes_on_dep.py").write_text(GOES_ON)
    mark = tmp_path / "mark"
    monkeypatch.setenv("GOES_ON_MARK", str(mark))
    monkeypatch.syspath_prepend(str(tmp_path))
    if not early:
        monkeypatch.setattr(isolation, "EARLY_ACK_MAX", 1 << 20)
    seen: dict[str, bool] = {}

    def judge(name: str, value: np.ndarray) -> np.ndarray:
        if name == "layers.0.q":
            deadline = time.monotonic() + (20 if early else 1)  # early: the child writes the mark while we wait
            while not mark.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen[name] = mark.exists()
        return value

    judge.returns_own_value = True  # cumulative mode: the deployment keeps its own value
    with DeploymentHost("process") as host:
        dep = host.open("goes_on_dep:factory", get(MODEL), WeightsSource(None), 0)
        out = dep.prefill(np.arange(3), judge)
    assert out.shape == (3, 8)
    assert seen == {"layers.0.q": early}
    assert mark.read_text() == "went on"
