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

import harness
from harness.deployment import validation
from harness.deployment.loader import BUILTIN, load_factory
from harness.deployment.validation import IMPRECISE, MEMBERS
from harness.deployment.validation.arithmetic import Arithmetic, round_bf16
from harness.deployment.validation.rope import inverse_frequencies
from harness.spec import taps as tapspec
from harness.weights.synthetic import synthetic_weights

PACKAGE = Path(validation.__file__).parent
FAMILIES = ("llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b")  # rope scaling, q/k/v bias, q/k norm
ALL = {**MEMBERS, **IMPRECISE}
STEPS = 2
FORBIDDEN = ("harness.deployment.emulator", "harness.spec.rope", "harness.reference")


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


def test_gemm_orders_agree_and_bf16_storage_rounds():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 200), dtype=np.float32), rng.standard_normal((33, 200), dtype=np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    for arith in (Arithmetic(), Arithmetic(gemm="blocked", k_block=96), Arithmetic(gemm="pairwise", k_block=32),
                  Arithmetic(compute="f64")):
        np.testing.assert_allclose(arith.matmul(x, w), exact, rtol=1e-5, atol=1e-4)
    stored = Arithmetic(storage="bf16").store(x)
    assert np.array_equal(stored, round_bf16(stored)) and not np.array_equal(stored, x)


@pytest.mark.parametrize("name", ["numpy-fp32", "numpy-f64"])
def test_fp32_and_f64_members_match_the_fp32_golden(name, golden_root):
    """Every tap within 1e-5 relative (Frobenius) of the fp32 golden: more precise than bf16 by 100x."""
    v = harness.check("qwen3-0.6b", MEMBERS[name].factory, decode_steps=STEPS, mode="cumulative", golden_dir=golden_root)
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
    v = harness.check(model, MEMBERS[name].factory, decode_steps=STEPS, mode=mode, golden_dir=golden_root)
    assert v.passed, v.summary()
    assert v.coverage.required_missing == [] and v.coverage.not_exposed == []


@pytest.mark.parametrize("mode", ["cumulative", "isolated"])
@pytest.mark.parametrize("model", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_imprecise_member_fails_at_its_expected_tap(model, mode, golden_root):
    member = IMPRECISE["numpy-bf16-rmsnorm-stats"]
    v = harness.check(model, member.factory, decode_steps=STEPS, mode=mode, golden_dir=golden_root)
    assert not v.passed
    assert (v.first_failure.phase, v.first_failure.tap) == ("prefill", member.expected_failure)


def _sweep_module():
    import importlib.util

    path = PACKAGE.parents[2] / "benchmarks" / "validation_sweep.py"
    spec = importlib.util.spec_from_file_location("validation_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_lines_carry_the_policy_statistics_and_the_lean(golden_root):
    """One JSON-ready line per tap with R / r_tail / r_bias as the policy computes them; a failing tap
    also carries the worst row's lean in ULPs, which separates a sub-ULP lean from a real one."""
    sweep = _sweep_module()
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
    table = sweep.false_alarm_table(lines)
    assert "numpy-bf16-rmsnorm-stats" in table[1] and "1 (100.0%)" in table[1]


def test_row_lean_measures_a_scaling_in_ulps():
    sweep = _sweep_module()
    g = np.linspace(1.0, 1.9, 64, dtype=np.float32)[None, :]  # one binade: one ULP is 2^-7
    assert sweep.row_lean_ulp(g, g) == 0.0
    assert abs(sweep.row_lean_ulp(g + 2.0 ** -9, g) - 0.25) < 1e-9
    assert sweep.classify({"failed_on": ["r_bias"], "row_lean_ulp": 1e-5}) == "r_bias tiny lean"
    assert sweep.classify({"failed_on": ["R", "r_bias"], "row_lean_ulp": 1e-5}) == "R/r_tail"
