"""pytest plugin of npu-harness (registered through the ``pytest11`` entry point).

Kept tiny at import time: loading pytest must not import torch or transformers (the suites import them
when a test first needs a result). Options live in one group, each with its default in the help; the
session's state is in ``config.stash``. Phase 7's "nothing skipped" rule is enforced here, on the
controller (so it holds under pytest-xdist): when a model's ``test_recheck`` ran, every required test
of that model (``model_suite.required_keys``) must have passed; skipped, xfailed or deselected ones
fail the session with their ids listed.
"""
from __future__ import annotations

from typing import Any

import pytest

from harness.suites.session import SESSION, SETTINGS, HarnessSession, Settings, settings_of

__all__ = ["SESSION", "SETTINGS", "settings_of"]
ACCOUNTING = pytest.StashKey["Phase7Accounting"]()
REQUIRED = "npu_harness_required"
_MARKERS = [f"phase{n}: npu-harness phase {n} gate" for n in range(8)] + [
    "npu: needs a real XDNA NPU", "slow: takes more than a few seconds", "perf: performance measurement"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("npu-harness", "npu-harness per-model suites")
    group.addoption("--deployment", default=None, metavar="MODULE:FACTORY",
                    help="Deployment under test: MODULE:FACTORY or a built-in name. Default: the emulator.")
    group.addoption("--fault", action="append", default=[], metavar="NAME",
                    help="Emulator fault to switch on (repeatable; `harness list` names them). Default: none.")
    # pytest owns --trace (break into pdb at each test), hence --trace-dir here; `harness gate --trace`.
    group.addoption("--trace-dir", default=None, metavar="DIR",
                    help="Judge a trace directory instead of a live deployment. Default: none.")
    group.addoption("--scale", default="tiny", choices=("tiny", "small", "full"), help="Model scale. Default: tiny.")
    group.addoption("--seed", type=int, default=0, help="Seed of prompt and synthetic weights. Default: 0.")
    group.addoption("--weights", default=None, metavar="DIR",
                    help="Local Hugging Face checkpoint directory. Default: synthetic weights.")
    group.addoption("--mode", default="both", choices=("cumulative", "isolated", "both"),
                    help="Tap judging mode. Default: both.")
    group.addoption("--phase", type=int, default=7, choices=range(8), metavar="N",
                    help="Run the gates of phases 0..N (deselect later ones). Default: 7.")
    group.addoption("--golden-dir", default=None, metavar="DIR",
                    help="Golden store directory. Default: $NPU_HARNESS_GOLDEN_DIR or golden/.")
    group.addoption("--decode-steps", type=int, default=4, metavar="N",
                    help="Decode steps judged per tap (phase 5). Default: 4.")
    group.addoption("--recheck-seed", type=int, default=None, metavar="N",
                    help="Pin phase 7's seed (to reproduce a re-check). Default: derived from the deployment "
                         "and the golden key.")
    group.addoption("--recheck-prompt-len", type=int, default=None, metavar="N",
                    help="Pin phase 7's prompt length. Default: derived from the deployment and the golden key.")
    group.addoption("--rounds", type=int, default=10, metavar="N",
                    help="Timed rounds per performance series (phases 4-5, at least 10). Default: 10.")
    group.addoption("--isolation", default="process", choices=("process", "inline"),
                    help="Where the deployment runs: a child process (a crash or hang is an error naming the "
                         "phase) or inline (debugging). Default: process.")
    # pytest-timeout owns --timeout (per test), hence --deployment-timeout here; `harness gate --timeout`.
    group.addoption("--deployment-timeout", type=float, default=None, metavar="SECONDS",
                    help="Deadline of each deployment call. Default: derived from model size and tokens.")


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    if config.getoption("decode_steps") < 1:
        raise pytest.UsageError(f"--decode-steps {config.getoption('decode_steps')}: must be >= 1")
    config.stash[SETTINGS] = Settings(
        deployment=config.getoption("deployment"), trace=config.getoption("trace_dir"),
        scale=config.getoption("scale"), seed=config.getoption("seed"), weights=config.getoption("weights"),
        mode=config.getoption("mode"), phase=config.getoption("phase"), golden_dir=config.getoption("golden_dir"),
        decode_steps=config.getoption("decode_steps"), faults=tuple(config.getoption("fault")),
        recheck_seed=config.getoption("recheck_seed"), recheck_prompt_len=config.getoption("recheck_prompt_len"),
        isolation=config.getoption("isolation"), timeout=config.getoption("deployment_timeout"),
        rounds=config.getoption("rounds"))
    config.stash[ACCOUNTING] = Phase7Accounting(config)
    config.pluginmanager.register(config.stash[ACCOUNTING], "npu-harness-phase7")


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION in config.stash:
        config.stash[SESSION].close()  # the deployment's child process ends with the session


@pytest.fixture(scope="session")
def harness_session(request: pytest.FixtureRequest) -> HarnessSession:
    """The session's memoised checks (one per model and mode; per xdist worker)."""
    config = request.config
    if SESSION not in config.stash:
        config.stash[SESSION] = HarnessSession(settings_of(config))
    return config.stash[SESSION]


def _suite_of(item: pytest.Item) -> Any:
    cls = getattr(item, "cls", None)
    from harness.suites.model_suite import ModelSuite

    return cls if cls is not None and issubclass(cls, ModelSuite) else None


def _phase(item: pytest.Item) -> int | None:
    for n in range(8):
        if item.get_closest_marker(f"phase{n}") is not None:
            return n
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect suite tests of later phases (``--phase``) or that cannot run (``--mode``, ``--trace``);
    tag the required ones so phase 7 can account for them on the controller."""
    from harness.suites.model_suite import PERF_TESTS, applicable

    settings = settings_of(config)
    trace_model = None
    if settings.trace is not None:
        from harness.deployment.trace import read_trace

        trace_model = read_trace(settings.trace).model
    keep, drop = [], []
    for item in items:
        suite = _suite_of(item)
        if suite is None:
            keep.append(item)
            continue
        name = item.originalname if hasattr(item, "originalname") else item.name
        phase = _phase(item)
        if (phase is not None and phase > settings.phase) or not applicable(name, settings) \
                or (trace_model is not None and suite.model_id != trace_model):
            drop.append(item)
            continue
        keep.append(item)
        if name not in PERF_TESTS:
            pid = item.callspec.id if hasattr(item, "callspec") else ""
            item.user_properties.append((REQUIRED, f"{suite.model_id}::{name}[{pid}]"))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class Phase7Accounting:
    """Per required key, the outcome the controller saw; at the end, what phase 7 refuses to count."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.outcomes: dict[str, str] = {}
        self.problems: list[str] = []
        self.not_applicable: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(p for p in report.user_properties if isinstance(p, tuple) and len(p) == 2)
        key = props.get(REQUIRED)
        if key is None:
            return
        if "npu_harness_optional_skip" in props:
            self.outcomes[key] = "optional"
        elif "npu_harness_not_applicable" in props:  # model_suite.NOT_APPLICABLE_PROPERTY
            self.outcomes[key] = f"not run ({props['npu_harness_not_applicable']})"
        elif hasattr(report, "wasxfail"):
            self.outcomes[key] = "xfailed" if report.skipped else "failed"
        elif report.failed:
            self.outcomes[key] = "failed"
        elif report.skipped:
            self.outcomes.setdefault(key, "skipped")
        elif report.when == "call" and report.passed:
            self.outcomes.setdefault(key, "passed")

    def problems_now(self) -> list[str]:
        """Required tests of re-checked models that did not pass: skipped, xfailed or never run. Tests
        not applicable to the deployment (phase 1 without an op backend) go to ``not_applicable``: listed
        as not run, not failing, as the gate's phase 7 treats phase 1 n/a."""
        from harness.suites.model_suite import required_keys

        rechecked = {k.split("::", 1)[0] for k in self.outcomes if "::test_recheck[" in k}
        problems, self.not_applicable = [], []
        for model in sorted(rechecked):
            for key in sorted(required_keys(model, settings_of(self.config))):
                state = self.outcomes.get(key, "not run (deselected)")
                if state in ("skipped", "xfailed", "not run (deselected)"):
                    problems.append(f"{key}: {state}")
                elif state.startswith("not run ("):
                    self.not_applicable.append(f"{key}: {state}")
        return problems

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput"):  # an xdist worker: the controller does the accounting
            return
        self.problems = self.problems_now()
        if self.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.not_applicable:
            terminalreporter.section("npu-harness phase 7: required tests not run (not applicable)", yellow=True)
            terminalreporter.write_line(f"{len(self.not_applicable)} not run, not failing: "
                                        f"{self.not_applicable[0]}{' ...' if len(self.not_applicable) > 1 else ''}")
        if not self.problems:
            return
        terminalreporter.section("npu-harness phase 7: required tests that did not pass", red=True)
        for line in self.problems[:30]:
            terminalreporter.write_line(line)
        if len(self.problems) > 30:
            terminalreporter.write_line(f"... and {len(self.problems) - 30} more")
        terminalreporter.write_line("phase 7 fails: a skipped, xfailed or deselected required test is not a pass")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add the machine identity (CPU, power state, NPU stack) to pytest-benchmark's machine_info."""
    from harness.perf.machine import update_machine_info

    update_machine_info(machine_info)
