"""Every ``--flag`` a message, hint or help text in mlxman names is a flag some mlxman command has."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

import mlxman
from mlxman.cli.app import app

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Flags of other programs that mlxman's text names on purpose, each with where it belongs.
OTHER_PROGRAMS = {
    "--verbose": "`ollama run --verbose`, whose counters generation stats follow",
    "--check": "`python -m mlxman.cli.reference --check`, the docs generator, not a command",
    "--hf-path": "`mlx_lm.convert --hf-path`, the next step `pull` names for a repo not in MLX format",
    "--mlx-path": "`mlx_lm.convert --mlx-path`, the next step `pull` names for a repo not in MLX format",
    "--hostfile": "`mlx.launch --hostfile`, the command line mlxman starts sharded ranks with",
    "--python": "`mlx.launch --python`, the command line mlxman starts sharded ranks with",
    "--starting-port": "`mlx.launch --starting-port`, the command line mlxman starts sharded ranks with",
}


def command_flags(command: Any) -> set[str]:
    """Every option name of ``command`` and its subcommands, from the click tree Typer builds."""
    flags = {"--help"}
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", "") == "option":
            flags.update(name for name in (*param.opts, *param.secondary_opts) if name.startswith("--"))
    for sub in getattr(command, "commands", {}).values():
        flags |= command_flags(sub)
    return flags


def named_flags() -> Iterator[tuple[str, int, str]]:
    """(file, line, flag) for every ``--flag`` in a string literal of the package, f-strings included."""
    root = Path(mlxman.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    yield str(path.relative_to(root.parent)), node.lineno, flag


def test_every_flag_a_hint_names_exists() -> None:
    flags = command_flags(typer.main.get_command(app))
    assert {"--memory-limit", "--context-length", "--max-models"} <= flags
    found = list(named_flags())
    assert len(found) > 50  # the scan sees the hints
    missing = [
        f"{path}:{line}: {flag}" for path, line, flag in found if flag not in flags | set(OTHER_PROGRAMS)
    ]
    assert missing == [], "hints name flags no command has:\n" + "\n".join(missing)


def test_pool_limits_are_flags_of_every_command_that_builds_a_pool() -> None:
    root = typer.main.get_command(app)
    for name in ("generate", "serve", "demo"):
        assert {"--context-length", "--max-models"} <= command_flags(root.commands[name]), name  # type: ignore[attr-defined]
    assert "--context-length" in command_flags(root.commands["pool"].commands["estimate"])  # type: ignore[attr-defined]
