"""The shared per-model pytest suite, in the manner of transformers' per-model testers.

``models/<folder>/test_<folder>.py`` is a thin declarative subclass::

    class TestQwen3_0_6b(ModelSuite):
        model_id = "qwen3-0.6b"

Test ids name phase and tap: ``test_layer[prefill-layers.3.q_rope]`` (cumulative) and
``test_layer_isolated[decode.0-layers.0.attn]``; gate tests are ``test_sanity[...]``, ``test_ops[...]``,
``test_e2e[...]``, ``test_recheck[...]`` and the perf benchmarks ``test_prefill_perf`` /
``test_decode_perf``. Each test carries one marker ``phase0`` .. ``phase7``: the earliest gate that
needs it, so ``--phase N`` keeps exactly the gates 0..N. Parametrisation comes from the spec's tap list
(``harness.spec.taps``), never from running the model; the check itself runs once per (model, mode)
per session and each test asserts on its own TapResult.

Flags a subclass may set, each with its reason:

- ``expected_failures = {"test_layer[prefill-layers.0.act]": "why"}``: strict xfail. Phase 7 still
  fails while any is present: an expected failure is a known bug, not a pass.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import pytest

from harness.spec import taps as tapspec
from harness.suites.phases import gate_phase_of
from harness.suites.session import HarnessSession, Settings, settings_of

E2E_CHECKS = ("topk_walk", "logprob_tie", "kl", "top1", "deterministic")
SANITY_CHECKS = ("golden_integrity", "residual_identity", "decode_matches_prefill", "bf16_top1")
TEST_PHASE = {"test_sanity": 0, "test_ops": 1, "test_prefill_perf": 4, "test_decode_perf": 5, "test_e2e": 6,
              "test_recheck": 7}
TAP_TESTS = {"test_layer": "cumulative", "test_layer_isolated": "isolated"}
PERF_TESTS = ("test_prefill_perf", "test_decode_perf")
# Set on a phase-1 test skipped because the deployment cannot be judged op by op: phase 7's accounting
# lists it as not run without failing for it (as the gate's phase 7 treats phase 1 n/a).
NOT_APPLICABLE_PROPERTY = "npu_harness_not_applicable"
# Perf deployments run 9 decode steps per round; replays (needs_golden) can only replay recorded steps,
# so they get the end-to-end golden (same prompt, 32 steps), which phase 6 builds anyway.
PERF_GOLDEN_STEPS = 32


def tap_params(model: str, settings: Settings, mode: str) -> list[tuple[str, int]]:
    """(``phase-tap`` id, gate phase) of every tap test of ``model`` in ``mode``."""
    from harness.spec.model_spec import get

    spec = get(model, settings.scale)
    return [(f"{phase}-{tap}", gate_phase_of(mode, phase, tap))
            for phase in tapspec.phase_names(settings.decode_steps) for tap in tapspec.tap_names(spec)]


def params_for(test: str, model: str, settings: Settings) -> list[tuple[str, int]]:
    """(id, gate phase) of every parametrisation of ``test`` for ``model``: the one place ids are made."""
    if test in TAP_TESTS:
        return tap_params(model, settings, TAP_TESTS[test])
    if test == "test_sanity":
        return [(c, 0) for c in SANITY_CHECKS]
    if test == "test_ops":
        from harness.spec.model_spec import get
        from harness.suites.ops_phase import op_ids

        return [(i, 1) for i in op_ids(get(model, settings.scale))]
    if test == "test_e2e":
        return [(c, 6) for c in E2E_CHECKS]
    if test == "test_recheck":
        return [(m, 7) for m in settings.modes] + [("integrity", 7)]
    raise KeyError(test)


def applicable(test: str, settings: Settings) -> bool:
    """Whether ``test`` can run under ``settings`` (a trace: phases 0, 2, 3, 5 cumulative only)."""
    if test in TAP_TESTS:
        return TAP_TESTS[test] in settings.modes
    if settings.trace is not None:
        return test == "test_sanity"
    return True


def required_keys(model: str, settings: Settings) -> set[str]:
    """Phase 7's list: every test of phases <= ``settings.phase`` that must pass (perf tests excluded:
    timings are judged by ``harness perf compare``, not pass / fail)."""
    keys = set()
    for test in (*TAP_TESTS, *(t for t in TEST_PHASE if t not in PERF_TESTS)):
        if not applicable(test, settings):
            continue
        keys.update(f"{model}::{test}[{pid}]" for pid, ph in params_for(test, model, settings) if ph <= settings.phase)
    return keys


def _tap_message(result: Any) -> str:
    """A failing tap's message: the policy's reasons, then every metric against its threshold."""
    from harness.report.summary import against_thresholds

    parts = [result.message or f"{result.phase} {result.tap} failed"]
    judgement = result.judgement or {}
    if judgement.get("thresholds"):
        parts.append(f"judged by {judgement.get('policy', 'policy')}: "
                     + against_thresholds(result.metrics, judgement["thresholds"]))
    parts.append(f"`harness explain {result.tap}` says what it is")
    return "\n".join(parts)


class ModelSuite:
    """Base of the per-model suites; a subclass must set ``model_id`` (checked when it is defined)."""

    model_id: ClassVar[str]
    expected_failures: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from harness.spec.model_spec import MODEL_IDS

        model = cls.__dict__.get("model_id", getattr(cls, "model_id", None))
        if not isinstance(model, str) or model not in MODEL_IDS:
            raise TypeError(f"{cls.__module__}.{cls.__name__}: set the class attribute model_id to one of "
                            f"{', '.join(MODEL_IDS)} (got {model!r})")
        for key, reason in dict(cls.expected_failures).items():
            if not isinstance(reason, str) or not reason.strip():
                raise TypeError(f"{cls.__name__}.expected_failures[{key!r}]: give the reason as a non-empty string")

    # -- parametrisation (pytest calls this for each test method of the class) ---------------------------
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        test = metafunc.function.__name__
        if "case" not in metafunc.fixturenames:
            return
        settings = settings_of(metafunc.config)
        marks = {n: getattr(pytest.mark, f"phase{n}") for n in range(8)}
        params = []
        for pid, phase in params_for(test, self.model_id, settings):
            m = [marks[phase]]
            reason = self.expected_failures.get(f"{test}[{pid}]")
            if reason:
                m.append(pytest.mark.xfail(reason=reason, strict=True))
            params.append(pytest.param(pid, marks=m, id=pid))
        metafunc.parametrize("case", params)

    # -- phase 0 -------------------------------------------------------------------------------------------
    def test_sanity(self, harness_session: HarnessSession, case: str) -> None:
        check = harness_session.sanity(self.model_id)[case]
        assert check.passed, f"{self.model_id} reference sanity {case}: {check.message}"

    # -- phase 1 -------------------------------------------------------------------------------------------
    def test_ops(self, harness_session: HarnessSession, case: str, request: pytest.FixtureRequest) -> None:
        run = harness_session.ops(self.model_id)
        if case in run.not_run:  # no op backend, or a case it has no kernel for: never a pass
            request.node.user_properties.append((NOT_APPLICABLE_PROPERTY, run.not_run[case]))
            pytest.skip(run.not_run[case])
        check = next(c for c in run.checks if c.id == case)
        assert check.passed, f"{self.model_id} op {case}: {check.message}"

    # -- phases 2, 3, 5 ----------------------------------------------------------------------------------
    def _tap(self, session: HarnessSession, mode: str, case: str, request: pytest.FixtureRequest) -> None:
        phase, tap = case.split("-", 1)
        verdict = session.verdict(self.model_id, mode)
        result = verdict.result(phase, tap)
        if result is None:
            from harness.spec.model_spec import get

            if tap in tapspec.required_taps(get(self.model_id, session.settings.scale)):
                pytest.fail(f"{phase} {tap}: required tap not exposed by the deployment (the contract needs it)")
            request.node.user_properties.append(("npu_harness_optional_skip", case))
            pytest.skip(f"{phase} {tap}: not exposed by the deployment (fused); optional, listed in coverage")
        assert result.passed, _tap_message(result)

    def test_layer(self, harness_session: HarnessSession, case: str, request: pytest.FixtureRequest) -> None:
        self._tap(harness_session, "cumulative", case, request)

    def test_layer_isolated(self, harness_session: HarnessSession, case: str, request: pytest.FixtureRequest) -> None:
        self._tap(harness_session, "isolated", case, request)

    # -- phases 4 and 5: performance (pytest-benchmark, pedantic, >= 10 rounds) -------------------------
    @pytest.mark.perf
    @pytest.mark.phase4
    def test_prefill_perf(self, harness_session: HarnessSession, benchmark: Any) -> None:
        from harness.perf.timing import bench_prefill

        self._bench(harness_session, benchmark, bench_prefill)

    @pytest.mark.perf
    @pytest.mark.phase5
    def test_decode_perf(self, harness_session: HarnessSession, benchmark: Any) -> None:
        from harness.perf.timing import bench_decode

        self._bench(harness_session, benchmark, bench_decode)

    def _bench(self, harness_session: HarnessSession, benchmark: Any, bench: Any) -> None:
        """Time the deployment on the end-to-end golden's prompt with ``bench`` (harness.perf.timing)."""
        from harness.deployment.loader import identity

        golden = harness_session.golden(self.model_id, steps=PERF_GOLDEN_STEPS)
        dep = harness_session.deployment(self.model_id, golden)
        try:  # one history series per deployment identity (knobs included: harness.deployment.loader.identity)
            bench(benchmark, dep, golden.input_ids, model=self.model_id,
                  deployment=identity(harness_session.settings.factory()), rounds=harness_session.settings.rounds)
        finally:
            dep.close()

    # -- phase 6 -------------------------------------------------------------------------------------------
    def test_e2e(self, harness_session: HarnessSession, case: str) -> None:
        checks, details = harness_session.e2e(self.model_id)
        check = checks[case]
        assert check.passed, (f"{self.model_id} end to end {case}: {check.message}\n"
                              f"reference tokens {details['reference_tokens']}\n"
                              f"deployment tokens {details['deployment_tokens']}")

    # -- phase 7 -------------------------------------------------------------------------------------------
    def test_recheck(self, harness_session: HarnessSession, case: str, request: pytest.FixtureRequest) -> None:
        if case == "integrity":
            from harness.store.golden import verify_dir

            used = {g.path: g for g in harness_session.goldens.get(self.model_id, [])}
            used.setdefault(harness_session.golden(self.model_id).path, None)
            problems = [p for path in used for p in verify_dir(path)]
            assert not problems, "golden integrity: " + "; ".join(problems)
            return
        verdict, seed, plen = harness_session.recheck(self.model_id, case)
        rerun = verdict.provenance["recheck"]["rerun"]
        request.node.user_properties.append(("npu_harness_recheck", rerun))
        first = verdict.first_failure
        assert verdict.passed, (f"re-check with seed {seed}, prompt {plen} (rerun: {rerun}): first failure "
                                f"{first.phase} {first.tap}" if first else "required taps missing")
