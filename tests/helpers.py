"""Helpers for tests: run the CLI the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable

from typer.testing import CliRunner

from mlxman.cli.app import app

HEAVY_MODULES = ("mlx_lm", "mlx_vlm", "mlx_embeddings", "transformers")
# A call that has not returned by then is blocked (a FIFO opened without O_NONBLOCK, say), not slow.
HANG_SECONDS = 120


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Invoke the real Typer app in-process; stdout and stderr stay separate."""
    return CliRunner().invoke(app, list(args), input=input, env=env, catch_exceptions=False)


def run_subprocess(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mlxman`` in a child process, exactly as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "mlxman", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        input=stdin,
        timeout=600,
    )


def imported_heavy_modules(*args: str) -> list[str]:
    """Run the CLI with ``args`` in a fresh interpreter and list the heavy modules it imported."""
    code = (
        "import sys, json\n"
        "from mlxman.cli.app import app\n"
        f"try:\n    app({list(args)!r}, prog_name='mlxman')\n"
        "except SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    import json

    last = proc.stderr.strip().splitlines()[-1]
    return list(json.loads(last))


def finishes(call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; return what it raised (None if nothing). Fails when it never returns."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    assert not thread.is_alive(), "blocked (a FIFO was opened without O_NONBLOCK?)"
    return outcome[0]
