"""Reading verdict dicts (schema version 1, docs/contract.md): validation, ordering and number formatting.

The reports take the verdict as a plain dict (``verdict.to_dict()`` or a loaded ``--json`` file), so
they work offline on saved verdicts and do not depend on the verdict classes.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.spec import taps

SCHEMA = 1
_REQUIRED = ("schema", "model", "passed", "results")
_DECODE_RE = re.compile(r"^decode\.(\d+)$")
_CONTROL_RE = re.compile(r"\s+")
# verdict.to_dict() writes non-finite floats as strings so the JSON stays standard.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
               "-infinity": -math.inf}


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise HarnessError(f"verdict file not found: {p}") from None
    except IsADirectoryError:
        raise HarnessError(f"verdict file {p} is a directory; give the JSON file") from None
    except PermissionError:
        raise HarnessError(f"verdict file {p} is not readable (permission denied)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"verdict file {p} is not valid JSON: {exc}") from None


def verdicts_of(data: Any, source: str = "verdict") -> list[dict[str, Any]]:
    """Every verdict in a JSON document the CLI writes: a verdict (``harness.check(...).to_dict()``) or
    a ``harness gate --json`` document (each model's verdicts per mode, the gate's perf attached)."""
    if isinstance(data, dict) and data.get("kind") == "gate":
        out = []
        for i, model in enumerate(data.get("models") or []):
            for key, v in (model.get("verdicts") or {}).items():
                v = dict(validate(v, source=f"{source}: models[{i}].verdicts[{key}]"))
                if model.get("perf") and not v.get("perf"):
                    v["perf"] = model["perf"]
                out.append(v)
        return out
    return [validate(data, source=source)]


def load_verdicts(path: str | Path) -> list[dict[str, Any]]:
    """Every verdict of a verdict or ``harness gate --json`` file; errors name the file."""
    p = Path(path)
    return verdicts_of(_read_json(p), source=str(p))


def load_verdict(path: str | Path) -> dict[str, Any]:
    """Read and validate one verdict JSON file; errors name the file. A ``harness gate --json`` file
    gives its first failing verdict (else its first): the one its console summary shows."""
    p = Path(path)
    found = load_verdicts(p)
    if not found:
        raise HarnessError(f"{p}: a gate document without verdicts (the gate could not run: see its 'errors')")
    return next((v for v in found if not v["passed"]), found[0])


def validate(verdict: Any, source: str = "verdict") -> dict[str, Any]:
    """Check the shape the reports rely on; raise HarnessError naming ``source`` and the key."""
    if not isinstance(verdict, dict):
        raise HarnessError(f"{source}: expected a verdict dict, got {type(verdict).__name__}")
    missing = [k for k in _REQUIRED if k not in verdict]
    if missing:
        raise HarnessError(f"{source}: verdict lacks key(s) {', '.join(missing)}")
    if verdict["schema"] != SCHEMA:
        raise HarnessError(f"{source}: verdict schema {verdict['schema']!r}, this report reads schema {SCHEMA}")
    if not isinstance(verdict["results"], list):
        raise HarnessError(f"{source}: 'results' must be a list")
    for i, res in enumerate(verdict["results"]):
        if not isinstance(res, dict) or not {"phase", "tap", "passed"} <= res.keys():
            raise HarnessError(f"{source}: results[{i}] needs phase, tap and passed")
        if not isinstance(res.get("metrics", {}), dict):
            raise HarnessError(f"{source}: results[{i}] ({res['phase']} {res['tap']}): metrics must be a dict")
    ff = verdict.get("first_failure")
    if ff is not None and (not isinstance(ff, dict) or not {"phase", "tap"} <= ff.keys()):
        raise HarnessError(f"{source}: first_failure needs phase and tap")
    return verdict


def phase_index(phase: str) -> int:
    """Execution order of a phase: prefill 0, decode.N -> N + 1, anything else after all decodes."""
    if phase == "prefill":
        return 0
    m = _DECODE_RE.match(phase)
    return int(m.group(1)) + 1 if m else 1 << 30


def tap_position(name: str) -> tuple[int, int]:
    """Execution order of a tap within a phase: (layer slot, op slot). Unknown names sort last."""
    try:
        tap = taps.parse(name)
    except HarnessError:
        return (1 << 30, 0)
    if tap.layer is None:
        return (-1, 0) if tap.kind == "embed" else (1 << 29, taps.GLOBAL_TAIL.index(tap.kind))
    return (tap.layer, taps.LAYER_KINDS.index(tap.kind))


def sorted_results(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """Results in execution order (phase, then tap); stable for equal keys."""
    return sorted(verdict["results"], key=lambda r: (phase_index(r["phase"]), tap_position(r["tap"])))


def failed_by_phase(verdict: dict[str, Any]) -> dict[str, int]:
    """Number of failing taps per phase, phases in execution order."""
    counts: dict[str, int] = {}
    for res in sorted_results(verdict):
        if not res["passed"]:
            counts[res["phase"]] = counts.get(res["phase"], 0) + 1
    return counts


def perf_comparisons(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """The perf comparisons of a verdict: ``perf`` may be null, a list, or a dict holding ``comparisons``."""
    perf = verdict.get("perf")
    if perf is None:
        return []
    if isinstance(perf, dict):
        perf = perf.get("comparisons", [])
    if not isinstance(perf, list) or not all(isinstance(c, dict) for c in perf):
        raise HarnessError(f"verdict for {verdict.get('model')}: perf must be null, a list of comparisons or "
                           "a dict with 'comparisons'")
    return perf


def status(verdict: dict[str, Any]) -> str:
    """The headline word, mirroring the gate's exit codes: PASS (0), FAIL (1), PERF REGRESSION (2),
    NOTHING COMPARED (3: a check that compared nothing never passes)."""
    compared = (verdict.get("coverage") or {}).get("compared")
    if compared == 0 or not verdict["results"]:
        return "NOTHING COMPARED"
    if not verdict["passed"]:
        return "FAIL"
    if any(c.get("verdict") == "regression" for c in perf_comparisons(verdict)):
        return "PERF REGRESSION"
    return "PASS"


def title(verdict: dict[str, Any]) -> str:
    """``qwen3-0.6b scale=tiny seed=0 mode=cumulative`` (keys absent from the verdict are left out)."""
    parts = [str(verdict["model"])]
    parts += [f"{k}={verdict[k]}" for k in ("scale", "seed", "mode") if verdict.get(k) is not None]
    return " ".join(parts)


def one_line(text: Any, limit: int = 200) -> str:
    """Collapse whitespace (hints may hold newlines) and cut to ``limit`` characters (default 200)."""
    s = _CONTROL_RE.sub(" ", str(text)).strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


def fmt(x: Any) -> str:
    """A metric for people: 4 significant digits, ``nan`` / ``inf`` spelt out, ``-`` when absent."""
    x = num(x)
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return one_line(x, 40)
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.4g}"


def fmt_cos(x: Any) -> str:
    """Cosine similarity with enough digits to tell 0.99999 from 0.999 (six decimals)."""
    x = num(x)
    if isinstance(x, float) and math.isfinite(x):
        return f"{x:.6f}"
    return fmt(x)


def num(x: Any) -> Any:
    """Undo the JSON encoding of non-finite metrics: ``"nan"``, ``"inf"``, ``"-inf"`` -> float; else ``x``."""
    if isinstance(x, str) and x.strip().lower() in _NON_FINITE:
        return _NON_FINITE[x.strip().lower()]
    return x


def as_float(x: Any) -> float:
    """A metric as float for plotting; absent or non-numeric values become NaN."""
    x = num(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def perf_p(c: dict[str, Any]) -> Any:
    """A comparison's p-value: ``p_value``, else the one-sided p matching its verdict (harness.perf's
    ``p_worse`` / ``p_better``)."""
    if c.get("p_value") is not None:
        return c["p_value"]
    if c.get("verdict") == "improvement":
        return c.get("p_better")
    return c.get("p_worse")
