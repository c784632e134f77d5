"""Model specs and canonical tap names."""
from harness.spec.model_spec import MODEL_IDS, SCALES, ModelSpec, get, names

__all__ = ["MODEL_IDS", "SCALES", "ModelSpec", "get", "names"]
