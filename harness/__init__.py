"""npu-harness: per-layer correctness and performance gates for LLM deployments on spatial NPUs.

Public API (see docs/): ``harness.models``, ``harness.check``, ``harness.check_trace``.
Importing the package stays light (NumPy only); torch and transformers load when a golden is built.
No module of the harness imports this package root: they import the submodule they need
(``harness.checker``, ``harness.version``), so the root can re-export them without a cycle.
"""
from harness import models
from harness.checker import check, check_trace
from harness.version import __version__

__all__ = ["models", "check", "check_trace", "__version__"]
