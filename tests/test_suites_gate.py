"""Phase-gate library: exit-code rules, tap-to-phase mapping, e2e statistics, sanity on a corrupted golden,
run_gate on the emulator; replays refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from harness.deployment.replay import perturbed_replay
from harness.suites.e2e import kl_rows, log_softmax
from harness.suites.gate import run_gate
from harness.suites.phases import (EXIT_ERROR, EXIT_FAIL, EXIT_PASS, EXIT_PERF, Check, GateResult, PhaseOutcome,
                                   gate_phase_of, outcome, overall_exit)

MODEL = "qwen3-0.6b"
logits = arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 16)),
                elements=st.floats(-30, 30, width=32))


@settings(max_examples=40, deadline=None)
@given(logits, st.floats(-5, 5))
def test_kl_is_nonnegative_zero_on_self_and_shift_invariant(x: np.ndarray, shift: float) -> None:
    kl = kl_rows(x, x + np.float32(shift))
    assert np.all(np.abs(kl) < 1e-9)
    y = x[::-1].copy()
    assert np.all(kl_rows(x, y) >= -1e-12)
    assert np.allclose(np.exp(log_softmax(x)).sum(-1), 1.0)


def test_gate_phase_mapping() -> None:
    assert gate_phase_of("isolated", "prefill", "embed") == 2
    assert gate_phase_of("isolated", "prefill", "layers.0.q") == 2
    assert gate_phase_of("cumulative", "prefill", "layers.0.q") == 3
    assert gate_phase_of("isolated", "prefill", "layers.1.q") == 3
    assert gate_phase_of("cumulative", "decode.3", "layers.0.q") == 5


def _result(*statuses: str, error: str | None = None) -> GateResult:
    r = GateResult(MODEL, "x", 7, error=error)
    r.outcomes = {n: PhaseOutcome(n, s) for n, s in enumerate(statuses)}
    return r


def test_exit_codes() -> None:
    assert _result("pass", "measured").exit_code == EXIT_PASS
    assert _result("pass", "fail", "regression").exit_code == EXIT_FAIL
    assert _result("pass", "regression").exit_code == EXIT_PERF
    assert _result("pass", "fail", "error").exit_code == EXIT_ERROR
    assert _result(error="boom").exit_code == EXIT_ERROR
    assert _result().exit_code == EXIT_ERROR  # nothing ran: never a pass
    assert overall_exit([_result("pass"), _result("fail"), _result("regression")]) == EXIT_FAIL
    assert overall_exit([]) == EXIT_ERROR
    o = outcome(3, [Check("a", True), Check("b", False, "r 4 > max 1.5")])
    assert o.status == "fail" and "b: r 4 > max 1.5" in o.message


def test_sanity_catches_a_corrupted_golden(golden_root: Path, tmp_path: Path) -> None:
    from harness.store import GoldenRequest, GoldenStore
    from harness.store.golden import GoldenSet
    from harness.suites.sanity import golden_integrity

    golden = GoldenStore(golden_root).get(GoldenRequest(MODEL, "tiny", 0, 4))
    copy = tmp_path / golden.path.name
    shutil.copytree(golden.path, copy)
    assert golden_integrity(GoldenSet(copy, golden.manifest))
    blob = (copy / "decode.1.safetensors").read_bytes()
    (copy / "decode.1.safetensors").write_bytes(blob[:-8] + bytes(8))
    check = golden_integrity(GoldenSet(copy, golden.manifest))
    assert not check and "decode.1.safetensors" in check.message


def test_decode_matches_prefill_scales_with_depth_and_catches_a_stale_step(golden_root: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 reordering noise is judged against the bf16 golden's own difference where it passes the
    fixed floor (deep layers at full scale); a decode step carrying another step's values still fails."""
    import harness.suites.sanity as sanity
    from harness.store import GoldenRequest, GoldenStore
    from harness.store.golden import GoldenSet
    from harness.weights import WeightsSource, load_weights

    golden = GoldenStore(golden_root).get(GoldenRequest(MODEL, "tiny", 0, 4))
    weights = load_weights(golden.spec, WeightsSource(None), 0)
    clean = sanity.decode_matches_prefill(golden, weights)
    assert clean and clean.metrics["compared"] > 0 and clean.metrics["worst_rel"] < sanity.DECODE_PREFILL_RTOL
    # A floor below the noise: every tap is then judged against its bf16 difference, and fp32 noise is a
    # small share of it.
    monkeypatch.setattr(sanity, "DECODE_PREFILL_RTOL", clean.metrics["worst_rel"] / 100)
    deep = sanity.decode_matches_prefill(golden, weights)
    assert deep and deep.metrics["max_rel"] > sanity.DECODE_PREFILL_RTOL and deep.metrics["score"] < 0.5

    class Stale(GoldenSet):  # decode.2's layers.1.o holds decode.1's value: a stale KV-cache step
        def tensor(self, phase: str, tap: str, variant: str = "fp32") -> np.ndarray:
            return super().tensor("decode.1" if (phase, tap) == ("decode.2", "layers.1.o") else phase, tap, variant)

    stale = sanity.decode_matches_prefill(Stale(golden.path, golden.manifest), weights)
    assert not stale and stale.metrics["where"] == "decode.2 layers.1.o" and stale.metrics["score"] > 10


def test_run_gate_refuses_a_reference_replay(golden_root: Path) -> None:
    """A replay hands back the goldens: the gate never runs one (exit 3 before any phase)."""
    for dep in (perturbed_replay("prefill", "layers.1.gate", 0.05), "replay-fp32"):
        r = run_gate(MODEL, deployment=dep, phase=3, golden_dir=golden_root, mode="isolated")
        assert r.exit_code == EXIT_ERROR and "asks for the goldens" in r.error and not r.outcomes


def test_run_gate_e2e_and_recheck_on_the_emulator(golden_root: Path) -> None:
    r = run_gate(MODEL, phase=7, golden_dir=golden_root, mode="cumulative", recheck_seed=11, recheck_prompt_len=40)
    assert r.exit_code == EXIT_PASS, {n: (o.status, o.message) for n, o in r.outcomes.items()}
    assert "--recheck-seed 11 --recheck-prompt-len 40" in r.recheck["reproduce"]
    assert r.recheck["reproduce"].startswith("harness gate --model qwen3-0.6b") and not r.recheck["derived"]
    assert len(r.e2e["deployment_tokens"]) == len(r.e2e["reference_tokens"])
    ids = {c.id for c in r.outcomes[6].checks}
    assert ids == {"topk_walk", "logprob_tie", "kl", "top1", "deterministic"}
    assert r.outcomes[4].status == "measured" and r.perf["samples"]["ttft"]
    doc = r.to_dict()
    assert doc["verdicts"]["recheck/cumulative"]["provenance"]["recheck"]["seed"] == 11
    # the deployment ran in one child process (default isolation), reused by every phase
    pids = {v["provenance"]["isolation"]["pid"] for v in doc["verdicts"].values()}
    assert len(pids) == 1 and doc["verdicts"]["cumulative"]["provenance"]["isolation"]["mode"] == "process"
    assert r.deployment_s > 0


@pytest.mark.parametrize("bad", [{"phase": 9}, {"mode": "sideways"}, {"scale": "huge"}])
def test_run_gate_bad_options_are_exit_3(golden_root: Path, bad: dict) -> None:
    r = run_gate(MODEL, golden_dir=golden_root, **bad)
    assert r.exit_code == EXIT_ERROR and r.error


@pytest.mark.parametrize("bad, words", [
    ({"seed": -5}, "--seed -5"),
    ({"decode_steps": -1}, "--decode-steps -1"),
    ({"decode_steps": 10**9}, "context length"),
    ({"prompt_len": 100000}, "context length"),
    ({"prompt_len": 4000, "ram": 200e6}, "of memory"),
    ({"disk": 1e6}, "on disk"),
])
def test_run_gate_refuses_unbounded_inputs_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          bad: dict, words: str) -> None:
    """Inputs are checked against the model's context and the machine (memory and disk predicted from
    the golden's size; here the machine is made small) before any golden is started."""
    from harness.store import bounds

    ram, disk = bad.pop("ram", None), bad.pop("disk", None)
    monkeypatch.setattr(bounds, "available_ram", lambda: ram if ram is not None else 10**12)
    monkeypatch.setattr(bounds, "free_disk", lambda root: disk if disk is not None else 10**13)
    r = run_gate(MODEL, golden_dir=tmp_path / "g", **bad)
    assert r.exit_code == EXIT_ERROR and words in r.error, r.error
    assert not r.outcomes
    assert not (tmp_path / "g").exists()


def test_a_golden_in_the_store_is_never_refused_for_room(golden_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The room check is for goldens still to build: with the golden in the store (a 16 GB full-scale
    one, on a disk filling up) the gate runs; the same request without it is refused."""
    from harness.store import bounds

    run_gate(MODEL, golden_dir=golden_root, phase=0, decode_steps=3)  # builds it, if not there already
    monkeypatch.setattr(bounds, "free_disk", lambda root: 1e6)
    assert run_gate(MODEL, golden_dir=golden_root, phase=0, decode_steps=3).exit_code == EXIT_PASS
    r = run_gate(MODEL, golden_dir=golden_root, phase=0, decode_steps=2, seed=7)
    assert r.exit_code == EXIT_ERROR and "on disk" in r.error


def test_recheck_is_derived_from_deployment_and_golden_key() -> None:
    from harness.suites.run import ModelRun, RunOptions, derive_recheck

    def params(**kw):
        return ModelRun(MODEL, RunOptions(**kw)).recheck_params()

    base = params()
    assert base == params()  # the same deployment on the same golden: the same re-check, every run
    assert params(faults=("interleaved_rope",)) != base  # another deployment
    assert params(seed=1) != base  # another golden key
    assert params(recheck_seed=5, recheck_prompt_len=33) == (5, 33)
    seed, plen = base
    assert 1 <= seed < 2**31 and 32 <= plen < 96  # around tiny's default of 64
    assert derive_recheck("a", "k", 64) != derive_recheck("b", "k", 64)


def test_recheck_follows_the_deployment_code(tmp_path: Path) -> None:
    """Editing a user's deployment file gives it a fresh phase-7 re-check (one it was not tuned to);
    the rerun command still names the deployment as given."""
    from harness.deployment.loader import code_digest
    from harness.suites.run import ModelRun, RunOptions, rerun_command

    dep = tmp_path / "mine.py"
    dep.write_text("from harness.deployment.emulator import factory\n")
    target = f"{dep}:factory"
    first = ModelRun(MODEL, RunOptions(deployment=target))
    before, first_identity = first.recheck_params(), first.identity()
    dep.write_text("from harness.deployment.emulator import factory  # tuned\n")
    second = ModelRun(MODEL, RunOptions(deployment=target))
    assert before != second.recheck_params()
    assert first_identity.startswith(target + "@") and first_identity != second.identity()
    assert len(code_digest(target)) == 16
    assert code_digest("emulator") == code_digest("numpy-fp32") == code_digest(None) == ""  # built-ins: by name
    seed, plen = second.recheck_params()
    assert f"--deployment {target} " in rerun_command(MODEL, second.opts, seed, plen, str(second.name))


def test_decode_steps_zero_is_not_a_pass(golden_root: Path) -> None:
    """Phase 5 with nothing compared is "not run" (exit 3), never pass."""
    r = run_gate(MODEL, phase=5, golden_dir=golden_root, mode="cumulative", decode_steps=0)
    assert r.outcomes[3].status == "pass"
    assert r.outcomes[5].status == "not run" and "decode" in r.outcomes[5].message
    assert r.exit_code == EXIT_ERROR and not r.passed
    assert r.first_failure()["gate_phase"] == 5


def test_predicted_golden_size_matches_a_built_one(golden_root: Path) -> None:
    """The up-front prediction is the golden's real size: taps x tokens x (fp32 + bf16) bytes."""
    from harness.store import GoldenRequest, GoldenStore
    from harness.store.bounds import predict

    g = GoldenStore(golden_root).get(GoldenRequest(MODEL, "tiny", 0, 4))
    files = sum(f.stat().st_size for f in g.path.glob("*.safetensors"))
    need = predict(g.spec, 64, 4)
    assert 0.97 < need.elements * 6 / files <= 1.0  # safetensors headers are the only extra bytes
