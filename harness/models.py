"""Public model registry (``harness.models.names()``, ``harness.models.get(id)``)."""
from harness.spec.model_spec import MODEL_IDS, ModelSpec, folder_name, get, names

__all__ = ["MODEL_IDS", "ModelSpec", "folder_name", "get", "names"]
