"""qwen3-0.6b: every phase gate of the shared suite (harness.suites.model_suite.ModelSuite)."""
from harness.suites.model_suite import ModelSuite


class TestQwen3_0_6b(ModelSuite):
    model_id = "qwen3-0.6b"
