"""The op registry of phase 1, in the manner of llama.cpp's test-backend-ops.

One declaration per op (a subclass of ``Op`` decorated with ``@register``) says everything about it:
its parameters (the identity's keys, in order), the inputs it takes and the output it returns (the
op-backend protocol), how to generate seeded activation-like inputs, the reference (the op in plain
torch: float64 for the fp32 reference, bf16 for the local noise baseline) and the shape cases a
``ModelSpec`` needs, tile edges and remainders included. Adding an op is one such declaration here:
its cases reach the pytest ids, phase 1's check ids, the gate JSON / JUnit and the NPU kernel
registry's keys, and ``time_cases`` times the same cases.

A case's identity is ``OpCase.id``, e.g. ``gemm[M=64,K=896,N=4864]``: the op and its parameters in
declaration order. It is the pytest id, the check id, the JSON key and the key of the compiled kernel
in ``harness.deployment.pyxrt`` 's registry. The design under test (accumulator dtype, tile sizes,
approximations) is the backend's, never part of the identity.

``judge`` scores a case with R = ||dut - ref|| / ||baseline - ref|| (``harness.compare.metrics``).
``exact_probe`` feeds small integers whose products and sums are exact in fp32, so a bf16 accumulator
fails deterministically rather than statistically (ops declared with ``probe = True``).
"""
from __future__ import annotations

import abc
import math
import statistics
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.spec.model_spec import ModelSpec
from harness.spec.rope import rope_inv_freq

# A clean kernel's R is ~1 (measured: <= 1.3 over cases_for on all nine tiny models); a kernel more
# than twice as far from fp32 as torch's own bf16 op is treated as wrong until the calibrated policy
# (harness.compare.policies) sets per-kind limits.
R_LIMIT = 2.0
PROBE_VALUES = 4  # probe entries are integers in [0, 4): K * 9 stays far below 2^24, exact in fp32
# Input std of the embedding-scale RMSNorm case: layer 0 normalises raw embeddings (~0.01-0.02), where
# eps is a visible share of the mean square (a wrong eps fails there, not on hidden states).
EMBED_STD = 0.01

Act = Callable[..., np.ndarray]
# Elements drawn, rounded or multiplied at once. A full-scale LM head case's weight is [vocab, hidden]
# (qwen3-4b: 389 M values, 1.6 GB in float32): drawn whole in float64, cast, scaled and rounded through
# copies, then widened to float64 for the reference, it alone took phase 1 past 8 GB. Row chunks give
# the same values (the generator's stream does not depend on how it is split).
_CHUNK_ELEMENTS = 1 << 24


def bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 (nearest even) and return float32."""
    return x.to(torch.bfloat16).to(torch.float32)


# -- declarations -------------------------------------------------------------------------------------

class Op(abc.ABC):
    """One op: subclass, set the class attributes, implement the three methods, decorate with @register."""

    name: ClassVar[str]
    params: ClassVar[tuple[str, ...]]       # identity keys, in identity order
    signature: ClassVar[str]                # inputs -> output, shapes in parameter names (the protocol)
    probe: ClassVar[bool] = False           # GEMM-like: also gets the exact small-integer probe

    @abc.abstractmethod
    def inputs(self, p: dict[str, Any], act: Act) -> dict[str, np.ndarray]:
        """Float32 inputs by name; ``act(*shape, std=, outliers=)`` draws activation-like values."""

    @abc.abstractmethod
    def reference(self, p: dict[str, Any], x: dict[str, torch.Tensor], case: "OpCase") -> torch.Tensor:
        """The op in plain torch at the inputs' dtype (float64: the reference, bf16: the baseline)."""

    @abc.abstractmethod
    def cases(self, spec: ModelSpec, t: int) -> list[dict[str, Any]]:
        """Parameter dicts of this op at ``spec``'s shapes for a ``t``-token prompt (edges included)."""

    def gemm_dims(self, p: dict[str, Any]) -> tuple[int, int, int] | None:
        """(M, K, N) for GEMM-like ops (tiling checks and the probe), else None."""
        return None


OPS: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: add ``cls`` to the registry under ``cls.name`` (names are unique)."""
    if cls.name in OPS:
        raise HarnessError(f"op {cls.name!r} is declared twice")
    OPS[cls.name] = cls()
    return cls


def _projections(spec: ModelSpec) -> list[tuple[int, int]]:
    """(K, N) of every GEMM of a decoder layer and the LM head, in execution order."""
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return [(h, q), (h, kv), (q, h), (h, i), (i, h), (h, v)]


def _lengths(t: int) -> tuple[int, ...]:
    """``t`` and ``t - 1``: one of them is odd, off every power-of-two tile (phase 7 draws such prompt
    lengths, so kernels must handle the remainder rows)."""
    return (t, t - 1) if t > 1 else (t,)


@register
class Gemm(Op):
    name, params, probe = "gemm", ("M", "K", "N"), True
    signature = "a [M, K], w [N, K] (HF layout) -> [M, N] = a @ w.T"

    def inputs(self, p, act):
        return {"a": act(p["M"], p["K"]), "w": act(p["N"], p["K"], std=1 / math.sqrt(p["K"]), outliers=False)}

    def reference(self, p, x, case):
        return x["a"] @ x["w"].T

    def cases(self, spec, t):
        return [dict(M=m, K=k, N=n) for m in _lengths(t) for k, n in _projections(spec)]

    def gemm_dims(self, p):
        return p["M"], p["K"], p["N"]


@register
class GemmBias(Op):
    name, params, probe = "gemm_bias", ("M", "K", "N"), False
    signature = "a [M, K], w [N, K], b [N] -> [M, N] = a @ w.T + b (the q / k / v projections with a bias)"

    def inputs(self, p, act):
        return {"a": act(p["M"], p["K"]), "w": act(p["N"], p["K"], std=1 / math.sqrt(p["K"]), outliers=False),
                "b": act(p["N"], outliers=False)}

    def reference(self, p, x, case):
        return x["a"] @ x["w"].T + x["b"]

    def cases(self, spec, t):
        if not spec.has_qkv_bias:
            return []
        return [dict(M=m, K=k, N=n) for m in (*_lengths(t), 1) for k, n in _projections(spec)[:2]]

    def gemm_dims(self, p):
        return p["M"], p["K"], p["N"]


@register
class Gemv(Op):
    name, params, probe = "gemv", ("K", "N"), True
    signature = "a [K], w [N, K] -> [N] = w @ a"

    def inputs(self, p, act):
        return {"a": act(p["K"]), "w": act(p["N"], p["K"], std=1 / math.sqrt(p["K"]), outliers=False)}

    def reference(self, p, x, case):
        return x["w"] @ x["a"]

    def cases(self, spec, t):
        return [dict(K=k, N=n) for k, n in _projections(spec)]

    def gemm_dims(self, p):
        return 1, p["K"], p["N"]


@register
class RmsNorm(Op):
    name, params = "rmsnorm", ("T", "D", "eps", "std")
    signature = "x [T, D], w [D] -> [T, D] (eps: rms_norm_eps; std: the inputs' scale)"

    def inputs(self, p, act):
        return {"x": act(p["T"], p["D"], std=p["std"]), "w": np.abs(1 + act(p["D"], std=0.15, outliers=False))}

    def reference(self, p, x, case):  # HF LlamaRMSNorm: normalise in fp32 (or better), cast, then scale
        dt = x["x"].dtype
        h = x["x"].to(torch.promote_types(dt, torch.float32))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + p["eps"])
        return x["w"] * h.to(dt)

    def cases(self, spec, t):
        eps = spec.rms_norm_eps
        out = [dict(T=t, D=spec.hidden_size, eps=eps, std=0.05), dict(T=t, D=spec.hidden_size, eps=eps, std=EMBED_STD)]
        if spec.has_qk_norm:  # Qwen3's per-head q / k norm at head_dim
            out.append(dict(T=t * spec.num_heads, D=spec.head_dim, eps=eps, std=0.05))
        return out


def _rope_tables(case: "OpCase", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    p = case.p
    inv = rope_inv_freq(p["hd"], float(p["theta"]), case.rope_scaling)
    positions = np.arange(p["pos"], p["pos"] + p["T"], dtype=np.float64)
    ang = torch.from_numpy(positions[:, None] * inv[None, :])
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


@register
class Rope(Op):
    name, params = "rope", ("T", "heads", "hd", "theta", "scaling", "pos")
    signature = ("x [T, heads, hd] -> [T, heads, hd]: HF two-halves rotation at positions pos .. pos+T-1 "
                 "(theta: rope_theta; scaling: the config's rope_type, its dict in OpCase.rope_scaling)")

    def inputs(self, p, act):
        return {"x": act(p["T"], p["heads"], p["hd"], std=2.0, outliers=False)}

    def reference(self, p, x, case):
        dt = x["x"].dtype
        cos, sin = _rope_tables(case, dt)
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        q = x["x"]
        h = q.shape[-1] // 2
        return q * cos + torch.cat([-q[..., h:], q[..., :h]], -1) * sin

    def cases(self, spec, t):
        kind = (spec.rope_scaling or {}).get("rope_type", "none")
        base = dict(T=t, heads=spec.num_heads, hd=spec.head_dim, theta=spec.rope_theta, scaling=kind)
        # The end of the context window: where rope_scaling's low-frequency band turns by whole radians.
        last = int(spec.config.get("max_position_embeddings", 0)) - t
        return [dict(base, pos=0)] + ([dict(base, pos=last)] if last > 0 else [])


@register
class SiluMul(Op):
    name, params = "silu_mul", ("T", "I")
    signature = "gate [T, I], up [T, I] -> [T, I] = silu(gate) * up"

    def inputs(self, p, act):
        return {"gate": act(p["T"], p["I"], std=1.6), "up": act(p["T"], p["I"])}

    def reference(self, p, x, case):
        return F.silu(x["gate"]) * x["up"]

    def cases(self, spec, t):
        return [dict(T=t, I=spec.intermediate_size)]


@register
class Softmax(Op):
    name, params = "softmax", ("rows", "L")
    signature = "x [rows, L] -> [rows, L], softmax over the last dim"

    def inputs(self, p, act):
        return {"x": act(p["rows"], p["L"], std=3.0, outliers=False)}

    def reference(self, p, x, case):
        return torch.softmax(x["x"], -1)

    def cases(self, spec, t):
        return [dict(rows=spec.num_heads * t, L=t)]


def _attention_inputs(heads: int, kv_heads: int, t: int, length: int, hd: int, act: Act) -> dict[str, np.ndarray]:
    s = math.sqrt(3.0)  # q.k / sqrt(hd) with std ~3: peaked, not uniform, rows
    return {"q": act(heads, t, hd, std=s, outliers=False), "k": act(kv_heads, length, hd, std=s, outliers=False),
            "v": act(kv_heads, length, hd)}


def _sdpa(x: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
    q, k, v = x["q"], x["k"], x["v"]
    groups = q.shape[0] // k.shape[0]  # GQA: query head h reads KV head h // groups
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal)[0]


@register
class AttentionPrefill(Op):
    name, params = "attention_prefill", ("heads", "kv_heads", "T", "hd")
    signature = ("q [heads, T, hd], k / v [kv_heads, T, hd] -> [heads, T, hd]: causal, scale 1/sqrt(hd), "
                 "query head h reads KV head h // (heads / kv_heads)")

    def inputs(self, p, act):
        return _attention_inputs(p["heads"], p["kv_heads"], p["T"], p["T"], p["hd"], act)

    def reference(self, p, x, case):
        return _sdpa(x, causal=True)

    def cases(self, spec, t):
        return [dict(heads=spec.num_heads, kv_heads=spec.num_kv_heads, T=n, hd=spec.head_dim)
                for n in _lengths(t)]


@register
class AttentionDecode(Op):
    name, params = "attention_decode", ("heads", "kv_heads", "L", "hd")
    signature = ("q [heads, 1, hd], k / v [kv_heads, L, hd] -> [heads, 1, hd]: the new token (position L-1) "
                 "attends to every cached key; scale and GQA as attention_prefill")

    def inputs(self, p, act):
        return _attention_inputs(p["heads"], p["kv_heads"], 1, p["L"], p["hd"], act)

    def reference(self, p, x, case):
        return _sdpa(x, causal=False)

    def cases(self, spec, t):
        return [dict(heads=spec.num_heads, kv_heads=spec.num_kv_heads, L=t + 1, hd=spec.head_dim)]


# -- cases ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpCase:
    """One op at one shape: ``op`` and ``params`` (name, value) pairs in the declaration's order."""

    op: str
    params: tuple[tuple[str, Any], ...]
    rope_scaling: dict | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise HarnessError(f"unknown op {self.op!r}; known: {', '.join(OPS)}")
        names = tuple(k for k, _ in self.params)
        if names != OPS[self.op].params:
            raise HarnessError(f"{self.op}: parameters {names}, expected {OPS[self.op].params}")

    @classmethod
    def of(cls, op: str, rope_scaling: dict | None = None, **params: Any) -> "OpCase":
        """``OpCase.of("gemm", M=64, K=896, N=4864)``: parameters by name, put in declaration order."""
        known = OPS[op].params if op in OPS else tuple(params)
        return cls(op, tuple((k, params[k]) for k in known if k in params), rope_scaling=rope_scaling)

    @property
    def definition(self) -> Op:
        return OPS[self.op]

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def id(self) -> str:
        """The identity used everywhere, e.g. ``gemm[M=64,K=896,N=4864]``."""
        return f"{self.op}[{','.join(f'{k}={v}' for k, v in self.params)}]"

    def __str__(self) -> str:
        return self.id

    def gemm_dims(self) -> tuple[int, int, int] | None:
        return self.definition.gemm_dims(self.p)

    def inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded activation-like inputs (bf16 values as float32): peaked, with a few outlier channels."""
        rng = np.random.default_rng([seed, zlib.crc32(self.id.encode())])

        def act(*shape: int, std: float = 1.0, outliers: bool = True) -> np.ndarray:
            x = np.empty(shape, dtype=np.float32)
            for rows in _row_chunks(x):  # float64 draws cast to float32, as one draw's astype would
                rows[...] = rng.standard_normal(rows.shape)
            x *= std  # the float32 product of ``x * std``, in place
            if outliers and shape[-1] >= 16:
                x[..., rng.choice(shape[-1], 2, replace=False)] *= 8.0
            return x

        out = self.definition.inputs(self.p, act)
        return {k: _round_bf16_inplace(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}

    def reference(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The fp32 result (computed in float64)."""
        return self._compute(inputs, torch.float64)

    def baseline(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The same op in torch bf16: the local noise baseline."""
        return self._compute(inputs, torch.bfloat16)

    def _compute(self, inputs: dict[str, np.ndarray], dtype: torch.dtype) -> np.ndarray:
        """The op on ``inputs`` cast to ``dtype``; in float64, a GEMM-like op whose weight exceeds
        ``_CHUNK_ELEMENTS`` a band of the weight's rows (output columns) at a time: each output column
        reads only its row of ``w`` (and of ``b``), so the LM head never exists whole in float64 (3.1 GB at
        qwen3-4b). bf16 stays in one piece (half the float32 size): torch's bf16 GEMM rounds its
        accumulation differently with N, and the baseline must be the whole op's."""
        w = inputs.get("w")
        if dtype != torch.float64 or self.gemm_dims() is None or w is None or w.size <= _CHUNK_ELEMENTS:
            x = {k: torch.from_numpy(v).to(dtype) for k, v in inputs.items()}
            return self.definition.reference(self.p, x, self).float().numpy()
        n, step = w.shape[0], max(1, _CHUNK_ELEMENTS // w.shape[1])
        out: np.ndarray | None = None
        for c0 in range(0, n, step):
            x = {k: torch.from_numpy(v[c0:c0 + step] if k in ("w", "b") else v).to(dtype) for k, v in inputs.items()}
            part = self.definition.reference(self.p, x, self).float().numpy()
            if out is None:
                out = np.empty(part.shape[:-1] + (n,), dtype=np.float32)
            out[..., c0:c0 + step] = part
        assert out is not None
        return out


def _row_chunks(x: np.ndarray):
    """Writable views of ``x``'s rows (its last axis whole), ``_CHUNK_ELEMENTS`` at a time, in C order."""
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    step = max(1, _CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for r0 in range(0, flat.shape[0], step):
        yield flat[r0:r0 + step]


def _round_bf16_inplace(x: np.ndarray) -> np.ndarray:
    """``x`` (float32, C-contiguous) rounded to bf16 (``bf16``) in place, a band of rows at a time."""
    for rows in _row_chunks(x):
        t = torch.from_numpy(rows)
        t.copy_(t.to(torch.bfloat16))
    return x


def cases_for(spec: ModelSpec, tokens: int | None = None) -> list[OpCase]:
    """Every op case of ``spec`` (a prompt of ``tokens``, default the scale's length), unique by id, in
    registry order."""
    t = tokens or spec.default_prompt_len
    unique: dict[str, OpCase] = {}
    for op in OPS.values():
        for params in op.cases(spec, t):
            case = OpCase.of(op.name, rope_scaling=spec.rope_scaling if op.name == "rope" else None, **params)
            unique.setdefault(case.id, case)
    return list(unique.values())


# -- backends -------------------------------------------------------------------------------------------

class OpBackend(Protocol):
    """A deployment's kernels, op by op (what ``factory.op_backend(spec)`` returns).

    ``run(case, inputs)`` computes ``case`` on ``inputs`` (float32 arrays holding bf16 values, named and
    shaped as the op's ``signature``) and returns the output (any float dtype; judged as float32).
    Optional ``supports(case) -> bool``: False for a case it has no kernel for (reported as not run).
    """

    def run(self, case: OpCase, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


def supports(backend: Any, case: OpCase) -> bool:
    """Whether ``backend`` runs ``case`` (backends without ``supports`` claim every case)."""
    check = getattr(backend, "supports", None)
    return bool(check(case)) if callable(check) else True


# -- judging --------------------------------------------------------------------------------------------

@dataclass
class OpResult:
    """Truthy when the case passed; ``metrics`` holds R and the comparator's other numbers."""

    case: str
    passed: bool
    metrics: dict[str, Any]

    def __bool__(self) -> bool:
        return self.passed


def _2d(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)


def _output(case: OpCase, backend: OpBackend, inputs: dict[str, np.ndarray], want: tuple[int, ...],
            owned: bool = False) -> np.ndarray:
    """The backend's output on ``inputs``: copies of them, or (``owned``: the caller has no further use
    for them) the arrays themselves, which a full-scale LM head case cannot afford twice."""
    out = np.asarray(backend.run(case, inputs if owned else {k: v.copy() for k, v in inputs.items()}))
    if out.shape != want:
        raise HarnessError(f"{case.id}: the op backend returned shape {out.shape}, expected {want}")
    return out.astype(np.float32)


def judge(case: OpCase, backend: OpBackend, seed: int = 0, r_limit: float = R_LIMIT) -> OpResult:
    """Run ``case`` on ``backend`` and judge it against the fp32 reference with the bf16 baseline."""
    from harness.compare.metrics import tap_metrics

    inputs = case.inputs(seed)
    ref, base = case.reference(inputs), case.baseline(inputs)
    dut = _output(case, backend, inputs, ref.shape, owned=True)
    metrics = tap_metrics(_2d(dut), _2d(ref), _2d(base))
    finite = bool(np.isfinite(dut).all())  # NaN or inf always fails
    return OpResult(case.id, finite and metrics["r"] <= r_limit, metrics)


def exact_probe(case: OpCase, backend: OpBackend) -> OpResult:
    """GEMM / GEMV on integers in [0, 4): fp32 accumulation gives exactly bf16(exact sum); a bf16
    accumulator loses the low bits once partial sums pass 256 and fails deterministically."""
    if not case.definition.probe:
        raise HarnessError(f"{case.id}: exact probes exist for {', '.join(n for n, o in OPS.items() if o.probe)} only")
    m, k, n = case.gemm_dims()
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    a = rng.integers(0, PROBE_VALUES, size=(m, k)).astype(np.float32)
    w = np.empty((n, k), dtype=np.float32)
    for rows in _row_chunks(w):  # the same integers as one draw, without a [N, K] int64 array
        rows[...] = rng.integers(0, PROBE_VALUES, size=rows.shape)
    exact, a64 = np.empty((m, n), dtype=np.float32), a.astype(np.float64)
    step = max(1, _CHUNK_ELEMENTS // k)
    for c0 in range(0, n, step):  # float64 sums of small integers are exact whatever their order
        exact[:, c0:c0 + step] = a64 @ w[c0:c0 + step].T.astype(np.float64)
    want = bf16(torch.from_numpy(exact)).numpy()
    a_shape = (m, k) if "M" in case.p else (k,)  # gemm's a is [M, K], gemv's [K]
    got = _output(case, backend, {"a": a.reshape(a_shape), "w": w}, a_shape[:-1] + (n,), owned=True).reshape(m, n)
    bad = got != want
    first = np.argwhere(bad)[0].tolist() if bad.any() else None
    return OpResult(case.id, not bad.any(), {"mismatches": int(bad.sum()), "elements": int(bad.size),
                                             "max_exact_sum": float(exact.max()), "first_mismatch": first})


# -- performance from the same cases ---------------------------------------------------------------------

def time_cases(cases: list[OpCase], backend: OpBackend, rounds: int = 5, warmup: int = 1,
               seed: int = 0) -> dict[str, dict[str, Any]]:
    """Wall time of ``backend.run`` per case id: ``median_s``, ``min_s``, ``rounds`` (after ``warmup``
    untimed runs), on the same inputs phase 1 judges. Cases the backend does not support are left out."""
    if rounds < 1 or warmup < 0:
        raise HarnessError(f"time_cases: rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        if not supports(backend, case):
            continue
        inputs = case.inputs(seed)
        samples = []
        for i in range(warmup + rounds):
            fresh = {k: v.copy() for k, v in inputs.items()}
            t0 = time.perf_counter()
            backend.run(case, fresh)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        out[case.id] = {"median_s": statistics.median(samples), "min_s": min(samples), "rounds": rounds}
    return out
