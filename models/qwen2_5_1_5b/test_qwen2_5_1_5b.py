"""qwen2.5-1.5b: every phase gate of the shared suite (harness.suites.model_suite.ModelSuite)."""
from harness.suites.model_suite import ModelSuite


class TestQwen2_5_1_5b(ModelSuite):
    model_id = "qwen2.5-1.5b"
