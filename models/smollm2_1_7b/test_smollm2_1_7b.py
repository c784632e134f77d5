"""smollm2-1.7b: every phase gate of the shared suite (harness.suites.model_suite.ModelSuite)."""
from harness.suites.model_suite import ModelSuite


class TestSmollm2_1_7b(ModelSuite):
    model_id = "smollm2-1.7b"
