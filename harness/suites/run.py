"""The run state both front ends share: ``harness gate`` (``harness.suites.gate.run_gate``) and the pytest
plugin (``harness.suites.session.HarnessSession``) judge a model through one ``ModelRun``.

A ``ModelRun`` holds one model's goldens, weights, the ``harness.check`` verdicts per mode, and the sanity,
op, end-to-end and re-check results, each computed once. Errors are memoised too: when a result cannot be
computed (HarnessError, a deployment that fails to import or raises), every later request for it raises
the same HarnessError instead of running it again (the gate turns it into an ``error`` phase, a suite
test into a failure with that message).

Phase 7's re-check seed and prompt length are derived from what is judged - the deployment's identity and
the key of the golden the earlier phases used - unless given (``recheck_seed`` / ``recheck_prompt_len``):
the same deployment on the same golden re-checks the same way every run, and ``rerun_command`` prints the
command that repeats it exactly.
"""
from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError
from harness.suites.phases import MAX_PHASE, Check

MODES = ("cumulative", "isolated")
RECHECK_MIN_PROMPT = 8


def deployment_with_faults(deployment: str | Callable | None, faults: list[str] | tuple[str, ...]) -> Any:
    """``deployment`` as given, or the emulator with the named ``faults`` switched on (``--fault``)."""
    if not faults:
        return deployment
    from harness.deployment.loader import BUILTIN, DEFAULT_DEPLOYMENT

    if deployment not in (None, "emulator", DEFAULT_DEPLOYMENT, BUILTIN["emulator"]):
        raise HarnessError(f"--fault needs the emulator deployment, not --deployment {deployment!r}")
    from harness.deployment.emulator import make_factory

    factory = make_factory(tuple(faults))
    factory.name = f"emulator+{'+'.join(faults)}"  # type: ignore[attr-defined]
    factory.spawn_target = f"emulator[faults={'+'.join(faults)}]"  # type: ignore[attr-defined]  # rebuilt in the child
    return factory


def modes_of(mode: str) -> tuple[str, ...]:
    """``both`` (default) -> both modes; else the one named; HarnessError naming --mode otherwise."""
    if mode == "both":
        return MODES
    if mode not in MODES:
        raise HarnessError(f"--mode {mode!r}: expected cumulative, isolated or both")
    return (mode,)


@dataclass
class RunOptions:
    """Everything a run takes besides the model; defaults as the CLI's and the plugin's."""

    deployment: str | Callable | None = None
    phase: int = MAX_PHASE
    scale: str = "tiny"
    seed: int = 0
    weights: str | Path | None = None
    mode: str = "both"
    golden_dir: str | Path | None = None
    perf: bool = False
    perf_db: str | None = None
    decode_steps: int = 4
    prompt_len: int | None = None
    rows: str = "full"  # golden storage: full or sampled (harness.store.streamwrite)
    trace: str | Path | None = None
    faults: tuple[str, ...] = ()  # emulator faults switched on (--fault)
    recheck_seed: int | None = None  # phase 7: None derives it from the deployment and the golden
    recheck_prompt_len: int | None = None
    rounds: int = 10  # timed rounds per performance series (phases 4-5; at least 10 for a decision)
    isolation: Any = "process"  # where the deployment runs: a child process, inline (debugging), or a DeploymentHost
    timeout: float | None = None  # seconds per deployment call; None: derived from the work
    progress: Callable | None = None  # golden builds: (stage, done, total)
    # The gate's phases: (model, phase, None) when one starts, (model, phase, PhaseOutcome) when it ends
    # (harness gate --progress: a full-scale gate runs for hours and prints its verdict only at the end).
    on_phase: Callable | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modes(self) -> tuple[str, ...]:
        if self.trace is not None:
            return ("cumulative",)
        return modes_of(self.mode)

    def factory(self) -> Any:
        """The deployment factory (the emulator with ``faults`` switched on, when given)."""
        return deployment_with_faults(self.deployment, self.faults)


def derive_recheck(identity: str, golden_key: str, base_prompt_len: int) -> tuple[int, int]:
    """Phase 7's (seed, prompt length) from what is judged: a hash of the deployment's identity and the
    golden key. The length lies in [base/2, 3*base/2): off the tiling grid more often than not."""
    digest = hashlib.sha256(f"recheck|{identity}|{golden_key}".encode()).digest()
    seed = int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1
    low = max(RECHECK_MIN_PROMPT, base_prompt_len // 2)
    return seed, low + int.from_bytes(digest[4:8], "big") % base_prompt_len


def rerun_command(model: str, opts: RunOptions, seed: int, prompt_len: int, name: str) -> str:
    """The ``harness gate`` command that reruns phase 7 exactly as this run did."""
    args = ["harness", "gate", "--model", model, "--scale", opts.scale, "--seed", str(opts.seed),
            "--decode-steps", str(opts.decode_steps)]
    if opts.prompt_len:
        args += ["--prompt-len", str(opts.prompt_len)]
    if opts.rows != "full":
        args += ["--rows", opts.rows]
    if opts.weights:
        args += ["--weights", str(opts.weights)]
    dep = opts.deployment if isinstance(opts.deployment, str) else None if opts.deployment is None else name
    if dep:
        args += ["--deployment", dep]
    for f in opts.faults:
        args += ["--fault", f]
    args += ["--mode", opts.mode, "--phase", "7", "--recheck-seed", str(seed), "--recheck-prompt-len", str(prompt_len)]
    if opts.golden_dir:
        args += ["--golden-dir", str(opts.golden_dir)]
    return shlex.join(args)


class _Failed:
    """A memoised failure: re-raised as the same message wherever the result is needed again."""

    def __init__(self, message: str):
        self.message = message


class ModelRun:
    """One model's run state: goldens, weights, verdicts per mode and the per-phase results, each once."""

    def __init__(self, model: str, opts: RunOptions):
        from harness.spec.model_spec import get
        from harness.store import GoldenStore

        self.model, self.opts = model, opts
        self.spec = get(model, opts.scale)
        self.store = GoldenStore(opts.golden_dir)
        self.target = opts.factory()  # the deployment as given (with --fault applied)
        # isolation: one deployment host (one child process) serves every deployment of this run; never a
        # factory that asks for the goldens.
        from harness.deployment.isolation import DeploymentHost, spawn_target
        from harness.deployment.loader import describe, load_factory, refuse_golden_access

        if opts.trace is None:
            refuse_golden_access(load_factory(self.target), self.target)
        self.name = describe(self.target)
        # A host passed in (a gate over several models, a pytest session) is the caller's to close.
        self.owns_host = not isinstance(opts.isolation, DeploymentHost)
        self.host = DeploymentHost(opts.isolation, opts.timeout) if self.owns_host else opts.isolation
        if opts.trace is None and spawn_target(self.target)[1] is None:
            self.host.start()  # the child starts up while phases 0-1 run (not for a factory that runs inline)
        self.seconds0 = self.host.seconds  # a shared host also counts other runs' deployments
        self.verdicts: dict[str, Any] = {}
        self.goldens: list[Any] = []
        self._memo: dict[tuple, Any] = {}
        self._recheck: tuple[int, int] | None = None

    # -- memoisation -------------------------------------------------------------------------------
    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` once; a failure is kept and re-raised as the same HarnessError."""
        if key not in self._memo:
            try:
                self._memo[key] = compute()
            except HarnessError as exc:
                self._memo[key] = _Failed(str(exc))
            except Exception as exc:  # a deployment raising outside harness.check, or a harness bug
                from harness.deployment.loader import summarise_exception

                self._memo[key] = _Failed(f"could not run: {summarise_exception(exc)}")
        value = self._memo[key]
        if isinstance(value, _Failed):
            raise HarnessError(value.message)
        return value

    # -- building blocks ---------------------------------------------------------------------------
    def request(self, seed: int | None = None, steps: int | None = None, prompt_len: int | None = None):
        """The GoldenRequest of (seed, steps, prompt length); defaults: the run's options."""
        from harness.store import GoldenRequest
        from harness.weights import WeightsSource

        o = self.opts
        source = WeightsSource(str(o.weights) if o.weights else None)
        return GoldenRequest(self.model, o.scale, o.seed if seed is None else seed,
                             o.decode_steps if steps is None else steps,
                             o.prompt_len if prompt_len is None else prompt_len, source, o.rows)

    def has_golden(self, seed: int | None = None, steps: int | None = None, prompt_len: int | None = None) -> bool:
        """Whether that golden is in the local store already (nothing to build, no room needed)."""
        return self.store.has(self.request(seed, steps, prompt_len))

    def golden(self, seed: int | None = None, steps: int | None = None, prompt_len: int | None = None):
        """The verified golden of (seed, steps, prompt length); defaults: the run's options."""
        g = self.store.get(self.request(seed, steps, prompt_len), progress=self.opts.progress)
        self.goldens.append(g)
        return g

    def weights(self, seed: int | None = None):
        from harness.weights import WeightsSource, load_weights

        o = self.opts
        return load_weights(self.spec, WeightsSource(str(o.weights) if o.weights else None),
                            o.seed if seed is None else seed)

    def check(self, mode: str, key: str | None = None, seed: int | None = None, prompt_len: int | None = None):
        """The verdict of ``mode`` (memoised under ``key``; the trace's when a trace is judged)."""
        from harness.checker import check, check_trace

        key = key or mode

        def run():
            o = self.opts
            if o.trace is not None:
                v = check_trace(o.trace, golden_dir=o.golden_dir, progress=o.progress)
                if v.model != self.model or v.scale != o.scale:
                    raise HarnessError(f"--trace {o.trace}: records {v.model}/{v.scale}, not {self.model}/{o.scale}")
                return v
            return check(self.model, self.target, scale=o.scale, seed=o.seed if seed is None else seed,
                         decode_steps=o.decode_steps, mode=mode, weights=o.weights,
                         prompt_len=o.prompt_len if seed is None else prompt_len, rows=o.rows,
                         golden_dir=o.golden_dir, progress=o.progress, isolation=self.host)

        v = self.memo(("verdict", key), run)
        self.verdicts[key] = v
        return v

    def deployment(self, golden):
        """A fresh deployment on this run's host (never handed the golden); close it after use."""
        from harness.weights import WeightsSource

        source = WeightsSource(str(self.opts.weights) if self.opts.weights else None)
        return self.host.open(self.target, self.spec, source, golden.manifest["seed"])

    @property
    def deployment_seconds(self) -> float:
        """Seconds spent inside this run's deployments (prefill / decode / factory)."""
        return self.host.seconds - self.seconds0

    def close(self) -> None:
        """End the deployment's child process, when this run started it."""
        if self.owns_host:
            self.host.close()

    # -- per-phase results -------------------------------------------------------------------------
    def sanity(self) -> list[Check]:
        """Phase 0: reference sanity of the run's golden."""
        from harness.suites.sanity import sanity_checks

        return self.memo(("sanity",), lambda: sanity_checks(self.golden(), self.weights()))

    def ops(self) -> Any:
        """Phase 1's OpRun: the op cases judged on the deployment's own op backend, and the ids not run
        (every id, "not applicable: no op backend", when the factory offers none)."""
        from harness.suites.ops_phase import run_ops

        return self.memo(("ops",), lambda: run_ops(self.spec, self.target))

    def e2e(self) -> tuple[list[Check], dict[str, Any]]:
        """Phase 6: greedy generation against the end-to-end golden."""
        from harness.suites.e2e import E2E_STEPS, e2e_checks

        def run():
            golden = self.golden(steps=E2E_STEPS)
            opened: list[Any] = []
            try:
                return e2e_checks(golden, lambda: opened.append(self.deployment(golden)) or opened[-1])
            finally:
                for dep in opened:
                    dep.close()

        return self.memo(("e2e",), run)

    def identity(self) -> str:
        """What is judged, as phase 7's derivation reads it: the deployment's name and, for a user's
        deployment, the digest of the file defining its factory (a code change meets a fresh re-check)."""
        from harness.deployment.loader import code_digest

        digest = code_digest(self.target)
        return f"{self.name}@{digest}" if digest else str(self.name)

    def recheck_params(self) -> tuple[int, int]:
        """Phase 7's (seed, prompt length): given, or derived from the deployment and the golden key."""
        if self._recheck is None:
            o = self.opts
            seed, plen = o.recheck_seed, o.recheck_prompt_len
            if seed is None or plen is None:
                from harness.store import GoldenRequest
                from harness.weights import WeightsSource

                key = GoldenRequest(self.model, o.scale, o.seed, o.decode_steps, o.prompt_len,
                                    WeightsSource(str(o.weights) if o.weights else None), o.rows).key()
                d_seed, d_plen = derive_recheck(self.identity(), key, o.prompt_len or self.spec.default_prompt_len)
                seed = d_seed if seed is None else seed
                plen = d_plen if plen is None else plen
            self._recheck = (seed, plen)
        return self._recheck

    def recheck(self, mode: str):
        """Phase 7's check of ``mode`` with the re-check seed and prompt length."""
        seed, plen = self.recheck_params()
        v = self.check(mode, key=f"recheck/{mode}", seed=seed, prompt_len=plen)
        v.provenance["recheck"] = {"seed": seed, "prompt_len": plen,
                                   "rerun": rerun_command(self.model, self.opts, seed, plen, str(self.name))}
        return v
