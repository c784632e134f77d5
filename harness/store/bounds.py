"""Bounded inputs: a golden request is refused in one line (HarnessError, exit 3) before anything is
written when it cannot be honoured - a seed the generators reject, a negative decode step count, more
tokens than the model's context length, or a golden the machine has no room for.

The room is predicted up front from the spec, which fixes the golden's size exactly: every tap of every
phase is ``rows x features`` elements, stored once as fp32 (the golden) and once as bf16 (the baseline),
plus bf16 again for isolated mode's local baseline (full storage only); a sampled golden keeps
``sampled_rows`` of the prefill. The build streams (harness.reference.streaming, store.streamwrite), so
its memory is one block's weights (fp32 conversion buffers of one decoder layer and of the embedding /
LM head, beside the mapped bf16 source of the block running), one layer's activations and taps (and,
the bf16 runs being layer-first, every phase's hidden states between two layers), the writer thread's
queue, the KV cache, one attention score matrix and the logits, over the interpreter's own baseline (a
larger model's fp32 run may keep some layers' converted weights beyond that, only in room the
prediction leaves free: ``build_rooms``); its disk adds the private bf16 copy of synthetic weights
the build reads (written by a thread as the fp32 reference starts, deleted at the end; a small model's
are kept in memory instead). The figures are upper bounds, so a request is refused only when it exceeds
what is available outright.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec
from harness.store.streamwrite import WRITE_BEHIND_BYTES
from harness.weights import KEEP_MAPPED_BYTES
from harness.weights.synthetic import largest_layer_draw

MAX_SEED = 2**32 - 1  # NumPy's and torch's seeding both take it; a negative seed is rejected by NumPy
DISK_BYTES_PER_ELEMENT = 4 + 2 + 2  # fp32 golden, bf16 baseline, bf16 local baseline (isolated mode)
SAMPLED_DISK_BYTES_PER_ELEMENT = 4 + 2  # a sampled golden has no local baseline
BASE_RAM = 600e6  # Python, torch, transformers and the harness itself, resident before any tensor
HEADROOM = 1.0  # refuse a golden predicted to need more than what is free
# A larger model's build keeps its first layers' fp32 weights converted, within this predicted total
# (and half the memory available): each kept layer is widened once instead of once per forward.
RESIDENT_TARGET = 6e9
RESIDENT_ENV = "NPU_HARNESS_BUILD_MEMORY"  # overrides RESIDENT_TARGET, e.g. 12G (0: stream every layer)


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
    """What building one golden takes: elements of all stored taps, bytes on disk, peak bytes in memory."""

    elements: int
    disk_bytes: int
    ram_bytes: int


def _layer_params(spec: ModelSpec) -> int:
    attn = spec.hidden_size * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim \
        + spec.num_heads * spec.head_dim * spec.hidden_size
    return attn + 3 * spec.hidden_size * spec.intermediate_size + 2 * spec.hidden_size


def _params(spec: ModelSpec) -> int:
    embed = spec.vocab_size * spec.hidden_size * (1 if spec.tied_embeddings else 2)
    return spec.num_layers * _layer_params(spec) + embed


def _kept_whole(spec: ModelSpec) -> bool:
    """A small model: its build keeps the bf16 weights in memory and every converted fp32 tensor."""
    return 2 * _params(spec) <= KEEP_MAPPED_BYTES


def predict(spec: ModelSpec, tokens: int, decode_steps: int, rows: str = "full", *,
            decoding: bool = False) -> Footprint:
    """The golden's exact element count (stored taps x rows) and the disk and memory its streaming build
    needs. ``decoding``: the memory once the prompt has been through (its activations, attention scores
    and logits gone, the weights generator done), when only one row at a time runs."""
    names = tapspec.tap_names(spec)
    per_token = sum(tapspec.features(spec, tapspec.parse(name).kind) for name in names)
    layer_width = per_token // max(spec.num_layers, 1)  # one layer's taps per token (about)
    kept = tokens
    if rows == "sampled":
        from harness.store.streamwrite import sampled_rows

        kept = len(sampled_rows(tokens, ""))  # how many rows does not depend on the key, which rows does
    elements = per_token * (kept + decode_steps)  # prefill: the rows kept; each decode step: one row
    positions = tokens + decode_steps
    block = max(_layer_params(spec), spec.vocab_size * spec.hidden_size)
    kv_width = 2 * spec.num_kv_heads * spec.head_dim
    small = _kept_whole(spec)
    rows_now = 1 if decoding else tokens  # the rows one forward runs
    ram = (BASE_RAM
           # fp32 conversion buffers (a small model: the generator's float32 draw buffer, which runs
           # beside its fp32 reference and is at most the embedding's size)
           + (_layer_params(spec) + spec.vocab_size * spec.hidden_size) * 4
           # bf16 weights: a small model's are generated whole in memory (harness.weights.build_source)
           # and its fp32 run keeps every converted tensor; else one block's mapped pages
           + (6 * _params(spec) if small else block * 2)
           # a larger model's weights file is written by a thread beside the fp32 reference: its float32
           # draw buffer and the bfloat16 tensor it writes (harness.weights.GeneratingWeights)
           + (0 if small or decoding else largest_layer_draw(spec) * (4 + 2))
           + WRITE_BEHIND_BYTES  # tap copies queued for the writer thread
           + rows_now * layer_width * 4 * 2  # one layer's activations, and the taps the writer holds
           + positions * spec.hidden_size * 4  # a layer-first run's hidden states, every phase's at once
           + spec.num_layers * positions * kv_width * 4  # the KV cache (fp32 run)
           + spec.num_heads * rows_now * positions * 4  # one attention score matrix
           + rows_now * spec.vocab_size * 4  # the prefill logits (written as they are: no copy)
           + (kept * spec.vocab_size * 4 if rows == "sampled" and not decoding else 0))  # the sampled rows of them
    disk_per_element = SAMPLED_DISK_BYTES_PER_ELEMENT if rows == "sampled" else DISK_BYTES_PER_ELEMENT
    private = 0 if small else 2 * _params(spec)  # the build's private bf16 weights file (synthetic weights)
    return Footprint(elements, elements * disk_per_element + private, int(ram))


def build_rooms(spec: ModelSpec, tokens: int, decode_steps: int, rows: str = "full",
                available: int | None = None) -> tuple[int, int]:
    """Bytes of converted fp32 weights the build's fp32 reference keeps instead of converting them again
    every forward: (the prompt's room, the decode steps' room), from one reading of MemAvailable, so the
    second is never capped by memory that moved between two readings. A small model keeps all of them
    (``predict`` counts them). A larger one keeps what fits between its streaming prediction, the least
    it needs, and ``resident_target()`` or half of ``available`` (MemAvailable when not given),
    whichever is lower: a machine short of memory streams every layer, and a build is never refused for
    want of this room. Kept in the order the forward reads them, a tied embedding table comes first and
    then needs no conversion buffer: its bytes, which the prediction counts as that buffer, are added to
    the room. The decode steps' room is the one left once the prompt has been through
    (``predict(decoding=True)``): a long prompt's activations, scores and logits leave more of it for the
    decode steps, which run every layer once per token. The table's bytes count there only if the
    prompt's room kept it: otherwise its conversion buffer was made for the prompt, and it stays."""
    target = resident_target()  # a bad setting fails every build, not only a larger model's
    if _kept_whole(spec):
        whole = 2 * KEEP_MAPPED_BYTES  # room for every weight at 4 bytes (a small model's are at most 2 GiB in bf16)
        return whole, whole
    if available is None:
        available = available_ram()
    room = target if available is None else min(target, available / 2)
    table = spec.vocab_size * spec.hidden_size * 4 if spec.tied_embeddings else 0
    spare = room - predict(spec, tokens, decode_steps, rows).ram_bytes
    prompt = int(spare + table) if spare > 0 else 0
    later = room - predict(spec, tokens, decode_steps, rows, decoding=True).ram_bytes
    return prompt, max(prompt, int(later + (table if prompt else 0)))


def resident_target() -> float:
    """``RESIDENT_TARGET``, or ``$NPU_HARNESS_BUILD_MEMORY`` (a size: ``12G``, ``500MB``, bytes)."""
    from harness.sizes import parse_size

    raw = os.environ.get(RESIDENT_ENV, "").strip()
    return RESIDENT_TARGET if not raw else parse_size(raw, f"${RESIDENT_ENV}")


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


def check_machine(spec: ModelSpec, tokens: int, decode_steps: int, root: Path, rows: str = "full") -> Footprint:
    """Refuse (HarnessError) a golden the machine has no memory or disk for; return the prediction."""
    need = predict(spec, tokens, decode_steps, rows)
    what = f"{spec.key} with --prompt-len {tokens} --decode-steps {decode_steps}" + (" --rows sampled" if rows == "sampled" else "")
    ram = available_ram()
    if ram is not None and need.ram_bytes > HEADROOM * ram:
        raise HarnessError(f"{what}: building its golden needs about {_gb(need.ram_bytes)} of memory, "
                           f"{_gb(ram)} available; lower --prompt-len or --decode-steps")
    disk = free_disk(root)
    if disk is not None and need.disk_bytes > HEADROOM * disk:
        raise HarnessError(f"{what}: its golden needs about {_gb(need.disk_bytes)} on disk, {_gb(disk)} free "
                           f"under {root}; lower --prompt-len or --decode-steps, use --rows sampled, or `harness golden clean`")
    return need
