"""The one place where exceptions become ``Error: ...`` lines and exit codes."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from mlxman.errors import EXIT_FAILURE, EXIT_INTERRUPTED, MlxmanError
from mlxman.settings import DEBUG_ENV, debug_enabled


def report(exc: BaseException) -> int:
    """Print an exception as one line for the user; return the exit code."""
    from mlxman.output import out  # rich: only once there is something to print

    if isinstance(exc, MlxmanError):
        out.error(exc.message, exc.hint)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        out.error("Interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError) and exc.strerror:
        # The file system said no (a name too long, no permission, a full disk): the user's to fix, not a bug.
        where = f": {_shorten(str(exc.filename))}" if exc.filename is not None else ""
        out.error(f"{exc.strerror}{where}", "check the path, its permissions and the free disk space")
        return EXIT_FAILURE
    out.error(
        f"unexpected {type(exc).__name__}: {exc}",
        f"this is a bug in mlxman; run again with {DEBUG_ENV}=1 for the traceback and report it",
    )
    return EXIT_FAILURE


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]}…{text[-limit // 2 :]}"


class MlxmanGroup(TyperGroup):
    """Root command group that routes every error through ``report`` (tracebacks only when debugging)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            raise typer.Exit(report(KeyboardInterrupt())) from None
        except Exception as exc:
            if debug_enabled() or _is_cli_control_flow(exc):
                raise
            raise typer.Exit(report(exc)) from None


def _is_cli_control_flow(exc: Exception) -> bool:
    """The parser's own usage errors (they know how to show themselves): Typer prints them with usage."""
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)
