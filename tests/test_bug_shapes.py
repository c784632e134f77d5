"""The generic bug shapes (harness/selftest/bug_shapes.py): each changes exactly what it claims, and
``inject`` puts one into any deployment where the gate finds it."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
from harness.deployment.replay import check_replay, fp32_replay
from harness.errors import HarnessError
from harness.selftest import bug_shapes as bs
from harness.spec import taps as tapspec

SPEC = harness.models.get("qwen3-0.6b", "tiny")
HD = SPEC.head_dim
Q_WIDTH = SPEC.num_heads * HD


def value(tokens=8, features=Q_WIDTH, seed=0):
    return np.random.default_rng(seed).standard_normal((tokens, features)).astype(np.float32)


def ctx(tap="layers.1.q", phase="prefill", previous=None):
    return bs.ShapeContext(SPEC, phase, tap, previous)


def changed(a, b):
    return np.argwhere(a != b)


def test_scale_and_offset_are_exact():
    x = value()
    np.testing.assert_array_equal(bs.perturb(x, ctx(), "scale", 0.01), x * np.float32(1.01))
    out = bs.perturb(x, ctx(), "offset", 0.02)
    np.testing.assert_allclose(out - x, np.broadcast_to(0.02 * bs.row_rms(x), x.shape), rtol=1e-4, atol=1e-6)


def test_noise_is_relative_and_noise_rms_is_in_row_rms():
    x = value(64, 2048)
    rel = bs.perturb(x, ctx("logits"), "noise", 0.01) / x - 1
    assert abs(np.sqrt(np.mean(rel ** 2)) - 0.01) < 5e-4 and abs(np.mean(rel)) < 1e-3
    add = (bs.perturb(x, ctx("logits"), "noise_rms", 0.01) - x) / bs.row_rms(x)
    assert abs(np.sqrt(np.mean(add ** 2)) - 0.01) < 5e-4


def test_sparse_touches_a_few_elements_by_m_row_rms():
    x = value()
    out = bs.perturb(x, ctx(), "sparse", 1.0, seed=3)
    where = changed(out, x)
    assert len(where) == bs.SPARSE_ELEMENTS
    rms = bs.row_rms(x)[:, 0]
    for r, c in where:
        assert abs(abs(out[r, c] - x[r, c]) - rms[r]) < 1e-5 * max(1.0, rms[r])


@pytest.mark.parametrize("shape, row", [("row_last", 7), ("row_mid", 4)])
def test_row_shapes_touch_one_row_by_exactly_m(shape, row):
    x = value()
    out = bs.perturb(x, ctx(), shape, 0.01)
    assert set(changed(out, x)[:, 0]) == {row}
    np.testing.assert_allclose(np.abs(out[row] / x[row] - 1), 0.01, rtol=1e-3)
    one = value(1)
    assert changed(bs.perturb(one, ctx(phase="decode.0"), shape, 0.01), one)[:, 0].tolist() == [0] * Q_WIDTH


def test_head_touches_one_head_slice_of_every_row():
    x = value()
    out = bs.perturb(x, ctx("layers.0.q"), "head", 0.05, seed=1)
    cols = sorted(set(changed(out, x)[:, 1]))
    assert len(cols) == HD and cols[0] % HD == 0 and cols == list(range(cols[0], cols[0] + HD))
    assert set(changed(out, x)[:, 0]) == set(range(8))
    np.testing.assert_allclose(np.abs(out[:, cols] / x[:, cols] - 1), 0.05, rtol=1e-3)


def test_head_on_a_non_head_tap_is_an_aligned_head_dim_block():
    x = value(features=SPEC.hidden_size)
    for seed in range(5):
        cols = sorted(set(changed(bs.perturb(x, ctx("layers.0.out"), "head", 0.1, seed=seed), x)[:, 1]))
        assert len(cols) == HD and cols[0] % HD == 0


def test_channel_touches_one_column_by_m_row_rms():
    x = value()
    out = bs.perturb(x, ctx(), "channel", 1.0, seed=2)
    where = changed(out, x)
    assert len(set(where[:, 1])) == 1 and sorted(where[:, 0]) == list(range(8))
    c = where[0, 1]
    np.testing.assert_allclose(np.abs(out[:, c] - x[:, c]), bs.row_rms(x)[:, 0], rtol=1e-4)


def test_rtz_truncates_where_round_to_nearest_rounds_away_from_zero():
    x = value(32, 256)
    out = bs.perturb(x, ctx("layers.0.out"), "rtz", 1.0)
    rne = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.all(np.abs(out) <= np.abs(x)) and np.all(np.sign(out) == np.sign(x))
    np.testing.assert_array_equal(out, out.astype(ml_dtypes.bfloat16).astype(np.float32))  # bf16 values
    toward_zero = np.abs(rne) <= np.abs(x)
    np.testing.assert_array_equal(out[toward_zero], rne[toward_zero])   # where RNE went toward zero: same
    away = ~toward_zero
    assert 0.3 < away.mean() < 0.7
    np.testing.assert_array_equal(np.abs(out[away]), bs.bf16_toward_zero(np.abs(rne[away])))  # one ULP nearer zero


def test_rtz_of_a_bf16_value_steps_half_the_elements_one_ulp_toward_zero():
    x = value(32, 256).astype(ml_dtypes.bfloat16).astype(np.float32)
    out = bs.perturb(x, ctx("layers.0.out"), "rtz", 1.0)
    moved = out != x
    assert 0.4 < moved.mean() < 0.6
    np.testing.assert_array_equal(np.abs(out[moved]), bs.bf16_toward_zero(np.abs(x[moved])))


def test_stale_row_prefill_and_decode():
    x = value()
    out = bs.perturb(x, ctx(), "stale", 1.0)
    np.testing.assert_array_equal(out[-1], x[-2])
    np.testing.assert_array_equal(out[:-1], x[:-1])
    prev, now = value(seed=1), value(1, seed=2)
    np.testing.assert_array_equal(bs.perturb(now, ctx(phase="decode.0", previous=prev), "stale", 1.0)[0], prev[-1])
    np.testing.assert_array_equal(bs.perturb(now, ctx(phase="decode.0"), "stale", 1.0), now)  # nothing to be stale with


def test_sign_negates_one_head_slice_of_the_last_row():
    x = value()
    out = bs.perturb(x, ctx("layers.2.k_rope"), "sign", 1.0)
    where = changed(out, x)
    assert set(where[:, 0]) == {7} and len(where) == HD
    np.testing.assert_array_equal(out[7, where[:, 1]], -x[7, where[:, 1]])


def test_unknown_shape_and_bad_value_are_harness_errors():
    with pytest.raises(HarnessError, match="unknown bug shape"):
        bs.get("nope")
    with pytest.raises(HarnessError, match="expected \\[tokens, features\\]"):
        bs.perturb(np.zeros(4, np.float32), ctx(), "noise", 0.01)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(bs.SHAPES)), tokens=st.integers(1, 6),
       tap=st.sampled_from(["embed", "layers.0.q", "layers.1.k_rope", "layers.2.act", "logits"]),
       seed=st.integers(0, 2 ** 16), data=st.data())
def test_shapes_preserve_shape_dtype_and_input_and_are_seeded(name, tokens, tap, seed, data):
    m = data.draw(st.sampled_from(bs.get(name).magnitudes), label="magnitude")
    x = value(tokens, tapspec.shape(SPEC, tap, 1)[1], seed)
    before = x.copy()
    c = ctx(tap, "decode.1" if tokens == 1 else "prefill", previous=value(3, x.shape[1], seed + 1))
    a, b = bs.perturb(x, c, name, m, seed), bs.perturb(x, c, name, m, seed)
    assert a.shape == x.shape and a.dtype == np.float32 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, before)
    if name in ("noise", "noise_rms", "sparse", "head", "channel"):
        assert not np.array_equal(bs.perturb(x, c, name, m, seed + 1), a)  # another seed, another draw


@pytest.mark.parametrize("shape, phase, tap", [
    ("sign", "prefill", "layers.1.attn"),
    ("sparse", "decode.1", "layers.0.gate"),
    ("stale", "decode.0", "layers.2.k_rope"),
    ("channel", "prefill", "layers.0.attn_norm"),
])
def test_inject_localises_to_the_perturbed_tap_in_isolated_mode(shape, phase, tap, golden_root):
    v = check_replay("qwen3-0.6b", bs.inject(fp32_replay, phase, tap, shape), decode_steps=2, mode="isolated",
                      golden_dir=golden_root)
    assert [r.id for r in v.failures] == [f"{phase}/{tap}"]
    assert (v.first_failure.phase, v.first_failure.tap) == (phase, tap)


def test_inject_keeps_needs_golden_and_names_the_shape():
    f = bs.inject("replay-fp32", "prefill", "layers.0.q", "sign")
    assert f.needs_golden and f.name.endswith("+sign(1)@prefill/layers.0.q")
    assert not getattr(bs.inject("emulator", "prefill", "layers.0.q", "sign"), "needs_golden")


def test_inject_into_the_emulator_propagates_in_cumulative_mode(golden_root):
    v = harness.check("qwen3-0.6b", bs.inject("emulator", "prefill", "layers.0.v", "head", 1.0), decode_steps=2,
                      mode="cumulative", golden_dir=golden_root)
    assert (v.first_failure.phase, v.first_failure.tap) == ("prefill", "layers.0.v")
    assert "prefill/layers.0.attn" in [r.id for r in v.failures]  # the corrupted head of v reached the attention


def test_inject_passes_the_other_taps_through_unchanged():
    seen = {}

    class Dep:
        def prefill(self, ids, tap):
            for name in ("layers.0.q", "layers.0.k"):
                seen[name] = tap(name, value())
            return None

        def decode(self, token, tap):
            return None

    f = bs.inject(lambda spec, w: Dep(), "prefill", "layers.0.q", "scale", 0.5)
    dep = f(SPEC, {})
    dep.prefill(np.arange(3), lambda name, v: v)
    np.testing.assert_array_equal(seen["layers.0.k"], value())
    np.testing.assert_array_equal(seen["layers.0.q"], value() * np.float32(1.5))
    assert dep.applied == 1


def test_sweep_detects_gross_shapes_on_every_tap_and_rerenders(load_file, golden_root, tmp_path, capsys):
    sweep = load_file("benchmarks/bug_shape_sweep.py")
    out = tmp_path / "out"
    rc = sweep.main(["--models", "qwen3-0.6b", "--seeds", "0", "--host", "replay-fp32", "--modes", "isolated",
                     "--shapes", "sign,stale,sparse", "--decode-steps", "2", "--jobs", "1",
                     "--golden-dir", str(golden_root), "--out", str(out)])
    assert rc == 0   # every gross shape found at every tap: the target met
    saved = json.loads((out / "bug_shapes.json").read_text())
    counts = saved["hosts"]["replay-fp32"]["counts"]
    taps = sum(n for key, (n, _) in counts.items() if key.startswith("isolated|sign|"))
    assert taps == 3 * len(tapspec.tap_names(SPEC))   # every tap of 3 phases
    assert all(n == d for key, (n, d) in counts.items() if float(key.split("|")[2]) == 1.0)  # the gross forms
    assert any(n > d for n, d in counts.values())   # while 3% of a row rms on 4 elements is missed somewhere
    md = (out / "bug_shapes.md").read_text()
    assert "| sign | 1 (ref) | 100.0% | 100.0% |" in md
    capsys.readouterr()
    assert sweep.main(["--from-json", str(out / "bug_shapes.json")]) == 0
    assert capsys.readouterr().out.strip() == md.strip()
    assert sweep.main(["--shapes", "nope", "--out", str(out)]) == 3
