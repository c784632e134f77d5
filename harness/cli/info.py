"""``harness list`` (models, phases, deployments, faults) and ``harness explain TAP``."""
from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.cli.console import make_console
from harness.errors import HarnessError


@dataclass(frozen=True)
class Site:
    """Where the emulator hands a tap over: file, line, function and the expression it taps."""

    file: str
    line: int
    function: str
    expression: str


def _kind_of(node: ast.AST) -> str | None:
    """``"embed"`` or ``p + "q_rope"`` -> the tap kind."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str):
        return node.right.value
    return None


def _expression(fn: ast.FunctionDef, arg: ast.AST) -> str:
    """The tapped expression; a bare name is followed to its assignment in the same function."""
    if isinstance(arg, ast.Name):
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == arg.id for t in node.targets):
                return f"{arg.id} = {ast.unparse(node.value)}"
    return ast.unparse(arg)


def emulator_sites() -> dict[str, Site]:
    """Tap kind -> where the emulator computes it, found by reading the emulator module's source."""
    from harness import version
    from harness.deployment.emulator import model

    path = str(Path(inspect.getsourcefile(model) or model.__file__).resolve().relative_to(Path(version.__file__).parents[1]))
    tree = ast.parse(inspect.getsource(model))
    sites: dict[str, Site] = {}
    for cls in ast.walk(tree):
        if not isinstance(cls, (ast.FunctionDef, ast.ClassDef)):
            continue
        for fn in ([cls] if isinstance(cls, ast.FunctionDef) else
                   [n for n in cls.body if isinstance(n, ast.FunctionDef)]):
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "_tap" and len(call.args) >= 3):
                    kind = _kind_of(call.args[1])
                    if kind and kind not in sites:
                        owner = f"{cls.name}.{fn.name}" if isinstance(cls, ast.ClassDef) else fn.name
                        sites[kind] = Site(path, call.lineno, owner, _expression(fn, call.args[2]))
    return sites


def explain_text(tap: str, model: str | None = None, scale: str = "tiny") -> list[str]:
    """The lines ``harness explain`` prints: HF meaning, shape, emulator site, known faults."""
    from harness.deployment.emulator.faults import FAULTS
    from harness.spec import taps as tapspec

    parsed = tapspec.parse(tap)  # TapError naming the tap when it is not canonical
    lines = [f"{tap}: {tapspec.DESCRIPTIONS[parsed.kind]}"]
    if model is not None:
        from harness.spec.model_spec import get

        spec = get(model, scale)
        tapspec.validate(spec, tap)
        feats = tapspec.features(spec, parsed.kind)
        lines.append(f"shape on {model} ({scale}): [tokens, {feats}]"
                     + (f" = {feats // spec.head_dim} heads x head_dim {spec.head_dim}, head-major"
                        if tapspec.head_of(spec, parsed.kind, 0)[0] is not None else ""))
    site = emulator_sites().get(parsed.kind)
    if site:
        lines.append(f"emulator: {site.file}:{site.line} in {site.function}: {site.expression}")
    else:
        lines.append("emulator: not tapped by the emulator")
    from harness.spec.model_spec import get

    spec = get(model or "qwen3-0.6b", scale)  # faults name their tap per model; qwen3 has every kind
    known = [f for f in FAULTS.values() if f.applies(spec) and tapspec.parse(f.expected_tap(spec)[1]).kind == parsed.kind]
    for f in known:
        lines.append(f"known fault here: {f.name}: {f.description}")
    return lines


def _table(title: str, *columns: str) -> Table:
    """A table whose cells are text, never markup (fault descriptions hold brackets), and that wraps
    rather than cuts names in an 80-column CI log."""
    t = Table(title=title)
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


def _row(t: Table, *cells: str) -> None:
    t.add_row(*(Text(c) for c in cells))


def taps_listing(model: str, scale: str, prompt_len: int | None, as_json: bool) -> None:
    """``harness list --taps``: every tap of one model, in order, with shapes and layout."""
    import json

    from harness.spec import taps as tapspec
    from harness.spec.model_spec import get

    spec = get(model, scale)
    tokens = prompt_len or spec.default_prompt_len
    rows = tapspec.table(spec, tokens)
    if as_json:
        typer.echo(json.dumps({"model": model, "scale": scale, "prompt_len": tokens, "config": spec.config,
                               "taps": rows}, indent=1))
        return
    t = _table(f"taps of {model} ({scale}), execution order; prefill of {tokens} tokens, decode 1 row",
               "#", "tap", "shape", "prefill", "layout", "required")
    for r in rows:
        _row(t, str(r["order"]), r["name"], r["shape"], "x".join(map(str, r["prefill_shape"])), r["layout"],
             "yes" if r["required"] else "")
    make_console().print(t)


def list_cmd(
    taps: bool = typer.Option(False, "--taps", help="List one model's taps (name, order, shape, layout, required)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model whose taps --taps lists."),
    scale: str = typer.Option("tiny", "--scale", help="Scale for --taps. Default: tiny."),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="Prompt tokens for --taps' prefill shapes."),
    as_json: bool = typer.Option(False, "--json", help="With --taps: JSON on stdout."),
) -> None:
    """Models with their tiny dimensions, the phases, built-in deployments and emulator faults; with
    ``--taps --model ID`` the taps a deployment of that model hands over."""
    from harness.deployment.emulator.faults import FAULTS
    from harness.deployment.loader import BUILTIN, DEFAULT_DEPLOYMENT
    from harness.spec.model_spec import get, names
    from harness.suites.phases import PHASES

    if taps or as_json:
        if not model:
            raise HarnessError("harness list --taps needs --model ID")
        taps_listing(model, scale, prompt_len, as_json)
        return
    console = make_console()
    t = _table("models (tiny scale dimensions)", "model", "hidden", "layers", "heads/kv", "head_dim", "ffn", "vocab",
               "features")
    for m in names():
        s = get(m, "tiny")
        feats = [f for f, on in (("qkv-bias", s.has_qkv_bias), ("qk-norm", s.has_qk_norm),
                                 ("tied", s.tied_embeddings), ("rope-scaling", bool(s.rope_scaling)),
                                 ("gqa", s.gqa_groups > 1)) if on]
        _row(t, m, str(s.hidden_size), str(s.num_layers), f"{s.num_heads}/{s.num_kv_heads}", str(s.head_dim),
             str(s.intermediate_size), str(s.vocab_size), ",".join(feats))
    console.print(t)
    p = _table("phases (harness gate --phase N runs 0..N)", "N", "name", "what")
    for n, (name, what) in PHASES.items():
        _row(p, str(n), name, what)
    console.print(p)
    d = _table("deployments (--deployment NAME, MODULE:FACTORY or FILE.py:FACTORY, [key=value,...] for its "
               "keyword arguments)", "name", "factory")
    for name, target in BUILTIN.items():
        note = " (default)" if target == DEFAULT_DEPLOYMENT else " (reference: check_replay only)" if "replay" in name else ""
        _row(d, name + note, target)
    console.print(d)
    f = _table("emulator faults (harness gate --fault NAME)", "fault", "first failing tap", "description")
    spec = get("qwen3-0.6b", "tiny")
    for fault in FAULTS.values():
        where = "/".join(fault.expected_tap(spec)) if fault.applies(spec) else "(not on qwen3)"
        _row(f, fault.name, where, fault.description)
    console.print(f)


def explain_cmd(
    tap: str = typer.Argument(..., help="Canonical tap name, e.g. layers.3.q_rope or logits."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Also give its shape on this model."),
    scale: str = typer.Option("tiny", "--scale", help="Scale for the shape. Default: tiny."),
) -> None:
    """What a tap is in Hugging Face terms and where the emulator computes it."""
    try:
        lines = explain_text(tap, model, scale)
    except HarnessError as exc:
        Console(stderr=True).print(Text(f"error: {exc}"), soft_wrap=True)
        raise typer.Exit(3)
    console = Console()
    for ln in lines:
        console.print(Text(ln), soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``harness list`` and ``harness explain`` to the CLI app."""
    app.command("list")(list_cmd)
    app.command("explain")(explain_cmd)
