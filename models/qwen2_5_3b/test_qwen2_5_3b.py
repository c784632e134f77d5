"""qwen2.5-3b: every phase gate of the shared suite (harness.suites.model_suite.ModelSuite)."""
from harness.suites.model_suite import ModelSuite


class TestQwen2_5_3b(ModelSuite):
    model_id = "qwen2.5-3b"
