"""Op-level suites (phase 1): one declaration per op case, in the manner of llama.cpp's test-backend-ops.

An ``OpCase`` is an op name plus parameters; ``vars()`` is its canonical identity
(``gemm[M=64,K=896,N=4864,acc=fp32]``), used as pytest id and report key. Each case generates seeded,
activation-like bf16 inputs, computes the fp32 reference and the bf16 local baseline (the same op in
torch bf16), and is run by a backend: ``OpBackend.run(case, inputs) -> np.ndarray``. The emulator's
kernels are the backend everywhere; compiled NPU kernels plug in through ``ShapeKeyedBackend``.

``judge`` scores a case with R = ||dut - ref|| / ||baseline - ref|| (``harness.compare.metrics``).
``exact_probe`` feeds small integers whose products and sums are exact in fp32, so a bf16 accumulator
fails deterministically rather than statistically.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from harness.deployment.emulator import kernels as K
from harness.deployment.emulator.config import EmulatorConfig
from harness.errors import HarnessError
from harness.spec.model_spec import ModelSpec

OPS = ("gemm", "gemv", "rmsnorm", "rope", "silu_mul", "softmax", "attention_prefill", "attention_decode")
# A clean kernel's R is ~1 (measured: <= 1.3 over op_cases_for on all nine tiny models); a kernel more
# than twice as far from fp32 as torch's own bf16 op is treated as wrong until the calibrated policy
# (harness.compare.policies) sets per-kind limits.
R_LIMIT = 2.0
PROBE_VALUES = 4  # probe entries are integers in [0, 4): K * 9 stays far below 2^24, exact in fp32


@dataclass(frozen=True)
class OpCase:
    """One op at one shape: ``op`` and ``params`` (name, value) pairs in canonical order."""

    op: str
    params: tuple[tuple[str, Any], ...]
    rope_scaling: dict | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise HarnessError(f"unknown op {self.op!r}; known: {', '.join(OPS)}")

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    def vars(self) -> str:
        """Canonical identity, e.g. ``gemm[M=64,K=896,N=4864,acc=fp32]``."""
        return f"{self.op}[{','.join(f'{k}={v}' for k, v in self.params)}]"

    def check_id(self) -> str:
        """The phase-1 check id: the identity without the accumulator, which is the design under test
        (the deployment's knob), not a property of the op case."""
        return f"{self.op}[{','.join(f'{k}={v}' for k, v in self.params if k != 'acc')}]"

    @property
    def shape_key(self) -> str:
        """The shape part of the identity (what a compiled kernel is specialised for)."""
        return ",".join(f"{k}={v}" for k, v in self.params if k not in ("acc", "eps", "theta", "scaling"))

    def gemm_dims(self) -> tuple[int, int, int] | None:
        p = self.p
        if self.op == "gemm":
            return p["M"], p["K"], p["N"]
        if self.op == "gemv":
            return 1, p["K"], p["N"]
        return None

    def tiling_problems(self, cfg: EmulatorConfig) -> list[str]:
        """How this case misses the NPU tiling grid of ``cfg`` (GEMM / GEMV only; empty when it fits)."""
        dims = self.gemm_dims()
        return K.check_tiling(self.vars(), *dims, cfg) if dims else []

    # -- inputs, reference, baseline ---------------------------------------------------------------
    def inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded activation-like inputs (bf16 values as float32): peaked, with a few outlier channels."""
        rng = np.random.default_rng([seed, zlib.crc32(self.vars().encode())])
        p = self.p

        def act(*shape, std=1.0, outliers=True):
            x = rng.standard_normal(shape).astype(np.float32) * std
            if outliers and shape[-1] >= 16:
                x[..., rng.choice(shape[-1], 2, replace=False)] *= 8.0
            return x

        if self.op in ("gemm", "gemv"):
            m = p.get("M", 1)
            out = {"a": act(m, p["K"]), "w": act(p["N"], p["K"], std=1 / math.sqrt(p["K"]), outliers=False)}
        elif self.op == "rmsnorm":
            out = {"x": act(p["T"], p["D"], std=0.05), "w": np.abs(1 + act(p["D"], std=0.15, outliers=False))}
        elif self.op == "rope":
            out = {"x": act(p["T"], p["heads"], p["hd"], std=2.0, outliers=False)}
        elif self.op == "silu_mul":
            out = {"gate": act(p["T"], p["I"], std=1.6), "up": act(p["T"], p["I"])}
        elif self.op == "softmax":
            out = {"x": act(p["rows"], p["L"], std=3.0, outliers=False)}
        else:
            t = p["T"] if self.op == "attention_prefill" else 1
            length = p["T"] if self.op == "attention_prefill" else p["L"]
            s = math.sqrt(3.0)  # q.k / sqrt(hd) with std ~3: peaked, not uniform, rows
            out = {"q": act(p["heads"], t, p["hd"], std=s, outliers=False),
                   "k": act(p["kv_heads"], length, p["hd"], std=s, outliers=False),
                   "v": act(p["kv_heads"], length, p["hd"])}
        return {k: K.bf16(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))).numpy() for k, v in out.items()}

    def reference(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The fp32 (computed in float64) result."""
        return _compute(self, {k: torch.from_numpy(v).double() for k, v in inputs.items()}).float().numpy()

    def baseline(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The same op in torch bf16: the local noise baseline."""
        return _compute(self, {k: torch.from_numpy(v).bfloat16() for k, v in inputs.items()}).float().numpy()


def _rope_tables(case: OpCase, positions: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    p = case.p
    inv = K.rope_inv_freq(p["hd"], float(p["theta"]), case.rope_scaling)
    ang = torch.from_numpy(positions[:, None] * inv[None, :])
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def _compute(case: OpCase, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The op in plain torch at the inputs' dtype (float64: reference, bf16: baseline)."""
    p, dt = case.p, next(iter(x.values())).dtype
    if case.op in ("gemm", "gemv"):
        return x["a"] @ x["w"].T
    if case.op == "rmsnorm":  # HF LlamaRMSNorm: normalise in fp32 (or better), cast, then scale
        h = x["x"].to(torch.promote_types(dt, torch.float32))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + p["eps"])
        return x["w"] * h.to(dt)
    if case.op == "rope":
        cos, sin = _rope_tables(case, np.arange(p["T"], dtype=np.float64), dt)
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        q = x["x"]
        h = q.shape[-1] // 2
        return q * cos + torch.cat([-q[..., h:], q[..., :h]], -1) * sin
    if case.op == "silu_mul":
        return F.silu(x["gate"]) * x["up"]
    if case.op == "softmax":
        return torch.softmax(x["x"], -1)
    q, k, v = x["q"], x["k"], x["v"]
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    if case.op == "attention_prefill":
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


# -- backends ----------------------------------------------------------------------------------------

class OpBackend(Protocol):
    """A kernel under test: runs ``case`` on ``inputs`` and returns the output as float32."""

    def run(self, case: OpCase, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


class EmulatorOpBackend:
    """The emulator's XDNA 2 kernels with ``config`` (default: the clean EmulatorConfig)."""

    def __init__(self, config: EmulatorConfig | None = None):
        self.cfg = config or EmulatorConfig()

    def run(self, case: OpCase, inputs: dict[str, np.ndarray]) -> np.ndarray:
        p, cfg = case.p, self.cfg
        x = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in inputs.items()}  # a writable copy
        if case.op in ("gemm", "gemv"):
            a = x["a"] if case.op == "gemm" else x["a"].reshape(1, -1)
            return K.gemm(a, x["w"], cfg, acc=p.get("acc"), name=case.vars()).numpy()
        if case.op == "rmsnorm":
            return K.rmsnorm(x["x"], x["w"], p["eps"]).numpy()
        if case.op == "rope":
            inv = K.rope_inv_freq(p["hd"], float(p["theta"]), case.rope_scaling)
            cos, sin = K.rope_table(np.arange(p["T"]), inv)
            return K.rope(x["x"], cos, sin).numpy()
        if case.op == "silu_mul":
            return K.silu_mul(x["gate"], x["up"], cfg.tanh).numpy()
        if case.op == "softmax":
            return K.softmax(x["x"], cfg.exp).numpy()
        q, k, v = x["q"], x["k"], x["v"]
        heads, kv = q.shape[0], k.shape[0]
        q_pos = torch.arange(q.shape[1]) if case.op == "attention_prefill" else torch.tensor([k.shape[1] - 1])
        kv_map = torch.arange(heads) // (heads // kv)
        return K.flash_attention(q, k, v, q_pos, kv_map, 1 / math.sqrt(p["hd"]), cfg).numpy()


class ShapeKeyedBackend:
    """Adapts a kernel runner with ``run(op, shape_key, inputs)`` (compiled NPU kernels) to OpBackend."""

    def __init__(self, runner: Any):
        self.runner = runner

    def run(self, case: OpCase, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.runner.run(case.op, case.shape_key, inputs), dtype=np.float32)


# -- judging -----------------------------------------------------------------------------------------

@dataclass
class OpResult:
    """Truthy when the case passed; ``metrics`` holds R and the comparator's other numbers."""

    case: str
    passed: bool
    metrics: dict[str, Any]

    def __bool__(self) -> bool:
        return self.passed


def _2d(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


def judge(case: OpCase, backend: OpBackend, seed: int = 0, r_limit: float = R_LIMIT) -> OpResult:
    """Run ``case`` on ``backend`` and judge it against the fp32 reference with the bf16 baseline."""
    from harness.compare.metrics import tap_metrics

    inputs = case.inputs(seed)
    ref, base = case.reference(inputs), case.baseline(inputs)
    dut = np.asarray(backend.run(case, inputs), dtype=np.float32)
    if dut.shape != ref.shape:
        raise HarnessError(f"{case.vars()}: backend returned shape {dut.shape}, expected {ref.shape}")
    metrics = tap_metrics(_2d(dut), _2d(ref), _2d(base))
    finite = bool(np.isfinite(dut).all())  # NaN or inf always fails
    return OpResult(case.vars(), finite and metrics["r"] <= r_limit, metrics)


def exact_probe(case: OpCase, backend: OpBackend) -> OpResult:
    """GEMM / GEMV on integers in [0, 4): fp32 accumulation gives exactly bf16(exact sum); a bf16
    accumulator loses the low bits once partial sums pass 256 and fails deterministically."""
    dims = case.gemm_dims()
    if dims is None:
        raise HarnessError(f"{case.vars()}: exact probes exist for gemm and gemv only")
    m, k, n = dims
    rng = np.random.default_rng(zlib.crc32(case.vars().encode()))
    a = rng.integers(0, PROBE_VALUES, size=(m, k)).astype(np.float32)
    w = rng.integers(0, PROBE_VALUES, size=(n, k)).astype(np.float32)
    exact = (a.astype(np.int64) @ w.T.astype(np.int64)).astype(np.float32)
    want = K.bf16(torch.from_numpy(exact)).numpy()
    got = np.asarray(backend.run(case, {"a": a if case.op == "gemm" else a[0], "w": w}), dtype=np.float32).reshape(m, n)
    bad = got != want
    first = np.argwhere(bad)[0].tolist() if bad.any() else None
    return OpResult(case.vars(), not bad.any(), {"mismatches": int(bad.sum()), "elements": int(bad.size),
                                                  "max_exact_sum": float(exact.max()), "first_mismatch": first})


# -- cases at a model's shapes -------------------------------------------------------------------------

def _case(op: str, **params) -> OpCase:
    scaling = params.pop("rope_scaling", None)
    return OpCase(op, tuple(params.items()), rope_scaling=scaling)


def op_cases_for(spec: ModelSpec, tokens: int | None = None, acc: str = "fp32") -> list[OpCase]:
    """Every op case of ``spec`` at its real shapes (prompt of ``tokens``, default the scale's length)."""
    t = tokens or spec.default_prompt_len
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    projections = [(h, nh * hd), (h, nkv * hd), (nh * hd, h), (h, i), (i, h), (h, v)]
    cases = [_case("gemm", M=t, K=k, N=n, acc=acc) for k, n in projections]
    cases += [_case("gemv", K=k, N=n, acc=acc) for k, n in projections]
    cases.append(_case("rmsnorm", T=t, D=h, eps=spec.rms_norm_eps))
    if spec.has_qk_norm:
        cases.append(_case("rmsnorm", T=t * nh, D=hd, eps=spec.rms_norm_eps))
    scaling = spec.rope_scaling
    kind = (scaling or {}).get("rope_type", "none")
    cases.append(_case("rope", T=t, heads=nh, hd=hd, theta=spec.rope_theta, scaling=kind, rope_scaling=scaling))
    cases.append(_case("silu_mul", T=t, I=i))
    cases.append(_case("softmax", rows=nh * t, L=t))
    cases.append(_case("attention_prefill", heads=nh, kv_heads=nkv, T=t, hd=hd))
    cases.append(_case("attention_decode", heads=nh, kv_heads=nkv, L=t + 1, hd=hd))
    unique = {c.vars(): c for c in cases}
    return list(unique.values())
