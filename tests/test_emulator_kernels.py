"""XDNA 2 kernel numerics: GEMM tiling and accumulation, RoPE, exp / tanh approximations, attention."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.deployment.emulator import kernels as K
from harness.deployment.emulator.config import EmulatorConfig
from harness.errors import HarnessError

CFG = EmulatorConfig(k_tile=16, n_tile=8, herd_n=2, m_tile=4, herd_m=2)


def _rand(*shape, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return K.bf16(torch.randn(*shape, generator=g) * std)


@settings(max_examples=25, deadline=None)
@given(mb=st.integers(1, 4), kb=st.integers(1, 6), nb=st.integers(1, 4), seed=st.integers(0, 1000))
def test_fp32_gemm_is_the_correctly_rounded_product(mb, kb, nb, seed) -> None:
    m, k, n = mb * CFG.m_block, kb * CFG.k_tile, nb * CFG.n_block
    a, w = _rand(m, k, seed=seed), _rand(n, k, seed=seed + 1)
    exact = K.bf16((a.double() @ w.double().T).float())
    got = K.gemm(a, w, CFG)
    # fp32 partial sums differ from float64 by ~1e-7 relative, so at most a rare 1-ulp tie flip.
    assert (got != exact).float().mean() < 0.01
    np.testing.assert_allclose(got, exact, rtol=2 ** -7, atol=1e-6)
    np.testing.assert_array_equal(K.gemm(a, K.Tiled(w, CFG.k_tile), CFG), got)


def test_bf16_accumulator_fails_exact_integers_deterministically() -> None:
    cfg = EmulatorConfig(k_tile=64)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (4, 4864), generator=g).float()
    w = torch.randint(0, 4, (256, 4864), generator=g).float()
    exact = K.bf16((a.double() @ w.double().T).float())
    np.testing.assert_array_equal(K.gemm(a, w, cfg), exact)
    assert (K.gemm(a, w, cfg, acc="bf16") != exact).float().mean() > 0.5


def test_off_grid_shapes_raise_pad_or_garble_as_declared() -> None:
    a, w = _rand(8, 20), _rand(12, 20, seed=1)  # K=20 and N=12 are off CFG's grid (16, 16)
    with pytest.raises(K.TilingError, match=r"N=12 is not a multiple of n_tile\*herd_n=16.*K=20"):
        K.gemm(a, w, EmulatorConfig(**{**CFG.__dict__, "remainder": "raise"}), name="probe")
    padded = K.gemm(a, w, CFG)
    np.testing.assert_allclose(padded, K.bf16(a @ w.T), rtol=2 ** -7, atol=1e-6)
    garbled = K.gemm(a, w, CFG, remainder="ignore")
    assert not garbled[:, 0:].any() and padded.abs().sum() > 0  # 12 < 16: no full block is written


def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from harness.spec.model_spec import get

    spec = get("llama-3.2-1b", "tiny")
    ours = K.rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](spec.hf_config(), "cpu")
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)
    assert not np.allclose(ours, K.rope_inv_freq(spec.head_dim, spec.rope_theta, None))
    with pytest.raises(HarnessError, match="rope_scaling type 'yarn'"):
        K.rope_inv_freq(64, 1e4, {"rope_type": "yarn"})


def test_rope_half_split_matches_the_hf_formula_and_interleaved_does_not() -> None:
    x = _rand(10, 2, 16, seed=4)
    inv = K.rope_inv_freq(16, 10000.0, None)
    cos, sin = K.rope_table(np.arange(10), inv)
    c, s = torch.cat([cos, cos], -1)[:, None].double(), torch.cat([sin, sin], -1)[:, None].double()
    xd = x.double()
    hf = xd * c + torch.cat([-xd[..., 8:], xd[..., :8]], -1) * s
    np.testing.assert_allclose(K.rope(x, cos, sin), hf, rtol=2 ** -6, atol=1e-2)
    assert not torch.allclose(K.rope(x, cos, sin, "interleaved"), K.rope(x, cos, sin), atol=1e-2)


@settings(max_examples=20, deadline=None)
@given(x=st.lists(st.floats(-60.0, 0.0), min_size=1, max_size=64))
def test_exp_approximations_stay_within_their_documented_error(x) -> None:
    t = torch.tensor(x, dtype=torch.float32)
    true = torch.exp(t.double())
    rel = {kind: ((K.exp_approx(t, kind).double() - true).abs() / true).max().item() for kind in ("exact", "lut", "poly3")}
    assert rel["exact"] <= 2 ** -8                # one bf16 rounding
    assert rel["lut"] <= 2 ** -8 * 3 + 2 ** -8    # two bf16 table entries, 1/256 input truncation, output rounding
    assert rel["poly3"] <= 0.002 + 2 ** -7        # "within 0.2% of 2^f", bf16 Horner steps, output rounding
    assert K.exp_approx(torch.tensor([-math.inf]), "lut").item() == 0.0


def test_tanh_approximations() -> None:
    x = torch.linspace(-6, 6, 2001)
    assert (K.tanh_approx(x, "lut") - torch.tanh(x)).abs().max() < 6e-3  # getTanhBf16: within 5.1e-3 + rounding
    small = x[x.abs() <= 0.5]
    np.testing.assert_array_equal(K.tanh_approx(small, "vtanh"), K.bf16(small))
    silu = K.silu_mul(x, torch.ones_like(x))
    np.testing.assert_allclose(silu, torch.nn.functional.silu(x), rtol=2 ** -6, atol=2e-2)


def _dense_attention(q, k, v, groups):
    k, v = k.repeat_interleave(groups, 0).double(), v.repeat_interleave(groups, 0).double()
    s = q.double() @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    t, length = q.shape[1], k.shape[1]
    s = s.masked_fill(torch.ones(t, length).triu(1).bool(), -math.inf)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("knobs", [{}, {"attn_block": 5}, {"softmax_stats": "bf16"}, {"exp": "lut"},
                                   {"scores_dtype": "bf16", "exp": "poly3"}])
def test_flash_attention_matches_dense_softmax_attention(knobs) -> None:
    cfg = EmulatorConfig(**knobs)
    q, k, v = _rand(4, 24, 16, seed=5, std=1.7), _rand(2, 24, 16, seed=6, std=1.7), _rand(2, 24, 16, seed=7)
    out = K.flash_attention(q, k, v, torch.arange(24), torch.arange(4) // 2, 1 / 4.0, cfg)
    ref = _dense_attention(q, k, v, 2)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 0.02, f"{knobs}: relative error {rel:.4f}"


def test_config_rejects_bad_knobs() -> None:
    with pytest.raises(HarnessError, match="k_tile=0"):
        EmulatorConfig(k_tile=0)
    with pytest.raises(HarnessError, match="slowdown=0.5"):
        EmulatorConfig(slowdown=0.5)
    with pytest.raises(HarnessError, match="exp='fast'"):
        EmulatorConfig(exp="fast")


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 40), kb=st.integers(1, 7), n=st.integers(1, 70), bias=st.booleans(), seed=st.integers(0, 99))
def test_fp32_accumulation_adds_the_k_tiles_in_order(m, kb, n, bias, seed) -> None:
    """The compiled accumulator gives the very float32 sums of ``total += tile_j`` in K-tile order."""
    k = kb * CFG.k_tile - (seed % CFG.k_tile)  # ragged K too: padded with exact zeros
    a, w = _rand(m, k, seed=seed), _rand(n, k, seed=seed + 1, std=100.0)
    b = _rand(n, seed=seed + 2) if bias else None
    tiled = K.Tiled(w, CFG.k_tile)
    a_pad = torch.nn.functional.pad(a, (0, tiled.tiles.shape[0] * CFG.k_tile - k))
    partial = torch.bmm(a_pad.reshape(m, -1, CFG.k_tile).transpose(0, 1), tiled.tiles)
    total = torch.zeros(m, n) if b is None else b.expand(m, n).clone()
    for tile in partial:
        total += tile
    np.testing.assert_array_equal(K.gemm(a, tiled, CFG, bias=b), K.bf16(total))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 90), k=st.integers(1, 100), transposed=st.booleans(), seed=st.integers(0, 99))
def test_prepared_weight_equals_rounding_then_tiling(n, k, transposed, seed) -> None:
    """``Tiled.from_weight`` (one layout copy, rounding in place) gives the very bits of rounding a float32
    copy to bf16 and tiling it, NaN / inf / subnormals / ties included, from a read-only source."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 10.0 ** torch.randint(-40, 39, (n, k), generator=g)).numpy()
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 1e-40, -1e-45, 3.4e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8],
                       dtype=np.float32)
    w.reshape(-1)[: min(w.size, special.size)] = special[: w.size]
    w.setflags(write=False)
    rounded = K.bf16(torch.from_numpy(w.copy()))
    want = K.Tiled(rounded.T if transposed else rounded, CFG.k_tile)
    got = K.Tiled.from_weight(w, CFG.k_tile, transposed=transposed)
    assert (got.n, got.k, got.k_tile) == (want.n, want.k, want.k_tile)
    np.testing.assert_array_equal(got.tiles.numpy().view(np.uint32), want.tiles.numpy().view(np.uint32))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 9), band_bytes=st.integers(1, 400), seed=st.integers(0, 2**16),
       special=st.booleans())
def test_a_table_read_as_bf16_band_by_band_has_the_bits_of_the_one_piece_cast(rows, cols, band_bytes, seed,
                                                                               special) -> None:
    """The emulator reads its embedding and LM head as bf16 a band of rows at a time (no whole float32
    copy); the bits are those of casting the whole table, ties, NaN, inf and subnormals included."""
    from harness.deployment.emulator import model as M

    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-40, 38)).astype(np.float32)
    if special:
        a.flat[rng.integers(0, a.size, 4)] = [np.nan, np.inf, -np.inf, 1e-41]
        a.flat[0] = np.float32(1.0 + 2.0 ** -8)  # a tie: rounds to even
    a.flags.writeable = False  # as the lazy weights hand it over
    want = torch.from_numpy(a.copy()).to(torch.bfloat16)
    old, M.BF16_ROWS_BYTES = M.BF16_ROWS_BYTES, band_bytes
    try:
        got = M._bf16_table(a)
    finally:
        M.BF16_ROWS_BYTES = old
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
