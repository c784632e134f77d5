"""Run a model layer-first over phases whose inputs are all known: layer 0 for the prefill and every
decode step, then layer 1, ...

A streamed model (harness.reference.streaming) that cannot keep every weight maps, or maps and converts,
each layer again on every forward: 33 times for a prefill and 32 decode steps. A run fed known tokens - a
bf16 reference fed the fp32 golden's tokens, a teacher-forced baseline - needs no phase's output to
build the next phase's input, so it can give each layer all of its phases in a row: a block entered again
without another in between reuses its tensors, and each layer is read once per run.

Every phase is embedded, then gets what the model's own forward, handed that embedding, would give its
first decoder layer (the positions, mask and rotary embeddings built from the KV cache as it stands: the
first layer has run every earlier phase by then). Each decoder layer, the final norm and the LM head are
called as the forward calls them: the stock modules on the same values in the same order per layer, so
every tap is bit-identical to a step-by-step run (tested). Models whose layers take different masks
(sliding-window layers) run step by step instead (``supported``).
"""
from __future__ import annotations

import torch

from harness.reference.capture import TapRecorder


class _AtFirstLayer(Exception):
    """Stops a model's forward where it calls its first decoder layer."""


def supported(model) -> bool:
    """Whether every decoder layer takes the same mask (no sliding-window layers): the phases are then run
    with the arguments the model's own forward hands its first layer."""
    kinds = getattr(model.config, "layer_types", None)
    return not kinds or set(kinds) == {"full_attention"}


def _first_layer_call(model, embedded: torch.Tensor, cache) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``model``'s own forward passes its first decoder layer for
    the input embeddings ``embedded`` (positions, mask and rotary embeddings computed from ``cache`` as it
    stands)."""
    got: dict = {}

    def grab(module, args, kwargs):
        got["call"] = (args, kwargs)
        raise _AtFirstLayer

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        model(inputs_embeds=embedded, cache=cache, use_cache=True)
    except _AtFirstLayer:
        pass
    finally:
        handle.remove()
    return got["call"]


def run_layer_first(model, rec: TapRecorder, cache, phases: list[tuple[str, torch.Tensor]]) -> None:
    """Run ``phases`` ((name, input ids [1, T]) in order, each after the one before it in ``cache``)
    through ``model`` one layer at a time; the taps go to ``rec`` under each phase's name."""
    from transformers.modeling_utils import slice_logits_to_keep

    layers, inner = model.model.layers, model.model
    embedded = []
    for phase, ids in phases:
        rec.phase = phase
        embedded.append(inner.embed_tokens(ids))  # what the forward would embed (a forced tap included)
    states = []
    for (phase, _), x in zip(phases, embedded):
        rec.phase = phase
        # The first layer runs before the next phase's call is built: that call's mask and positions read
        # the first layer's KV cache, which then holds every phase before it, as in a step-by-step run.
        args, kwargs = _first_layer_call(model, x, cache)
        states.append([layers[0](*args, **kwargs), kwargs])
    del embedded, x, args
    for layer in layers[1:]:
        for (phase, _), state in zip(phases, states):
            rec.phase = phase
            state[0] = layer(state[0], **state[1])
    for (phase, _), state in zip(phases, states):
        rec.phase = phase
        state[:] = [inner.norm(state[0])]  # the layers' arguments are no longer needed
    for (phase, _), state in zip(phases, states):
        rec.phase = phase
        model.lm_head(slice_logits_to_keep(state.pop(), 0))  # as the forward calls it; the logits are a tap
