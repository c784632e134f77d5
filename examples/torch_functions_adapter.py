"""Gate ``torch_functions_decoder`` (plain torch functions, bf16) with the adapter kit: a mapping.

    harness gate --model llama-3.2-1b --deployment examples/torch_functions_adapter.py:factory --phase 3

Weights are found by identity (every projection, norm scale, the embedding and the tied LM head),
the attention context and ``act`` as the inputs of o_proj and down_proj, RoPE and
the block by function name; everything else (dtype widening, [1, T, H, D] layouts, the
golden coming back in isolated mode) is the kit's job.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_functions_decoder as ref  # noqa: E402

from harness.deployment.adapters import TorchTaps, hf_weight_taps, to_tap_array  # noqa: E402


class Adapted:
    def __init__(self, spec, weights, dtype: str = "bfloat16", observe: str = ""):
        self.config, self.cache, self.pos = spec.config, {}, 0
        self.w = {k: torch.from_numpy(np.array(v)).to(getattr(torch, dtype)) for k, v in weights.items()}
        self.taps = TorchTaps(
            spec.num_layers,
            weights=hf_weight_taps(spec.num_layers, self.w, tied=spec.tied_embeddings),
            functions={(ref, "apply_rope"): ["layers.{i}.q_rope", "layers.{i}.k_rope"],
                       (ref, "transformer_block"): ["layers.{i}.out"]},
            layouts={"q_rope": "bhtd", "k_rope": "bhtd"}, observe=filter(None, observe.split("+")))

    def _run(self, ids, tap):
        with self.taps.attached(tap):
            logits = ref.forward(torch.as_tensor(ids).long(), self.w, self.config, self.cache, self.pos)
        self.pos += len(ids)
        return to_tap_array(logits)

    def prefill(self, input_ids, tap):
        self.cache, self.pos = {}, 0
        return self._run(np.asarray(input_ids).reshape(-1), tap)

    def decode(self, token_id, tap):
        return self._run(np.array([int(token_id)]), tap)


def factory(spec, weights, dtype: str = "bfloat16", observe: str = ""):
    """``--deployment examples/torch_functions_adapter.py:factory[dtype=float32]`` runs it in fp32;
    ``[observe=attn+act]`` hands those taps over for judgement only (the decoder keeps its own values)."""
    return Adapted(spec, weights, dtype, observe)
