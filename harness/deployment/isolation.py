"""Where a deployment runs while it is judged: in a child process (default) or in the harness's own.

``process``: a child started with the ``spawn`` method builds the deployment itself, from the factory
target (``MODULE:FACTORY``, a built-in name, ``emulator[...]``, or a picklable callable) and the weights
*source* (seed or checkpoint path; it loads the weights itself, never a copy of the parent's). The parent
holds a proxy with the same ``prefill(input_ids, tap)`` / ``decode(token_id, tap)`` contract: each tap
the deployment hands over travels to the parent (through the pipe when small, through a POSIX
shared-memory segment when larger than ``PIPE_MAX``: full-scale logits are 78 MB), is judged there,
and, when the tap's caller needs an answer (isolated mode: the golden), the answer travels back after
the deployment has handed over its own value. In cumulative mode the child keeps its own value: small
taps stream without waiting, a shared-memory tap waits for an ack, which the parent sends once it has
mapped the segment, before judging it: the deployment computes on while its last tap is judged (at most
one more segment exists meanwhile; a tap over ``EARLY_ACK_MAX`` is acknowledged after judging instead).

A crash (segfault, abort, ``os._exit``, a driver error killing the process), a hang past the call's
deadline or an out-of-memory kill becomes a ``DeploymentError`` naming the phase, the last tap seen and
the signal or exit code (exit 3 at the CLI); the child is killed and its segments unlinked on every
path. A gate killed outright (SIGKILL, a CI timeout) takes its child with it: the child watches for
its parent and exits within a second, even in the middle of a call. One child (``DeploymentHost``) serves every deployment of a gate run, so the spawn start-up
(about 1-2 s, mostly importing torch) is paid once per run, not per check; a dead child is replaced on
the next ``open``.

``inline``: the deployment runs in the harness's own process (for debugging with pdb, or for factories
that cannot be pickled: those fall back to inline and the verdict's provenance says why). Inline calls
have no deadline: nothing can interrupt a hung call in the same process.
"""
from __future__ import annotations

import atexit
import itertools
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness.deployment.loader import (DeploymentError, call_deployment, describe, load_factory,
                                       refuse_golden_access, summarise_exception)
from harness.errors import HarnessError
from harness.memory import release

ISOLATIONS = ("process", "inline")
PIPE_MAX = 1 << 20  # bytes: larger tensors go through shared memory
PIPE_MAX_ENV = "NPU_HARNESS_PIPE_MAX"  # overrides PIPE_MAX (tests drive the shared-memory path with tiny models)
SHM_DIR = Path("/dev/shm")
# Default deadlines: a generous floor plus a term proportional to the work, at a pace far below any CPU
# (so a slow machine never trips them, and a hang still ends).
BUILD_FLOOR_S = 120.0        # spawn start-up, torch import, weight load or upload
BUILD_S_PER_PARAM = 1e-7     # 10 M parameters per second
CALL_FLOOR_S = 60.0
CALL_S_PER_PARAM_TOKEN = 2e-8  # 50 M parameter-tokens per second (~100 MFLOP/s)
POLL_S = 0.5
# Shared-memory taps up to this size are acknowledged before they are judged, so judging (on the parent's
# core) overlaps the deployment's next op; a larger one (a 2048-token logits tap is 1.2 GB) is
# acknowledged after, so it never exists beside the next one.
EARLY_ACK_MAX = 256 << 20


class DeploymentCrash(DeploymentError):
    """The deployment's process died (signal or exit) while building or running."""


class DeploymentTimeout(DeploymentError):
    """The deployment did not finish a call within its deadline and was killed."""


@dataclass(frozen=True)
class Unjudgeable:
    """A value the child could not send as a float32 array, with the message the judge reports."""

    message: str

    @property
    def unjudgeable_message(self) -> str:  # what harness.checker.as_float32 looks for
        return self.message


def approx_params(spec: Any) -> int:
    """Parameters of ``spec`` (attention, MLP, embedding and head), for deadlines."""
    h, i, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    qkv = spec.head_dim * (spec.num_heads * 2 + spec.num_kv_heads * 2) * h
    head = spec.vocab_size * h * (1 if spec.tied_embeddings else 2)
    return int(layers * (qkv + 3 * h * i) + head)


@dataclass(frozen=True)
class Deadlines:
    """Seconds allowed per deployment call: ``timeout`` for each when given, else derived from the work."""

    timeout: float | None = None

    def build(self, spec: Any) -> float:
        """Building (child start-up, imports, weight load, factory) keeps its derived deadline: ``timeout``
        is for the steady-state calls, and only ever lengthens this one."""
        derived = BUILD_FLOOR_S + BUILD_S_PER_PARAM * approx_params(spec)
        return derived if self.timeout is None else max(derived, self.timeout)

    def call(self, spec: Any, tokens: int, calls: int = 1) -> float:
        if self.timeout is not None:
            return self.timeout * calls
        return calls * (CALL_FLOOR_S + CALL_S_PER_PARAM_TOKEN * approx_params(spec) * max(tokens, 1))


def validate_isolation(isolation: Any) -> None:
    if not isinstance(isolation, DeploymentHost) and isolation not in ISOLATIONS:
        raise HarnessError(f"--isolation {isolation!r}: expected one of {', '.join(ISOLATIONS)}")


def validate_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise HarnessError(f"--timeout {timeout!r}: expected a positive number of seconds")


def spawn_target(target: str | Callable | None) -> tuple[Any, str | None]:
    """What the child rebuilds the factory from, or ``(None, why not)`` when it cannot be sent."""
    if target is None or isinstance(target, str):
        return target, None
    text = getattr(target, "spawn_target", None)
    if isinstance(text, str):
        return text, None
    try:
        pickle.dumps(target)
    except Exception as exc:
        return None, f"factory {describe(target)} cannot be pickled ({type(exc).__name__}: {str(exc)[:120]})"
    return target, None


# -- tensors on the wire ---------------------------------------------------------------------------
def _segment_prefix(child_pid: int) -> str:
    return f"npuh{child_pid}-"


# -- arrays a deployment allocates in shared memory (no copy on the way to the parent) ----------------
_SHARED: dict[int, tuple[str, int]] = {}  # in the child: data address -> (segment name, bytes)
_CHILD: dict[str, Any] = {}  # in the child: the segment prefix and counter (unset in the harness's process)


def shared_array(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """An uninitialised array for a large output the deployment will hand over (its logits: 1.2 GB at
    2048 tokens and a 151936-token vocabulary). In a deployment's child process it lives in a
    shared-memory segment that reaches the parent without a copy, as a tap or as the returned value;
    elsewhere (inline, or below the pipe limit) it is ``np.empty``. The segment goes when the array
    (and every view of it) does."""
    import mmap
    import weakref

    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not _CHILD or nbytes <= int(os.environ.get(PIPE_MAX_ENV, PIPE_MAX)) or not SHM_DIR.is_dir():
        return np.empty(shape, dtype)
    name = f"{_CHILD['prefix']}o{next(_CHILD['counter'])}"
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    _SHARED[arr.ctypes.data] = (name, nbytes)
    weakref.finalize(arr, _drop_shared, arr.ctypes.data, name)
    return arr


def _drop_shared(address: int, name: str) -> None:
    _SHARED.pop(address, None)
    try:
        os.unlink(SHM_DIR / name)
    except OSError:
        pass


def pack(value: Any, prefix: str, counter: Any) -> tuple:
    """``("pipe", value)``, or for a large numeric array ``("shm", name, shape, dtype)`` (the receiver
    copies it out and unlinks the segment), or for a whole ``shared_array`` ``("owned", name, shape,
    dtype)`` (the receiver maps it; the sender keeps it until the receiver's next message)."""
    limit = int(os.environ.get(PIPE_MAX_ENV, PIPE_MAX))
    owned = _SHARED.get(value.ctypes.data) if isinstance(value, np.ndarray) and value.nbytes > limit else None
    if owned is not None and owned[1] == value.nbytes and value.flags.c_contiguous:
        return ("owned", owned[0], value.shape, value.dtype.str)
    if isinstance(value, np.ndarray) and value.nbytes > limit and value.dtype.kind in "biufc":
        from multiprocessing import shared_memory

        name = f"{prefix}{next(counter)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=value.nbytes)
        try:
            np.ndarray(value.shape, value.dtype, buffer=shm.buf)[...] = value
        finally:
            shm.close()
        return ("shm", name, value.shape, value.dtype.str)
    return ("pipe", value)


def unpack(packed: tuple) -> Any:
    if packed[0] == "pipe":
        return packed[1]
    from multiprocessing import shared_memory

    kind, name, shape, dtype = packed
    mapped = _map_segment(name)  # the segment's pages themselves, without a copy (Linux /dev/shm)
    if kind == "owned":  # the child's shared_array: its name stays until the child drops the array
        if mapped is None:
            raise DeploymentError(f"deployment host: shared array {name} is gone")
        return np.ndarray(shape, np.dtype(dtype), buffer=mapped)
    shm = shared_memory.SharedMemory(name=name)
    try:
        if mapped is not None:
            return np.ndarray(shape, np.dtype(dtype), buffer=mapped)
        return np.ndarray(shape, np.dtype(dtype), buffer=shm.buf).copy()
    finally:
        shm.close()
        shm.unlink()  # the name goes now; the pages go with the returned array


def _map_segment(name: str):
    """A private read-write map of shared-memory segment ``name`` that lives as long as the array built
    on it (None where segments are not files under /dev/shm). A full-scale logits tap (2048 x 151936
    fp32, 1.2 GB) is then held once, not once in the segment and once in a copy."""
    import mmap

    try:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _unlink_segments(prefix: str) -> None:
    """Remove segments a dead child (or an aborted call) left behind."""
    if not SHM_DIR.is_dir():
        return
    from multiprocessing import shared_memory

    for path in SHM_DIR.glob(prefix + "*"):
        try:
            shm = shared_memory.SharedMemory(name=path.name)  # attach, so unlink also unregisters it
            shm.close()
            shm.unlink()
        except (FileNotFoundError, OSError):
            pass


# -- the child ---------------------------------------------------------------------------------------
def _child_tap(conn: Any, how: str, prefix: str, counter: Any) -> Callable:
    from harness.checker import as_float32
    from harness.perf.timing import noop_tap

    if how == "none":
        return noop_tap

    def send(name: str, value: Any, observe: bool) -> Any:
        arr, problem = as_float32(name, value)
        packed = pack(arr, prefix, counter) if problem is None else ("pipe", Unjudgeable(problem))
        echo = how == "echo" and not observe
        wants_reply = echo or packed[0] in ("shm", "owned")  # the parent maps a segment before we go on
        conn.send(("tap", name, packed, wants_reply, observe))
        if not wants_reply:
            return value
        reply = conn.recv()
        return unpack(reply[1]) if echo else value

    def tap(name: str, value: Any) -> Any:
        return send(name, value, False)

    tap.observe = lambda name, value: send(name, value, True)  # type: ignore[attr-defined]  # judged, not forced
    return tap


def _error(exc: BaseException) -> tuple:
    if isinstance(exc, HarnessError):
        return ("error", "harness", str(exc))
    return ("error", "raised", summarise_exception(exc))


def _follow(paths: list[str], cwd: str) -> None:
    """Import from where the parent imports now: a long-lived child was spawned with the parent's sys.path
    and working directory of that moment (a deployment module added to sys.path later must still load)."""
    for entry in reversed(paths):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        if os.getcwd() != cwd:
            os.chdir(cwd)
    except OSError:
        pass


def _forget_moved(target: Any) -> None:
    """Drop a top-level deployment module imported earlier from a file that is no longer the one its
    name finds now (a later test or user writes a module of the same name elsewhere)."""
    if not isinstance(target, str) or ":" not in target:
        return
    name = target.split("[", 1)[0].rpartition(":")[0]
    module = sys.modules.get(name)
    if "." in name or module is None or not getattr(module, "__file__", None):
        return
    from importlib.machinery import PathFinder

    found = PathFinder.find_spec(name, sys.path)
    if found is None or found.origin != module.__file__:
        del sys.modules[name]


ORPHAN_POLL_S = 1.0


def _exit_with_parent() -> None:
    """End this child when the gate's process goes, even mid-call. A gate killed outright (SIGTERM from
    a CI timeout, SIGKILL, the OOM killer) never tells its child, and a child busy in a long call only
    notices the closed pipe at its next message: a qwen3-4b timing round kept computing for 50 minutes
    after its gate was gone. A daemon thread watches for the reparenting."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(ORPHAN_POLL_S)
            if os.getppid() != parent:
                os._exit(1)  # nobody reads our results any more

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _build_deployment(target: Any, model: str, scale: str, weights_path: str | None, seed: int, paths: list[str],
                      cwd: str) -> Any:
    """A deployment built in the child from its factory and its own lazy weights (load_weights)."""
    from harness.spec.model_spec import get
    from harness.weights import WeightsSource, load_weights

    _follow(paths, cwd)
    _forget_moved(target)
    spec = get(model, scale)
    factory = load_factory(target)
    refuse_golden_access(factory, target)
    weights = load_weights(spec, WeightsSource(weights_path), seed)
    try:
        dep = factory(spec, weights)
    except HarnessError:
        raise
    except Exception as exc:
        raise DeploymentError(f"deployment raised in factory: {summarise_exception(exc)}") from exc
    for method in ("prefill", "decode"):
        if not callable(getattr(dep, method, None)):
            raise DeploymentError(f"deployment {describe(target)} has no {method}() method")
    return dep


def child_main(conn: Any) -> None:
    """The child's loop: build deployments, run their calls, stream taps; exits when the parent goes."""
    import faulthandler

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it kills us)
    faulthandler.enable()  # a segfault in the deployment prints its Python stack before the parent reports it
    _exit_with_parent()
    try:  # what nearly every deployment (and the emulator, and synthetic weights) imports: do it while idle
        import torch  # noqa: F401
    except ImportError:
        pass
    from harness.checker import as_float32

    prefix, counter = _segment_prefix(os.getpid()), itertools.count()
    _CHILD.update(prefix=prefix, counter=counter)
    deployments: dict[int, Any] = {}
    ids = itertools.count()
    handed: Any = None  # the last call's returned shared_array: the parent maps it before its next message
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        handed = None
        kind = msg[0]
        if kind == "close":
            return
        if kind == "drop":
            deployments.pop(msg[1], None)
            release()  # a dropped deployment's memory (GBs at full scale) is free before the next is built
            continue
        start = time.perf_counter()
        try:
            if kind == "build":
                dep_id = next(ids)
                # Built in a function: no local of this loop keeps a deployment (or its weights) alive once
                # it is dropped. One did: a dropped qwen3-4b emulator (3.1 GB) stayed until the next one was
                # built beside it, the child's peak of a 256-token gate (6.9 GB with the parent).
                deployments[dep_id] = _build_deployment(*msg[1:])
                reply: tuple = ("done", ("pipe", dep_id), time.perf_counter() - start)
            elif kind == "call":
                _, dep_id, method, arg, how = msg
                tap = _child_tap(conn, how, prefix, counter)
                out = getattr(deployments[dep_id], method)(arg, tap)
                seconds = time.perf_counter() - start
                arr, problem = as_float32("logits (returned)", out)
                reply = ("done", pack(arr, prefix, counter) if problem is None else ("pipe", Unjudgeable(problem)),
                         seconds)
                if reply[1][0] == "owned":
                    handed = arr
                del out, arr  # the segment holds the logits now: 1.2 GB at 2048 tokens, not kept into the next call
                if method == "prefill":  # its activations' freed heap, before the decode steps
                    release()
            elif kind == "run":
                _, dep_id, fn, args = msg
                reply = ("done", ("pipe", fn(deployments[dep_id], *args)), time.perf_counter() - start)
            else:
                reply = ("error", "harness", f"deployment host: unknown request {kind!r}")
        except Exception as exc:
            reply = (*_error(exc), time.perf_counter() - start)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


# -- the parent side -----------------------------------------------------------------------------------
def _how_it_died(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = {"SIGSEGV": "a segmentation fault", "SIGABRT": "an abort", "SIGBUS": "a bus error",
               "SIGKILL": "killed: out of memory (the kernel's OOM killer) or kill -9",
               "SIGFPE": "a floating-point exception", "SIGILL": "an illegal instruction"}.get(name, "")
        return f"killed by {name}" + (f" ({why})" if why else "")
    return f"exited with code {exitcode} (sys.exit / os._exit in the deployment)"


class DeploymentHost:
    """Runs deployments in one reusable child process (``process``) or in this process (``inline``).

    ``open(target, spec, source, seed)`` returns a deployment proxy; ``seconds`` sums the time spent
    inside deployments (factory, prefill, decode, as measured where they run); ``close()`` (also a
    context manager) kills and reaps the child. Safe to reuse after a crash: the next ``open`` starts
    a fresh child.
    """

    def __init__(self, isolation: str = "process", timeout: float | None = None):
        validate_isolation(isolation)
        validate_timeout(timeout)
        self.isolation = isolation
        self.deadlines = Deadlines(timeout)
        self.seconds = 0.0
        self._proc: Any = None
        self._conn: Any = None
        self._counter = itertools.count()

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "DeploymentHost":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start the child now (``process`` only; non-blocking): its start-up (spawn, imports) then overlaps
        with the caller's own work (a gate's phases 0-1) instead of delaying the first deployment."""
        if self.isolation == "process" and (self._proc is None or not self._proc.is_alive()):
            self.kill()
            self._start()

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=child_main, args=(child,), daemon=True, name="npu-harness-deployment")
        proc.start()
        child.close()  # only the child holds its end now: its death reads as EOF here
        self._proc, self._conn = proc, parent

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill(self) -> None:
        """Kill the child (if any) and remove what it left in shared memory."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is None:
            return
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        if conn is not None:
            conn.close()
        _unlink_segments(_segment_prefix(proc.pid))
        if proc.exitcode is not None:
            proc.close()

    def close(self) -> None:
        """Ask the child to exit, then make sure it has: it holds nothing worth a clean shutdown, so after a
        short grace period it is killed (torch's interpreter teardown alone can take seconds)."""
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(("close",))
                self._proc.join(0.2)
            except (BrokenPipeError, OSError):
                pass
        self.kill()

    # -- messages ------------------------------------------------------------------------------------
    def send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the child is gone: receive() reports how

    def receive(self, phase: str, deadline: float, budget: float, last_tap: str | None) -> tuple:
        """The child's next message, or DeploymentCrash / DeploymentTimeout naming ``phase``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise DeploymentTimeout(f"deployment did not finish {phase} within its deadline of {budget:.3g} s "
                                        f"(--timeout); {_last(last_tap)}; the deployment was killed")
            try:
                ready = self._conn.poll(min(remaining, POLL_S))
            except (OSError, EOFError):
                ready = True
            if not ready and self._proc.is_alive():
                continue
            try:
                return self._conn.recv()
            except (EOFError, OSError):
                pass
            self._proc.join(5)
            how = _how_it_died(self._proc.exitcode)
            self.kill()
            raise DeploymentCrash(f"deployment crashed in {phase}: {how}; {_last(last_tap)}")

    def request(self, phase: str, msg: tuple, budget: float, on_tap: Callable | None = None,
                last_tap: Callable[[], str | None] = lambda: None) -> tuple[Any, float]:
        """Send ``msg``, serve the taps it streams, return (result, seconds inside the deployment)."""
        self.send(msg)
        deadline = time.monotonic() + budget
        try:
            while True:
                reply = self.receive(phase, deadline, budget, last_tap())
                if reply[0] == "tap":
                    if on_tap is None:
                        raise DeploymentError(f"deployment host: a tap arrived outside a call in {phase}")
                    on_tap(reply)
                    continue
                seconds = reply[-1]
                self.seconds += seconds
                if reply[0] == "done":
                    return unpack(reply[1]), seconds
                _, kind, message, _ = reply
                if kind == "harness":
                    raise DeploymentError(message)
                raise DeploymentError(f"deployment raised in {phase}: {message}")
        except DeploymentError:
            raise
        except BaseException:
            self.kill()  # a judge error, Ctrl-C or a harness bug mid-call: the child's state is unknown
            raise

    # -- deployments ----------------------------------------------------------------------------------
    def open(self, target: str | Callable | None, spec: Any, source: Any, seed: int) -> Any:
        """A deployment of ``spec`` built by ``target`` with the weights of ``source`` and ``seed``."""
        if callable(target):
            refuse_golden_access(target, target)
        sendable, why_not = spawn_target(target)
        if self.isolation == "inline" or why_not is not None:
            return InlineDeployment(self, target, spec, source, seed, note=why_not)
        if self._proc is None or not self._proc.is_alive():
            self.kill()
            self._start()
        budget = self.deadlines.build(spec)
        dep_id, _ = self.request("factory", ("build", sendable, spec.id, spec.scale, source.path, seed,
                                             list(sys.path), os.getcwd()), budget)
        return RemoteDeployment(self, dep_id, spec, describe(target))


def _last(tap: str | None) -> str:
    return f"last tap seen: {tap}" if tap else "no tap handed over before"


def _tap_mode(tap: Callable | None) -> str:
    """``none`` (no taps sent), ``own`` (the deployment keeps its value) or ``echo`` (tap's answer returns)."""
    from harness.perf.timing import noop_tap

    if tap is None or tap is noop_tap:
        return "none"
    return "own" if getattr(tap, "returns_own_value", False) else "echo"


class RemoteDeployment:
    """The parent's proxy of a deployment living in a DeploymentHost's child."""

    def __init__(self, host: DeploymentHost, dep_id: int, spec: Any, name: str):
        self.host, self.id, self.spec, self.name = host, dep_id, spec, name
        self.child_pid = host.pid
        self.isolation = {"mode": "process", "pid": host.pid}
        self.last_tap: str | None = None
        self._step = 0
        self._reply_counter = itertools.count()

    def _call(self, phase: str, method: str, arg: Any, tokens: int, tap: Callable | None) -> Any:
        how = _tap_mode(tap)
        prefix = _segment_prefix(self.child_pid) + "p"

        def on_tap(msg: tuple) -> None:
            _, name, packed, wants_reply, observe = msg
            self.last_tap = f"{phase} {name}"
            value = unpack(packed)
            echo = how == "echo" and not observe
            # A "shm" segment is the parent's alone once mapped (the child closed it, the name is gone): the
            # child may go on at once. An "owned" array stays the child's, and an echo needs the answer.
            early = wants_reply and not echo and packed[0] == "shm" and value.nbytes <= EARLY_ACK_MAX
            if early:
                self.host.send(("ack",))
            if observe:
                judge = getattr(tap, "observe", None)
                answer = judge(name, value) if callable(judge) else tap(name, value)
            else:
                answer = tap(name, value)
            del value
            if wants_reply and not early:
                if echo:
                    self.host.send(("value", pack(answer, prefix, self._reply_counter)))
                else:
                    self.host.send(("ack",))

        self.last_tap = None
        budget = self.host.deadlines.call(self.spec, tokens)
        out, _ = self.host.request(phase, ("call", self.id, method, arg, how), budget, on_tap,
                                   lambda: self.last_tap)
        return out

    def prefill(self, input_ids: Any, tap: Callable | None) -> Any:
        self._step = 0
        ids = np.asarray(input_ids)
        return self._call("prefill", "prefill", ids, int(ids.size), tap)

    def decode(self, token_id: Any, tap: Callable | None) -> Any:
        phase = f"decode.{self._step}"
        self._step += 1
        return self._call(phase, "decode", token_id, 1, tap)

    def run(self, fn: Callable, *args: Any, phase: str = "run", tokens: int = 1, calls: int = 1) -> Any:
        """``fn(deployment, *args)`` where the deployment lives (``fn`` must be picklable by reference)."""
        budget = self.host.deadlines.call(self.spec, tokens, calls)
        out, _ = self.host.request(phase, ("run", self.id, fn, args), budget)
        return out

    def close(self) -> None:
        if self.host._proc is not None and self.host.pid == self.child_pid:
            self.host.send(("drop", self.id))


class InlineDeployment:
    """A deployment built and run in this process (``--isolation inline``), timed like a remote one."""

    def __init__(self, host: DeploymentHost, target: Any, spec: Any, source: Any, seed: int, note: str | None = None):
        from harness.weights import load_weights

        self.host, self.spec, self.name = host, spec, describe(target)
        self.isolation: dict[str, Any] = {"mode": "inline"}
        if note:
            self.isolation["reason"] = note + "; ran in the harness's own process (no crash or hang protection)"
        build = load_factory(target)
        refuse_golden_access(build, target)
        weights = load_weights(spec, source, seed)
        self.inner = self._timed("factory", build, spec, weights)
        for method in ("prefill", "decode"):
            if not callable(getattr(self.inner, method, None)):
                raise DeploymentError(f"deployment {self.name} has no {method}() method")

    def _timed(self, what: str, fn: Callable, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return call_deployment(what, fn, *args)
        finally:
            self.host.seconds += time.perf_counter() - start

    def prefill(self, input_ids: Any, tap: Callable | None) -> Any:
        from harness.perf.timing import noop_tap

        self._step = 0
        return self._timed("prefill", self.inner.prefill, input_ids, tap or noop_tap)

    def decode(self, token_id: Any, tap: Callable | None) -> Any:
        from harness.perf.timing import noop_tap

        phase = f"decode.{getattr(self, '_step', 0)}"
        self._step = getattr(self, "_step", 0) + 1
        return self._timed(phase, self.inner.decode, token_id, tap or noop_tap)

    def run(self, fn: Callable, *args: Any, phase: str = "run", tokens: int = 1, calls: int = 1) -> Any:
        return self._timed(phase, fn, self.inner, *args)

    def close(self) -> None:
        self.inner = None


_SHARED: dict[tuple[str, float | None], DeploymentHost] = {}


def shared_host(isolation: str, timeout: float | None) -> DeploymentHost:
    """This process's host for ``(isolation, timeout)``, kept between ``harness.check`` calls so a caller
    checking many deployments pays the child's start-up (importing torch: seconds) once; it is closed at
    exit, and after a crash or timeout its next ``open`` starts a fresh child."""
    key = (isolation, timeout)
    host = _SHARED.get(key)
    if host is None:
        host = _SHARED[key] = DeploymentHost(isolation, timeout)
        atexit.register(host.close)
    return host


def open_deployment(isolation: "str | DeploymentHost", timeout: float | None, target: Any, spec: Any, source: Any,
                    seed: int) -> tuple[Any, DeploymentHost | None]:
    """A deployment on ``isolation``: a host to reuse, or a mode (then this process's shared host for it).
    The second value is a host the caller must close (none: hosts are the caller's or shared)."""
    host = isolation if isinstance(isolation, DeploymentHost) else shared_host(isolation, timeout)
    return host.open(target, spec, source, seed), None
