"""Comparison: metrics of one tap (``metrics``), the policies that judge them (``policies``) and
which policy applies to which tap (``policy_config``). See docs/policies.md."""
from harness.compare.metrics import exact_match, tap_metrics
from harness.compare.policies import Judgement, parse_policy
from harness.compare.policy_config import PolicySet

__all__ = ["Judgement", "PolicySet", "exact_match", "parse_policy", "tap_metrics"]
