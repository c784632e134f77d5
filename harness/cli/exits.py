"""Exit codes at the edge of the CLI: whatever happens inside a command, ``harness`` ends with 0 pass,
1 correctness failure, 2 measured performance regression or 3 "the check could not run" - and for 3,
one line on stderr naming the cause (the option, the file, the exception), never a traceback.

Click reports usage errors with exit 2 and lets other exceptions escape with a traceback (exit 1); to CI
and agents 2 means "performance regression" and 1 "correctness failure". ``HarnessGroup`` (the root
command's class) runs click in non-standalone mode and maps every outcome itself.
"""
from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from harness.errors import EXIT_ERROR, HarnessError

# typer vendors its own click: find its exception classes through a public one.
_CLICK = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickException: type[Exception] = _CLICK["ClickException"]
UsageError: type[Exception] = _CLICK["UsageError"]


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (newlines folded), cut at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def error_line(exc: BaseException) -> str:
    """The one line ``harness`` prints for an exception that ended a command (exit 3)."""
    if isinstance(exc, UsageError):
        ctx = getattr(exc, "ctx", None)
        where = f" ({ctx.command_path} -h for help)" if ctx is not None else ""
        return one_line(f"error: {exc.format_message()}{where}")
    if isinstance(exc, ClickException):
        return one_line(f"error: {exc.format_message()}")
    if isinstance(exc, HarnessError):
        return one_line(f"error: {exc}")
    if isinstance(exc, MemoryError):
        return one_line(f"error: could not run: out of memory (MemoryError{': ' + str(exc) if str(exc) else ''})")
    from harness.deployment.loader import summarise_exception

    return one_line(f"error: could not run: {summarise_exception(exc)}")


class CommandGroup(TyperGroup):
    """A command group that, called without a command, says so in one line (exit 3) instead of a page of
    help with click's exit 2."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            raise UsageError(f"missing command; one of: {', '.join(self.list_commands(ctx))}", ctx)
        return super().parse_args(ctx, args)


class HarnessGroup(CommandGroup):
    """The root command: maps usage errors, HarnessError and any uncaught exception to one line, exit 3."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # a caller that handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(EXIT_ERROR)
        except BaseException as exc:  # noqa: BLE001  the edge of the program: everything becomes exit 3
            if type(exc).__name__ == "Abort":
                print("error: aborted", file=sys.stderr)
            else:
                print(error_line(exc), file=sys.stderr)
            sys.exit(EXIT_ERROR)
        # A command that returned normally passed; one that raised typer.Exit(n) returns n here.
        sys.exit(code if isinstance(code, int) else 0)
