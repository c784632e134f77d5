"""Trace directories: validation errors, replay through tap(), atomic writing, prepare_inputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from harness.deployment import trace as tr
from harness.errors import HarnessError, TapError
from harness.spec import model_spec, taps

MODEL = "qwen3-0.6b"  # has q/k norm and head_dim != hidden/heads: the widest tap set
SPEC = model_spec.get(MODEL, "tiny")
T = 5


def make_phases(spec=SPEC, tokens: int = T, decode_steps: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for phase in taps.phase_names(decode_steps):
        n = tokens if phase == "prefill" else 1
        out[phase] = {
            name: rng.standard_normal(taps.shape(spec, name, n)).astype(np.float32)
            for name in taps.tap_names(spec)
        }
    return out


@pytest.fixture
def trace_dir(tmp_path: Path) -> Path:
    d = tmp_path / "trace"
    tr.write_trace(d, MODEL, "tiny", 0, 2, make_phases(), input_ids=np.arange(T), decode_tokens=[7, 9])
    return d


def edit_phase(d: Path, phase: str, fn) -> None:
    path = d / tr.phase_file(phase)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_round_trip_reads_taps_in_canonical_order(trace_dir: Path):
    t = tr.read_trace(trace_dir)
    assert (t.model, t.scale, t.seed, t.decode_steps, t.prefill_tokens) == (MODEL, "tiny", 0, 2, T)
    assert t.phases == ["prefill", "decode.0", "decode.1"]
    prefill = t.load("prefill")
    assert list(prefill) == taps.tap_names(SPEC)
    assert all(v.dtype == np.float32 for v in prefill.values())
    np.testing.assert_array_equal(prefill["embed"], make_phases()["prefill"]["embed"])


def test_bf16_taps_are_converted_to_float32(tmp_path: Path):
    phases = make_phases(decode_steps=0)
    phases["prefill"] = {k: v.astype(ml_dtypes.bfloat16) for k, v in phases["prefill"].items()}
    t = tr.write_trace(tmp_path / "t", MODEL, "tiny", 0, 0, phases)
    got = t.load("prefill")["logits"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, phases["prefill"]["logits"].astype(np.float32))


def test_replay_calls_tap_in_order_and_returns_logits(trace_dir: Path):
    seen: list[str] = []

    def tap(name, value):
        seen.append(name)
        return value

    dep = tr.trace_factory(trace_dir)(SPEC, None)
    logits = dep.prefill(np.arange(T), tap)
    assert seen == taps.tap_names(SPEC)
    assert logits.shape == (T, SPEC.vocab_size)
    seen.clear()
    assert dep.decode(7, tap).shape == (1, SPEC.vocab_size)
    assert dep.decode(9, tap).shape == (1, SPEC.vocab_size)
    assert seen == taps.tap_names(SPEC) * 2
    with pytest.raises(HarnessError, match="holds 2 decode steps"):
        dep.decode(1, tap)


def test_replay_checks_token_count_and_recorded_tokens(trace_dir: Path):
    dep = tr.TraceDeployment(tr.read_trace(trace_dir))
    with pytest.raises(HarnessError, match="holds 5 tokens, the check asked for 6"):
        dep.prefill(np.arange(6), lambda n, v: v)
    with pytest.raises(HarnessError, match="input_ids differ"):
        dep.prefill(np.arange(T) + 1, lambda n, v: v)
    dep.prefill(np.arange(T), lambda n, v: v)
    with pytest.raises(HarnessError, match="recorded for token 7, the check feeds 8"):
        dep.decode(8, lambda n, v: v)


def test_factory_refuses_another_model(trace_dir: Path):
    factory = tr.trace_factory(trace_dir)
    with pytest.raises(HarnessError, match="trace.json names qwen3-0.6b, expected llama-3.2-1b"):
        factory(model_spec.get("llama-3.2-1b", "tiny"), None)
    with pytest.raises(HarnessError, match="expected full"):
        tr.read_trace(trace_dir).expect_model(MODEL, "full")


def test_missing_or_invalid_trace_json(tmp_path: Path, trace_dir: Path):
    with pytest.raises(HarnessError, match="does not exist"):
        tr.read_trace(tmp_path / "nope")
    (trace_dir / "trace.json").write_text("{not json")
    with pytest.raises(HarnessError, match="trace.json: not valid JSON"):
        tr.read_trace(trace_dir)
    (trace_dir / "trace.json").write_text(json.dumps({"model": MODEL, "scale": "tiny", "seed": 0}))
    with pytest.raises(HarnessError, match="missing key 'decode_steps'"):
        tr.read_trace(trace_dir)
    (trace_dir / "trace.json").write_text(json.dumps({"model": MODEL, "scale": "tiny", "seed": "0", "decode_steps": 2}))
    with pytest.raises(HarnessError, match="'seed' must be int"):
        tr.read_trace(trace_dir)
    (trace_dir / "trace.json").unlink()
    with pytest.raises(HarnessError, match="trace.json is missing"):
        tr.read_trace(trace_dir)


def test_unknown_model_or_scale(trace_dir: Path):
    meta = json.loads((trace_dir / "trace.json").read_text())
    (trace_dir / "trace.json").write_text(json.dumps(meta | {"model": "gpt-2"}))
    with pytest.raises(HarnessError, match=r"trace.json: unknown model 'gpt-2'"):
        tr.read_trace(trace_dir)
    (trace_dir / "trace.json").write_text(json.dumps(meta | {"scale": "huge"}))
    with pytest.raises(HarnessError, match="unknown scale 'huge'"):
        tr.read_trace(trace_dir)


def test_unknown_tap_name_names_file_and_tap(trace_dir: Path):
    edit_phase(trace_dir, "decode.1", lambda t: t.update({"layers.0.qkv": t["layers.0.q"]}))
    with pytest.raises(TapError, match=r"decode.1.safetensors: unknown tap name 'layers.0.qkv'"):
        tr.read_trace(trace_dir)


def test_tap_of_a_layer_out_of_range(trace_dir: Path):
    edit_phase(trace_dir, "prefill", lambda t: t.update({"layers.9.out": t["layers.0.out"]}))
    with pytest.raises(TapError, match=r"prefill.safetensors: .*layer 9 out of range"):
        tr.read_trace(trace_dir)


def test_wrong_shape_names_both_shapes(trace_dir: Path):
    edit_phase(trace_dir, "prefill", lambda t: t.update({"layers.1.k": t["layers.1.q"]}))
    kv = SPEC.num_kv_heads * SPEC.head_dim
    q = SPEC.num_heads * SPEC.head_dim
    with pytest.raises(TapError, match=rf"prefill.safetensors: tap 'layers.1.k' has shape \[{T}, {q}\], expected \[{T}, {kv}\]"):
        tr.read_trace(trace_dir)


def test_decode_phase_with_two_tokens_is_refused(trace_dir: Path):
    edit_phase(trace_dir, "decode.0", lambda t: t.update({"embed": np.zeros((2, SPEC.hidden_size), np.float32)}))
    with pytest.raises(TapError, match=r"decode.0.safetensors: tap 'embed' has shape \[2, "):
        tr.read_trace(trace_dir)


def test_wrong_dtype_is_refused(trace_dir: Path):
    edit_phase(trace_dir, "prefill", lambda t: t.update({"embed": t["embed"].astype(np.float64)}))
    with pytest.raises(TapError, match="tap 'embed' has dtype F64"):
        tr.read_trace(trace_dir)


def test_missing_logits_and_missing_phase(trace_dir: Path):
    edit_phase(trace_dir, "decode.0", lambda t: t.pop("logits"))
    with pytest.raises(TapError, match="decode.0.safetensors: tap 'logits' is missing"):
        tr.read_trace(trace_dir)
    (trace_dir / "decode.0.safetensors").unlink()
    with pytest.raises(HarnessError, match="decode.0.safetensors is missing"):
        tr.read_trace(trace_dir)


def test_extra_decode_phase_is_refused(trace_dir: Path):
    (trace_dir / "decode.5.safetensors").write_bytes((trace_dir / "decode.1.safetensors").read_bytes())
    with pytest.raises(HarnessError, match="unexpected phase file.*decode.5.safetensors.*decode_steps=2"):
        tr.read_trace(trace_dir)


@pytest.mark.parametrize("name", ["prefill.pt", "taps.bin", "x.pth", "y.pkl", "model.ckpt"])
def test_pickle_files_are_refused(trace_dir: Path, name: str):
    (trace_dir / name).write_bytes(b"\x80\x04.")
    with pytest.raises(HarnessError, match=rf"{name} refused: .*write the tensors as safetensors"):
        tr.read_trace(trace_dir)


def test_symlink_leading_outside_is_refused(tmp_path: Path, trace_dir: Path):
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(trace_dir / "decode.1.safetensors", outside)
    os.symlink(outside, trace_dir / "decode.1.safetensors")
    with pytest.raises(HarnessError, match="decode.1.safetensors resolves to .* outside the trace directory"):
        tr.read_trace(trace_dir)


def test_weights_path_with_dotdot_is_refused(trace_dir: Path):
    meta = json.loads((trace_dir / "trace.json").read_text())
    (trace_dir / "trace.json").write_text(json.dumps(meta | {"weights": "../w.safetensors"}))
    with pytest.raises(HarnessError, match="weights file '../w.safetensors' points outside"):
        tr.read_trace(trace_dir)


def test_corrupt_safetensors_names_the_file(trace_dir: Path):
    (trace_dir / "prefill.safetensors").write_bytes(b"garbage")
    with pytest.raises(HarnessError, match="prefill.safetensors: not a readable safetensors file"):
        tr.read_trace(trace_dir)


def test_write_trace_is_atomic_and_refuses_overwrite(tmp_path: Path, trace_dir: Path):
    with pytest.raises(HarnessError, match="already exists"):
        tr.write_trace(trace_dir, MODEL, "tiny", 0, 2, make_phases())
    bad = make_phases()
    bad["prefill"]["layers.0.bogus"] = bad["prefill"]["embed"]
    with pytest.raises(TapError, match="bogus"):
        tr.write_trace(trace_dir, MODEL, "tiny", 1, 2, bad, overwrite=True)
    # The failed write left the old trace intact and no temp directory behind.
    assert tr.read_trace(trace_dir).seed == 0
    assert sorted(p.name for p in trace_dir.parent.iterdir()) == ["trace"]
    tr.write_trace(trace_dir, MODEL, "tiny", 3, 2, make_phases(seed=1), overwrite=True)
    assert tr.read_trace(trace_dir).seed == 3
    with pytest.raises(HarnessError, match="do not match decode_steps=3"):
        tr.write_trace(tmp_path / "x", MODEL, "tiny", 0, 3, make_phases())


def test_prepare_inputs_writes_what_an_external_program_needs(tmp_path: Path):
    w = {"model.embed_tokens.weight": np.array([[1.0, 0.5], [-2.0, 0.25]], np.float32)}
    d = tr.prepare_inputs(tmp_path / "p", SPEC, 4, 2, np.arange(T), np.array([3, 4]), w)
    meta = json.loads((d / "trace.json").read_text())
    assert meta == {"model": MODEL, "scale": "tiny", "seed": 4, "decode_steps": 2, "weights": "weights.safetensors"}
    inputs = load_file(d / "inputs.safetensors")
    assert inputs["input_ids"].dtype == np.int64 and list(inputs["decode_tokens"]) == [3, 4]
    weights = load_file(d / "weights.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    # The external program adds its phase files; the result reads as a trace that knows its weights.
    for phase, tensors in make_phases().items():
        save_file(tensors, d / tr.phase_file(phase))
    t = tr.read_trace(d)
    np.testing.assert_array_equal(t.load_weights()["model.embed_tokens.weight"], w["model.embed_tokens.weight"])
    assert list(t.inputs()["decode_tokens"]) == [3, 4]


def test_prepare_writes_the_scaled_config_and_the_expected_files_with_trace_json_last(tmp_path: Path, monkeypatch):
    w = {"model.norm.weight": np.ones(SPEC.hidden_size, np.float32)}
    order = []  # file timestamps are too coarse to order files written within a few ms: record the renames
    real_replace = os.replace
    monkeypatch.setattr(tr.os, "replace", lambda a, b: (order.append(Path(b).name), real_replace(a, b)))
    d = tr.prepare_inputs(tmp_path / "p", SPEC, 4, 2, np.arange(T), np.array([3, 4]), w)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == SPEC.config
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "num_hidden_layers",
                "vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings"):
        assert key in cfg, key
    assert model_spec.ModelSpec(MODEL, "tiny", cfg).head_dim == SPEC.head_dim
    expected = json.loads((d / "expected.json").read_text())
    assert [f["file"] for f in expected["write"]] == ["prefill.safetensors", "decode.0.safetensors",
                                                      "decode.1.safetensors"]
    prefill, decode0 = expected["write"][0], expected["write"][1]
    assert [t["name"] for t in prefill["taps"]] == taps.tap_names(SPEC)
    assert {t["name"] for t in prefill["taps"] if t["required"]} == set(taps.required_taps(SPEC))
    assert all(tuple(t["shape"]) == taps.shape(SPEC, t["name"], T) for t in prefill["taps"])
    assert all(t["shape"][0] == 1 for t in decode0["taps"])
    assert expected["read"]["weights.safetensors"] == {"model.norm.weight": {"dtype": "BF16", "shape": [SPEC.hidden_size]}}
    assert expected["read"]["inputs.safetensors"]["input_ids"]["shape"] == [T]
    assert order == ["inputs.safetensors", "weights.safetensors", "config.json", "expected.json", "trace.json"]
    # A program that writes exactly what expected.json lists produces a valid trace.
    for f in expected["write"]:
        save_file({t["name"]: np.zeros(t["shape"], np.float32) for t in f["taps"]}, d / f["file"])
    assert tr.read_trace(d).phases == ["prefill", "decode.0", "decode.1"]
    # Preparing again over the finished trace would leave stale phase files: refused.
    with pytest.raises(HarnessError, match="already holds phase files .*prepare into an empty directory"):
        tr.prepare_inputs(d, SPEC, 5, 2, np.arange(T), np.array([3, 4]), w)


def test_prepare_into_an_unwritable_place_is_one_line(tmp_path: Path):
    """As root chmod stops nothing: a path under a regular file is unwritable for anyone (ENOTDIR)."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(HarnessError, match=r"trace prepare: cannot write .*file/p .*choose a directory this user can write"):
        tr.prepare_inputs(tmp_path / "file" / "p", SPEC, 0, 0, np.arange(3), [], {})
    with pytest.raises(HarnessError, match=r"trace: cannot write .*file \(it or a parent is a file, not a directory\); choose a directory this user can write"):
        tr.write_trace(tmp_path / "file" / "t", MODEL, "tiny", 0, 0, make_phases(decode_steps=0))


def test_prepare_inputs_refuses_lossy_weights_and_bad_tokens(tmp_path: Path):
    with pytest.raises(HarnessError, match="'w' is not bf16-representable"):
        tr.prepare_inputs(tmp_path, SPEC, 0, 0, np.arange(3), [], {"w": np.array([1.0 + 2**-12], np.float32)})
    with pytest.raises(HarnessError, match="input_ids outside"):
        tr.prepare_inputs(tmp_path, SPEC, 0, 0, np.array([SPEC.vocab_size]), [], {})
    with pytest.raises(HarnessError, match="1 decode tokens for decode_steps=2"):
        tr.prepare_inputs(tmp_path, SPEC, 0, 2, np.arange(3), [1], {})


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 9), steps=st.integers(0, 2), model=st.sampled_from(["llama-3.2-1b", "qwen2.5-0.5b"]))
def test_any_valid_trace_round_trips(tmp_path_factory, tokens: int, steps: int, model: str):
    spec = model_spec.get(model, "tiny")
    phases = make_phases(spec, tokens, steps)
    t = tr.write_trace(tmp_path_factory.mktemp("h") / "t", model, "tiny", 0, steps, phases)
    assert t.prefill_tokens == tokens and t.phases == taps.phase_names(steps)
    for phase in t.phases:
        got = t.load(phase)
        assert list(got) == taps.tap_names(spec)
        np.testing.assert_array_equal(got["logits"], phases[phase]["logits"])


def test_weights_may_be_a_checkpoint_folder_inside_the_trace(trace_dir: Path):
    (trace_dir / "ckpt").mkdir()
    (trace_dir / "ckpt" / "config.json").write_text(json.dumps(SPEC.config))
    save_file({"a": np.ones((2, 2), np.float32)}, trace_dir / "ckpt" / "model-00001.safetensors")
    save_file({"b": np.zeros(3, np.float32)}, trace_dir / "ckpt" / "model-00002.safetensors")
    meta = json.loads((trace_dir / "trace.json").read_text())
    (trace_dir / "trace.json").write_text(json.dumps(meta | {"weights": "ckpt"}))
    assert sorted(tr.read_trace(trace_dir).load_weights()) == ["a", "b"]
    (trace_dir / "ckpt" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(HarnessError, match="pytorch_model.bin refused"):
        tr.read_trace(trace_dir)
    (trace_dir / "trace.json").write_text(json.dumps(meta | {"weights": "nowhere.safetensors"}))
    with pytest.raises(HarnessError, match="weights 'nowhere.safetensors' does not exist"):
        tr.read_trace(trace_dir)
