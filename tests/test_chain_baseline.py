"""Isolated mode on deployments that keep taps to themselves: taps downstream of an unexposed or
observe-only tap are deferred and judged against a chain baseline (docs/policies.md, "Taps downstream
of an unexposed one")."""
from __future__ import annotations

import json

import numpy as np
import pytest

import harness
from harness.checker import DeferredValues
from harness.errors import GoldenCorrupt
from harness.spec.model_spec import get
from harness.store import GoldenRequest, verify_dir
from harness.store.golden import chain_name

MODEL, STEPS = "qwen3-0.6b", 2
WITHHELD = "harness.selftest.withheld:factory"


def _check(golden_root, seed=0, model=MODEL, steps=STEPS, **kw):
    args = ",".join(f"{k}={v}" for k, v in kw.items())
    return harness.check(model, f"{WITHHELD}[{args}]", seed=seed, decode_steps=steps, mode="isolated",
                         isolation="inline", golden_dir=golden_root)


def test_taps_after_a_withheld_one_are_judged_against_the_chain_baseline(golden_root, store):
    v = _check(golden_root, member="numpy_bf16_pairwise", drop="act")
    assert v.passed, v.first_failure
    spec = get(MODEL, "tiny")
    assert v.provenance["chain_baseline"] == {"name": "local-act", "unforced_kinds": ["act"],
                                             "taps_judged": spec.num_layers * (STEPS + 1)}
    downs = [r for r in v.results if r.tap.endswith(".down")]
    assert len(downs) == spec.num_layers * (STEPS + 1)
    for r in downs:
        assert r.metrics["unforced_inputs"] == 1
        assert r.judgement["baseline"] == "local-act"
        assert r.judgement["unforced"] == [r.tap.replace(".down", ".act")]
        assert "row_r" not in r.judgement["measured"]  # only the tap-wide statistics and the lean
    others = [r for r in v.results if not r.tap.endswith(".down")]
    assert others and all("unforced_inputs" not in r.metrics for r in others)
    # the results keep the run's order: per phase, canonical tap order without the withheld act
    order = {n: k for k, n in enumerate(harness.spec.taps.tap_names(spec))}
    for phase in {r.phase for r in v.results}:
        taps = [r.tap for r in v.results if r.phase == phase]
        assert taps == sorted(taps, key=order.__getitem__) and not any(t.endswith(".act") for t in taps)
    # the chain baseline sits in the entry, names its unforced taps, and is verified with it
    golden = store.get(GoldenRequest(MODEL, "tiny", 0, STEPS))
    manifest = json.loads((golden.path / "local-act" / "manifest.json").read_text())
    assert manifest["kind"] == "chain bf16 baseline" and manifest["key"] == golden.manifest["key"]
    assert manifest["unforced"]["prefill"] == [f"layers.{i}.act" for i in range(spec.num_layers)]
    assert verify_dir(golden.path) == []


def test_norms_and_adds_after_a_withheld_tap_keep_their_block_statistics(golden_root):
    v = _check(golden_root, member="numpy_bf16_pairwise", drop="attn_residual")
    assert v.passed, v.first_failure
    for r in v.results:
        if r.tap.endswith((".ffn_norm", ".out")):
            assert r.metrics["unforced_inputs"] == 1 and r.judgement["baseline"] == "local-attn_residual"
            assert {"head_r", "kind_r"} <= set(r.judgement["measured"])  # (decode has no row_r)
    bug = _check(golden_root, member="numpy_bf16_pairwise", drop="attn_residual", bug="head", bug_tap="ffn_norm")
    assert not bug.passed and bug.first_failure.tap.endswith(".ffn_norm")


def test_observe_only_taps_defer_what_follows_them(golden_root):
    v = _check(golden_root, member="numpy_bf16_pairwise", drop="act", how="observe")
    assert v.passed, v.first_failure
    assert v.coverage.observed and all(t.endswith(".act") for t in v.coverage.observed)
    acts = [r for r in v.results if r.tap.endswith(".act")]
    assert acts and all("unforced_inputs" not in r.metrics for r in acts)  # read forced gate / up
    assert all(r.metrics["unforced_inputs"] == 1 for r in v.results if r.tap.endswith(".down"))


def test_logits_after_an_observe_only_final_norm_and_the_returned_logits(golden_root):
    """The member returns what its logits tap got back (the golden): judged too, against the chain."""
    v = _check(golden_root, member="numpy_bf16_pairwise", drop="final_norm", how="observe")
    assert v.passed, v.first_failure
    logits = [r for r in v.results if r.tap == "logits"]
    assert len(logits) == STEPS + 1 and all(r.metrics["unforced_inputs"] == 1 for r in logits)
    assert v.provenance["chain_baseline"] == {"name": "local-final_norm", "unforced_kinds": ["final_norm"],
                                             "taps_judged": STEPS + 1}


def test_a_one_percent_bug_after_a_withheld_tap_is_caught_there(golden_root):
    for bug in ("scale", "noise"):
        v = _check(golden_root, member="numpy_bf16_pairwise", drop="act", bug=bug, bug_tap="down")
        assert not v.passed
        assert v.first_failure.tap.endswith(".down"), v.first_failure
        assert "chain baseline local-act" in v.first_failure.message
        assert v.first_failure.judgement["baseline"] == "local-act"


def test_torch_functions_example_false_alarm_is_gone(golden_root):
    """qwen2.5-0.5b seed 2 failed layers.*.ffn_norm on r_tail (4.25 > 4) against the local baseline:
    the example keeps attn_residual to itself."""
    v = harness.check("qwen2.5-0.5b", "examples/torch_functions_adapter.py:factory", seed=2, decode_steps=4,
                      mode="isolated", isolation="inline", golden_dir=golden_root)
    assert v.passed, v.first_failure
    norms = [r for r in v.results if r.tap.endswith(".ffn_norm")]
    assert norms and all(r.metrics["unforced_inputs"] == 1 for r in norms)
    assert v.provenance["chain_baseline"]["name"] == "local-attn_residual"


def test_withholding_nothing_builds_no_chain_and_defers_nothing(golden_root, store):
    v = _check(golden_root, member="numpy_bf16_pairwise", drop="none")
    assert v.passed and "chain_baseline" not in v.provenance
    assert all("unforced_inputs" not in r.metrics for r in v.results)


def test_chain_baseline_is_reused_and_verified(golden_root, store, monkeypatch):
    _check(golden_root, member="numpy_bf16_pairwise", drop="attn_norm")
    golden = store.get(GoldenRequest(MODEL, "tiny", 0, STEPS))
    chain = golden.path / "local-attn_norm"
    assert (chain / "manifest.json").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the chain baseline was rebuilt")

    monkeypatch.setattr(type(store), "_build_chain", no_rebuild)
    assert _check(golden_root, member="numpy_bf16_pairwise", drop="attn_norm").passed
    # an edited file of the chain baseline: named by verify_dir, refused on load and on use
    target = chain / "decode.0.safetensors"
    original = target.read_bytes()
    try:
        data = bytearray(original)
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
        problems = verify_dir(golden.path)
        assert problems and str(target) in problems[0]
        with pytest.raises(GoldenCorrupt, match="decode.0.safetensors"):
            store.load(golden.path)
        with pytest.raises(GoldenCorrupt, match="chain baseline"):
            store.ensure_chain(golden, {p: {f"layers.{i}.attn_norm" for i in range(golden.spec.num_layers)}
                                        for p in golden.phases})
    finally:
        target.write_bytes(original)
    assert verify_dir(golden.path) == []


def test_chain_names():
    spec = get(MODEL, "tiny")
    phases = ["prefill", "decode.0"]
    every = {f"layers.{i}.{k}" for i in range(spec.num_layers) for k in ("gate", "up", "act")}
    assert chain_name(spec, phases, {p: every for p in phases}) == "local-act+gate+up"
    partial = chain_name(spec, phases, {"prefill": {"layers.0.act"}})
    assert partial.startswith("local-act-") and len(partial) == len("local-act-") + 12
    assert partial != chain_name(spec, phases, {"prefill": {"layers.1.act"}})


def test_deferred_values_spill_to_disk_past_the_budget():
    values = DeferredValues(budget=100)
    small, big = np.ones((2, 3), np.float32), np.arange(64, dtype=np.float32).reshape(8, 8)
    a, b = values.put(small), values.put(big)
    small[:] = 7  # the deployment reusing its buffer changes nothing held
    assert np.array_equal(values.get(a), np.ones((2, 3))) and np.array_equal(values.get(b), big)
    spill = values._dir.name
    values.close()
    import os

    assert not os.path.exists(spill)
