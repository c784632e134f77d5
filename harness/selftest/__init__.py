"""The gate's self-test: seeded emulator bugs and clean runs scored under our policy and the classic ones."""
from harness.selftest.runner import CLASSIC, OURS, POLICIES, Case, CaseResult, population, run_case, run_cases

__all__ = ["CLASSIC", "OURS", "POLICIES", "Case", "CaseResult", "population", "run_case", "run_cases"]
