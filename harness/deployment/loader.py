"""Resolve ``--deployment MODULE:FACTORY`` strings to factories, with errors a user can act on."""
from __future__ import annotations

import importlib
import re
import traceback
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError

_HARNESS_DIR = str(Path(__file__).resolve().parents[1])

DEFAULT_DEPLOYMENT = "harness.deployment.emulator:factory"
# Short names for the built-in deployments (``harness list`` shows them).
BUILTIN = {
    "emulator": DEFAULT_DEPLOYMENT,
    "replay-bf16": "harness.deployment.replay:bf16_replay",
    "replay-fp32": "harness.deployment.replay:fp32_replay",
}


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
    target = BUILTIN.get(target, target)
    if ":" not in target:
        raise DeploymentError(f"--deployment {target!r}: expected MODULE:FACTORY (e.g. {DEFAULT_DEPLOYMENT})")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DeploymentError(f"--deployment {target!r}: cannot import {module_name}: {summarise_exception(exc)}") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DeploymentError(f"--deployment {target!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise DeploymentError(f"--deployment {target!r}: {attr} is not callable")
    return obj


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
