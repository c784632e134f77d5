"""Bounded inputs: a golden request is refused in one line (HarnessError, exit 3) before anything is
written when it cannot be honoured - a seed the generators reject, a negative decode step count, more
tokens than the model's context length, or a golden the machine has no room for.

The room is predicted up front from the golden's size, which the spec fixes exactly: every tap of every
phase is ``tokens x features`` elements, stored once as fp32 (the golden) and once as bf16 (the
baseline), plus bf16 again for isolated mode's local baseline. The build holds every phase in memory
(fp32 and bf16 runs) next to two fp32 copies of the weights (the cached arrays and the fp32 model; the
bf16 model is built after the fp32 one is released) and one attention score matrix. The memory figure
is an upper bound, so a request is refused only when it exceeds what is available outright.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec

MAX_SEED = 2**32 - 1  # NumPy's and torch's seeding both take it; a negative seed is rejected by NumPy
DISK_BYTES_PER_ELEMENT = 4 + 2 + 2  # fp32 golden, bf16 baseline, bf16 local baseline (isolated mode)
RAM_BYTES_PER_ELEMENT = 4 + 4  # the fp32 run's taps and the bf16 run's (held as float32 until written)
HEADROOM = 1.0  # refuse a golden predicted to need more than what is free


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_request(spec: ModelSpec, seed: int, prompt_len: int | None, decode_steps: int) -> None:
    """Seed, prompt length and decode steps against the model; HarnessError naming the option otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise HarnessError(f"--seed {seed}: must be an integer in 0..{MAX_SEED}")
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 0:
        raise HarnessError(f"--decode-steps {decode_steps}: must be an integer >= 0")
    if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1):
        raise HarnessError(f"--prompt-len {prompt_len}: must be an integer >= 1")
    tokens = prompt_len or spec.default_prompt_len
    context = int(spec.config.get("max_position_embeddings") or 0)
    if context and tokens + decode_steps > context:
        raise HarnessError(f"--prompt-len {tokens} + --decode-steps {decode_steps} = {tokens + decode_steps} "
                           f"positions: more than {spec.id}'s context length (max_position_embeddings {context})")


@dataclass(frozen=True)
class Footprint:
    """What building one golden takes: elements of all taps, bytes on disk, peak bytes in memory."""

    elements: int
    disk_bytes: int
    ram_bytes: int


def _params(spec: ModelSpec) -> int:
    attn = spec.hidden_size * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim \
        + spec.num_heads * spec.head_dim * spec.hidden_size
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    embed = spec.vocab_size * spec.hidden_size * (1 if spec.tied_embeddings else 2)
    return spec.num_layers * (attn + mlp + 2 * spec.hidden_size) + embed


def predict(spec: ModelSpec, tokens: int, decode_steps: int) -> Footprint:
    """The golden's exact element count (taps x phases) and the disk and memory it needs."""
    per_token = sum(tapspec.features(spec, tapspec.parse(name).kind) for name in tapspec.tap_names(spec))
    elements = per_token * (tokens + decode_steps)  # prefill: `tokens` rows; each decode step: one row
    positions = tokens + decode_steps
    ram = elements * RAM_BYTES_PER_ELEMENT + 2 * 4 * _params(spec) + spec.num_heads * positions * positions * 4
    return Footprint(elements, elements * DISK_BYTES_PER_ELEMENT, ram)


def available_ram() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(root: Path) -> int | None:
    """Free bytes on the file system that holds (or will hold) ``root``."""
    path = Path(root).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_machine(spec: ModelSpec, tokens: int, decode_steps: int, root: Path) -> Footprint:
    """Refuse (HarnessError) a golden the machine has no memory or disk for; return the prediction."""
    need = predict(spec, tokens, decode_steps)
    what = f"{spec.key} with --prompt-len {tokens} --decode-steps {decode_steps}"
    ram = available_ram()
    if ram is not None and need.ram_bytes > HEADROOM * ram:
        raise HarnessError(f"{what}: building its golden needs about {_gb(need.ram_bytes)} of memory, "
                           f"{_gb(ram)} available; lower --prompt-len or --decode-steps")
    disk = free_disk(root)
    if disk is not None and need.disk_bytes > HEADROOM * disk:
        raise HarnessError(f"{what}: its golden needs about {_gb(need.disk_bytes)} on disk, {_gb(disk)} free "
                           f"under {root}; lower --prompt-len or --decode-steps, or `harness golden clean`")
    return need
