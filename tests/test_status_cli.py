"""``mlxman status`` and ``pool status`` against a server that needs a key: the server's own MLX counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from mlxman.demo import DemoKit
from tests.helpers import run_cli
from tests.server_harness import Server, free_port, running_server

API_KEY = "status-key-0c7e"


@pytest.fixture(scope="module")
def server(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("status-logs")
    with running_server(logs, "--preload", str(demo_kit.model), api_key=API_KEY) as srv:
        yield srv


def serve_refused(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``mlxman serve`` that must refuse to start; a server that starts instead is stopped, not waited on."""
    argv = [sys.executable, "-m", "mlxman", "serve", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`serve {' '.join(args)}` started instead of refusing") from None


NO_KEY = {"MLXMAN_API_KEY": ""}
WITH_KEY_VAR = {"MLXMAN_TEST_STATUS_KEY": API_KEY, "MLXMAN_API_KEY": ""}


def test_pool_status_says_the_server_needs_a_key(server: Server) -> None:
    result = run_cli("pool", "status", "--host", server.host, env=NO_KEY)
    assert result.exit_code == 1
    assert "No mlxman server" not in result.stderr + result.stdout
    assert "needs an API key" in result.stderr and "--api-key-env" in result.stderr
    wrong = run_cli("pool", "status", "--host", server.host, env={"MLXMAN_API_KEY": "wrong"})
    assert wrong.exit_code == 1 and "refused the API key" in wrong.stderr


def test_pool_commands_honour_api_key_env(server: Server, demo_kit: DemoKit) -> None:
    key = ["--api-key-env", "MLXMAN_TEST_STATUS_KEY"]
    status = run_cli("pool", "status", "--host", server.host, *key, "--json", env=WITH_KEY_VAR)
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["running"] is True
    for action in ("pin", "unpin"):
        result = run_cli("pool", action, str(demo_kit.model), "--host", server.host, *key, env=WITH_KEY_VAR)
        assert result.exit_code == 0, result.stderr
    unset = run_cli("pool", "status", "--host", server.host, "--api-key-env", "MLXMAN_TEST_UNSET")
    assert unset.exit_code == 2 and "MLXMAN_TEST_UNSET" in unset.stderr


def test_status_says_the_server_needs_a_key(server: Server) -> None:
    result = run_cli("status", "--host", server.host, env=NO_KEY)
    assert result.exit_code == 0, result.stderr
    assert "none running" not in result.stdout
    assert "needs an API key" in result.stdout and "--api-key-env" in result.stdout
    data = json.loads(run_cli("status", "--host", server.host, "--json", env=NO_KEY).stdout)
    assert data["server"]["state"] == "needs_key" and data["pool"] is None


def test_status_shows_the_servers_mlx_counters(server: Server, demo_kit: DemoKit) -> None:
    weights = (demo_kit.model / "model.safetensors").stat().st_size
    args = ["status", "--host", server.host, "--api-key-env", "MLXMAN_TEST_STATUS_KEY"]
    data = json.loads(run_cli(*args, "--json", env=WITH_KEY_VAR).stdout)
    assert data["server"]["state"] == "running"
    process = data["server"]["process"]
    # The preloaded model's weights live in the server's MLX memory, not in this process's.
    assert process["mlx"]["active_memory"] >= weights * 0.9
    assert (
        process["mlx"]["memory_limit"] > 0
        and process["mlx"]["peak_memory"] >= process["mlx"]["active_memory"]
    )
    assert process["rss_bytes"] > 0 and process["threads"] >= 1 and process["pid"] == server.process.pid
    assert data["pool"]["entries"]
    table = run_cli(*args, env={**WITH_KEY_VAR, "COLUMNS": "200"}).stdout
    assert "Server MLX" in table and f"pid {server.process.pid}" in table and "Pool of the server" in table


def test_the_server_endpoint_needs_the_key(server: Server) -> None:
    assert httpx.get(server.url + "/api/server").status_code == 401
    data = server.get("/api/server").json()
    assert data["mlx"]["active_memory"] > 0 and data["threads"] >= 1 and data["rss_bytes"] > 0


def test_status_without_a_server_says_none_runs() -> None:
    host = f"127.0.0.1:{free_port()}"
    result = run_cli("status", "--host", host)
    assert result.exit_code == 0
    assert f"none running at http://{host}" in result.stdout
    assert "Server MLX" not in result.stdout
    data = json.loads(run_cli("status", "--host", host, "--json").stdout)
    assert data["server"]["address"] == f"http://{host}" and data["server"]["state"] == "none"
    assert data["server"]["process"] is None


def test_a_non_ascii_key_is_refused_at_start_and_never_crashes_the_client(server: Server) -> None:
    started = serve_refused("--port", str(free_port()), env={"MLXMAN_API_KEY": "clé-secrète"})
    assert started.returncode == 2, started.stderr
    assert "MLXMAN_API_KEY" in started.stderr and "Traceback" not in started.stderr
    for args in (["pool", "status"], ["pool", "unload", "x"], ["status"]):
        result = run_cli(*args, "--host", server.host, env={"MLXMAN_API_KEY": "clé"})
        assert result.exit_code == 2, (args, result.stderr)
        assert "MLXMAN_API_KEY" in result.stderr and "unexpected" not in result.stderr
