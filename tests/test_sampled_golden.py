"""Sampled goldens, reader side: the checker judges the deployment's rows of a golden that stores some
prompt rows of each prefill tap, in cumulative mode only; isolated mode is refused (check) or n/a (gate)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from harness import checker
from harness.errors import HarnessError
from harness.fileio import SafetensorsReader, write_safetensors
from harness.store import GoldenRequest, GoldenStore
from harness.suites.gate import run_gate
from harness.suites.phases import NOT_APPLICABLE, PASS

MODEL, STEPS = "qwen3-0.6b", 2
ROWS = [0, 1, 5, 17, 40, 62, 63]
LONG = 300  # prompt tokens: more than the first and last 128-row tiles, so a sampled golden drops rows


def _sample_entry(path, rows: list[int]) -> None:
    """Rewrite a full golden entry in place as a sampled one: prefill taps keep ``rows``."""
    name = "prefill.safetensors"
    with SafetensorsReader(path / name) as reader:
        tensors = {k: np.ascontiguousarray(reader.get_tensor(k)[rows]) for k in reader.keys()}
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = write_safetensors(path / name, tensors)
    manifest["storage"], manifest["rows"] = "sampled", {"prefill": rows}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def sampled_root(tmp_path_factory):
    """A store whose (tiny, seed 0) golden entry is sampled; built full, then rewritten."""
    root = tmp_path_factory.mktemp("sampled")
    store = GoldenStore(root)
    golden = store.get(GoldenRequest(MODEL, "tiny", 0, STEPS))
    _sample_entry(golden.path, ROWS)
    return root


def test_golden_rows_and_sampled_flag(sampled_root) -> None:
    golden = GoldenStore(sampled_root).get(GoldenRequest(MODEL, "tiny", 0, STEPS), build=False)
    assert golden.sampled and golden.rows("prefill").tolist() == ROWS and golden.rows("decode.0") is None
    assert golden.tensor("prefill", "layers.0.q").shape[0] == len(ROWS)


def test_cumulative_check_judges_the_sampled_rows(sampled_root) -> None:
    v = checker.check(MODEL, scale="tiny", decode_steps=STEPS, golden_dir=sampled_root, isolation="inline")
    assert v.passed, v.first_failure
    assert v.coverage.compared > 0 and not v.coverage.required_missing


def test_wrong_row_count_is_a_shape_failure_not_a_crash(sampled_root, tmp_path) -> None:
    """The deployment's full [T, features] shape is what is checked, before its rows are selected."""
    from harness.deployment.emulator import factory as emulator

    def short(spec, weights):
        emu = emulator(spec, weights)
        inner = emu.prefill
        # layers.0.q handed over one prompt row short (the emulator continues with its own value)
        emu.prefill = lambda ids, tap: inner(ids, lambda n, v: (tap(n, v[:-1]), v)[1] if n == "layers.0.q"
                                             else tap(n, v))
        return emu

    v = checker.check(MODEL, short, scale="tiny", decode_steps=STEPS, golden_dir=sampled_root, isolation="inline")
    bad = [r for r in v.results if not r.passed]
    assert [r.tap for r in bad] == ["layers.0.q"] and "shape (63, 256), expected (64, 256)" in bad[0].message


def test_isolated_check_on_a_sampled_golden_is_refused(sampled_root) -> None:
    with pytest.raises(HarnessError, match="sampled golden: isolated mode needs full tensors.*--mode cumulative"):
        checker.check(MODEL, scale="tiny", decode_steps=STEPS, mode="isolated", golden_dir=sampled_root,
                      isolation="inline")
    with pytest.raises(HarnessError, match="--mode cumulative"):
        checker.check(MODEL, scale="tiny", decode_steps=STEPS, mode="isolated", rows="sampled",
                      golden_dir=sampled_root, isolation="inline")


def test_gate_with_sampled_rows_judges_cumulative_and_says_why_isolated_is_na(tmp_path, monkeypatch) -> None:
    """A real ``--rows sampled`` golden (the store's sampled storage, fewer middle rows so a short prompt
    drops some): phase 2 n/a with the reason, phases 3 and 5 judge cumulative mode only."""
    from harness.store import streamwrite
    from harness.suites.gate import _tap_phase
    from harness.suites.run import MODES, ModelRun, RunOptions

    monkeypatch.setattr(streamwrite, "SAMPLED_MIDDLE", 16)
    run = ModelRun(MODEL, RunOptions(scale="tiny", decode_steps=STEPS, prompt_len=LONG, golden_dir=tmp_path,
                                     rows="sampled", isolation="inline"))
    try:
        outcomes = {n: _tap_phase(run, n, MODES) for n in (2, 3, 5)}
    finally:
        run.close()
    golden = run.golden()
    assert golden.sampled and len(golden.rows("prefill")) == 128 + 16 + (LONG - 256) < LONG
    assert outcomes[2].status == NOT_APPLICABLE
    assert "sampled golden: isolated mode needs full tensors" in outcomes[2].message
    for n in (3, 5):
        assert outcomes[n].status == PASS, outcomes[n].message
        assert {c.id.split(":")[0] for c in outcomes[n].checks} == {"cumulative"}


def test_rows_option_is_validated() -> None:
    with pytest.raises(HarnessError, match="rows"):
        checker.check(MODEL, scale="tiny", rows="some", isolation="inline")
