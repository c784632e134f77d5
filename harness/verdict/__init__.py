"""Verdicts: per-tap results, the first failure and its localisation."""
from harness.verdict.verdict import Coverage, FirstFailure, TapResult, Verdict

__all__ = ["Coverage", "FirstFailure", "TapResult", "Verdict"]
