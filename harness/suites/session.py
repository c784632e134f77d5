"""What one pytest session (one xdist worker) computes once and every test reads: per (model, mode) the
``harness.check`` verdict, per model the sanity, op, end-to-end and re-check results.

Errors are cached too: when a check cannot run (HarnessError, a deployment that fails to import or
raises), every test that needs it fails with the same message instead of re-running it.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable

from harness.errors import HarnessError
from harness.suites.phases import Check

MODES = ("cumulative", "isolated")


@dataclass(frozen=True)
class Settings:
    """The plugin's options (defaults as ``harness gate``): see ``harness.pytest_plugin``."""

    deployment: str | None = None
    trace: str | None = None
    scale: str = "tiny"
    seed: int = 0
    weights: str | None = None
    mode: str = "both"
    phase: int = 7
    golden_dir: str | None = None
    decode_steps: int = 4
    fault: tuple[str, ...] = ()
    recheck_seed: int | None = None
    isolation: str = "process"  # where the deployment runs (harness.deployment.isolation)
    timeout: float | None = None  # seconds per deployment call; None: derived from the work

    @property
    def modes(self) -> tuple[str, ...]:
        if self.trace is not None:
            return ("cumulative",)
        return MODES if self.mode == "both" else (self.mode,)

    def factory(self) -> Any:
        """The deployment factory (the emulator with ``fault`` switched on, when given)."""
        from harness.suites.gate import deployment_with_faults

        return deployment_with_faults(self.deployment, self.fault)


class _Failed:
    """A cached failure: re-raised as the same message by every test that needs the result."""

    def __init__(self, message: str):
        self.message = message


class HarnessSession:
    """Lazily computed, memoised results of one session."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._memo: dict[tuple, Any] = {}
        self.goldens: dict[str, list[Any]] = {}
        self.recheck_seeds: dict[str, tuple[int, int]] = {}
        self._host: Any = None

    @property
    def host(self) -> Any:
        """One deployment host (one child process) for every deployment of this session (worker)."""
        if self._host is None:
            from harness.deployment.isolation import DeploymentHost

            self._host = DeploymentHost(self.settings.isolation, self.settings.timeout)
        return self._host

    def close(self) -> None:
        if self._host is not None:
            self._host.close()

    def _get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            try:
                self._memo[key] = compute()
            except HarnessError as exc:
                self._memo[key] = _Failed(f"could not run: {exc}")
            except Exception as exc:
                from harness.deployment.loader import summarise_exception

                self._memo[key] = _Failed(f"could not run: {summarise_exception(exc)}")
        value = self._memo[key]
        if isinstance(value, _Failed):
            raise HarnessError(value.message)
        return value

    # -- building blocks -----------------------------------------------------------------------------
    def golden(self, model: str, steps: int | None = None, seed: int | None = None, prompt_len: int | None = None):
        from harness.store import GoldenRequest, GoldenStore
        from harness.weights import WeightsSource

        s = self.settings
        req = GoldenRequest(model, s.scale, s.seed if seed is None else seed,
                            s.decode_steps if steps is None else steps, prompt_len, WeightsSource(s.weights))
        g = GoldenStore(s.golden_dir).get(req)
        self.goldens.setdefault(model, []).append(g)
        return g

    def weights(self, model: str, seed: int | None = None):
        from harness.spec.model_spec import get
        from harness.weights import WeightsSource, load_weights

        s = self.settings
        return load_weights(get(model, s.scale), WeightsSource(s.weights), s.seed if seed is None else seed)

    def verdict(self, model: str, mode: str):
        """The check of ``model`` in ``mode`` (or the trace's), run once per session."""
        import harness

        s = self.settings

        def run():
            if s.trace is not None:
                v = harness.check_trace(s.trace, golden_dir=s.golden_dir)
                if v.model != model:
                    raise HarnessError(f"--trace {s.trace} records {v.model}, not {model}")
                return v
            return harness.check(model, s.factory(), scale=s.scale, seed=s.seed, decode_steps=s.decode_steps,
                                 mode=mode, weights=s.weights, golden_dir=s.golden_dir, isolation=self.host)

        return self._get(("verdict", model, mode), run)

    def sanity(self, model: str) -> dict[str, Check]:
        from harness.suites.sanity import sanity_checks

        return self._get(("sanity", model), lambda: {c.id: c for c in sanity_checks(
            self.golden(model), self.weights(model))})

    def ops(self, model: str) -> dict[str, Check]:
        from harness.spec.model_spec import get
        from harness.suites.ops_phase import run_ops

        return self._get(("ops", model), lambda: {c.id: c for c in run_ops(
            get(model, self.settings.scale), self.settings.factory())})

    def deployment(self, model: str, golden) -> Any:
        """A fresh deployment of ``model`` on the session's host (never handed the golden)."""
        from harness.weights import WeightsSource

        return self.host.open(self.settings.factory(), golden.spec, WeightsSource(self.settings.weights),
                              golden.manifest["seed"])

    def e2e(self, model: str) -> tuple[dict[str, Check], dict[str, Any]]:
        from harness.suites.e2e import E2E_STEPS, e2e_checks

        def run():
            golden = self.golden(model, steps=E2E_STEPS)
            opened: list[Any] = []
            try:
                checks, details = e2e_checks(golden, lambda: opened.append(self.deployment(model, golden)) or opened[-1])
            finally:
                for dep in opened:
                    dep.close()
            return {c.id: c for c in checks}, details

        return self._get(("e2e", model), run)

    def recheck(self, model: str, mode: str):
        """The check with a seed and prompt length drawn now (``--recheck-seed`` pins the seed)."""
        import harness

        s = self.settings
        if model not in self.recheck_seeds:
            from harness.spec.model_spec import get

            base = get(model, s.scale).default_prompt_len
            seed = s.recheck_seed if s.recheck_seed is not None else secrets.randbelow(2**31 - 1) + 1
            self.recheck_seeds[model] = (seed, max(8, base // 2) + secrets.randbelow(base))
        seed, plen = self.recheck_seeds[model]

        def run():
            v = harness.check(model, s.factory(), scale=s.scale, seed=seed, decode_steps=s.decode_steps,
                              mode=mode, weights=s.weights, prompt_len=plen, golden_dir=s.golden_dir,
                              isolation=self.host)
            v.provenance["recheck"] = {"seed": seed, "prompt_len": plen}
            return v

        return self._get(("recheck", model, mode), run), seed, plen
