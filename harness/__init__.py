"""npu-harness: per-layer correctness and performance gates for LLM deployments on spatial NPUs."""
from harness import models

__version__ = "0.1.0"
__all__ = ["models", "__version__"]
