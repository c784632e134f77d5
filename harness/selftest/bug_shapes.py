"""Generic bug shapes: perturbations applicable to any tap of any deployment, beyond the emulator's faults.

Each shape is declared once in ``SHAPES``: its name, what its magnitude means, the magnitude grid the
minimum-detectable-error sweep walks, the reference magnitude the issue's detection target is judged at
(1%, or the gross form where 1% of that shape is below one bf16 rounding of the tap), and
``apply(value, ctx, magnitude, rng) -> value`` on a 2-D float32 ``[tokens, features]`` tap value.

Conventions (docs/bug-shapes.md has the table):

- "relative" noise is multiplicative, ``x * (1 + m * z)``: every element's error is m of itself, so it
  costs the same number of bf16 ULPs on every element (the hardest case for a ULP-based gate, and the
  shape of a precision bug); ``noise_rms`` is the additive form, ``x + m * rms(row) * z``.
- region shapes (a row, a head slice) use random signs, ``x * (1 + m * s)`` with s = +-1:
  every element of the region is off by exactly m of itself, with no lean. A channel is additive
  (``+ m * rms(row) * s``), like the sparse corruption: a channel near zero would hide any relative error.
- "row rms" is the root mean square of the element's own row (token), so magnitudes compare across
  taps whatever their scale.
- head-structured taps (q, k, v, q_norm, k_norm, q_rope, k_rope, attn) are flattened head-major
  (``head * head_dim + d``); on the other taps a "head" is a contiguous, aligned block of head_dim features.

``inject(factory, phase, tap, shape, magnitude, seed)`` wraps any deployment factory so that the one tap
hands the perturbed value to the real tap callable: cumulative mode propagates it downstream, isolated
mode judges it at that tap alone.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import ml_dtypes
import numpy as np

from harness.errors import HarnessError
from harness.spec import taps as tapspec
from harness.spec.model_spec import ModelSpec

HEAD_KINDS = frozenset({"q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope", "attn"})
SPARSE_ELEMENTS = 4      # the "few elements" of the sparse gross corruption


@dataclass(frozen=True)
class ShapeContext:
    """What a shape may know about the tap it perturbs.

    ``previous``: the value this tap held in the previous phase (decode.N: decode.N-1's, decode.0:
    prefill's) as the deployment handed it over, or None in prefill."""

    spec: ModelSpec
    phase: str
    tap: str
    previous: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return tapspec.parse(self.tap).kind

    @property
    def decode(self) -> bool:
        return self.phase.startswith("decode")


Apply = Callable[[np.ndarray, ShapeContext, float, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class BugShape:
    """One generic bug shape: ``apply`` never modifies its input and returns float32 of the same shape."""

    name: str
    meaning: str                 # what the magnitude is
    magnitudes: tuple[float, ...]
    reference: float             # the target magnitude: 1%, or the gross form
    apply_fn: Apply = field(repr=False)
    gross: bool = False          # reference is a gross form rather than 1%

    def apply(self, value: np.ndarray, ctx: ShapeContext, magnitude: float, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(value, dtype=np.float32)
        if x.ndim != 2:
            raise HarnessError(f"bug shape {self.name}: tap {ctx.tap} value has shape {x.shape}, expected [tokens, features]")
        out = self.apply_fn(x.copy(), ctx, float(magnitude), rng)
        return np.ascontiguousarray(out, dtype=np.float32)


# -- helpers ------------------------------------------------------------------------------------

def row_rms(x: np.ndarray) -> np.ndarray:
    """[tokens, 1] root mean square of each row (float64 for the sum)."""
    return np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=1, keepdims=True))


def _signs(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=shape)


def head_block(ctx: ShapeContext, features: int, rng: np.random.Generator) -> slice:
    """One head's feature slice (a random head) on head-structured taps, else a random aligned block of
    head_dim features (the whole row when narrower)."""
    width = min(ctx.spec.head_dim, features)
    blocks = max(1, features // width)
    start = int(rng.integers(blocks)) * width
    return slice(start, start + width)


def middle_row(tokens: int) -> int:
    return tokens // 2


def rtz_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 toward zero into bf16 (truncate the low 16 bits), as float32. Non-finite values keep
    their class (Inf stays Inf, NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isfinite(x), out, x).astype(np.float32)


def rne_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even into bf16 (ml_dtypes), as float32."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


# -- the shapes -----------------------------------------------------------------------------------

def _scale(x, ctx, m, rng):
    return x * np.float32(1.0 + m)


def _noise(x, ctx, m, rng):
    return x * (1.0 + m * rng.standard_normal(x.shape))


def _noise_rms(x, ctx, m, rng):
    return x + m * row_rms(x) * rng.standard_normal(x.shape)


def _sparse(x, ctx, m, rng):
    n = min(SPARSE_ELEMENTS, x.size)
    flat = rng.choice(x.size, size=n, replace=False)
    rows, cols = np.unravel_index(flat, x.shape)
    rms = row_rms(x)[rows, 0]
    x[rows, cols] = x[rows, cols] + m * rms * _signs(rng, n)
    return x


def _row(pick: Callable[[int], int]) -> Apply:
    def apply(x, ctx, m, rng):
        t = pick(x.shape[0])
        x[t] = x[t] * (1.0 + m * _signs(rng, x.shape[1]))
        return x
    return apply


def _head(x, ctx, m, rng):
    block = head_block(ctx, x.shape[1], rng)
    x[:, block] = x[:, block] * (1.0 + m * _signs(rng, (x.shape[0], block.stop - block.start)))
    return x


def _channel(x, ctx, m, rng):
    """Additive, in row rms: relative to itself a channel crossing zero would hide any magnitude."""
    c = int(rng.integers(x.shape[1]))
    x[:, c] = x[:, c] + m * row_rms(x)[:, 0] * _signs(rng, x.shape[0])
    return x


def _offset(x, ctx, m, rng):
    return x + m * row_rms(x)


def _rtz(x, ctx, m, rng):
    """Round toward zero into bf16 instead of to nearest. A value that is already bf16 (a deployment
    that rounded to nearest) lost the information of where the exact value lay; round-to-nearest went
    away from zero on about half of the elements, and there RTZ would sit one ULP nearer zero: so those
    elements step one ULP toward zero on a seeded half. Non-bf16 values are truncated exactly."""
    out = rtz_bf16(x)
    exact = (out == x) & np.isfinite(x) & (x != 0)
    step = exact & (rng.random(x.shape) < 0.5)
    out = np.where(step, np.sign(x) * bf16_toward_zero(np.abs(x)), out)
    if m < 1.0:  # only a fraction m of the elements (m = 1: the whole tap)
        out = np.where(rng.random(x.shape) < m, out, x)
    return out


def bf16_toward_zero(a: np.ndarray) -> np.ndarray:
    """The next bf16 value toward zero from a bf16 value a > 0."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits & np.uint32(0xFFFF0000)) - np.uint32(0x10000)).view(np.float32)


def _stale(x, ctx, m, rng):
    """The last row holds the previous token's values: in prefill row T-1 gets row T-2; in decode the
    tap's value of the previous step (decode.0: prefill's last row). No previous token: unchanged."""
    if ctx.decode:
        if ctx.previous is None or ctx.previous.shape[1] != x.shape[1]:
            return x
        prev = np.asarray(ctx.previous, dtype=np.float32)[-1]
    else:
        if x.shape[0] < 2:
            return x
        prev = x[-2].copy()
    x[-1] = prev if m == 1.0 else x[-1] + m * (prev - x[-1])
    return x


def _sign(x, ctx, m, rng):
    """One head slice of the last row negated (m = 1); m < 1 scales that slice by (1 - 2m)."""
    block = head_block(ctx, x.shape[1], rng)
    x[-1, block] = x[-1, block] * (1.0 - 2.0 * m)
    return x


_FINE = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
_REGION = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0)

SHAPES: dict[str, BugShape] = {s.name: s for s in (
    BugShape("scale", "x * (1 + m): the whole tap scaled (the emulator's classic 1% property)", _FINE, 0.01, _scale),
    BugShape("noise", "x * (1 + m z), z ~ N(0, 1) per element: relative noise of rms m on every element", _FINE, 0.01, _noise),
    BugShape("noise_rms", "x + m rms(row) z, z ~ N(0, 1): additive noise of rms m of the row rms", _FINE, 0.01, _noise_rms),
    BugShape("sparse", f"{SPARSE_ELEMENTS} random elements off by +-m row rms (gross: m = 1)",
             (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), 1.0, _sparse, gross=True),
    BugShape("row_last", "the last row x * (1 + m s), s = +-1", _REGION, 0.01, _row(lambda t: t - 1)),
    BugShape("row_mid", "row T // 2 x * (1 + m s), s = +-1 (decode: the one row)", _REGION, 0.01, _row(middle_row)),
    BugShape("head", "one head slice (every row) x * (1 + m s), s = +-1", _REGION, 0.01, _head),
    BugShape("channel", "one feature column (every row) x + m rms(row) s, s = +-1 (gross: m = 1)",
             (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), 1.0, _channel, gross=True),
    BugShape("offset", "x + m rms(row): a constant offset on every element", _FINE, 0.01, _offset),
    BugShape("rtz", "round toward zero into bf16 instead of to nearest, on a fraction m of the elements",
             (1.0,), 1.0, _rtz, gross=True),
    BugShape("stale", "the last row moved m of the way to the previous token's values (1: stale)",
             (1.0,), 1.0, _stale, gross=True),
    BugShape("sign", "one head slice of the last row x * (1 - 2m) (1: sign flipped)", (1.0,), 1.0, _sign, gross=True),
)}


def get(name: str) -> BugShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise HarnessError(f"unknown bug shape {name!r}; shapes: {', '.join(SHAPES)}") from None


def shape_rng(seed: int, phase: str, tap: str, shape: str, magnitude: float) -> np.random.Generator:
    """A generator fixed by (seed, phase, tap, shape, magnitude): the same perturbation however it is reached."""
    key = zlib.crc32(f"{phase}/{tap}/{shape}/{magnitude!r}".encode())
    return np.random.default_rng([int(seed), key])


def perturb(value: np.ndarray, ctx: ShapeContext, shape: str, magnitude: float, seed: int = 0) -> np.ndarray:
    """``shape`` at ``magnitude`` applied to one tap value, seeded by (seed, phase, tap, shape, magnitude)."""
    return get(shape).apply(value, ctx, magnitude, shape_rng(seed, ctx.phase, ctx.tap, shape, magnitude))


# -- injection into any deployment ----------------------------------------------------------------

class InjectedDeployment:
    """Wraps a deployment: at (phase, tap) the value handed over is perturbed before the real tap sees it."""

    def __init__(self, inner: Any, spec: ModelSpec, phase: str, tap: str, shape: str, magnitude: float, seed: int):
        self.inner, self.spec = inner, spec
        self.target, self.shape, self.magnitude, self.seed = (phase, tap), shape, magnitude, seed
        self.step = 0
        self.previous: np.ndarray | None = None   # the target tap's value in the last phase (for stale)
        self.applied = 0

    def _wrap(self, phase: str, tap: Callable) -> Callable:
        target_phase, target_tap = self.target

        def hand_over(name: str, value: Any) -> Any:
            if name != target_tap:
                return tap(name, value)
            arr, to_torch = _as_numpy(value)
            if arr is None:  # not float32 2-D: a contract problem the gate reports itself
                return tap(name, value)
            previous, self.previous = self.previous, np.array(arr, copy=True)
            if phase != target_phase:
                return tap(name, value)
            ctx = ShapeContext(self.spec, phase, name, previous)
            self.applied += 1
            out = perturb(arr, ctx, self.shape, self.magnitude, self.seed)
            return tap(name, to_torch(out))
        return hand_over

    def prefill(self, input_ids, tap):
        self.step, self.previous = 0, None
        return self.inner.prefill(input_ids, self._wrap("prefill", tap))

    def decode(self, token_id, tap):
        phase = f"decode.{self.step}"
        self.step += 1
        return self.inner.decode(token_id, self._wrap(phase, tap))


def _as_numpy(value: Any) -> tuple[np.ndarray | None, Callable[[np.ndarray], Any]]:
    """(float32 2-D numpy view of value or None, a function turning a numpy result back into value's type)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        import torch

        if value.dtype != torch.float32 or value.dim() != 2:
            return None, lambda a: a
        return value.detach().cpu().numpy(), torch.from_numpy
    if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim == 2:
        return value, lambda a: a
    return None, lambda a: a


def wrap_factory(factory: Any, wrap: Callable[[Any, ModelSpec], Any], name: str) -> Callable:
    """A factory whose deployments are ``wrap(inner_deployment, spec)``; keeps ``needs_golden`` factories
    (the replays) working. ``factory``: a callable or a ``--deployment`` target string."""
    from harness.deployment.loader import describe, load_factory

    inner = load_factory(factory)
    needs_golden = bool(getattr(inner, "needs_golden", False))

    def built(spec, weights, **kwargs):
        return wrap(inner(spec, weights, **kwargs) if needs_golden else inner(spec, weights), spec)
    built.needs_golden = needs_golden  # type: ignore[attr-defined]
    built.name = f"{describe(factory)}+{name}"  # type: ignore[attr-defined]
    return built


def inject(factory: Any, phase: str, tap: str, shape: str, magnitude: float | None = None, seed: int = 0) -> Callable:
    """``factory``'s deployments with ``shape`` at ``magnitude`` (default: the shape's reference) applied
    to ``tap`` of ``phase`` (``prefill`` or ``decode.N``)."""
    s = get(shape)
    m = s.reference if magnitude is None else float(magnitude)
    tapspec.parse(tap)
    return wrap_factory(factory, lambda dep, spec: InjectedDeployment(dep, spec, phase, tap, shape, m, seed),
                        f"{shape}({m:g})@{phase}/{tap}")
