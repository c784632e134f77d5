"""What one pytest session (one xdist worker) computes once and every test reads, per model: a
``harness.suites.run.ModelRun`` - the very run state ``harness gate`` uses - keyed by model id.

The session's options are the gate's (``Settings`` is ``RunOptions``); errors are memoised by the run
state, so when a check cannot run every test that needs it fails with the same message. The pytest
plugin keeps this object and its Settings in ``config.stash`` under the keys below; the suites read them
through ``settings_of`` here, so no suite module imports the plugin (the plugin imports the suites).
"""
from __future__ import annotations

from typing import Any

import pytest

from harness.suites.phases import Check
from harness.suites.run import MODES, ModelRun, RunOptions

Settings = RunOptions  # the plugin's options are the gate's
SETTINGS = pytest.StashKey[RunOptions]()
SESSION = pytest.StashKey["HarnessSession"]()

__all__ = ["MODES", "SESSION", "SETTINGS", "HarnessSession", "Settings", "settings_of"]


def settings_of(config: pytest.Config) -> RunOptions:
    """The session's options (built by the plugin at configure time)."""
    return config.stash[SETTINGS]


class HarnessSession:
    """The session's run states, one ``ModelRun`` per model, created on first use."""

    def __init__(self, settings: RunOptions):
        self.settings = settings
        self.runs: dict[str, ModelRun] = {}
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

    def run(self, model: str) -> ModelRun:
        if model not in self.runs:
            from dataclasses import replace

            self.runs[model] = ModelRun(model, replace(self.settings, isolation=self.host))
        return self.runs[model]

    @property
    def goldens(self) -> dict[str, list[Any]]:
        return {m: r.goldens for m, r in self.runs.items()}

    # -- what the suite's tests read ---------------------------------------------------------------
    def golden(self, model: str, steps: int | None = None, seed: int | None = None, prompt_len: int | None = None):
        return self.run(model).golden(seed, steps, prompt_len)

    def weights(self, model: str, seed: int | None = None):
        return self.run(model).weights(seed)

    def verdict(self, model: str, mode: str):
        """The check of ``model`` in ``mode`` (or the trace's), run once per session."""
        return self.run(model).check(mode)

    def sanity(self, model: str) -> dict[str, Check]:
        return {c.id: c for c in self.run(model).sanity()}

    def ops(self, model: str) -> Any:
        """Phase 1's OpRun of ``model``: checks judged on the deployment's op backend, ids not run."""
        return self.run(model).ops()

    def deployment(self, model: str, golden) -> Any:
        """A fresh deployment of ``model`` on the session's host (never handed the golden); close it after use."""
        return self.run(model).deployment(golden)

    def e2e(self, model: str) -> tuple[dict[str, Check], dict[str, Any]]:
        checks, details = self.run(model).e2e()
        return {c.id: c for c in checks}, details

    def recheck(self, model: str, mode: str):
        """Phase 7's check: seed and prompt length given or derived from the deployment and golden key."""
        run = self.run(model)
        seed, plen = run.recheck_params()
        return run.recheck(mode), seed, plen
