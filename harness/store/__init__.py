"""The golden store."""
from harness.store.golden import GoldenRequest, GoldenSet, GoldenStore, verify_dir

__all__ = ["GoldenRequest", "GoldenSet", "GoldenStore", "verify_dir"]
