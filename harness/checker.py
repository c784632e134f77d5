"""``harness.check``: run a deployment against the goldens and judge every tap of every phase.

Streaming: each tap is judged the moment the deployment hands it over and only its metrics are kept,
so memory stays at one golden tensor at a time whatever the model size. In isolated mode a tap whose op
read values the deployment kept to itself (unexposed or observe-only upstream taps) is deferred: its
value is kept and it is judged after the run against a chain baseline (docs/policies.md, "Taps
downstream of an unexposed one").
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness.deployment.loader import DeploymentError, call_deployment, describe, refuse_golden_access
from harness.errors import HarnessError, TapError
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec, get
from harness.store import GoldenRequest, GoldenSet, GoldenStore
from harness.verdict.localise import first_failure as locate_first_failure
from harness.verdict.verdict import Coverage, FirstFailure, TapResult, Verdict
from harness.weights import WeightsSource, load_weights

MODES = ("cumulative", "isolated")


def as_float32(name: str, value: Any) -> tuple[np.ndarray | None, str | None]:
    """The tap value as a float32 array, or a message saying what is wrong with it."""
    message = getattr(value, "unjudgeable_message", None)
    if isinstance(message, str):  # the child process already found the problem (isolation.Unjudgeable)
        return None, message
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor: any float dtype, widened
        if not value.is_floating_point():
            dtype = str(value.dtype).replace("torch.", "")
            return None, f"tap {name}: dtype {dtype}, expected a floating-point tensor"
        value = value.detach().cpu().float().numpy()  # bf16 / fp16 widen exactly
    if not isinstance(value, np.ndarray):
        return None, f"tap {name}: got {type(value).__name__}, expected a float32 numpy array"
    if value.dtype != np.float32:
        return None, f"tap {name}: dtype {value.dtype}, expected float32"
    return value, None


class TapJudge:
    """The ``tap`` callable handed to a deployment for one phase."""

    def __init__(self, spec: ModelSpec, golden: GoldenSet, phase: str, mode: str, baseline: str, policies):
        self.spec, self.golden, self.phase, self.mode = spec, golden, phase, mode
        self.baseline, self.policies = baseline, policies
        self.results: list[TapResult] = []
        self.seen: set[str] = set()
        self.observed: set[str] = set()  # observe-only taps (the deployment kept its own value)
        # The DUT value of this phase's first failing tap in canonical order (for cause hints);
        # one tensor per phase, and none once an earlier phase failed (set keep_failed False).
        self.keep_failed = True
        self.failed: tuple[int, str, np.ndarray] | None = None
        self._order: dict[str, int] | None = None
        self._logits: np.ndarray | None = None  # what the deployment tapped as logits (vs what it returns)
        self.seconds = 0.0  # spent judging (inline, inside the deployment's calls)
        # Isolated mode: taps downstream of one the deployment kept to itself, judged after the run
        # against a chain baseline (resolve); their place in ``results`` is held until then.
        self.deferred: list[Deferred] = []
        self.values: DeferredValues | None = None  # set by judge_deployment when isolated
        # A sampled golden stores some prompt rows of each prefill tap: the deployment's full [T, features]
        # value is checked for its shape, then those rows are judged.
        self.rows = golden.rows(phase)
        self.full_rows = len(golden.input_ids) if phase == "prefill" else 1

    def _sampled(self, dut: np.ndarray) -> np.ndarray:
        return dut if self.rows is None else dut[self.rows]

    @property
    def returns_own_value(self) -> bool:
        """True in cumulative mode: the deployment continues with its own value (a child process need not
        wait for an answer)."""
        return self.mode != "isolated"

    def _keep_failed(self, name: str, dut: np.ndarray) -> None:
        if self._order is None:
            self._order = {n: k for k, n in enumerate(tapspec.tap_names(self.spec))}
        index = self._order[name]
        if self.failed is None or index < self.failed[0]:
            self.failed = (index, name, np.array(dut, copy=True))

    def judge_returned(self, logits: np.ndarray) -> None:
        """Judge the logits the call returned exactly like the ``logits`` tap: when they differ from the
        tapped ones and fail the policy, the phase's logits result fails, saying ``logits (returned)``;
        when the deployment did not tap its logits, the returned ones are its logits result."""
        if "logits" not in self.golden.tap_names(self.phase):
            return
        logits = self._sampled(logits)
        if self._logits is not None and self._logits.shape == logits.shape and \
                np.array_equal(self._logits, logits, equal_nan=True):
            return  # the very values the tap's result judged
        unforced = self.unforced("logits") if self.mode == "isolated" else ()
        if unforced:  # judged with the deferred taps, against the same chain baseline
            self.deferred.append(Deferred("logits", "logits", unforced, self.values.put(logits), returned=True))
            return
        base = self.golden.tensor(self.phase, "logits", self.baseline)
        self._merge_returned(self._judge_returned(logits, base), logits)

    def _judge_returned(self, logits: np.ndarray, base: np.ndarray, medians: bool | None = None,
                        unforced: int = 0) -> TapResult:
        golden = self.golden.tensor(self.phase, "logits", "fp32")
        kind = tapspec.validate(self.spec, "logits").kind
        returned = judge_tap(self.policies, self.phase, "logits (returned)", kind, logits, golden, base, self.mode,
                             medians=medians, unforced=unforced)
        return dataclasses.replace(returned, tap="logits")

    def _merge_returned(self, returned: TapResult, logits: np.ndarray) -> None:
        index = next((k for k, r in enumerate(self.results) if r.tap == "logits"), None)
        if index is None:
            self.results.append(returned)
        elif not returned.passed:
            tapped = self.results[index]
            judgement = dict(returned.judgement or {})
            judgement["tapped"] = tapped.judgement
            self.results[index] = dataclasses.replace(returned, judgement=judgement)
        else:
            return
        if not returned.passed and self.keep_failed:
            self._keep_failed("logits", logits)

    def __call__(self, name: str, value: Any):
        start = time.perf_counter()
        try:
            return self._judge(name, value)
        finally:
            self.seconds += time.perf_counter() - start

    def observe(self, name: str, value: Any) -> Any:
        """An observe-only tap: judged like any other, but the deployment keeps its own value, also in
        isolated mode (a fused kernel that cannot take a value back); the verdict lists it as observed."""
        start = time.perf_counter()
        try:
            self._judge(name, value)
            self.observed.add(name)
            return value
        finally:
            self.seconds += time.perf_counter() - start

    def _judge(self, name: str, value: Any):
        parsed = tapspec.validate(self.spec, name)  # unknown names raise TapError naming the tap
        if name in self.seen:
            raise TapError(f"tap {name!r} handed over twice in phase {self.phase}")
        self.seen.add(name)
        golden = self.golden.tensor(self.phase, name, "fp32")
        expected = golden.shape if self.rows is None else (self.full_rows, *golden.shape[1:])
        dut, problem = as_float32(name, value)
        if problem is None:
            dut = _unbatched(dut, golden.ndim)
        if problem is None and dut.shape != expected:
            problem = f"tap {name}: shape {tuple(dut.shape)}, expected {tuple(expected)}"
        if problem is None:
            dut = self._sampled(dut)
        if problem is not None:
            self.results.append(TapResult(self.phase, name, False, {}, message=problem))
        elif self.mode == "isolated" and (unforced := self.unforced(name)):
            # The op read values the deployment kept to itself: its error holds their roundings too, so it
            # is judged after the run against a chain baseline that leaves the same taps unforced.
            self.deferred.append(Deferred(name, parsed.kind, unforced, self.values.put(dut), index=len(self.results)))
            self.results.append(TapResult(self.phase, name, False, {"unforced_inputs": len(unforced)},
                                          message=f"tap {name}: not judged yet (deferred to a chain baseline)"))
            if name == "logits":
                self._logits = np.array(dut, copy=True)
        else:
            base = self.golden.tensor(self.phase, name, self.baseline)
            result = judge_tap(self.policies, self.phase, name, parsed.kind, dut, golden, base, self.mode,
                               self.spec.head_dim)
            self.results.append(result)
            if name == "logits":
                self._logits = np.array(dut, copy=True)
            if not result.passed and self.keep_failed:
                self._keep_failed(name, dut)
        if self.mode == "isolated":
            return golden  # teacher forcing (GoldenSet.tensor returns a private copy)
        return value

    def unforced(self, name: str) -> tuple[str, ...]:
        """The taps upstream of ``name`` in this phase whose values the op behind it read unforced: its
        data-flow inputs (``harness.spec.taps.inputs``) not handed over with ``tap`` so far (unexposed, or
        observe-only), and recursively theirs, up to the forced ones; in canonical order."""
        found: set[str] = set()
        stack = list(tapspec.inputs(self.spec, name))
        while stack:
            t = stack.pop()
            if t in found or (t in self.seen and t not in self.observed):
                continue
            found.add(t)
            stack.extend(tapspec.inputs(self.spec, t))
        if not found:
            return ()
        if self._order is None:
            self._order = {n: k for k, n in enumerate(tapspec.tap_names(self.spec))}
        return tuple(sorted(found, key=self._order.__getitem__))

    def chain_unforced(self) -> set[str]:
        """Every tap a deferred tap of this phase read unforced: what its chain baseline leaves unforced."""
        return {t for d in self.deferred for t in d.unforced}

    def resolve(self, chain: str) -> None:
        """Judge the deferred taps against the chain baseline ``chain`` (GoldenSet.tensor variant), each
        in its place: ``metrics["unforced_inputs"]`` counts the ops upstream the deployment kept, and
        ``judgement["baseline"]`` names the baseline."""
        start = time.perf_counter()
        try:
            for d in self.deferred:
                dut = self.values.get(d.slot)
                base = self.golden.tensor(self.phase, d.name, chain)
                if d.returned:
                    result = _annotated(self._judge_returned(dut, base, medians=DEFERRED_MEDIANS,
                                                             unforced=len(d.unforced)), d, chain)
                    self._merge_returned(result, dut)
                    continue
                golden = self.golden.tensor(self.phase, d.name, "fp32")
                result = judge_tap(self.policies, self.phase, d.name, d.kind, dut, golden, base, self.mode,
                                   self.spec.head_dim, medians=DEFERRED_MEDIANS, unforced=len(d.unforced))
                self.results[d.index] = result = _annotated(result, d, chain)
                if not result.passed and self.keep_failed:
                    self._keep_failed(d.name, dut)
            self.deferred = []
        finally:
            self.seconds += time.perf_counter() - start


# The median statistics on deferred taps (judged against a chain baseline). Off: measured on, they
# failed 11-12 of 18 runs of correct members withholding act, gate+up+act or attn_norm (docs/policies.md,
# "Taps downstream of an unexposed one").
DEFERRED_MEDIANS = False


@dataclasses.dataclass
class Deferred:
    """A tap judged after the run against a chain baseline: ``unforced`` the taps upstream that its op
    read unforced; ``slot`` the deployment's value in DeferredValues; ``index`` its place in the phase's
    results; ``returned``: the returned logits (merged into the logits result like judge_returned)."""

    name: str
    kind: str
    unforced: tuple[str, ...]
    slot: int
    index: int = -1
    returned: bool = False


class DeferredValues:
    """The deployment's values of deferred taps until the chain baseline judges them: in memory up to
    ``budget`` bytes, then spilled to .npy files in a temporary directory (a full-scale run that keeps
    ``act`` to itself defers every layer's ``down``); ``close`` removes them."""

    def __init__(self, budget: int = 256 << 20):
        self.budget, self.held = budget, 0
        self._values: list[np.ndarray | str] = []
        self._dir = None

    def put(self, value: np.ndarray) -> int:
        value = np.array(value, dtype=np.float32, copy=True)  # the deployment may reuse its buffer
        if self.held + value.nbytes > self.budget:
            import tempfile

            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="npu-harness-deferred-")
            path = f"{self._dir.name}/{len(self._values)}.npy"
            np.save(path, value)
            self._values.append(path)
        else:
            self.held += value.nbytes
            self._values.append(value)
        return len(self._values) - 1

    def get(self, slot: int) -> np.ndarray:
        value = self._values[slot]
        return np.load(value, mmap_mode="r") if isinstance(value, str) else value

    def close(self) -> None:
        self._values.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _annotated(result: TapResult, d: Deferred, chain: str) -> TapResult:
    """``result`` of a deferred tap, saying what judged it and why."""
    judgement = dict(result.judgement or {})
    judgement.update(baseline=chain, unforced=list(d.unforced))
    message = result.message
    if message is not None:
        message += (f" (against the chain baseline {chain}: the deployment kept {', '.join(d.unforced)} "
                    f"to itself)")
    return dataclasses.replace(result, judgement=judgement, message=message)


def judge_tap(policies, phase: str, name: str, kind: str, dut, golden, base, mode: str = "cumulative",
              head_dim: int = 0, medians: bool | None = None, unforced: int = 0) -> TapResult:
    """Metrics plus the policy's judgement of one tap; ``head_dim`` (the model's) gives the tap its
    per-block statistics: a head's slice on head-structured taps (q, k, v, their norms and RoPE, attn), an aligned block
    of as many columns (a GEMM output tile) on the others. ``medians`` (default: in isolated mode) adds the
    median statistics, which the policy judges where present. ``unforced``: how many taps upstream the
    op read unforced (isolated mode, ``base`` a chain baseline), recorded as ``metrics["unforced_inputs"]``
    for the policy (docs/policies.md, "Taps downstream of an unexposed one").
    """
    from harness.compare.metrics import tap_metrics

    if medians is None:
        medians = mode == "isolated"
    metrics = tap_metrics(dut, golden, base, block=head_dim, medians=medians)
    if unforced:
        metrics["unforced_inputs"] = unforced
    policy = policies.lookup(kind, phase)
    judgement = policy.judge(dut, golden, base, metrics, kind=kind, phase=phase, mode=mode)
    message = None
    if not judgement.passed and judgement.reasons:
        message = f"{phase} {name}: " + "; ".join(judgement.reasons)
    return TapResult(phase, name, bool(judgement.passed), metrics, judgement.to_dict(), message)


def policies_for(spec: ModelSpec, policy=None):
    """The PolicySet for ``spec``: defaults, pyproject, models/<id>/policy.toml, then ``policy`` overrides."""
    if policy is not None and hasattr(policy, "lookup"):
        return policy
    from harness.compare.policy_config import PolicySet

    return PolicySet.for_model(spec, overrides=policy)


def _unbatched(arr: np.ndarray, ndim: int) -> np.ndarray:
    """``arr`` without a leading batch dimension of size 1 (``[1, tokens, ...]`` as torch models give it)."""
    return arr[0] if arr.ndim == ndim + 1 and arr.shape[0] == 1 else arr


def _check_logits(phase: str, logits: Any, rows: int, vocab: int) -> np.ndarray:
    arr, problem = as_float32("logits (returned)", logits)
    if problem is None:
        arr = _unbatched(arr, 2)
    if problem is None and arr.shape != (rows, vocab):
        problem = f"{phase}: returned logits have shape {tuple(arr.shape)}, expected {(rows, vocab)}"
    if problem is not None:
        raise DeploymentError(f"{phase}: {problem}")
    return arr


def provenance(golden: GoldenSet, deployment: str, policies, extra: dict | None = None) -> dict:
    from harness.store.golden import _versions

    prov = {
        "deployment": deployment,
        "golden": {"key": golden.manifest["key"], "path": str(golden.path),
                   "weights": golden.manifest["weights"], "created": golden.manifest.get("created")},
        "versions": _versions(),
        "policy": policies.describe() if hasattr(policies, "describe") else str(policies),
    }
    from harness.deployment.pyxrt.toolchain import toolchain_fingerprint

    prov["toolchain"] = toolchain_fingerprint()  # stale-kernel provenance (never raises)
    prov.update(extra or {})
    return prov


def check(
    model: str,
    factory: Callable | str | None = None,
    *,
    scale: str = "tiny",
    seed: int = 0,
    decode_steps: int = 4,
    mode: str = "cumulative",
    weights: str | Path | None = None,
    prompt_len: int | None = None,
    rows: str = "full",
    policy=None,
    golden_dir: str | Path | None = None,
    progress=None,
    isolation: Any = "process",
    timeout: float | None = None,
) -> Verdict:
    """Judge a deployment of ``model`` against the goldens; see docs/contract.md.

    ``factory(spec, weights)`` builds the deployment (or a ``MODULE:FACTORY`` string; default: the
    emulator). ``mode``: ``cumulative`` (tap returns the deployment's own value) or ``isolated`` (tap
    returns the golden: each tap's error is that op's alone, judged against the teacher-forced bf16
    baseline). ``weights``: a local HF checkpoint directory (default: synthetic weights of ``seed``).
    ``policy``: a PolicySet, or overrides ``{kind: policy text}``. ``isolation``: ``process`` (default:
    the deployment runs in a child process, see harness.deployment.isolation), ``inline`` (this process,
    for debugging), or a ``DeploymentHost`` to reuse; ``timeout``: seconds per deployment call (default:
    derived from the model size and tokens). ``rows``: ``full`` (default) or ``sampled`` (a golden that
    stores some prompt rows of each prefill tap, for long prompts; cumulative mode only). A factory asking
    for the goldens (``needs_golden``) is refused. Raises HarnessError when the check cannot run (bad
    input, broken golden, a deployment that cannot be built, raises, crashes or overruns its deadline).
    """
    from harness.deployment.isolation import open_deployment, validate_isolation, validate_timeout

    if mode not in MODES:
        raise HarnessError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    validate_isolation(isolation)
    validate_timeout(timeout)
    if callable(factory):
        refuse_golden_access(factory)

    def deploy(spec: ModelSpec, golden: GoldenSet, source: WeightsSource, mode: str):
        return open_deployment(isolation, timeout, factory, spec, source, seed)

    return judge_deployment(model, deploy, describe(factory), scale=scale, seed=seed, decode_steps=decode_steps,
                            mode=mode, weights=weights, prompt_len=prompt_len, rows=rows, policy=policy,
                            golden_dir=golden_dir, progress=progress)


SAMPLED_ISOLATED = "sampled golden: isolated mode needs full tensors"


def judge_deployment(model: str, deploy: Callable, name: str, *, scale: str = "tiny", seed: int = 0,
                     decode_steps: int = 4, mode: str = "cumulative", weights: str | Path | None = None,
                     prompt_len: int | None = None, rows: str = "full", policy=None,
                     golden_dir: str | Path | None = None, progress=None, extra_provenance: dict | None = None) -> Verdict:
    """The judging behind ``check``: ``deploy(spec, golden, source, mode)`` returns ``(deployment, host to
    close or None)``; every tap of every phase is judged as it arrives, a deferred one (isolated mode)
    after the run against its chain baseline."""
    if mode not in MODES:
        raise HarnessError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if decode_steps < 0:
        raise HarnessError(f"--decode-steps {decode_steps}: must be >= 0")
    t0 = time.perf_counter()
    spec = get(model, scale)
    source = WeightsSource(str(weights) if weights else None)
    store = GoldenStore(golden_dir)
    if mode == "isolated" and rows != "full":
        raise HarnessError(f"{SAMPLED_ISOLATED} (teacher forcing); use mode='cumulative' (--mode cumulative) "
                           f"or rows='full' (--rows full)")
    golden = store.get(GoldenRequest(model, scale, seed, decode_steps, prompt_len, source, rows), progress=progress)
    if mode == "isolated" and golden.sampled:
        raise HarnessError(f"{golden.path}: {SAMPLED_ISOLATED} (teacher forcing); use mode='cumulative' "
                           f"(--mode cumulative) or a golden built with --rows full")
    if mode == "isolated":
        golden = store.ensure_local(golden, progress=progress)
    baseline = "local" if mode == "isolated" else "bf16"
    policies = policies_for(spec, policy)
    dep, host = deploy(spec, golden, source, mode)
    judges: list[TapJudge] = []
    seen: dict[str, set[str]] = {}
    observed: set[str] = set()
    failed_dut: dict[tuple[str, str], np.ndarray] = {}
    seconds0 = getattr(getattr(dep, "host", None), "seconds", 0.0)
    values = DeferredValues()
    chain_extra: dict = {}
    try:
        try:
            for i, phase in enumerate(golden.phases):
                judge = TapJudge(spec, golden, phase, mode, baseline, policies)
                judge.keep_failed = not failed_dut
                judge.values = values
                if phase == "prefill":
                    logits = call_deployment("prefill", dep.prefill, golden.input_ids.copy(), judge)
                    rows = len(golden.input_ids)
                else:
                    logits = call_deployment(phase, dep.decode, int(golden.decode_tokens[i - 1]), judge)
                    rows = 1
                judge.judge_returned(_check_logits(phase, logits, rows, spec.vocab_size))
                judges.append(judge)
                seen[phase] = judge.seen
                observed |= judge.observed
                if judge.failed is not None:
                    failed_dut[(phase, judge.failed[1])] = judge.failed[2]
            deployment_s = getattr(getattr(dep, "host", None), "seconds", 0.0) - seconds0
        finally:
            close = getattr(dep, "close", None)
            if callable(close):
                close()
            if host is not None:
                host.close()
        if not any(seen.values()):  # returned logits alone are judged, but a deployment must hand over its taps
            raise HarnessError(f"the deployment handed over no taps: nothing was compared ({name})")
        chain_extra = _judge_deferred(store, golden, judges, progress)
    finally:
        values.close()
    if chain_extra:  # a deferred failure may come first: the first failing phase's DUT value, as above
        failed_dut = next(({(j.phase, j.failed[1]): j.failed[2]} for j in judges if j.failed is not None), {})
    results = [r for j in judges for r in j.results]
    judge_s = sum(j.seconds for j in judges)

    required = tapspec.required_taps(spec)
    missing = [f"{p}:{t}" for p in golden.phases for t in required if t not in seen[p]]
    exposed = set().union(*seen.values())
    not_exposed = [t for t in tapspec.tap_names(spec) if t not in exposed]
    first = locate_first_failure(spec, results, golden.phases)
    if first is None and missing:
        phase, tap = missing[0].split(":", 1)
        first = FirstFailure(phase=phase, tap=tap, metrics={}, hint="required tap not exposed",
                             message=f"required tap {tap} was not handed to tap() in {phase}")
    if first is not None and first.judgement is not None:  # a numeric failure: look for a known cause
        w = load_weights(spec, source, seed)  # the parent's own read-only copy (hints replay ops on it)
        first.hint = _hint(spec, golden, first, mode, w, failed_dut.get((first.phase, first.tap)))
    # deployment_s: time inside the deployment's calls where it runs (inline: judge_s, the judging of its
    # taps, happens inside those calls).
    extra = {"elapsed_s": round(time.perf_counter() - t0, 3), "deployment_s": round(deployment_s, 4),
             "judge_s": round(judge_s, 4),
             "isolation": dict(getattr(dep, "isolation", None) or {"mode": "inline"})}
    extra.update(chain_extra)
    extra.update(extra_provenance or {})
    verdict = Verdict(
        model=model, scale=scale, seed=seed, mode=mode, results=results,
        coverage=Coverage(compared=len(results), required_missing=missing, not_exposed=not_exposed,
                          observed=[t for t in tapspec.tap_names(spec) if t in observed]),
        first_failure=first,
        provenance=provenance(golden, name, policies, extra),
    )
    return verdict


def _judge_deferred(store: GoldenStore, golden: GoldenSet, judges: list[TapJudge], progress=None) -> dict:
    """Judge every deferred tap (isolated mode, downstream of a tap the deployment kept to itself) against
    the chain baseline that leaves exactly those taps unforced (GoldenStore.ensure_chain); the verdict's
    provenance names it. Nothing deferred: nothing to do, ``{}``."""
    unforced = {j.phase: j.chain_unforced() for j in judges if j.deferred}
    if not unforced:
        return {}
    chain = store.ensure_chain(golden, unforced, progress=progress)
    deferred = sum(not d.returned for j in judges for d in j.deferred)  # taps (returned logits merge into one)
    for j in judges:
        j.resolve(chain)
    kinds = sorted({tapspec.parse(t).kind for names in unforced.values() for t in names})
    return {"chain_baseline": {"name": chain, "unforced_kinds": kinds, "taps_judged": deferred}}


def _hint(spec, golden, first: FirstFailure, mode: str, weights, dut: np.ndarray | None = None) -> str:
    """A cause hint for the first failure (known bug signatures; see harness.verdict.hints); ``dut`` is
    the deployment's value of the first failing tap."""
    from harness.verdict.hints import diagnose

    return diagnose(spec, golden, first, mode=mode, weights=weights, dut=dut)


def check_trace(directory: str | Path, *, policy=None, golden_dir: str | Path | None = None, progress=None) -> Verdict:
    """Judge a trace directory written by an external deployment (cumulative mode).

    ``trace.json`` names the model, scale, seed and decode steps (and optionally a weights directory);
    the recorded tensors are replayed through the same comparator as a live deployment.
    """
    from harness.deployment.trace import read_trace, trace_factory

    trace = read_trace(directory)
    # trace.json's "weights" may name a HF checkpoint directory (then the golden uses it) or the
    # weights.safetensors that `harness trace prepare` wrote from the seed's synthetic weights.
    weights = trace.weights_path if trace.weights_path is not None and trace.weights_path.is_dir() else None
    factory = trace_factory(directory)
    factory.name = f"trace:{directory}"
    # A trace is data replayed by the harness's own code: nothing of the deployment runs, so inline.
    return check(trace.model, factory, scale=trace.scale, seed=trace.seed, decode_steps=trace.decode_steps,
                 mode="cumulative", weights=weights, prompt_len=trace.prefill_tokens, policy=policy, golden_dir=golden_dir,
                 progress=progress, isolation="inline")
