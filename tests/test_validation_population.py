"""The validation population (issue 11): independent correct deployments the gate must pass.

Each member shares no code with the emulator, hands every canonical tap over in the right shape,
continues with what tap returns, and passes ``harness.check`` in both modes; the imprecise member
fails exactly where the issue decided it must.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
from harness.deployment import validation
from harness.deployment.loader import BUILTIN, load_factory
from harness.deployment.validation import IMPRECISE, MEMBERS
from harness.deployment.validation.arithmetic import Arithmetic, round_bf16
from harness.deployment.validation.rope import cos_sin, inverse_frequencies, rotate
from harness.spec import taps as tapspec
from harness.weights.synthetic import synthetic_weights

PACKAGE = Path(validation.__file__).parent
FAMILIES = ("llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b")  # rope scaling, q/k/v bias, q/k norm
ALL = {**MEMBERS, **IMPRECISE}
STEPS = 2
FORBIDDEN = ("harness.deployment.emulator", "harness.spec.rope", "harness.reference")


def _check(model, factory, **kw):
    """harness.check in this process: these tests judge numerics, and a child process per check (the
    isolation default, where the harness has it) costs seconds each; one test keeps the default."""
    import inspect

    if "isolation" in inspect.signature(harness.check).parameters:
        kw.setdefault("isolation", "inline")
    return harness.check(model, factory, **kw)


def _imports(path: Path) -> set[str]:
    """Every module a source file imports (absolute names; relative imports resolved in the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "harness.deployment.validation" + (f".{base}" if base else "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_member_imports_the_emulator_or_its_helpers_even_transitively():
    """Independence: follow every import inside the package (and the harness modules it may use);
    none reaches the emulator, its RoPE helper or the reference capture."""
    seen, todo = set(), [p for p in PACKAGE.glob("*.py")]
    root = PACKAGE.parents[2]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), f"{path.name} imports {name}"
            if name.startswith("harness."):
                target = root / (name.replace(".", "/") + ".py")
                if target.exists():
                    todo.append(target)
    assert {p.name for p in seen} >= {"registry.py", "numpy_decoder.py", "arithmetic.py", "hf_decoder.py", "rope.py"}


def test_registry_names_splits_and_short_names():
    assert {"numpy-fp32", "numpy-f64", "numpy-bf16-pairwise", "hf-bf16-eager", "hf-bf16-sdpa",
            "numpy-flash-bf16stats", "numpy-fused"} <= set(MEMBERS)
    assert {m.split for m in MEMBERS.values()} == {"calibration", "heldout"}
    assert IMPRECISE["numpy-bf16-rmsnorm-stats"].expected_failure == "layers.0.attn_norm"
    for name, member in ALL.items():
        assert load_factory(name) is member.factory, name  # usable with --deployment NAME
        assert BUILTIN[name].startswith("harness.deployment.validation:")


def _read_only_weights(model: str):
    spec = harness.models.get(model, "tiny")
    weights = synthetic_weights(spec, seed=3)
    for w in weights.values():
        w.flags.writeable = False  # a member writing into the caller's weights raises
    return spec, weights


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("name", list(ALL))
def test_every_canonical_tap_handed_over_in_shape(name, model):
    spec, weights = _read_only_weights(model)
    dep = ALL[name].factory(spec, weights)
    handed: list[tuple[str, tuple, np.dtype]] = []

    def tap(tap_name, value):
        handed.append((tap_name, value.shape, value.dtype))
        return value

    ids = np.arange(7) * 13 % spec.vocab_size
    logits = dep.prefill(ids, tap)
    assert logits.shape == (7, spec.vocab_size) and logits.dtype == np.float32
    names = tapspec.tap_names(spec)
    assert sorted(n for n, _, _ in handed) == sorted(names)
    for tap_name, shape, dtype in handed:
        assert shape == tapspec.shape(spec, tap_name, 7) and dtype == np.float32, tap_name
    for step in range(STEPS):
        handed.clear()
        logits = dep.decode(int(ids[step]), tap)
        assert logits.shape == (1, spec.vocab_size)
        assert sorted(n for n, _, _ in handed) == sorted(names)
        assert all(shape == tapspec.shape(spec, n, 1) for n, shape, _ in handed)


@pytest.mark.parametrize("name", list(ALL))
def test_member_continues_with_what_tap_returns(name):
    """A tap that returns zeros for the attention context makes o_proj (no bias) output zeros, and a
    forced k_rope reaches the KV cache: decode sees it."""
    spec, weights = _read_only_weights("qwen2.5-0.5b")
    dep = ALL[name].factory(spec, weights)
    seen = {}

    def tap(tap_name, value):
        seen[tap_name] = value.copy()
        if tap_name == "layers.0.attn":
            return np.zeros_like(value)
        return value

    dep.prefill(np.arange(5), tap)
    assert not np.any(seen["layers.0.o"]) and np.any(seen["layers.1.o"])
    logits_plain = dep.decode(3, lambda n, v: v)
    dep.prefill(np.arange(5), lambda n, v: np.zeros_like(v) if n == "layers.1.k_rope" else v)
    logits_forced = dep.decode(3, lambda n, v: v)
    assert not np.allclose(logits_plain, logits_forced)


def test_rope_frequencies_follow_llama3_scaling():
    spec = harness.models.get("llama-3.2-1b", "full")
    plain = inverse_frequencies(spec.head_dim, spec.rope_theta, None)
    scaled = inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    wavelength = 2 * np.pi / plain
    factor = spec.rope_scaling["factor"]
    assert np.array_equal(scaled[wavelength < 8192 / 4], plain[wavelength < 8192 / 4])  # high frequencies kept
    assert np.allclose(scaled[wavelength > 8192], plain[wavelength > 8192] / factor)    # low ones divided
    middle = (wavelength > 8192 / 4) & (wavelength < 8192)
    assert middle.any() and np.all((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / factor))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 300), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_gemm_orders_agree_and_bf16_storage_rounds(m, k, n, seed):
    """Every accumulation order computes the same product (to fp32 accuracy), for any K, ragged
    blocks included; bf16 storage rounds, and a bf16-representable weight is used without a copy."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    for arith in (Arithmetic(), Arithmetic(gemm="blocked", k_block=96), Arithmetic(gemm="pairwise", k_block=32),
                  Arithmetic(compute="f64")):
        np.testing.assert_allclose(arith.matmul(x, w), exact, rtol=1e-5, atol=1e-4)
    stored = Arithmetic(storage="bf16").store(x)
    assert np.array_equal(stored, round_bf16(stored))
    assert Arithmetic(storage="bf16").weight(stored) is stored


@settings(max_examples=25, deadline=None)
@given(positions=st.lists(st.integers(0, 5000), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_rope_is_a_rotation_of_each_pair(positions, seed):
    """Each (d, d + hd/2) pair keeps its length, and position 0 is the identity."""
    spec = harness.models.get("llama-3.2-1b", "tiny")
    freqs = inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    x = np.random.default_rng(seed).standard_normal((len(positions), 2, spec.head_dim))
    cos, sin = cos_sin(np.array(positions), freqs, np.float64)
    y = rotate(x, cos, sin)
    half = spec.head_dim // 2
    pair_len = lambda a: np.hypot(a[..., :half], a[..., half:])  # noqa: E731
    np.testing.assert_allclose(pair_len(y), pair_len(x), rtol=1e-12)
    c0, s0 = cos_sin(np.array([0]), freqs, np.float64)
    np.testing.assert_array_equal(rotate(x[:1], c0, s0), x[:1])


@pytest.mark.parametrize("name", ["numpy-fp32", "numpy-f64"])
def test_fp32_and_f64_members_match_the_fp32_golden(name, golden_root):
    """Every tap within 1e-5 relative (Frobenius) of the fp32 golden: more precise than bf16 by 100x."""
    v = _check("qwen3-0.6b", MEMBERS[name].factory, decode_steps=STEPS, mode="cumulative", golden_dir=golden_root)
    worst = max(v.results, key=lambda r: r.metrics["rel_fro"])
    assert worst.metrics["rel_fro"] < 1e-5, (worst.phase, worst.name, worst.metrics["rel_fro"])
    assert len(v.results) == (STEPS + 1) * len(tapspec.tap_names(harness.models.get("qwen3-0.6b", "tiny")))


def _cases():
    for model in ("llama-3.2-1b", "qwen3-0.6b"):
        for mode in ("cumulative", "isolated"):
            for name in MEMBERS:
                yield pytest.param(name, model, mode, id=f"{name}-{model}-{mode}")


@pytest.mark.parametrize("name,model,mode", list(_cases()))
def test_member_passes_the_check(name, model, mode, golden_root):
    v = _check(model, MEMBERS[name].factory, decode_steps=STEPS, mode=mode, golden_dir=golden_root)
    assert v.passed, v.summary()
    assert v.coverage.required_missing == [] and v.coverage.not_exposed == []


@pytest.mark.parametrize("mode", ["cumulative", "isolated"])
@pytest.mark.parametrize("model", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_imprecise_member_fails_at_its_expected_tap(model, mode, golden_root):
    member = IMPRECISE["numpy-bf16-rmsnorm-stats"]
    v = _check(model, member.factory, decode_steps=STEPS, mode=mode, golden_dir=golden_root)
    assert not v.passed
    assert (v.first_failure.phase, v.first_failure.tap) == ("prefill", member.expected_failure)


def test_members_run_by_short_name_and_harness_list_shows_them(golden_root):
    """`--deployment NAME` resolves through the loader (as `harness gate -d NAME` does); `harness list`
    names every member."""
    from typer.testing import CliRunner

    from harness.cli import app

    v = harness.check("qwen2.5-0.5b", "numpy-bf16-blocked", decode_steps=1, mode="isolated", golden_dir=golden_root)
    assert v.passed and v.provenance["deployment"] == BUILTIN["numpy-bf16-blocked"], v.summary()
    res = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and all(name in res.output for name in ALL), res.output


SWEEP = "benchmarks/validation_sweep.py"


def test_sweep_lines_carry_the_policy_statistics_and_the_lean(load_file, golden_root):
    """One JSON-ready line per tap with R / r_tail / r_bias as the policy computes them; a failing tap
    also carries the worst row's lean in ULPs, which separates a sub-ULP lean from a real one."""
    sweep = load_file(SWEEP)
    spec = harness.models.get("qwen3-0.6b", "tiny")
    lines = sweep._check_lines(IMPRECISE["numpy-bf16-rmsnorm-stats"], "qwen3-0.6b", 0, "isolated", "tiny", STEPS,
                               golden_root)
    assert len(lines) == (STEPS + 1) * len(tapspec.tap_names(spec))
    first = next(x for x in lines if f"{x['phase']}/{x['tap']}" == x["first_failure"])
    assert first["tap"] == "layers.0.attn_norm" and "r_bias" in first["failed_on"]
    assert first["row_lean_ulp"] > sweep.TINY_LEAN_ULP > first["baseline_row_lean_ulp"] / 10
    assert {"R", "r_tail", "r_bias", "bias_t", "baseline_bias_t", "ulp_bias", "rel_fro", "baseline_rel_fro",
            "ulp_p99", "baseline_ulp_p99", "passed"} <= set(first)
    assert sweep.classify(first) == "r_bias"
    # failed: over its limits; a row scaled by the bf16 statistic moves its typical element too (row_med_r)
    assert first["worst_stat"] in ("r_bias", "row_med_r") and first["worst_ratio"] > 1
    assert all(x["worst_ratio"] <= 1 for x in lines if x["passed"] and x["worst_ratio"] is not None)
    assert any(x["over"] and x["over"][0].startswith("r_bias") for x in lines)
    table = sweep.false_alarm_table(lines)
    assert "numpy-bf16-rmsnorm-stats" in table[1] and "1 (100.0%)" in table[1]


def test_row_lean_measures_a_scaling_in_ulps(load_file):
    sweep = load_file(SWEEP)
    g = np.linspace(1.0, 1.9, 64, dtype=np.float32)[None, :]  # one binade: one ULP is 2^-7
    assert sweep.row_lean_ulp(g, g) == 0.0
    assert abs(sweep.row_lean_ulp(g + 2.0 ** -9, g) - 0.25) < 1e-9
    assert sweep.classify({"failed_on": ["r_bias"], "row_lean_ulp": 1e-5}) == "r_bias tiny lean"
    assert sweep.classify({"failed_on": ["R", "r_bias"], "row_lean_ulp": 1e-5}) == "R/r_tail"
    assert sweep.classify({"failed_on": ["r_bias", "row_r"], "row_lean_ulp": 0.9}) == "r_bias"
    assert sweep.classify({"failed_on": ["head_r"]}) == "per-kind"


def test_bf16_weights_are_rounded_once_and_only_when_needed():
    arith = Arithmetic(storage="bf16")
    w = np.array([[1.0, 1.0078125, -3.5]], dtype=np.float32)  # bf16 values
    assert arith.weight(w) is w
    off = w + np.float32(1e-4)
    held = arith.weight(off)
    assert held is not off and np.array_equal(held, round_bf16(off)) and np.array_equal(off, w + np.float32(1e-4))


@pytest.mark.parametrize("name", list(ALL))
def test_factories_pickle_by_reference(name):
    """A child process can rebuild every member's factory (the harness may run deployments there)."""
    import pickle

    factory = ALL[name].factory
    again = pickle.loads(pickle.dumps(factory))
    assert again == factory and again.name == name


def test_fused_member_holds_no_concatenated_weights():
    """numpy-fused concatenates q/k/v and gate/up per GEMM and drops the copy: holding it for every
    layer would add half the model's weights (3.7 GB at 1.7B). Its layers keep only the caller's
    (bf16-representable) arrays, and the fused product equals the separate ones'."""
    spec, weights = _read_only_weights("qwen2.5-0.5b")
    rounded = {k: round_bf16(v) for k, v in weights.items()}  # bf16 values: held as is, not copied
    dep = MEMBERS["numpy-fused"].factory(spec, rounded)
    matrices = [v for layer in dep.layers for v in vars(layer).values() if isinstance(v, np.ndarray) and v.ndim == 2]
    assert len(matrices) == 7 * spec.num_layers  # q, k, v, o, gate, up, down
    assert all(any(v is w for w in rounded.values()) for v in matrices)
    layer, x = dep.layers[0], np.ones((3, spec.hidden_size), np.float32)
    fused = np.split(x @ layer.qkv().T, layer.qkv_split, axis=1)
    assert all(np.allclose(f, x @ w.T, rtol=1e-6) for f, w in zip(fused, (layer.q, layer.k, layer.v)))


def test_sweep_markdown_table_states_each_modes_first_failure(load_file):
    sweep = load_file(SWEEP)
    base = {"member": "m", "model": "a", "seed": 0, "check_passed": True, "first_failure": None,
            "phase": "prefill", "tap": "logits"}
    lines = [{**base, "mode": "cumulative"}, {**base, "mode": "isolated"},
             {**base, "model": "b", "mode": "cumulative", "check_passed": False, "passed": False,
              "first_failure": "prefill/logits", "over": ["r_bias 4.84 > max 4.5"]},
             {**base, "model": "b", "mode": "isolated"}]
    table = sweep.markdown_table(lines)
    assert table[0] == "| member | a | b |"
    assert table[2] == "| m | pass | cum. fail: prefill `logits` r_bias 4.84 > max 4.5<br>iso. pass |"


def test_classify_names_per_kind_failures(load_file):
    sweep = load_file(SWEEP)
    assert sweep.classify({"failed_on": ["row_r"]}) == "per-kind"
    assert sweep.classify({"failed_on": ["r_bias", "row_r"], "row_lean_ulp": 0.6}) == "r_bias"
    assert sweep.classify({"failed_on": ["R", "head_r"]}) == "R/r_tail"
