"""Phase files written tap by tap: whatever the arrival order and whichever taps go out in batches, each
file holds the very bytes (and block sha256s) of writing its tensors one by one in file order."""
from __future__ import annotations

from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
from harness.fileio import write_safetensors
from harness.spec import taps as tapspec
from harness.store import streamwrite
from harness.store.streamwrite import PhaseFiles

SPEC = harness.models.get("qwen3-0.6b", "tiny")
PHASES = ["prefill", "decode.0", "decode.1"]
TOKENS = 5


def _taps(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Values of every tap of every phase, per variant key (``fp32/<tap>``, ``bf16/<tap>``)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, np.ndarray]] = {}
    for phase in PHASES:
        rows = TOKENS if phase == "prefill" else 1
        out[phase] = {}
        for variant, dtype in (("fp32", np.float32), ("bf16", ml_dtypes.bfloat16)):
            for name in tapspec.tap_names(SPEC):
                shape = (rows, tapspec.features(SPEC, tapspec.parse(name).kind))
                out[phase][f"{variant}/{name}"] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), tap_limit=st.sampled_from([0, 512, 4096, 1 << 20]),
       batch=st.sampled_from([1024, 8192, 1 << 18]), swaps=st.lists(st.integers(0, 10_000), max_size=40))
def test_phase_files_hold_the_bytes_of_writing_each_tap_alone(tmp_path_factory, seed, tap_limit, batch,
                                                              swaps) -> None:
    # BATCH_TAP_BYTES 0: every tap written alone, as before batches
    with mock.patch.object(streamwrite, "BATCH_TAP_BYTES", tap_limit), \
            mock.patch.object(streamwrite, "BATCH_BYTES", batch):
        _write_and_compare(tmp_path_factory, seed, swaps)


def _write_and_compare(tmp_path_factory, seed: int, swaps: list[int]) -> None:
    out = tmp_path_factory.mktemp("phases")
    taps = _taps(seed)
    files = PhaseFiles(out, SPEC, PHASES, TOKENS, ("fp32", "bf16"))
    # Arrival: the fp32 run phase by phase, then the bf16 run interleaving the phases (layer-first), with
    # neighbouring taps swapped (hook order differs from file order: an early tap waits for its turn).
    for variant, interleave in (("fp32", False), ("bf16", True)):
        per_phase = {p: [k for k in taps[p] if k.startswith(variant)] for p in PHASES}
        for s in swaps:
            order = per_phase[PHASES[s % len(PHASES)]]
            i = s % (len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        sequence = [(p, k) for i in range(len(per_phase["prefill"])) for p in PHASES for k in per_phase[p][i:i + 1]] \
            if interleave else [(p, k) for p in PHASES for k in per_phase[p]]
        for phase, key in sequence:
            files.put(variant, phase, key.split("/", 1)[1], taps[phase][key])
    records = files.close()
    for phase in PHASES:
        expected = tmp_path_factory.mktemp("alone") / "x.safetensors"
        record = write_safetensors(expected, taps[phase])
        assert (out / f"{phase}.safetensors").read_bytes() == expected.read_bytes(), phase
        assert records[f"{phase}.safetensors"] == record


def test_a_batched_tap_of_the_wrong_shape_is_refused_and_a_missing_one_fails_the_close(tmp_path) -> None:
    taps = _taps(0)
    files = PhaseFiles(tmp_path, SPEC, PHASES, TOKENS, ("fp32", "bf16"))
    first = next(iter(taps["decode.0"]))
    assert taps["decode.0"][first].nbytes <= streamwrite.BATCH_TAP_BYTES  # the batched path
    with pytest.raises(ValueError, match="layout says"):
        files.put("fp32", "decode.0", first.split("/", 1)[1], taps["prefill"][first])  # a prefill-sized value
    files.put("fp32", "decode.0", first.split("/", 1)[1], taps["decode.0"][first])
    with pytest.raises(ValueError, match="tensors never written"):
        files.close()
    files.abort()
