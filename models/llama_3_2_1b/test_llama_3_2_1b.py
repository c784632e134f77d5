"""llama-3.2-1b: every phase gate of the shared suite (harness.suites.model_suite.ModelSuite)."""
from harness.suites.model_suite import ModelSuite


class TestLlama_3_2_1b(ModelSuite):
    model_id = "llama-3.2-1b"
