"""One console for the commands: whole names in CI logs, user text never read as markup."""
from __future__ import annotations

from rich.console import Console

# A piped console defaults to 80 columns, where rich tables cut model ids, seeds and paths to "qwen3…":
# CI logs have no width limit that matters, so piped output gets room for whole names.
PIPED_WIDTH = 200


def make_console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=PIPED_WIDTH)
