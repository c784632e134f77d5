"""Errors the harness raises when a check cannot run (bad input, missing or corrupt golden).

They are values with a clear message naming the file, tap or option at fault; the CLI maps them to
exit code 3 ("the check itself could not run").
"""


# Exit codes of every command (docs/contract.md): one table for the gate, the perf commands and the CLI edge.
EXIT_PASS, EXIT_FAIL, EXIT_PERF, EXIT_ERROR = 0, 1, 2, 3


class HarnessError(Exception):
    """The check could not run: bad input, a missing golden, a broken store."""


class GoldenCorrupt(HarnessError):
    """A golden file is missing, truncated or edited (its sha256 does not match the manifest)."""


class TapError(HarnessError):
    """A deployment handed over a tap that does not exist, or a tensor that cannot be judged."""
