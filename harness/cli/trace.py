"""``harness trace prepare|dump``: inputs for external deployments, and traces of live ones."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from harness.cli.exits import CommandGroup
from harness.cli.common import DecodeOpt, GoldenDirOpt, PromptOpt, ScaleOpt, SeedOpt, WeightsOpt, path_or_none

trace_app = typer.Typer(cls=CommandGroup, help="Trace directories for deployments that run outside Python (C++ / pyxrt).",
                        no_args_is_help=True)


def _golden(model, scale, seed, decode_steps, prompt_len, weights, golden_dir):
    from harness.store import GoldenRequest, GoldenStore
    from harness.weights import WeightsSource

    req = GoldenRequest(model, scale, seed, decode_steps, prompt_len, WeightsSource(path_or_none(weights)))
    return GoldenStore(golden_dir).get(req)


@trace_app.command("prepare")
def prepare(
    out: Path = typer.Argument(..., help="Directory to write inputs.safetensors, weights.safetensors, config.json, "
                               "expected.json and (last) trace.json."),
    model: str = typer.Option(..., "--model", "-m", help="Model id."),
    scale: str = ScaleOpt,
    seed: int = SeedOpt,
    decode_steps: int = DecodeOpt,
    prompt_len: Optional[int] = PromptOpt,
    weights: Optional[Path] = WeightsOpt,
    golden_dir: Optional[Path] = GoldenDirOpt,
) -> None:
    """Write the token ids, decode tokens, weights, model config and expected files an external program
    needs to produce a trace."""
    from harness.deployment.trace import prepare_inputs
    from harness.weights import WeightsSource, load_weights

    golden = _golden(model, scale, seed, decode_steps, prompt_len, weights, golden_dir)
    w = load_weights(golden.spec, WeightsSource(path_or_none(weights)), seed)
    root = prepare_inputs(out, golden.spec, seed, decode_steps, golden.input_ids, golden.decode_tokens, w)
    typer.echo(f"wrote {root}/inputs.safetensors, weights.safetensors, config.json, expected.json, trace.json; "
               f"add the phase files expected.json lists, then run: harness gate --trace {root}")


@trace_app.command("dump")
def dump(
    out: Path = typer.Argument(..., help="Trace directory to write (must not exist unless --overwrite)."),
    model: str = typer.Option(..., "--model", "-m", help="Model id."),
    deployment: Optional[str] = typer.Option(None, "--deployment", "-d",
                                             help="MODULE:FACTORY. Default: the emulator."),
    scale: str = ScaleOpt,
    seed: int = SeedOpt,
    decode_steps: int = DecodeOpt,
    prompt_len: Optional[int] = PromptOpt,
    golden_dir: Optional[Path] = GoldenDirOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing trace directory."),
) -> None:
    """Run a Python deployment once (cumulative) and record every tap it hands over as a trace."""
    from harness.deployment.trace import write_trace

    golden = _golden(model, scale, seed, decode_steps, prompt_len, None, golden_dir)
    phases = record_phases(golden, deployment)
    write_trace(out, model, scale, seed, decode_steps, phases, golden.input_ids, golden.decode_tokens,
                overwrite=overwrite)
    typer.echo(f"wrote trace {out} ({len(phases)} phases)")


def record_phases(golden, deployment) -> dict:
    """Every tap a deployment hands over, per phase, fed the golden's tokens."""
    import numpy as np

    from harness.deployment.loader import load_factory
    from harness.weights import load_weights

    spec = golden.spec
    dep = load_factory(deployment)(spec, load_weights(spec, None, golden.manifest["seed"]))
    phases: dict[str, dict[str, np.ndarray]] = {}
    for i, phase in enumerate(golden.phases):
        record = phases.setdefault(phase, {})

        def tap(name, value, record=record):
            record[name] = np.array(value, dtype=np.float32, copy=True)
            return value

        if phase == "prefill":
            dep.prefill(golden.input_ids.copy(), tap)
        else:
            dep.decode(int(golden.decode_tokens[i - 1]), tap)
    return phases
