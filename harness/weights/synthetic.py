"""Synthetic weights that make activations look like a trained model's.

Why not transformers' default init (std 0.02 everywhere): it keeps every activation tiny and linear.
Attention rows come out nearly uniform, SiLU sees inputs near zero where it is almost linear, and the
residual stream has no outlier channels. Then a crude SiLU approximation, a bad softmax or a
low-precision accumulator passes unnoticed. These weights are instead scaled so that:

- embeddings sit at a trained model's small scale (RMS ~0.02), so RMSNorm's eps matters at layer 0;
- q/k projections give attention logits with a standard deviation of a few units, so softmax rows are
  peaked, not uniform (Qwen3's q/k norm weights carry that scale, as trained q/k norm weights do);
- MLP gate pre-activations have a standard deviation >= 1 in every layer, so SiLU is non-linear;
- a few residual channels carry outliers (large embedding columns and down_proj rows), damped by
  small RMSNorm weights on those channels, as in trained LLMs;
- the final norm's scale gives logits with a trained model's spread (a few units), so top-k is meaningful.

Every value is rounded to bfloat16, so the fp32 and bf16 reference runs share exactly the same weights.
Generation is seeded: torch's CPU generator (5x faster than NumPy's for the ~0.5-4 G values of a
full-scale model; the golden key records the torch version) draws every tensor in a fixed order.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from harness.spec.model_spec import ModelSpec

EMBED_STD = 0.02          # trained LLM embedding tables have RMS ~0.01-0.03
ATTN_LOGIT_STD = 3.0      # std of q.k/sqrt(d): peaked, non-uniform attention rows
GATE_STD = 1.6            # std of the MLP gate pre-activation: well outside SiLU's linear region
LOGIT_STD = 3.0           # spread of the output logits
N_OUTLIER_CHANNELS = 3
OUTLIER_GAIN = 12.0       # outlier channels are ~this many times larger than the rest
OUTLIER_NORM_WEIGHT = 0.08


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even) and return float32."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.to(torch.bfloat16).to(torch.float32).numpy()


def outlier_channels(spec: ModelSpec, seed: int) -> np.ndarray:
    """The residual channels that carry outliers for this model and seed."""
    rng = np.random.default_rng([seed, 7919])
    return np.sort(rng.choice(spec.hidden_size, size=N_OUTLIER_CHANNELS, replace=False))


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), as a bfloat16 (ml_dtypes) array: the
    values of ``bf16_round`` in half the bytes."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(_bfloat16())


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def largest_layer_draw(spec: ModelSpec) -> int:
    """Values in a decoder layer's largest tensor: the float32 draw buffer ``synthetic_plan`` keeps through
    the layers is this size (the first draw, the embedding table, gets one of its own)."""
    H = spec.hidden_size
    return max(spec.intermediate_size * H, spec.num_heads * spec.head_dim * H)


def synthetic_plan(spec: ModelSpec, seed: int = 0) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(HF parameter name, shape, make) per tensor, in generation order.

    Calling every ``make`` in list order yields the tensor's values as bfloat16 (exact); they share
    one seeded generator, so the order is part of the values. A caller materialises and releases one
    tensor at a time (``iter_synthetic_weights``): the peak is one tensor, not the model.
    ``lm_head.weight`` is omitted when the model ties it to the embedding (as HF checkpoints do).
    """
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + 104729)
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    outliers = outlier_channels(spec, seed)
    plan: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = []
    layer_draw = largest_layer_draw(spec)

    scratch: list[torch.Tensor] = []  # one float32 buffer, reused by every draw

    def normal(shape, std):
        # In place: the same float32 product as ``randn * std``, without a second tensor of the shape;
        # drawn into one reused buffer (``randn(out=)`` gives the same values): fresh memory costs a page
        # fault per 4 KiB, about a second per GB on a VM. The result is consumed (copied by ``to_bf16``
        # or by the arithmetic of its caller) before the next draw.
        n = int(np.prod(shape))
        if not scratch or scratch[0].numel() < n or (n <= layer_draw < scratch[0].numel()):
            # sized for this draw and at least a layer's largest: the embedding-sized buffer of the
            # first draw is not kept through the layers (a small model's reference runs beside them)
            # float32 named: torch's default dtype is process-wide, and a bf16 model built on another
            # thread (the reference beside a background draw) changes it for the moment
            scratch[:] = [torch.empty(max(n, layer_draw), dtype=torch.float32)]
        out = scratch[0][:n].view(shape)
        return torch.randn(shape, generator=gen, out=out).mul_(float(std)).numpy()

    def norm_weight(n, damp=None, center=1.0, spread=0.15):
        g = np.abs(center + normal(n, spread * center)).astype(np.float32)
        if damp is not None:
            g[damp] = OUTLIER_NORM_WEIGHT
        return g

    def add(name: str, shape, make: Callable[[], np.ndarray]) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        plan.append((name, shape, lambda: to_bf16(make())))

    def embed():
        e = normal((V, H), EMBED_STD)
        e[:, outliers] *= OUTLIER_GAIN
        return e

    add("model.embed_tokens.weight", (V, H), embed)

    # RMSNorm output has per-channel RMS ~ norm weight (~1), so a projection with std s/sqrt(H)
    # gives outputs of std ~s.
    qk_std = np.sqrt(ATTN_LOGIT_STD)

    def down():
        d = normal((H, I), 0.5 / np.sqrt(I))
        d[outliers, :] *= OUTLIER_GAIN / 2  # the MLPs keep feeding the outlier channels, as in trained models
        return d

    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", H, lambda: norm_weight(H, damp=outliers))
        add(p + "post_attention_layernorm.weight", H, lambda: norm_weight(H, damp=outliers))
        if spec.has_qk_norm:
            # q/k norm renormalises each head to RMS ~weight: the weight carries the logit scale.
            add(p + "self_attn.q_proj.weight", (nh * hd, H), lambda: normal((nh * hd, H), 1.0 / np.sqrt(H)))
            add(p + "self_attn.k_proj.weight", (nkv * hd, H), lambda: normal((nkv * hd, H), 1.0 / np.sqrt(H)))
            add(p + "self_attn.q_norm.weight", hd, lambda: norm_weight(hd, center=qk_std))
            add(p + "self_attn.k_norm.weight", hd, lambda: norm_weight(hd, center=qk_std))
        else:
            add(p + "self_attn.q_proj.weight", (nh * hd, H), lambda: normal((nh * hd, H), qk_std / np.sqrt(H)))
            add(p + "self_attn.k_proj.weight", (nkv * hd, H), lambda: normal((nkv * hd, H), qk_std / np.sqrt(H)))
        add(p + "self_attn.v_proj.weight", (nkv * hd, H), lambda: normal((nkv * hd, H), 1.0 / np.sqrt(H)))
        add(p + "self_attn.o_proj.weight", (H, nh * hd), lambda: normal((H, nh * hd), 0.5 / np.sqrt(nh * hd)))
        if spec.has_qkv_bias:
            # Trained Qwen2.5 checkpoints carry sizeable q/k biases (the k bias especially).
            add(p + "self_attn.q_proj.bias", nh * hd, lambda: normal(nh * hd, 0.5))
            add(p + "self_attn.k_proj.bias", nkv * hd, lambda: normal(nkv * hd, 1.0))
            add(p + "self_attn.v_proj.bias", nkv * hd, lambda: normal(nkv * hd, 0.2))
        add(p + "mlp.gate_proj.weight", (I, H), lambda: normal((I, H), GATE_STD / np.sqrt(H)))
        add(p + "mlp.up_proj.weight", (I, H), lambda: normal((I, H), 1.0 / np.sqrt(H)))
        add(p + "mlp.down_proj.weight", (H, I), down)

    # Logits = final_norm(x) @ embed.T: scale the final norm so logits have a trained spread.
    add("model.norm.weight", H, lambda: norm_weight(H, damp=outliers, center=LOGIT_STD / (EMBED_STD * np.sqrt(H))))
    if not spec.tied_embeddings:
        add("lm_head.weight", (V, H), lambda: normal((V, H), EMBED_STD))
    return plan


def iter_synthetic_weights(spec: ModelSpec, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(name, bf16-representable float32 array) per tensor, generated one at a time in plan order."""
    for name, _, make in synthetic_plan(spec, seed):
        yield name, make().astype(np.float32)


def synthetic_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded, bf16-representable weights keyed by HF parameter name (float32 arrays), all in memory
    (small models and tests; builds stream them through ``synthetic_plan``)."""
    return dict(iter_synthetic_weights(spec, seed))
