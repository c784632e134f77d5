"""llama-3.2-3b: every phase gate of the shared suite (harness.suites.model_suite.ModelSuite)."""
from harness.suites.model_suite import ModelSuite


class TestLlama_3_2_3b(ModelSuite):
    model_id = "llama-3.2-3b"
