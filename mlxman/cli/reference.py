"""Generate docs/cli.md from the commands' own ``--help`` (run ``python -m mlxman.cli.reference``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
WIDTH = "100"


def _command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not getattr(sub, "hidden", False):
            paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


def render_reference() -> str:
    """Every command's help text, in one Markdown page."""
    import typer
    from typer.testing import CliRunner

    from mlxman.cli.app import app

    env = {"COLUMNS": WIDTH, "TERMINAL_WIDTH": WIDTH, "NO_COLOR": "1", "TERM": "dumb"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        runner = CliRunner()
        parts = [
            "# CLI reference\n",
            "Generated from `--help` by `python -m mlxman.cli.reference`; a test fails when it is stale.\n",
        ]
        for path in _command_paths(typer.main.get_command(app)):
            result = runner.invoke(app, [*path, "--help"], env=env, prog_name="mlxman")
            title = " ".join(("mlxman", *path))
            body = "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())
            parts.append(f"## `{title}`\n\n```text\n{body}\n```\n")
        return "\n".join(parts)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    text = render_reference()
    if "--check" in sys.argv:
        sys.exit(0 if REFERENCE_PATH.read_text() == text else 1)
    REFERENCE_PATH.write_text(text)
    print(f"wrote {REFERENCE_PATH}")
