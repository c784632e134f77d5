"""Options shared by the commands (one definition, one help text, one default)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from harness.spec.model_spec import MODEL_IDS, SCALES

ModelOpt = typer.Option(None, "--model", "-m", help=f"Model id: {', '.join(MODEL_IDS)}.")
ScaleOpt = typer.Option("tiny", "--scale", help=f"Model scale: {', '.join(SCALES)}. Default: tiny.")
SeedOpt = typer.Option(0, "--seed", help="Seed of the prompt and synthetic weights. Default: 0.")
DecodeOpt = typer.Option(4, "--decode-steps", help="Decode steps after the prefill. Default: 4.")
PromptOpt = typer.Option(None, "--prompt-len", help="Prompt tokens. Default: 64 at tiny, 128 at full scale.")
RowsOpt = typer.Option("full", "--rows", help="Golden storage: full (every prefill row) or sampled (the first "
                       "and last 128-row tile plus a seeded sample of ~256 rows between them: bounded on disk for "
                       "long prompts; cumulative mode only, docs/golden-store.md). Default: full.")
WeightsOpt = typer.Option(None, "--weights", help="Local Hugging Face checkpoint directory (safetensors). "
                          "Default: synthetic weights.")
GoldenDirOpt = typer.Option(None, "--golden-dir", envvar="NPU_HARNESS_GOLDEN_DIR",
                            help="Golden store directory, or s3://bucket/prefix (a remote store shared by "
                            "machines, docs/fleet.md). Default: $NPU_HARNESS_GOLDEN_DIR or golden/.")
GoldenCacheOpt = typer.Option(None, "--golden-cache", envvar="NPU_HARNESS_GOLDEN_CACHE",
                              help="Local cache of an s3:// golden store. Default: "
                              "$XDG_CACHE_HOME/npu-harness/goldens/<hash of the URL>.")
GoldenCacheMaxOpt = typer.Option(None, "--golden-cache-max", envvar="NPU_HARNESS_GOLDEN_CACHE_MAX",
                                 help="Size bound of that cache (e.g. 20GB); the least recently used entries "
                                 "leave first. Default: unbounded.")


def models_or_all(model: Optional[list[str]], all_models: bool) -> list[str]:
    from harness.errors import HarnessError

    if all_models:
        return list(MODEL_IDS)
    if not model:
        raise HarnessError("give --model ID (repeatable) or --all")
    for m in model:
        if m not in MODEL_IDS:
            raise HarnessError(f"--model {m!r}: unknown; known: {', '.join(MODEL_IDS)}")
    return list(model)


def path_or_none(p: Optional[Path]) -> Optional[str]:
    return str(p) if p else None
