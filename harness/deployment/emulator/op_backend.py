"""The emulator's op backend: phase 1 runs the op registry's cases on the same kernels, knobs and faults
the emulated deployment computes with (``make_factory(...).op_backend(spec)``).

Each op is computed as ``model.py`` computes it, with the ``EmulatorConfig`` knobs and the op-level
``Deviations`` of the factory's faults: a per-GEMM accumulator override applies to the op cases of that
GEMM's shape (K, N), and the norm / RoPE / SiLU / attention deviations to their ops. Faults in the
wiring between ops (a skipped residual, a stale KV cache) have no op case; phases 2-6 catch those.
Cases are duck-typed (``case.op``, ``case.p``, ``case.id``, ``case.rope_scaling``), so this module does
not import the suites.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from harness.deployment.emulator import kernels as K
from harness.deployment.emulator.config import EmulatorConfig
from harness.deployment.emulator.faults import Deviations, deviations
from harness.errors import HarnessError
from harness.spec.model_spec import ModelSpec


def gemm_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(K, N) of each named GEMM of the emulator (the names ``Deviations.acc`` uses)."""
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h),
            "logits": (h, v)}


class EmulatorOpBackend:
    """Runs op cases on the emulator's kernels with ``config`` and the deviations of ``faults`` on ``spec``."""

    def __init__(self, config: EmulatorConfig | None = None, spec: ModelSpec | None = None,
                 faults: tuple[str, ...] = ()):
        self.cfg = config or EmulatorConfig()
        if faults and spec is None:
            raise HarnessError("EmulatorOpBackend: faults need the model spec (their deviations depend on it)")
        self.dev: Deviations = deviations(tuple(faults), spec) if faults else Deviations()
        shapes = gemm_shapes(spec) if spec is not None else {}
        # A faulty GEMM's kernel is the kernel of its shape: every op case of that (K, N) runs with it.
        self._acc = {shapes[name]: (acc, kt) for name, acc, kt in self.dev.acc if name in shapes}

    def supports(self, case: Any) -> bool:
        return case.op in _RUN

    def run(self, case: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if case.op not in _RUN:
            raise HarnessError(f"{case.id}: the emulator has no kernel for op {case.op!r}")
        start = time.perf_counter()
        # writable copies, except a GEMM's weight, which the kernel only reads (it lays out tiles of its
        # own): the full-scale LM head case's weight is 1.6 GB
        x = {k: K.float32_view(v) if k == "w" and case.op in _GEMMS else torch.from_numpy(np.array(v, dtype=np.float32))
             for k, v in inputs.items()}
        out = _RUN[case.op](self, case, case.p, x).numpy()
        if self.cfg.slowdown > 1.0:  # the slowdown knob, as the emulated model applies it per call
            time.sleep((self.cfg.slowdown - 1.0) * (time.perf_counter() - start))
        return out

    # -- one method per op, as model.py computes it ----------------------------------------------------
    def _gemm(self, case, p, x):
        a = x["a"].reshape(-1, x["a"].shape[-1])
        acc, kt = self._acc.get((p["K"], p["N"]), (None, None))
        cfg = self.cfg if kt is None else replace(self.cfg, k_tile=kt)
        w, n = x["w"], p["N"]
        remainder = self.dev.gemm_remainder or cfg.remainder
        # A band of whole n_tile*herd_n column blocks at a time, as the emulated model tiles its LM head:
        # each output column's sums are its own, and only the last band holds the off-grid remainder,
        # so the output is the one-piece GEMM's; a shape that must raise is left to the one-piece call.
        step = max(cfg.n_block, _TILED_ELEMENTS // max(1, p["K"]) // cfg.n_block * cfg.n_block)
        if n <= step or (remainder == "raise" and K.check_tiling(case.id, a.shape[0], p["K"], n, cfg)):
            out = K.gemm(a, w, cfg, acc=acc, remainder=remainder, name=case.id)
        else:
            out = torch.empty(a.shape[0], n)
            for c0 in range(0, n, step):
                out[:, c0:c0 + step] = K.gemm(a, w[c0:c0 + step], cfg, acc=acc, remainder=remainder, name=case.id)
        return out.reshape(*x["a"].shape[:-1], n)

    def _gemm_bias(self, case, p, x):
        acc, kt = self._acc.get((p["K"], p["N"]), (None, None))
        cfg = self.cfg if kt is None else replace(self.cfg, k_tile=kt)
        bias = x["b"] if self.dev.qkv_bias else None  # missing_qkv_bias: the kernel drops it
        return K.gemm(x["a"], x["w"], cfg, bias=bias, acc=acc, remainder=self.dev.gemm_remainder, name=case.id)

    def _rmsnorm(self, case, p, x):
        return K.rmsnorm(x["x"], x["w"], self.dev.eps if self.dev.eps is not None else p["eps"])

    def _rope(self, case, p, x):
        theta = self.dev.rope_theta if self.dev.rope_theta is not None else float(p["theta"])
        inv = K.rope_inv_freq(p["hd"], theta, case.rope_scaling if self.dev.rope_scaling else None)
        cos, sin = K.rope_table(np.arange(p["pos"], p["pos"] + p["T"]), inv)
        return K.rope(x["x"], cos, sin, self.dev.rope_style)

    def _silu_mul(self, case, p, x):
        return K.silu_mul(x["gate"], x["up"], self.dev.tanh or self.cfg.tanh)

    def _softmax(self, case, p, x):
        return K.softmax(x["x"], self.cfg.exp)

    def _attention(self, case, p, x):
        q, k, v = x["q"], x["k"], x["v"]
        heads, kv = q.shape[0], k.shape[0]
        h = torch.arange(heads)
        kv_map = h % kv if self.dev.gqa_modulo else h // (heads // kv)
        scale = 1.0 / p["hd"] if self.dev.attn_scale_linear else 1.0 / math.sqrt(p["hd"])
        q_pos = torch.arange(q.shape[1]) if case.op == "attention_prefill" else torch.tensor([k.shape[1] - 1])
        return K.flash_attention(q, k, v, q_pos, kv_map, scale, self.cfg, mask_offset=self.dev.mask_offset)


_GEMMS = frozenset({"gemm", "gemv", "gemm_bias"})
# Weight elements laid out as tiles at once (64 M: 256 MB of float32 tiles) in an op case's GEMM.
_TILED_ELEMENTS = 1 << 26

_RUN: dict[str, Callable[..., torch.Tensor]] = {
    "gemm": EmulatorOpBackend._gemm, "gemv": EmulatorOpBackend._gemm, "gemm_bias": EmulatorOpBackend._gemm_bias,
    "rmsnorm": EmulatorOpBackend._rmsnorm,
    "rope": EmulatorOpBackend._rope, "silu_mul": EmulatorOpBackend._silu_mul, "softmax": EmulatorOpBackend._softmax,
    "attention_prefill": EmulatorOpBackend._attention, "attention_decode": EmulatorOpBackend._attention,
}
