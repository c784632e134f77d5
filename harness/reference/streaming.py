"""A transformers model whose weights live outside it: each block's parameters are materialised from a
weights Mapping just before the block runs and released right after.

The model is built on the meta device (no memory, no init). Forward pre-hooks on the embedding, each
decoder layer, the final norm and the LM head put that block's tensors in place; forward hooks swap
them back for meta placeholders. Peak weight memory is one block (the largest: the embedding table or
the LM head), whatever the model's size; numerics are the stock modules' own, on the same values as
``build_hf_model`` (bit-identical taps, tested).
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch

from harness.errors import HarnessError
from harness.reference.hf_model import ATTN_IMPL
from harness.spec.model_spec import ModelSpec


def _as_torch(value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A weights array (float32 or bfloat16, possibly a read-only map) as a ``dtype`` tensor; zero-copy
    when the dtypes agree (the modules only read their parameters)."""
    import ml_dtypes

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if value.dtype == ml_dtypes.bfloat16:
            t = torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.asarray(value, dtype=np.float32))
    t = t.to(dtype)
    if t.data_ptr() % 64:
        # BLAS picks kernels (and so reduction orders) by alignment: a mapped tensor at an odd offset
        # would round differently from the same values in torch's own (64-byte aligned) memory.
        t = t.clone()
    return t


class _Block:
    """The parameters of one module (prefix ``prefix``), put in place on entry and released on exit."""

    def __init__(self, module: torch.nn.Module, names: dict[str, str], weights: Mapping, dtype: torch.dtype):
        # names: parameter path inside ``module`` -> weights key
        self.slots = []
        for local, key in names.items():
            owner_path, _, leaf = local.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            self.slots.append((owner, leaf, key, owner._parameters[leaf]))
        self.weights, self.dtype = weights, dtype

    def enter(self, module, args):
        for owner, leaf, key, placeholder in self.slots:
            t = _as_torch(self.weights[key], self.dtype)
            if tuple(t.shape) != tuple(placeholder.shape):
                raise HarnessError(f"weight {key}: shape {tuple(t.shape)}, expected {tuple(placeholder.shape)}")
            owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        return None

    def exit(self, module, args, output):
        for owner, leaf, _, placeholder in self.slots:
            owner._parameters[leaf] = placeholder
        return None


def build_streaming_model(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: torch.dtype = torch.float32):
    """The transformers model of ``spec`` in eval mode, reading its blocks from ``weights`` as it runs."""
    import transformers

    from harness.reference import capture  # noqa: F401  (registers the capture attention function)

    config = spec.hf_config()
    config._attn_implementation = ATTN_IMPL
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTN_IMPL)
    inner = model.model
    # Buffers computed at init (RoPE's inverse frequencies) must be real: rebuild the rotary module on CPU.
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if meta_buffers:
        raise HarnessError(f"streaming model of {spec.id}: buffers left on the meta device: {meta_buffers[:3]}")

    expected = {f"model.{n}" for n, _ in inner.named_parameters(remove_duplicate=False)}
    expected |= {"lm_head.weight"} if not spec.tied_embeddings else set()
    missing = sorted(expected - set(weights.keys()))
    unexpected = sorted(set(weights.keys()) - expected)
    if missing or unexpected:
        raise HarnessError(
            f"weights do not match {spec.id} ({spec.scale}): missing {missing[:5]}, unexpected {unexpected[:5]}")

    def attach(module: torch.nn.Module, prefix: str, names: dict[str, str] | None = None) -> None:
        names = names or {n: prefix + n for n, _ in module.named_parameters(remove_duplicate=False)}
        block = _Block(module, names, weights, dtype)
        module.register_forward_pre_hook(block.enter, prepend=True)
        module.register_forward_hook(block.exit)

    attach(inner.embed_tokens, "model.embed_tokens.")
    for i, layer in enumerate(inner.layers):
        attach(layer, f"model.layers.{i}.")
    attach(inner.norm, "model.norm.")
    # Tied: the LM head reads the embedding table (its own placeholder, untied from the embedding's).
    model.lm_head._parameters["weight"] = torch.nn.Parameter(
        torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device="meta"), requires_grad=False)
    head_key = "model.embed_tokens.weight" if spec.tied_embeddings else "lm_head.weight"
    attach(model.lm_head, "", {"weight": head_key})
    return model.eval()
