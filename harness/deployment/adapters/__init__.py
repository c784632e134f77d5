"""The adapter kit: what bringing your own implementation to the gate takes (docs/adapters.md).

``to_tap_array`` / ``from_tap_array`` convert a deployment's tensors (torch or NumPy, any float dtype,
a batch dimension of 1, per-head layouts) to and from the canonical ``[tokens, features]`` float32
arrays; ``TorchTaps`` attaches taps to an existing torch implementation by module name, by weight
identity or by function name.
"""
from harness.deployment.adapters.torch_taps import HF_INPUT_TAPS, HF_WEIGHT_TAPS, TorchTaps, hf_weight_taps
from harness.deployment.adapters.values import LAYOUTS, from_tap_array, infer_layout, to_tap_array

__all__ = ["HF_INPUT_TAPS", "HF_WEIGHT_TAPS", "LAYOUTS", "TorchTaps", "from_tap_array", "hf_weight_taps", "infer_layout", "to_tap_array"]
