"""npu-harness: per-layer correctness and performance gates for LLM deployments on spatial NPUs.

Public API (see docs/ and DESIGN.md): ``harness.models``, ``harness.check``, ``harness.check_trace``.
Importing the package stays light (NumPy only); torch and transformers load when a golden is built.
"""
from harness import models
from harness.checker import check, check_trace

__version__ = "0.1.0"

__all__ = ["models", "check", "check_trace", "__version__"]
