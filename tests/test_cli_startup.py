"""Start-up: commands are imported when they run, the root help imports none, and the pydantic-free
conversion of plain values gives exactly what typer's own gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import typer

from mlxman.cli.app import COMMANDS, app
from tests.helpers import run_cli

# Modules `--help`, `status`, `ls` and `adapter validate` must not import: the generators, and pydantic (which
# typer 0.29 would import to convert any option value) with huggingface_hub's HTTP stack.
SLOW_MODULES = ("mlx_lm", "mlx_vlm", "mlx_embeddings", "transformers", "pydantic", "httpx")


def imported(*args: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter holds after running the CLI with ``args``."""
    code = (
        "import sys, json\n"
        "from mlxman.cli.app import app\n"
        f"try:\n    app({list(args)!r}, prog_name='mlxman')\n"
        "except SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def slow_ones(modules: set[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(SLOW_MODULES))


def test_root_help_imports_no_command_module() -> None:
    modules = imported("--help")
    assert not [
        m for m in modules if m.startswith("mlxman.cli.") and m.split(".")[2] not in ("app", "lazy", "errors")
    ]
    assert slow_ones(modules) == []


def test_fast_commands_import_nothing_slow(isolated_home: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2}))
    env = {"MLXMAN_MODEL_DIRS": str(tmp_path)}
    for args in (
        ["status"],
        ["ls"],
        ["ls", "--json", "x", "--kind", "text"],
        ["adapter", "validate", str(adapter)],
    ):
        modules = imported(*args, env=env)
        assert slow_ones(modules) == [], args
        assert "mlxman.cli.generate" not in modules and "mlxman.cli.serve" not in modules, args


def test_the_listing_line_of_each_command_is_its_own_first_line() -> None:
    root = typer.main.get_command(app)
    for name, lazy in COMMANDS.items():
        command = root.commands[name]  # type: ignore[attr-defined]
        first = " ".join((command.short_help or command.help or "").split("\n\n")[0].split())
        assert lazy.help == first, f"COMMANDS[{name!r}].help in mlxman/cli/app.py should be {first!r}"


def test_root_help_lists_every_command() -> None:
    result = run_cli("--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.stdout, name


def test_a_typo_still_gets_a_suggestion() -> None:
    result = run_cli("statu")
    assert result.exit_code == 2
    assert "Did you mean 'status'" in result.output


def _walk(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found.extend(_walk(sub, (*path, name)))
    return found


def _outcome(call: Any) -> Any:
    try:
        return ("value", call())
    except BaseException as exc:  # Exit, usage errors: the same type and words
        return ("raised", type(exc).__name__, str(exc))


def test_plain_values_convert_as_typer_converts_them(tmp_path: Path) -> None:
    readable = tmp_path / "here"
    readable.mkdir()
    unreadable = tmp_path / "locked"
    unreadable.mkdir()
    unreadable.chmod(0)
    values = [None, "", "x", "12", "a/b", str(readable), str(unreadable), str(tmp_path / "nothing"), "-"]
    checked = 0
    try:
        for path, command in _walk(typer.main.get_command(app)):
            ctx = typer.Context(command, info_name=" ".join(("mlxman", *path)), resilient_parsing=True)
            params = [*command.params, command.get_help_option(ctx)]
            for param in params:
                slow = getattr(param.process_value, "typer_process_value", None)
                assert slow is not None, f"{path} {param.name} converts through pydantic"
                for value in values:
                    fast_result = _outcome(partial(param.process_value, ctx, value))
                    slow_result = _outcome(partial(slow, ctx, value))
                    assert fast_result == slow_result, (path, param.name, value)
                    checked += 1
    finally:
        unreadable.chmod(0o755)
    assert checked > 500


@pytest.mark.parametrize("args", [["--help"], ["status", "--json"]])
def test_root_options_still_work(args: list[str]) -> None:
    assert run_cli(*args).exit_code == 0
    assert run_cli("--version").stdout.startswith("mlxman ")
