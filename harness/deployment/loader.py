"""Resolve ``--deployment MODULE:FACTORY`` strings to factories, with errors a user can act on."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError

_HARNESS_DIR = str(Path(__file__).resolve().parents[1])

DEFAULT_DEPLOYMENT = "harness.deployment.emulator:factory"
# Short names for the built-in deployments (``harness list`` shows them).
BUILTIN = {
    "emulator": DEFAULT_DEPLOYMENT,
    "replay-bf16": "harness.deployment.replay:bf16_replay",
    "replay-fp32": "harness.deployment.replay:fp32_replay",
}
# The validation population (docs/validation.md): independent correct deployments, and the one the
# gate must fail (numpy-bf16-rmsnorm-stats).
BUILTIN.update({name: f"harness.deployment.validation:{name.replace('-', '_')}" for name in (
    "numpy-fp32", "numpy-f64", "numpy-bf16-pairwise", "numpy-bf16-blocked", "hf-bf16-sdpa", "hf-bf16-eager",
    "numpy-flash-bf16stats", "numpy-flash48-bf16stats", "numpy-fused", "numpy-bf16-twopass-norm",
    "numpy-bf16-rmsnorm-stats")})


class DeploymentError(HarnessError):
    """The deployment could not be imported, built or run (exit code 3), with its traceback summarised."""


def summarise_exception(exc: BaseException, frames: int = 3) -> str:
    """``Type: message`` plus the innermost frames as ``file:line in func``."""
    tb = traceback.extract_tb(exc.__traceback__)
    # Frames of the harness itself say nothing about the deployment's bug: show the deployment's own.
    own = [f for f in tb if not f.filename.startswith(_HARNESS_DIR)]
    tb = (own or tb)[-frames:]
    where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in tb)
    return f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")


def call_deployment(what: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``; anything the deployment raises (but a HarnessError) becomes a DeploymentError naming
    ``what`` and the deployment's own frames."""
    try:
        return fn(*args)
    except HarnessError:
        raise
    except Exception as exc:
        raise DeploymentError(f"deployment raised in {what}: {summarise_exception(exc)}") from exc


_KNOBS_RE = re.compile(r"^emulator\[(.*)\]$")


def _knob_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def emulator_with_knobs(target: str) -> Callable | None:
    """``emulator[slowdown=1.15,acc_dtype=bf16]`` -> the emulator with those EmulatorConfig knobs
    (``faults=a+b`` switches on faults), so a kernel design can be gated from the command line."""
    m = _KNOBS_RE.match(target)
    if m is None:
        return None
    from harness.deployment.emulator import make_factory

    knobs, faults = {}, ()
    for item in filter(None, (part.strip() for part in m.group(1).split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DeploymentError(f"--deployment {target!r}: {item!r} is not KNOB=VALUE")
        if key.strip() == "faults":
            faults = tuple(filter(None, value.split("+")))
        else:
            knobs[key.strip()] = _knob_value(value.strip())
    factory = make_factory(faults=faults, **knobs)
    factory.name = target
    factory.spawn_target = target  # a child process rebuilds it from this string (the closure cannot be pickled)
    return factory


def load_factory(target: str | Callable | None) -> Callable:
    """A factory from ``pkg.module:factory``, a built-in short name, ``emulator[KNOB=VALUE,...]``, or a
    callable (returned as is)."""
    if target is None:
        target = DEFAULT_DEPLOYMENT
    if callable(target):
        return target
    knobbed = emulator_with_knobs(target)
    if knobbed is not None:
        return knobbed
    given = target
    target, kwargs = _split_kwargs(target)
    target = BUILTIN.get(target, target)
    if ":" not in target:
        raise DeploymentError(f"--deployment {given!r}: expected MODULE:FACTORY or FILE.py:FACTORY "
                              f"(e.g. {DEFAULT_DEPLOYMENT})")
    module_name, _, attr = target.rpartition(":")
    module = _import(given, module_name)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DeploymentError(f"--deployment {target!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise DeploymentError(f"--deployment {target!r}: {attr} is not callable")
    if kwargs:
        return _with_kwargs(obj, kwargs, given)
    return obj


_KWARGS_RE = re.compile(r"^(.*)\[(.*)\]$")


def _split_kwargs(target: str) -> tuple[str, dict]:
    """``pkg.mod:factory[dtype=float32,block=16]`` -> (``pkg.mod:factory``, {"dtype": "float32", "block": 16})."""
    m = _KWARGS_RE.match(target)
    if m is None:
        return target, {}
    kwargs = {}
    for item in filter(None, (part.strip() for part in m.group(2).split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise DeploymentError(f"--deployment {target!r}: {item!r} is not KEY=VALUE")
        kwargs[key.strip()] = _knob_value(value.strip())
    return m.group(1), kwargs


def _with_kwargs(factory: Callable, kwargs: dict, given: str) -> Callable:
    """The factory with its keyword arguments bound; a wrong keyword is named when it is called."""
    def bound(spec, weights):  # type: ignore[no-untyped-def]
        try:
            return factory(spec, weights, **kwargs)
        except TypeError as exc:
            if "keyword argument" in str(exc):
                raise DeploymentError(f"--deployment {given!r}: {exc}") from None
            raise

    bound.name = given  # type: ignore[attr-defined]
    return bound


def _import(given: str, module_name: str):  # type: ignore[no-untyped-def]
    """A module by dotted name (the current directory is searched too, as ``python -m`` does) or a
    ``.py`` file by path."""
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise DeploymentError(f"--deployment {given!r}: no file {path}")
            spec = importlib.util.spec_from_file_location(f"_harness_deployment_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[spec.name] = module  # type: ignore[union-attr]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        return importlib.import_module(module_name)
    except DeploymentError:
        raise
    except Exception as exc:
        raise DeploymentError(f"--deployment {given!r}: cannot import {module_name}: {summarise_exception(exc)}") from exc


def identity(target: str | Callable | None) -> str:
    """The deployment's identity for the performance history: one series per identity. Built-ins by
    their short name; the emulator's knobs sorted, with knobs at their default value left out, so
    ``emulator``, ``emulator[]``, ``emulator[k_tile=64]`` and the default deployment are one series and
    ``emulator[slowdown=1.15]`` another; anything else as ``describe`` names it."""
    name = describe(target)
    short = {v: k for k, v in BUILTIN.items()}
    if name in short:
        return short[name]
    m = _KNOBS_RE.match(name)
    if m is None:
        return name
    from dataclasses import fields

    from harness.deployment.emulator.config import EmulatorConfig

    defaults = {f.name: f.default for f in fields(EmulatorConfig)}
    knobs = []
    for item in filter(None, (part.strip() for part in m.group(1).split(","))):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key in defaults and _knob_value(value) == defaults[key]:
            continue
        knobs.append(f"{key}={value}")
    return f"emulator[{','.join(sorted(knobs))}]" if knobs else "emulator"


def code_digest(target: str | Callable | None) -> str:
    """sha256 (16 hex digits) of the source file that defines a user's deployment factory, "" for the
    built-ins (their code is the harness's own) or where no file can be found. Phase 7 derives its seed
    from it, so every edit of the deployment meets a fresh re-check instead of one it could be tuned to."""
    if target is None or (isinstance(target, str) and (emulator_with_knobs(target) is not None
                                                       or _split_kwargs(target)[0] in BUILTIN)):
        return ""
    path: str | None = None
    try:
        if callable(target):
            path = inspect.getsourcefile(getattr(target, "__wrapped__", target))
        else:
            module_name = _split_kwargs(target)[0].rpartition(":")[0]
            if module_name.endswith(".py"):
                path = str(Path(module_name).resolve())
            else:
                found = importlib.util.find_spec(module_name)
                path = found.origin if found is not None else None
        if not path or not Path(path).is_file() or Path(path).resolve().is_relative_to(_HARNESS_DIR):
            return ""  # the harness's own code (a built-in, or a wrapper such as bound keyword arguments)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except (ImportError, OSError, TypeError, ValueError):
        return ""


def describe(target: str | Callable | None) -> str:
    """A name for provenance and reports."""
    if target is None:
        return DEFAULT_DEPLOYMENT
    if callable(target):
        return getattr(target, "name", None) or f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"
    return BUILTIN.get(target, target)


def refuse_golden_access(factory: Callable, target: str | Callable | None = None) -> None:
    """Raise DeploymentError when ``factory`` asks for the goldens (``needs_golden``): a gated deployment
    never gets them, or a five-line replay of the golden set would pass every tap phase."""
    if getattr(factory, "needs_golden", False):
        raise DeploymentError(
            f"--deployment {describe(target if target is not None else factory)}: the factory asks for the goldens "
            "(needs_golden); a gated deployment never gets them. Reference replays are judged only through "
            "harness.deployment.replay.check_replay, whose verdicts say so.")
