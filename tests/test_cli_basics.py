"""The CLI skeleton: help, version, status, the error handler and start-up imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxman.cli import reference
from tests.helpers import imported_heavy_modules, run_cli, run_subprocess


def test_help_in_subprocess() -> None:
    proc = run_subprocess("--help")
    assert proc.returncode == 0
    assert "Usage: mlxman" in proc.stdout or "Usage: python -m mlxman" in proc.stdout
    assert "status" in proc.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("mlxman ")


@pytest.mark.parametrize("args", [["--help"], ["status"], ["status", "--json"]])
def test_fast_commands_do_not_import_heavy_modules(args: list[str]) -> None:
    assert imported_heavy_modules(*args) == []


def test_status_json_fields(isolated_home: Path) -> None:
    result = run_cli("status", "--json", "--memory-limit", "2GiB")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    machine, mlx, budget = data["machine"], data["mlx"], data["budget"]
    assert machine["memory"]["total"] > 0
    assert 0 < machine["memory"]["available"] <= machine["memory"]["total"]
    assert machine["arch"] and machine["os"]
    assert mlx["version"] and mlx["device"] in ("cpu", "gpu")
    # MLX's memory counters are per process: status shows a running server's, never its own (always ~0).
    assert "active_memory" not in mlx and data["server"]["state"] in ("none", "running", "needs_key")
    assert budget == {"limit_bytes": 2 * 1024**3, "spec": "2GiB", "source": "--memory-limit"}
    assert data["user_dir"] == str(isolated_home)


def test_status_budget_sources(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def budget() -> dict[str, object]:
        return dict(json.loads(run_cli("status", "--json").stdout)["budget"])

    assert budget()["source"] == "default"
    (isolated_home / "config.toml").write_text('memory_limit = "3GB"\n')
    assert budget()["limit_bytes"] == 3_000_000_000
    assert "config file" in str(budget()["source"])
    monkeypatch.setenv("MLXMAN_MEMORY_LIMIT", "1GB")
    assert budget() == {"limit_bytes": 1_000_000_000, "spec": "1GB", "source": "MLXMAN_MEMORY_LIMIT"}


def test_status_table() -> None:
    result = run_cli("status")
    assert result.exit_code == 0
    for label in ("Machine", "RAM", "MLX", "Pool budget", "User dir"):
        assert label in result.stdout


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MLXMAN_MEMORY_LIMIT": "lots"}, "Invalid memory size 'lots'"),
        ({"MLXMAN_MEMORY_LIMIT": "0"}, "at least one byte"),
    ],
)
def test_bad_setting_is_one_clear_line(env: dict[str, str], needle: str) -> None:
    proc = run_subprocess("status", env=env)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert proc.stderr.startswith("Error:")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_broken_config_file(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("memory_limit = [unclosed\n")
    proc = run_subprocess("status")
    assert proc.returncode == 2
    assert "Cannot read config file" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_config_key(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("memroy_limit = '1GB'\n")
    proc = run_subprocess("status")
    assert proc.returncode == 2
    assert "memroy_limit" in proc.stderr


def test_debug_shows_traceback(isolated_home: Path) -> None:
    proc = run_subprocess("status", env={"MLXMAN_MEMORY_LIMIT": "lots", "MLXMAN_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_unknown_command_is_usage_error() -> None:
    proc = run_subprocess("frobnicate")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_cli_reference_is_current() -> None:
    assert reference.REFERENCE_PATH.read_text() == reference.render_reference(), (
        "docs/cli.md is stale: run `python -m mlxman.cli.reference`"
    )
