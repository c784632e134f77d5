"""A transformers model whose weights live outside it: each block's parameters are materialised from a
weights Mapping just before the block runs and released right after.

The model is built on the meta device (no memory, no init). Forward pre-hooks on the embedding, each
decoder layer, the final norm and the LM head put that block's tensors in place; forward hooks swap
them back for meta placeholders. Peak weight memory is one block (the largest: the embedding table or
the LM head, plus one set of conversion buffers those blocks share), whatever the model's size; numerics
are the stock modules' own, on the same values as ``build_hf_model`` (bit-identical taps, tested). A
buffer still holding a weight's converted values is not converted again: the embedding table a tied
LM head shares is widened once per run. A block entered again with no other block in between (a
layer-first run, harness.reference.layer_first) reuses the tensors it had: they stay referenced until
another block enters.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import numpy as np
import torch

from harness.errors import HarnessError
from harness.memory import release
from harness.reference.hf_model import ATTN_IMPL
from harness.spec.model_spec import ModelSpec


def _source(value: np.ndarray) -> torch.Tensor:
    """A weights array (float32 or bfloat16, possibly a read-only map) as a tensor on the same memory."""
    import ml_dtypes

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if value.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.asarray(value, dtype=np.float32))


def _as_torch(value: np.ndarray, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` as a ``dtype`` tensor: zero-copy when the dtypes agree and the memory is 64-byte aligned
    (the modules only read their parameters), else converted into ``buffer`` (reused block after block:
    fresh memory costs a page fault per 4 KiB, seconds per GB on a VM) or a new tensor."""
    t = _source(value)
    if t.dtype == dtype and t.data_ptr() % 64 == 0:
        return t
    # BLAS picks kernels (and so reduction orders) by alignment: a mapped tensor at an odd offset would
    # round differently from the same values in torch's own (64-byte aligned) memory, so it is copied.
    if buffer is None:
        return t.to(dtype=dtype, copy=True)
    return buffer.copy_(t)


class _Buffers:
    """Conversion targets shared by the blocks (one block is materialised at a time): the n-th tensor of
    a given shape in a block always lands in the same buffer, so all layers reuse one layer's memory.

    Up to ``resident_bytes`` of converted tensors are kept instead, in the order the forward first reads
    them (the embedding table, then layer by layer): those are converted once, not once per forward. A
    small model keeps them all; a larger one the first layers, as far as the memory it is given allows.
    """

    def __init__(self, dtype: torch.dtype, resident_bytes: int = 0):
        self.dtype, self._pool = dtype, {}
        self._holds: dict[tuple, str] = {}  # buffer -> the weights key whose converted values it holds
        self.resident: dict[str, torch.Tensor] = {}
        self.resident_left = resident_bytes
        self.held: tuple[_Block, list[torch.Tensor]] | None = None  # the block entered last, and its tensors

    def tensor(self, weights: Mapping, key: str, shape: tuple[int, ...], nth: int) -> torch.Tensor:
        """Weight ``key`` as a ``dtype`` tensor of ``shape``, the block's ``nth`` of that shape."""
        t = self.resident.get(key)
        if t is not None:
            return t
        slot = (shape, nth)
        if self._holds.get(slot) == key:
            # Still there since the last conversion (weights are read-only): a tied embedding table,
            # which the embedding and the LM head share, is widened once per run, not twice per step.
            return self._pool[slot]
        value = weights[key]
        if tuple(value.shape) != shape:
            raise HarnessError(f"weight {key}: shape {tuple(value.shape)}, expected {shape}")
        nbytes = math.prod(shape) * self.dtype.itemsize
        if nbytes <= self.resident_left:
            self.resident_left -= nbytes
            t = self.resident[key] = _as_torch(value, self.dtype)
            return t
        buf = self._pool.get(slot)
        if buf is None:
            buf = self._pool[slot] = torch.empty(shape, dtype=self.dtype)
        t = _as_torch(value, self.dtype, buf)
        if t is buf:
            self._holds[slot] = key
        return t


class _Block:
    """The parameters of one module (prefix ``prefix``), put in place on entry and released on exit."""

    def __init__(self, module: torch.nn.Module, names: dict[str, str], weights: Mapping, buffers: _Buffers):
        # names: parameter path inside ``module`` -> weights key
        self.slots = []
        seen: dict[tuple[int, ...], int] = {}
        for local, key in names.items():
            owner_path, _, leaf = local.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            shape = tuple(owner._parameters[leaf].shape)
            nth = seen[shape] = seen.get(shape, -1) + 1
            self.slots.append((owner, leaf, key, owner._parameters[leaf], nth))
        self.weights, self.buffers = weights, buffers

    def enter(self, module, args):
        held = self.buffers.held
        if held is not None and held[0] is self:
            tensors = held[1]  # entered again with no other block between (a layer-first run): as they were
        else:
            self.buffers.held = None  # the block before lets go of its maps before this one maps its own
            tensors = [self.buffers.tensor(self.weights, key, tuple(placeholder.shape), nth)
                       for _, _, key, placeholder, nth in self.slots]
            self.buffers.held = (self, tensors)
        for (owner, leaf, _, _, _), t in zip(self.slots, tensors):
            owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        return None

    def exit(self, module, args, output):
        for owner, leaf, _, placeholder, _ in self.slots:
            owner._parameters[leaf] = placeholder
        return None


def build_streaming_model(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: torch.dtype = torch.float32,
                          resident_bytes: int = 0, later_resident_bytes: int | None = None):
    """The transformers model of ``spec`` in eval mode, reading its blocks from ``weights`` as it runs.

    Up to ``resident_bytes`` of tensors converted to ``dtype`` are kept after their first use (a small
    model's decode steps then convert nothing; a larger model's first layers are converted once); from
    the model's second forward on (the decode steps, once the prompt's activations are gone), up to
    ``later_resident_bytes`` when that is more."""
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

    buffers = _Buffers(dtype, resident_bytes)
    if later_resident_bytes is not None and later_resident_bytes > resident_bytes:
        forwards = [0]

        def grow_after_the_first_forward(module, args):
            forwards[0] += 1
            if forwards[0] == 2:
                release()  # the prompt's freed activations go back before tensors are kept in their place
                buffers.resident_left += later_resident_bytes - resident_bytes

        model.register_forward_pre_hook(grow_after_the_first_forward)

    def attach(module: torch.nn.Module, prefix: str, names: dict[str, str] | None = None) -> None:
        names = names or {n: prefix + n for n, _ in module.named_parameters(remove_duplicate=False)}
        block = _Block(module, names, weights, buffers)
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
