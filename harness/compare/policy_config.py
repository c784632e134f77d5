"""Which policy judges which tap: a ``PolicySet`` keyed by tap kind, optionally by phase.

Keys: ``default``, a tap kind (``logits``, ``q_rope``, ...), ``<phase>:<kind>`` or
``<phase>:default`` where phase is ``prefill``, ``decode`` (every decode step) or ``decode.<n>``.
``lookup(kind, phase)`` takes the most specific: ``decode.2:logits``, ``decode:logits``, ``logits``,
``decode.2:default``, ``decode:default``, ``default``.

Sources, merged in order (later wins per key): the built-in defaults, ``[tool.npu-harness.policy]``
of a pyproject.toml, the per-model file ``models/<folder>/policy.toml`` (top-level keys), then
explicit overrides (a dict, or CLI strings ``kind=policy-text``). Values are policy texts
(``"allclose:rtol=0.04,atol=0.15"``) or inline tables (``{policy = "calibrated", r_max = 3.0}``).
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.compare.policies import Policy, make_policy, parse_policy
from harness.errors import HarnessError
from harness.spec.model_spec import folder_name, models_dir
from harness.spec.taps import GLOBAL_HEAD, GLOBAL_TAIL, LAYER_KINDS

KINDS: tuple[str, ...] = (*GLOBAL_HEAD, *LAYER_KINDS, *GLOBAL_TAIL)
BUILTIN: dict[str, str] = {"default": "calibrated"}
_PHASE_RE = re.compile(r"^(prefill|decode|decode\.\d+)$")


def _check_key(key: str, where: str) -> None:
    """HarnessError naming ``where`` unless key is default, a kind, or phase:kind / phase:default."""
    phase, sep, kind = key.rpartition(":")
    if sep and not _PHASE_RE.match(phase):
        raise HarnessError(f"{where}: bad phase {phase!r} in key {key!r}; expected prefill, decode or decode.<n>")
    if kind != "default" and kind not in KINDS:
        raise HarnessError(f"{where}: unknown tap kind {kind!r} in key {key!r}; kinds: default, {', '.join(KINDS)}")


def _policy(value: Any, where: str) -> Policy:
    if isinstance(value, Mapping):
        params = dict(value)
        name = params.pop("policy", None)
        if not isinstance(name, str):
            raise HarnessError(f"{where}: an inline table needs policy = \"<name>\", got {dict(value)!r}")
        return make_policy(name, params, where=where)
    return parse_policy(value, where=where)


@dataclass(frozen=True)
class PolicySet:
    """Policies by key with the source each came from; build with ``load`` or ``merged``."""

    entries: dict[str, tuple[Policy, str]] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> PolicySet:
        """The built-in defaults: ``calibrated`` everywhere."""
        return cls().merged(BUILTIN, "built-in")

    def merged(self, mapping: Mapping[str, Any], source: str) -> PolicySet:
        """A new set with ``mapping``'s keys added or replaced; errors name ``source`` and the key."""
        entries = dict(self.entries)
        for key, value in mapping.items():
            where = f"{source}: key {key!r}"
            _check_key(str(key), where)
            entries[str(key)] = (_policy(value, where), source)
        return PolicySet(entries)

    @classmethod
    def load(cls, *, pyproject: str | Path | None = None, model: str | None = None,
             model_file: str | Path | None = None,
             overrides: Mapping[str, Any] | Iterable[str] | None = None) -> PolicySet:
        """Merge built-in defaults, ``pyproject``'s ``[tool.npu-harness.policy]``, the model's
        ``policy.toml`` (``model_file``, or ``models/<folder>/policy.toml`` for model id ``model``;
        absent files are skipped) and ``overrides``."""
        ps = cls.builtin()
        if pyproject is not None:
            data = _read_toml(Path(pyproject))
            section = data.get("tool", {}).get("npu-harness", {}).get("policy", {})
            if not isinstance(section, Mapping):
                raise HarnessError(f"{pyproject}: [tool.npu-harness.policy] must be a table")
            ps = ps.merged(section, f"{pyproject} [tool.npu-harness.policy]")
        path = Path(model_file) if model_file is not None else (
            models_dir() / folder_name(model) / "policy.toml" if model else None)
        if path is not None and path.exists():
            ps = ps.merged(_read_toml(path), str(path))
        if overrides is not None:
            ps = ps.merged(_override_map(overrides), "overrides")
        return ps

    @classmethod
    def for_model(cls, spec: Any, *, overrides: Mapping[str, Any] | Iterable[str] | str | None = None,
                  pyproject: str | Path | None = None) -> PolicySet:
        """``load`` for a ModelSpec or model id: the repository's pyproject.toml (default; skipped when
        absent), ``models/<folder>/policy.toml``, then ``overrides``."""
        if pyproject is None:
            repo = models_dir().parent / "pyproject.toml"
            pyproject = repo if repo.exists() else None
        return cls.load(pyproject=pyproject, model=getattr(spec, "id", spec), overrides=overrides)

    def lookup(self, kind: str, phase: str = "prefill") -> Policy:
        """The policy for a tap kind in a phase: the most specific key wins (module docstring)."""
        if kind not in KINDS:
            raise HarnessError(f"policy lookup: unknown tap kind {kind!r}")
        family = "decode" if phase.startswith("decode") else phase
        for key in (f"{phase}:{kind}", f"{family}:{kind}", kind, f"{phase}:default", f"{family}:default", "default"):
            if key in self.entries:
                return self.entries[key][0]
        raise HarnessError("policy set has no 'default' entry")

    def describe(self) -> dict[str, dict[str, str]]:
        """Provenance: key -> {"policy": canonical text, "source": where it came from}."""
        return {k: {"policy": p.spec(), "source": src} for k, (p, src) in self.entries.items()}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise HarnessError(f"{path}: policy file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path}: not valid TOML: {exc}") from None


def _is_key(key: str) -> bool:
    try:
        _check_key(key, "")
    except HarnessError:
        return False
    return True


def _override_map(overrides: Mapping[str, Any] | Iterable[str] | str) -> dict[str, Any]:
    """A dict as is; strings ``key=policy-text``, where a string without a valid key in front is the
    ``default`` policy (``"iron"``, ``"allclose:rtol=0.04"``)."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in [overrides] if isinstance(overrides, str) else overrides:
        key, eq, text = str(item).partition("=")     # the policy text may hold '=' itself
        if eq and (":" not in key or _is_key(key.strip())):   # a policy text has ':' before any '='
            out[key.strip()] = text.strip()
        else:
            out["default"] = str(item)
    return out
