"""Build the Hugging Face transformers model of a spec from a weights dict (no default init)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from harness.errors import HarnessError
from harness.spec.model_spec import ModelSpec

ATTN_IMPL = "npu_harness_capture"  # registered in harness.reference.capture


def build_hf_model(spec: ModelSpec, weights: dict[str, np.ndarray], dtype: torch.dtype = torch.float32):
    """The transformers model class of ``spec`` in eval mode, holding ``weights`` cast to ``dtype``.

    Built under ``no_init_weights``: transformers' default initialisation is pure waste here (the
    weights are overwritten) and dominates build time at full scale.
    """
    import transformers
    from transformers.initialization import no_init_weights

    from harness.reference import capture  # noqa: F401  (registers the capture attention function)

    config = spec.hf_config()
    config._attn_implementation = ATTN_IMPL
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTN_IMPL)
    state = model.state_dict()
    missing = [k for k in state if k not in weights and not (k == "lm_head.weight" and spec.tied_embeddings)]
    unexpected = [k for k in weights if k not in state]
    if missing or unexpected:
        raise HarnessError(
            f"weights do not match {spec.id} ({spec.scale}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad(), warnings.catch_warnings():
        # Weights arrays are read-only (shared, cached); copy_ only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, value in weights.items():
            param = state[name]
            if tuple(param.shape) != tuple(value.shape):
                raise HarnessError(f"weight {name}: shape {value.shape}, {spec.id} expects {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
    if spec.tied_embeddings:
        model.tie_weights()
    return model.eval()
