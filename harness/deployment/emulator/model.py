"""The emulated deployment: llama / qwen2 / qwen3 decoder stacks built from the XDNA 2 kernels.

An independent implementation (torch tensor ops, never transformers' model code) of the deployment
contract: ``prefill(input_ids, tap)`` starts a new sequence, ``decode(token_id, tap)`` appends to the KV
cache; every canonical tap goes through ``tap(name, value)`` and the emulator continues with what it
returns (the golden in isolated mode).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from harness.deployment.emulator import kernels as K
from harness.deployment.emulator.config import EmulatorConfig
from harness.deployment.emulator.faults import Deviations, deviations
from harness.errors import HarnessError, TapError
from harness.spec.model_spec import ModelSpec

Tap = Callable[[str, np.ndarray], np.ndarray]
FAMILIES = ("llama", "qwen2", "qwen3")
_CACHE_MARGIN = 64  # decode steps the KV cache holds before it grows
# Prepared weights (fp32, K-tile-major) kept resident between calls; beyond it layers stream. 2 GiB keeps
# every tiny / small model and a 0.5B model whole, and bounds a 4B model's emulator to about 3 GB.
BUDGET_ENV = "NPU_HARNESS_EMULATOR_BUDGET"
_DEFAULT_BUDGET = 2 << 30
# Torch threads the emulator computes on ($NPU_HARNESS_EMULATOR_THREADS; 0 = the process's own setting).
# One by default: most of its kernels are small (a decode step is ~600 of them), and on a 2-core machine
# shared with other processes two OpenMP threads spinning between them made a full-scale qwen3-0.6b
# decode step 3-10x slower and prefill 3x slower than one thread (docs/emulator.md, "Speed"). Outputs do
# not depend on it: each product sums one K tile, which no thread splits (tests/test_emulator_model.py).
THREADS_ENV = "NPU_HARNESS_EMULATOR_THREADS"
_HEAD_CHUNK_ROWS = 8192  # LM head rows tiled at once when the head streams (8192 x 2560 fp32 = 84 MB)


def resident_budget() -> int:
    """Bytes of prepared weights the emulator keeps between calls (``$NPU_HARNESS_EMULATOR_BUDGET``,
    e.g. ``512MiB`` or ``4GB``, read as every size option is: harness.sizes; default 2 GiB)."""
    import os

    from harness.sizes import parse_size

    raw = os.environ.get(BUDGET_ENV, "").strip()
    return parse_size(raw, f"${BUDGET_ENV}") if raw else _DEFAULT_BUDGET


def compute_threads() -> int:
    """Torch threads for the emulator's calls (``$NPU_HARNESS_EMULATOR_THREADS``, default 1; 0 leaves
    the process's setting alone)."""
    import os

    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise HarnessError(f"{THREADS_ENV}={raw!r}: expected a thread count >= 1, or 0 for torch's own setting")
    return value


@contextmanager
def _torch_threads(n: int):
    """Run the block on ``n`` torch threads (0: as set), restoring the process's count after."""
    before = torch.get_num_threads()
    if n == 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _required(spec: ModelSpec, dev: Deviations) -> list[str]:
    """Every weight name the emulator reads (checked up front: a missing one fails at construction)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tied_embeddings and not dev.fresh_lm_head:
        names.append("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if spec.has_qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if spec.has_qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


def _identity_tap(name: str, value: np.ndarray) -> np.ndarray:
    return value


def _tensor(array) -> torch.Tensor:
    """float32 tensor of ``array``; read-only arrays (memory-mapped goldens, weights) are copied, since
    torch cannot wrap them without a warning."""
    arr = np.ascontiguousarray(array, dtype=np.float32)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


BF16_ROWS_BYTES = 64 << 20  # rows per band when a table is read as bf16 (float32 staging for non-float32 input)


def _bf16_table(array) -> torch.Tensor:
    """A [rows, cols] weight as a bf16 tensor, read a band of rows at a time: the whole float32 copy
    ``_tensor`` would make (1.6 GB for qwen3-4b's embedding, on top of the read weights' pages and the
    bf16 result) is never made; a float32 band is cast straight from the read-only map, without a copy.
    Rounding is per element, so the bits are those of the one-piece cast."""
    rows = int(array.shape[0])
    out = torch.empty(tuple(array.shape), dtype=torch.bfloat16)
    band = max(1, BF16_ROWS_BYTES // max(1, 4 * int(np.prod(array.shape[1:]))))
    for start in range(0, rows, band):
        out[start:start + band] = K.float32_view(array[start:start + band]).to(torch.bfloat16)
    return out


class _Layer:
    """One decoder layer's weights: bf16 values in float32 tensors, GEMM weights K-tile-major."""

    def __init__(self, get: Callable[[str], torch.Tensor], i: int, spec: ModelSpec,
                 tile: Callable[..., K.Tiled], o_transposed: bool):
        p = f"model.layers.{i}."
        self.attn_norm = get(p + "input_layernorm.weight")
        self.ffn_norm = get(p + "post_attention_layernorm.weight")
        self.wq, self.wk, self.wv = (tile(x, p + f"self_attn.{x}_proj.weight") for x in "qkv")
        self.wo = tile("o", p + "self_attn.o_proj.weight", transposed=o_transposed)
        self.bq = self.bk = self.bv = None
        if spec.has_qkv_bias:
            self.bq, self.bk, self.bv = (get(p + f"self_attn.{x}_proj.bias") for x in "qkv")
        self.q_norm = self.k_norm = None
        if spec.has_qk_norm:
            self.q_norm, self.k_norm = get(p + "self_attn.q_norm.weight"), get(p + "self_attn.k_norm.weight")
        self.gate, self.up, self.down = (tile(x, p + f"mlp.{x}_proj.weight") for x in ("gate", "up", "down"))

    @property
    def nbytes(self) -> int:
        parts = [self.attn_norm, self.ffn_norm, self.bq, self.bk, self.bv, self.q_norm, self.k_norm]
        parts += [t.tiles for t in (self.wq, self.wk, self.wv, self.wo, self.gate, self.up, self.down)]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)


class Emulator:
    """XDNA 2 numerics emulator of one model; ``config`` holds the kernel knobs, ``faults`` named bugs."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray],
                 config: EmulatorConfig | None = None, faults: tuple[str, ...] = ()):
        if spec.model_type not in FAMILIES:
            raise HarnessError(f"emulator: model_type {spec.model_type!r} of {spec.id} not supported ({', '.join(FAMILIES)})")
        self.spec, self.cfg = spec, config or EmulatorConfig()
        self.faults = tuple(faults)
        self.dev: Deviations = deviations(self.faults, spec)
        self.nh, self.nkv, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim

        self._weights = weights  # a dict or a lazy read-only Mapping: fetched layer by layer, never all at once
        missing = [n for n in _required(spec, self.dev) if n not in weights]
        if missing:
            raise HarnessError(f"emulator: weight {missing[0]!r} missing for {spec.id} ({spec.scale})")
        self._acc = {name: (acc, kt) for name, acc, kt in self.dev.acc}
        # Embedding and LM head stay resident as bf16 (half of fp32, exact: the NPU holds bf16 weights);
        # the LM head is tiled whole when that fits the budget, else in row chunks per call.
        self.embed = _bf16_table(self._weights["model.embed_tokens.weight"])
        if self.dev.fresh_lm_head:
            g = torch.Generator().manual_seed(1234)
            self._head = K.bf16(torch.randn(self.embed.shape, generator=g) * 0.02).to(torch.bfloat16)
        elif spec.tied_embeddings:
            self._head = self.embed
        else:
            self._head = _bf16_table(self._weights["lm_head.weight"])
        self.final_norm = self._get("model.norm.weight")
        self._budget = resident_budget()
        self._threads = compute_threads()
        head_bytes = self._head.numel() * 4
        self.lm_head: K.Tiled | None = None
        if head_bytes <= self._budget // 2:
            with _torch_threads(self._threads):  # ~1200 band copies: spinning threads cost more than they do
                self.lm_head = self._tile("logits", self._head)  # bf16 widened exactly by the layout copy
            self._budget -= head_bytes
        # Decoder layers: the first ones that fit the remaining budget stay resident (prepared once);
        # the rest are fetched, converted and tiled when they run and released after (streaming). A fixed
        # prefix, not an LRU: layers run in order, so an LRU smaller than the model would never hit.
        self._resident: dict[int, _Layer] = {}
        self._resident_limit: int | None = None  # decided once the first layer's size is known
        self.eps = self.dev.eps if self.dev.eps is not None else spec.rms_norm_eps
        theta = self.dev.rope_theta if self.dev.rope_theta is not None else spec.rope_theta
        self.inv_freq = K.rope_inv_freq(self.hd, theta, spec.rope_scaling if self.dev.rope_scaling else None)
        groups = spec.gqa_groups
        heads = torch.arange(self.nh)
        self.kv_map = heads % self.nkv if self.dev.gqa_modulo else heads // groups
        self.scale = 1.0 / self.hd if self.dev.attn_scale_linear else 1.0 / math.sqrt(self.hd)
        self.pos = 0
        self._cache: list[list[torch.Tensor]] = []

    def _get(self, name: str) -> torch.Tensor:
        # The NPU holds bf16 weights: round whatever was given (a no-op for bf16-representable ones).
        return K.bf16(_tensor(self._weights[name]))

    def _tile(self, name: str, w: torch.Tensor) -> K.Tiled:
        return K.Tiled(w, self._k_tile(name))

    def _k_tile(self, name: str) -> int:
        return self._acc.get(name, (None, self.cfg.k_tile))[1]

    def _prepare(self, name: str, weight: str, transposed: bool = False) -> K.Tiled:
        """GEMM weight ``weight`` read, rounded to bf16 (the NPU holds bf16 weights; a no-op for
        bf16-representable ones) and laid K-tile-major in one go."""
        return K.Tiled.from_weight(self._weights[weight], self._k_tile(name), transposed=transposed)

    def _layer_weights(self, i: int) -> _Layer:
        """Layer ``i``'s prepared weights: resident, or fetched now (dropped by the caller after use)."""
        layer = self._resident.get(i)
        if layer is not None:
            return layer
        layer = _Layer(self._get, i, self.spec, self._prepare, self.dev.o_proj_transposed)
        if self._resident_limit is None:
            self._resident_limit = min(self.spec.num_layers, self._budget // max(1, layer.nbytes))
        if i < self._resident_limit:
            self._resident[i] = layer
        return layer

    # -- public contract ---------------------------------------------------------------------------
    def prefill(self, input_ids, tap: Tap | None = None) -> np.ndarray:
        """Start a new sequence with ``input_ids`` [T]; returns logits [T, vocab] (float32)."""
        start = time.perf_counter()
        ids = self._ids(np.asarray(input_ids).reshape(-1), "prefill input_ids")
        if ids.numel() == 0:
            raise HarnessError("emulator prefill: input_ids is empty")
        self._reset(ids.numel())
        with _torch_threads(self._threads):
            logits = self._forward(ids, np.arange(ids.numel()), tap or _identity_tap, decode=False)
        self._slow(start)
        return logits

    def decode(self, token_id, tap: Tap | None = None) -> np.ndarray:
        """Append ``token_id`` at the next position; returns logits [1, vocab] (float32)."""
        start = time.perf_counter()
        if not self._cache:
            raise HarnessError("emulator decode called before prefill")
        ids = self._ids(np.asarray([int(token_id)]), "decode token_id")
        with _torch_threads(self._threads):
            logits = self._forward(ids, np.array([self.pos]), tap or _identity_tap, decode=True)
        self._slow(start)
        return logits

    # -- internals ---------------------------------------------------------------------------------
    def _ids(self, ids: np.ndarray, what: str) -> torch.Tensor:
        if not np.issubdtype(ids.dtype, np.integer):
            raise HarnessError(f"emulator {what}: expected integer token ids, got dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.spec.vocab_size)]
        if bad.size:
            raise HarnessError(f"emulator {what}: token id {int(bad[0])} outside vocabulary [0, {self.spec.vocab_size})")
        return torch.from_numpy(ids.astype(np.int64))

    def _slow(self, start: float) -> None:
        if self.cfg.slowdown > 1.0:
            time.sleep((self.cfg.slowdown - 1.0) * (time.perf_counter() - start))

    def _reset(self, tokens: int) -> None:
        cap = tokens + _CACHE_MARGIN
        self._cache = [[torch.zeros(self.nkv, cap, self.hd), torch.zeros(self.nkv, cap, self.hd)]
                       for _ in range(self.spec.num_layers)]
        self.pos = 0

    def _tap(self, tap: Tap, name: str, value: torch.Tensor) -> torch.Tensor:
        """Hand ``value`` ([tokens, features]) to ``tap``; continue with what it returns, as bf16."""
        given = value.numpy()
        out = tap(name, given)
        if out is None:
            raise TapError(f"tap {name!r} returned None; it must return the value to continue with")
        if out is given:
            return value
        arr = np.asarray(out, dtype=np.float32)
        if arr.shape != tuple(value.shape):
            raise TapError(f"tap {name!r} returned shape {arr.shape}, expected {tuple(value.shape)}")
        return K.bf16(_tensor(arr))

    def _gemm(self, name: str, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        acc, kt = self._acc.get(name, (None, None))
        cfg = self.cfg if kt is None else replace(self.cfg, k_tile=kt)
        return K.gemm(a, w, cfg, bias=bias, acc=acc, remainder=self.dev.gemm_remainder, name=name, out=out)

    def _store_kv(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new k / v [T, kv_heads, hd] head-major at positions pos .. pos + T - 1."""
        t = k.shape[0]
        kc, vc = self._cache[i]
        if self.pos + t > kc.shape[1]:
            grow = max(kc.shape[1] * 2, self.pos + t)
            for j, old in enumerate((kc, vc)):
                new = torch.zeros(self.nkv, grow, self.hd)
                new[:, : old.shape[1]] = old
                self._cache[i][j] = new
            kc, vc = self._cache[i]
        kc[:, self.pos:self.pos + t] = k.transpose(0, 1)
        vc[:, self.pos:self.pos + t] = v.transpose(0, 1)

    def _read_kv(self, i: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self._cache[i]
        if self.dev.kv_read_seq_major:  # the buffer is reinterpreted as [capacity, kv_heads, hd]
            cap = kc.shape[1]
            return tuple(c.reshape(cap, self.nkv, self.hd)[:length].transpose(0, 1) for c in (kc, vc))
        return kc[:, :length], vc[:, :length]

    def _forward(self, ids: torch.Tensor, positions: np.ndarray, tap: Tap, decode: bool) -> np.ndarray:
        x = self._tap(tap, "embed", self.embed[ids].float())
        rope_pos = positions + (self.dev.decode_pos_offset if decode else 0)
        cos, sin = K.rope_table(rope_pos, self.inv_freq)
        for i in range(self.spec.num_layers):
            x = self._layer(i, self._layer_weights(i), x, positions, cos, sin, tap, decode)
        self.pos += ids.numel()
        h = K.rmsnorm(x, self.final_norm, self.eps) if self.dev.final_norm else x
        h = self._tap(tap, "final_norm", h)
        logits = self._logits(h)
        self._tap(tap, "logits", logits)
        return logits.numpy()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head GEMM; without a resident tiled head, vocabulary rows are tiled chunk by chunk
        (each output column depends on its own weight row only: the same values as one GEMM)."""
        from harness.deployment.isolation import shared_array

        vocab = self._head.shape[0] if self.lm_head is None else self.lm_head.n
        # handed over without a copy when large (a [2048, 151936] prefill's is 1.2 GB)
        out = torch.from_numpy(shared_array((h.shape[0], vocab)))
        if self.lm_head is not None:
            return self._gemm("logits", h, self.lm_head, out=out)
        acc, kt = self._acc.get("logits", (None, None))
        cfg = self.cfg if kt is None else replace(self.cfg, k_tile=kt)
        remainder = self.dev.gemm_remainder or cfg.remainder
        problems = K.check_tiling("logits", h.shape[0], h.shape[1], vocab, cfg)
        if problems and remainder == "raise":
            raise K.TilingError(f"logits [M={h.shape[0]}, K={h.shape[1]}, N={vocab}]: " + "; ".join(problems)
                                + " (remainder='raise')")
        step = _HEAD_CHUNK_ROWS
        for r0 in range(0, vocab, step):
            r1 = min(vocab, r0 + step)
            chunk = self._tile("logits", self._head[r0:r1])
            out[:, r0:r1] = K.gemm(h, chunk, cfg, acc=acc, remainder="pad", name="logits")
        if remainder == "ignore" and vocab % cfg.n_block:
            out[:, vocab - vocab % cfg.n_block:] = 0.0
        return out

    def _layer(self, i: int, w: _Layer, x: torch.Tensor, positions: np.ndarray,
               cos: torch.Tensor, sin: torch.Tensor, tap: Tap, decode: bool) -> torch.Tensor:
        p, t, nh, nkv, hd = f"layers.{i}.", x.shape[0], self.nh, self.nkv, self.hd
        h = self._tap(tap, p + "attn_norm", K.rmsnorm(x, w.attn_norm, self.eps))
        bias = self.dev.qkv_bias
        q = self._tap(tap, p + "q", self._gemm("q", h, w.wq, w.bq if bias else None))
        k = self._tap(tap, p + "k", self._gemm("k", h, w.wk, w.bk if bias else None))
        v = self._tap(tap, p + "v", self._gemm("v", h, w.wv, w.bv if bias else None))
        q, k, v = q.reshape(t, nh, hd), k.reshape(t, nkv, hd), v.reshape(t, nkv, hd)
        if w.q_norm is not None:
            if self.dev.qk_norm:
                q, k = K.rmsnorm(q, w.q_norm, self.eps), K.rmsnorm(k, w.k_norm, self.eps)
            q = self._tap(tap, p + "q_norm", q.reshape(t, -1)).reshape(t, nh, hd)
            k = self._tap(tap, p + "k_norm", k.reshape(t, -1)).reshape(t, nkv, hd)
        q = self._tap(tap, p + "q_rope", K.rope(q, cos, sin, self.dev.rope_style).reshape(t, -1)).reshape(t, nh, hd)
        k = self._tap(tap, p + "k_rope", K.rope(k, cos, sin, self.dev.rope_style).reshape(t, -1)).reshape(t, nkv, hd)
        q_pos = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        if not decode:
            self._store_kv(i, k, v)
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # prefill attends over its own fresh k / v
        else:
            if self.dev.decode_append_kv:
                self._store_kv(i, k, v)
                length = self.pos + t
            else:
                length = self.pos
            keys, values = self._read_kv(i, length)
        ctx = K.flash_attention(q.transpose(0, 1), keys, values, q_pos, self.kv_map, self.scale, self.cfg,
                                mask_offset=self.dev.mask_offset)
        ctx = self._tap(tap, p + "attn", ctx.transpose(0, 1).reshape(t, nh * hd))
        o = self._tap(tap, p + "o", self._gemm("o", ctx, w.wo))
        r = self._tap(tap, p + "attn_residual", K.bf16(x + o) if self.dev.attn_residual else o)
        h2 = self._tap(tap, p + "ffn_norm", K.rmsnorm(r, w.ffn_norm, self.eps))
        gate = self._tap(tap, p + "gate", self._gemm("gate", h2, w.gate))
        up = self._tap(tap, p + "up", self._gemm("up", h2, w.up))
        act = self._tap(tap, p + "act", K.silu_mul(gate, up, self.dev.tanh or self.cfg.tanh))
        down = self._tap(tap, p + "down", self._gemm("down", act, w.down))
        return self._tap(tap, p + "out", K.bf16(r + down))


def make_factory(faults: tuple[str, ...] | list[str] = (), **knobs) -> Callable[[ModelSpec, dict], Emulator]:
    """A deployment factory ``factory(spec, weights) -> Emulator`` with named ``faults`` and kernel knobs.

    Knobs are EmulatorConfig fields (defaults: the clean kernel set); unknown knobs or faults raise now.
    ``factory.op_backend(spec)`` runs the op registry's cases on the same kernels, knobs and faults (phase 1).
    """
    from harness.deployment.emulator import faults as registry

    config = EmulatorConfig.from_knobs(**knobs)
    names = tuple([faults] if isinstance(faults, str) else faults)
    for name in names:
        registry.get(name)

    def factory(spec: ModelSpec, weights: dict[str, np.ndarray]) -> Emulator:
        return Emulator(spec, weights, config, names)

    def op_backend(spec: ModelSpec):
        """Phase 1's view of this deployment: its kernels op by op, with the same knobs and faults."""
        from harness.deployment.emulator.op_backend import EmulatorOpBackend

        return EmulatorOpBackend(config, spec, names)

    factory.config = config  # type: ignore[attr-defined]
    factory.faults = names  # type: ignore[attr-defined]
    factory.op_backend = op_backend  # type: ignore[attr-defined]
    return factory
