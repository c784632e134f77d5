"""Streaming golden build: lazy read-only weights, the layer-by-layer reference, taps written as captured,
sampled storage. The streamed path must give the very bits of the in-memory one it replaces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import harness
from harness.cli import app
from harness.errors import HarnessError
from harness.reference.capture import run_reference
from harness.reference.hf_model import build_hf_model
from harness.reference.prompts import prompt_ids
from harness.reference.streaming import build_streaming_model
from harness.spec import taps as tapspec
from harness.store import GoldenRequest, GoldenStore, verify_dir
from harness.store.bounds import RESIDENT_TARGET, build_rooms, predict
from harness.store.streamwrite import SAMPLED_MIDDLE, TILE, sampled_rows
from harness.weights import WeightsSource, build_source, load_weights, synthetic_file
from harness.weights.synthetic import synthetic_weights

runner = CliRunner()


@pytest.fixture(autouse=True)
def _weights_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NPU_HARNESS_WEIGHTS_DIR", str(tmp_path_factory.getbasetemp() / "weights-cache"))


def _collect(into: dict):
    return lambda phase, name, t: into.setdefault(phase, {}).__setitem__(name, t.float().numpy().copy())


@pytest.mark.parametrize("model", ["qwen3-0.6b", "llama-3.2-1b"])  # q/k norm; Llama-3 RoPE scaling
def test_streamed_capture_is_bit_identical_to_the_in_memory_model(model: str, tmp_path: Path) -> None:
    """Every tap of every phase, fp32, bf16 and the teacher-forced bf16 run, streamed vs the whole model."""
    spec = harness.models.get(model, "tiny")
    w, ids = synthetic_weights(spec, 1), prompt_ids(spec, 1, 24)
    private = build_source(spec, WeightsSource(), 1, tmp_path)  # bf16 file, as a build reads it
    fp32 = run_reference(build_hf_model(spec, w, torch.float32), spec, ids, decode_steps=2)
    bf16 = run_reference(build_hf_model(spec, w, torch.bfloat16), spec, ids, decode_steps=2,
                         decode_tokens=fp32.decode_tokens)
    forced = run_reference(build_hf_model(spec, w, torch.bfloat16), spec, ids, decode_steps=2,
                           decode_tokens=fp32.decode_tokens, force=fp32.taps)
    runs = {
        "fp32": (fp32, dict(), torch.float32, load_weights(spec, seed=1)),
        "fp32 widened from the bf16 file": (fp32, dict(), torch.float32, private),
        "bf16": (bf16, dict(decode_tokens=fp32.decode_tokens), torch.bfloat16, private),
        "forced": (forced, dict(decode_tokens=fp32.decode_tokens, force=lambda p, n: fp32.taps[p][n]),
                   torch.bfloat16, private),
    }
    for what, (want, kwargs, dtype, source) in runs.items():
        got: dict = {}
        streamed = run_reference(build_streaming_model(spec, source, dtype), spec, ids, decode_steps=2,
                                 sink=_collect(got), **kwargs)
        assert streamed.taps == {} and list(got) == list(want.taps)
        np.testing.assert_array_equal(streamed.decode_tokens, fp32.decode_tokens)
        for phase, taps in want.taps.items():
            assert sorted(got[phase]) == sorted(taps)
            for name, value in taps.items():
                assert np.array_equal(got[phase][name], value), (what, phase, name)


class _CountingWeights(dict):
    """A weights dict that counts the lookups of each key."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reads: dict[str, int] = {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().__getitem__(key)


@pytest.mark.parametrize("kept", ["nothing", "the table and layer 0"])
def test_converted_weights_are_read_once_when_kept_or_still_in_their_buffer(kept: str) -> None:
    """Streamed fp32 from bf16 weights. With nothing kept resident, each layer's weights are converted
    again every forward (one layer's buffers serve them all), but the embedding table the LM head shares
    stays in its buffer: one read for the prefill and 3 decode steps, instead of two per forward. With
    room for the table and layer 0, layer 0 is read once too, and the taps are the same bits."""
    import ml_dtypes

    spec = harness.models.get("qwen3-0.6b", "tiny")
    assert spec.tied_embeddings
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in synthetic_weights(spec, 3).items()}
    weights = _CountingWeights(bf16)
    room = 0 if kept == "nothing" else 4 * sum(v.size for k, v in bf16.items()
                                               if k.startswith(("model.embed_tokens.", "model.layers.0.")))
    ids = prompt_ids(spec, 3, 16)
    got: dict = {}
    run = run_reference(build_streaming_model(spec, weights, torch.float32, room), spec, ids, decode_steps=3,
                        sink=_collect(got))
    last = spec.num_layers - 1
    assert weights.reads["model.embed_tokens.weight"] == 1
    assert weights.reads["model.layers.0.mlp.up_proj.weight"] == (4 if kept == "nothing" else 1)
    assert weights.reads[f"model.layers.{last}.mlp.up_proj.weight"] == 4  # the prefill and 3 decode steps
    want = run_reference(build_hf_model(spec, bf16, torch.float32), spec, ids, decode_steps=3)
    np.testing.assert_array_equal(run.decode_tokens, want.decode_tokens)
    for phase, taps in want.taps.items():
        for name, value in taps.items():
            assert np.array_equal(got[phase][name], value), (phase, name)


@pytest.mark.parametrize("model", ["qwen3-0.6b", "llama-3.2-1b", "qwen2.5-0.5b"])
@pytest.mark.parametrize("forced", [False, True])
def test_a_layer_first_run_reads_each_layer_once_with_the_taps_of_a_step_by_step_run(
        model: str, forced: bool) -> None:
    """Fed known tokens, a streamed bf16 run with no room goes layer-first: each decoder layer's weights
    are looked up once over the prefill and 3 decode steps, not once per forward, and every tap is the
    bits of the in-memory model run step by step - also teacher-forced, keys forced into the KV cache
    included."""
    import ml_dtypes

    spec = harness.models.get(model, "tiny")
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in synthetic_weights(spec, 3).items()}
    ids = prompt_ids(spec, 3, 16)
    fp32 = run_reference(build_hf_model(spec, bf16, torch.float32), spec, ids, decode_steps=3)
    force = fp32.taps if forced else None
    want = run_reference(build_hf_model(spec, bf16, torch.bfloat16), spec, ids, decode_steps=3,
                         decode_tokens=fp32.decode_tokens, force=force)
    weights, got = _CountingWeights(bf16), {}
    run = run_reference(build_streaming_model(spec, weights, torch.bfloat16), spec, ids, decode_steps=3,
                        decode_tokens=fp32.decode_tokens, force=force, sink=_collect(got), layer_first=True)
    table = "model.embed_tokens.weight"  # a tied LM head is a block of its own over it: at most twice
    assert {k: n for k, n in weights.reads.items() if k != table} == {k: 1 for k in bf16 if k != table}
    assert 1 <= weights.reads[table] <= (2 if spec.tied_embeddings else 1)
    np.testing.assert_array_equal(run.decode_tokens, fp32.decode_tokens)
    assert got.keys() == want.taps.keys()
    for phase, taps in want.taps.items():
        assert got[phase].keys() == taps.keys()
        for name, value in taps.items():
            assert np.array_equal(got[phase][name], value), (phase, name)


def test_a_layer_first_run_of_a_model_with_sliding_window_layers_goes_step_by_step() -> None:
    """Layers taking different masks cannot share the first layer's arguments: same taps, step by step."""
    from harness.reference import layer_first

    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    w, ids = synthetic_weights(spec, 1), prompt_ids(spec, 1, 12)
    model = build_hf_model(spec, w, torch.bfloat16)
    assert layer_first.supported(model)
    model.config.layer_types = ["sliding_attention"] + ["full_attention"] * (spec.num_layers - 1)
    assert not layer_first.supported(model)


def test_a_build_runs_its_bf16_reference_layer_first_with_no_room(tmp_path: Path, monkeypatch) -> None:
    """The fp32 run keeps tensors in the build's room (a larger one for its decode steps); the bf16 run,
    fed its tokens, needs none."""
    from harness.reference import capture, streaming
    from harness.store import GoldenRequest, GoldenStore

    rooms: list[tuple[torch.dtype, int, int | None]] = []
    real = streaming.build_streaming_model
    monkeypatch.setattr(streaming, "build_streaming_model",
                        lambda spec, w, dtype=torch.float32, resident_bytes=0, later=None:
                        rooms.append((dtype, resident_bytes, later)) or real(spec, w, dtype, resident_bytes, later))
    orders: list[bool] = []
    real_run = capture.run_reference
    monkeypatch.setattr(capture, "run_reference",
                        lambda *a, layer_first=False, **k: orders.append(layer_first) or real_run(
                            *a, layer_first=layer_first, **k))
    store = GoldenStore(tmp_path)
    store.ensure_local(store.get(GoldenRequest("qwen3-0.6b", "tiny", 3, 2, 16)))
    assert [d for d, _, _ in rooms] == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert rooms[0][1] > 0 and rooms[0][2] >= rooms[0][1]  # the decode steps' room: at least the prompt's
    assert [r[1:] for r in rooms[1:]] == [(0, None), (0, None)]
    assert orders == [False, True, True]  # the fp32 run chooses its tokens; the bf16 and local runs are fed


def test_lazy_weights_are_the_synthetic_weights_read_only_and_cheap_to_list() -> None:
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    w, want = load_weights(spec, seed=2), synthetic_weights(spec, 2)
    assert len(w) == len(want) and set(w.keys()) == set(want) and "model.norm.weight" in w
    for name, value in want.items():
        got = w[name]
        assert got.dtype == np.float32 and np.array_equal(got, value)
        with pytest.raises(ValueError):
            got.flags.writeable = True
    path = synthetic_file(spec, 2)
    mtime = path.stat().st_mtime_ns
    load_weights(spec, seed=2)["model.norm.weight"]
    assert synthetic_file(spec, 2).stat().st_mtime_ns == mtime  # generated once, then reused
    assert dict(w).keys() == want.keys()  # code treating it as a dict keeps working


def test_streamed_golden_equals_the_in_memory_reference(tmp_path: Path) -> None:
    """The store's files hold the in-memory runs' values, and the build's private weights file is gone."""
    store = GoldenStore(tmp_path)
    g = store.ensure_local(store.get(GoldenRequest("qwen3-0.6b", "tiny", 0, 2)))
    spec, w = g.spec, synthetic_weights(g.spec, 0)
    fp32 = run_reference(build_hf_model(spec, w, torch.float32), spec, g.input_ids, decode_steps=2)
    model16 = build_hf_model(spec, w, torch.bfloat16)
    bf16 = run_reference(model16, spec, g.input_ids, decode_steps=2, decode_tokens=fp32.decode_tokens)
    local = run_reference(model16, spec, g.input_ids, decode_steps=2, decode_tokens=fp32.decode_tokens,
                          force=fp32.taps)
    np.testing.assert_array_equal(g.decode_tokens, fp32.decode_tokens)
    for phase in g.phases:
        assert g.tap_names(phase) == tapspec.tap_names(spec)  # canonical order, whatever the hook order
        for name in tapspec.tap_names(spec):
            assert np.array_equal(g.tensor(phase, name), fp32.taps[phase][name]), (phase, name)
            assert np.array_equal(g.tensor(phase, name, "bf16"), bf16.taps[phase][name]), (phase, name)
            assert np.array_equal(g.tensor(phase, name, "local"), local.taps[phase][name]), (phase, name)
    assert not list(tmp_path.rglob(".weights*")) and verify_dir(g.path) == []


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 5000), key=st.text(min_size=1, max_size=8))
def test_sampled_rows_keep_both_end_tiles_and_a_bounded_seeded_middle(tokens: int, key: str) -> None:
    rows = sampled_rows(tokens, key)
    assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0) and rows[0] == 0 and rows[-1] == tokens - 1
    first, last_start = min(TILE, tokens), ((tokens - 1) // TILE) * TILE
    assert set(range(first)) <= set(rows.tolist()) and set(range(last_start, tokens)) <= set(rows.tolist())
    assert len(rows) <= 2 * TILE + SAMPLED_MIDDLE and len(rows) == min(tokens, len(rows))
    if tokens <= 2 * TILE + SAMPLED_MIDDLE:
        assert len(rows) == tokens
    np.testing.assert_array_equal(rows, sampled_rows(tokens, key))  # the same golden keeps the same rows


def test_sampled_golden_keeps_the_full_goldens_rows(tmp_path: Path) -> None:
    store = GoldenStore(tmp_path)
    full_req = GoldenRequest("llama-3.2-1b", "tiny", 0, 1, 600)
    sampled_req = GoldenRequest("llama-3.2-1b", "tiny", 0, 1, 600, rows="sampled")
    assert full_req.key() != sampled_req.key()
    assert GoldenRequest("llama-3.2-1b", "tiny", 0, 1, 600).key() == full_req.key()
    full, sampled = store.get(full_req), store.get(sampled_req)
    rows = np.asarray(sampled.manifest["rows"]["prefill"])
    assert sampled.manifest["storage"] == "sampled" and full.manifest["storage"] == "full"
    assert 256 <= len(rows) <= 512 and not np.array_equal(rows, sampled_rows(600, "another key"))
    np.testing.assert_array_equal(rows, sampled_rows(600, sampled_req.key()))
    for name in ("embed", "layers.1.k_rope", "logits"):
        assert sampled.tensor("prefill", name).shape == (len(rows), full.tensor("prefill", name).shape[1])
        np.testing.assert_array_equal(sampled.tensor("prefill", name), full.tensor("prefill", name)[rows])
        np.testing.assert_array_equal(sampled.tensor("decode.0", name, "bf16"), full.tensor("decode.0", name, "bf16"))
    files = sum(f.stat().st_size for f in sampled.path.glob("*.safetensors"))
    assert 0.97 < predict(sampled.spec, 600, 1, "sampled").elements * 6 / files <= 1.0
    with pytest.raises(HarnessError, match="sampled golden has no local baseline"):
        store.ensure_local(sampled)
    assert not (sampled.path / "local").exists()


def test_rows_option_through_the_cli(tmp_path: Path) -> None:
    res = runner.invoke(app, ["golden", "build", "--model", "qwen3-0.6b", "--rows", "sampled", "--decode-steps", "1",
                              "--golden-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    manifest = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    assert manifest["storage"] == "sampled" and manifest["identity"]["storage"] == "sampled"
    res = runner.invoke(app, ["golden", "build", "--model", "qwen3-0.6b", "--rows", "most", "--golden-dir", str(tmp_path)])
    assert res.exit_code == 3 and "--rows 'most'" in res.output


def test_a_build_failing_mid_stream_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.store import streamwrite

    seen = []
    real = streamwrite.PhaseFiles.put

    def put(self, variant, phase, name, value):
        seen.append(name)
        if variant == "bf16" and len(seen) > 40:
            raise MemoryError("allocator gave up")
        real(self, variant, phase, name, value)

    monkeypatch.setattr(streamwrite.PhaseFiles, "put", put)
    with pytest.raises(MemoryError):
        GoldenStore(tmp_path).get(GoldenRequest("qwen3-0.6b", "tiny", 0, 1))
    left = [p for p in tmp_path.rglob("*") if p.name.startswith((".tmp", "seed", ".weights")) and p.suffix != ".lock"]
    assert left == []


def _room(spec, tokens: int, steps: int, rows: str = "full", available: int | None = None, *,
          decoding: bool = False) -> int:
    """The build's room for the prompt, or with ``decoding`` for the decode steps (``build_rooms``)."""
    return build_rooms(spec, tokens, steps, rows, available)[1 if decoding else 0]


def test_streaming_prediction_fits_the_done_when_build() -> None:
    """qwen3-4b at 2048 tokens is predicted within the 8 GB target, and sampled storage bounds its disk."""
    spec = harness.models.get("qwen3-4b", "full")
    full, sampled = predict(spec, 2048, 32), predict(spec, 2048, 32, "sampled")
    assert full.ram_bytes < sampled.ram_bytes < 8e9
    assert sampled.disk_bytes < full.disk_bytes / 2
    assert predict(spec, 256, 32).ram_bytes < 6e9


def test_a_larger_models_build_keeps_converted_layers_only_in_room_its_prediction_leaves(monkeypatch) -> None:
    """A small model keeps all its fp32 weights (the prediction counts them). A larger one keeps what fits
    between its streaming prediction and the resident target, or half the memory available: nothing on a
    machine short of memory, and nothing when the prediction alone reaches the target."""
    monkeypatch.delenv("NPU_HARNESS_BUILD_MEMORY", raising=False)  # the default target
    small = harness.models.get("qwen2.5-0.5b", "full")
    assert _room(small, 128, 32, available=1 << 30) >= 4 * sum(
        int(np.prod(shape)) for _, shape in _shapes(small))
    spec = harness.models.get("llama-3.2-1b", "full")
    floor, table = predict(spec, 128, 32).ram_bytes, spec.vocab_size * spec.hidden_size * 4
    assert spec.tied_embeddings  # its table comes first and frees the conversion buffer predicted for it
    assert _room(spec, 128, 32, available=64 << 30) == int(RESIDENT_TARGET - floor + table)
    assert _room(spec, 128, 32, available=2 * floor + (2 << 30)) == (1 << 30) + table
    assert _room(spec, 128, 32, available=floor) == 0
    assert _room(harness.models.get("qwen3-4b", "full"), 2048, 32, "sampled", available=64 << 30) == 0
    monkeypatch.setenv("NPU_HARNESS_BUILD_MEMORY", "0")  # stream every layer
    assert _room(spec, 128, 32, available=64 << 30) == 0
    monkeypatch.setenv("NPU_HARNESS_BUILD_MEMORY", "12G")
    assert _room(spec, 128, 32, available=64 << 30) == int(12e9 - floor + table)
    monkeypatch.setenv("NPU_HARNESS_BUILD_MEMORY", "lots")
    with pytest.raises(HarnessError, match="NPU_HARNESS_BUILD_MEMORY 'lots'"):
        _room(spec, 128, 32, available=64 << 30)


def test_the_decode_steps_have_the_room_a_long_prompts_transients_leave(monkeypatch) -> None:
    """Once the prompt has been through, its activations, attention scores and logits are gone: the decode
    steps' prediction drops by them, and the room grows by as much, up to the same target."""
    monkeypatch.delenv("NPU_HARNESS_BUILD_MEMORY", raising=False)
    spec = harness.models.get("qwen3-4b", "full")
    for tokens, rows in ((128, "full"), (2048, "sampled"), (2048, "full")):
        prompt, steps = predict(spec, tokens, 32, rows), predict(spec, tokens, 32, rows, decoding=True)
        assert steps.ram_bytes < prompt.ram_bytes and steps.disk_bytes == prompt.disk_bytes
        assert steps.elements == prompt.elements
        before = _room(spec, tokens, 32, rows, available=64 << 30)
        after = _room(spec, tokens, 32, rows, available=64 << 30, decoding=True)
        table = spec.vocab_size * spec.hidden_size * 4
        # The tied table's bytes count only when the prompt's room kept it (no conversion buffer made).
        assert after == int(RESIDENT_TARGET - steps.ram_bytes + (table if before else 0))
        if before:  # both within the target: the difference is what the prompt's transients took
            assert after - before == prompt.ram_bytes - steps.ram_bytes
    assert _room(spec, 2048, 32, "sampled", available=64 << 30) == 0  # the prompt leaves none
    assert _room(spec, 2048, 32, "sampled", available=64 << 30, decoding=True) > 1e9
    small = harness.models.get("qwen2.5-0.5b", "full")  # keeps everything either way
    assert _room(small, 2048, 32, decoding=True) == _room(small, 2048, 32)


def test_the_builds_two_rooms_come_from_one_reading_of_available_memory(monkeypatch) -> None:
    """Memory read twice could shrink between the readings and cap the decode steps' room at the
    prompt's; the build reads it once for both."""
    from harness.store import bounds

    monkeypatch.delenv("NPU_HARNESS_BUILD_MEMORY", raising=False)
    readings = iter([64 << 30, 1 << 30])  # a second reading would see almost nothing left
    monkeypatch.setattr(bounds, "available_ram", lambda: next(readings))
    spec = harness.models.get("qwen3-4b", "full")
    assert bounds.build_rooms(spec, 2048, 32, "sampled") == (
        _room(spec, 2048, 32, "sampled", available=64 << 30),
        _room(spec, 2048, 32, "sampled", available=64 << 30, decoding=True))


def test_a_streamed_model_keeps_more_from_its_second_forward_with_the_same_taps() -> None:
    """Room 0 for the prompt, room for everything after it: the prefill converts each weight, decode.0
    converts and keeps what is not still in its buffer, the later steps read nothing; with room 0 all
    along every step reads again. The taps are the in-memory model's bits."""
    import ml_dtypes

    spec = harness.models.get("llama-3.2-1b", "tiny")
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in synthetic_weights(spec, 4).items()}
    ids = prompt_ids(spec, 4, 16)
    want = run_reference(build_hf_model(spec, bf16, torch.float32), spec, ids, decode_steps=3)
    everything = 4 * sum(v.size for v in bf16.values())

    def reads(steps: int, later: int | None, got: dict | None = None) -> dict[str, int]:
        weights = _CountingWeights(bf16)
        run = run_reference(build_streaming_model(spec, weights, torch.float32, 0, later), spec, ids,
                            decode_steps=steps, sink=_collect(got if got is not None else {}))
        np.testing.assert_array_equal(run.decode_tokens, want.decode_tokens[:steps])
        return weights.reads

    got: dict = {}
    kept = reads(3, everything, got)
    assert kept == reads(1, everything) and max(kept.values()) == 2  # nothing read after decode.0
    assert sum(reads(3, None).values()) > sum(reads(1, None).values())  # room 0 all along: read every step
    for phase, taps in want.taps.items():
        for name, value in taps.items():
            assert np.array_equal(got[phase][name], value), (phase, name)


def _shapes(spec):
    from harness.weights.synthetic import synthetic_plan

    return [(name, shape) for name, shape, _ in synthetic_plan(spec, 0)]


def test_a_bad_build_memory_setting_fails_the_build_before_it_writes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NPU_HARNESS_BUILD_MEMORY", "lots")
    with pytest.raises(HarnessError, match="NPU_HARNESS_BUILD_MEMORY 'lots'"):
        GoldenStore(tmp_path).get(GoldenRequest("qwen3-0.6b", "tiny", 0, 1))
    assert [p for p in tmp_path.rglob("*") if p.suffix != ".lock" and not p.is_dir()] == []
