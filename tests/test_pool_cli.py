"""``mlxman pool ...`` and ``mlxman status`` against a real server with no roots, and without any server."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from mlxman.demo import DemoKit
from mlxman.demo.kit import DEMO_PROMPT
from tests.helpers import imported_heavy_modules, run_cli, run_subprocess
from tests.server_harness import Server, free_port, running_server

LONG_MODEL = "a-model-folder-with-a-rather-long-descriptive-name"
LONG_ADAPTER = "an-adapter-trained-on-colors-for-quite-a-while"
SERVER_CONTEXT, SERVER_MAX_MODELS = 1024, 3


@pytest.fixture(scope="module")
def long_names(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo model and an adapter under names too long for an 80-column table."""
    root = tmp_path_factory.mktemp("long-names")
    shutil.copytree(demo_kit.model, root / LONG_MODEL)
    shutil.copytree(demo_kit.adapters["colors"], root / LONG_ADAPTER)
    return (root / LONG_MODEL).resolve(), (root / LONG_ADAPTER).resolve()


@pytest.fixture(scope="module")
def server(
    demo_kit: DemoKit, long_names: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("pool-server-logs")
    preload = f"{demo_kit.model}::{demo_kit.adapters['colors']}"
    long_preload = f"{long_names[0]}::{long_names[1]}"
    limits = ["--context-length", str(SERVER_CONTEXT), "--max-models", str(SERVER_MAX_MODELS)]
    with running_server(
        logs, "--preload", preload, "--preload", long_preload, "--keep-alive", "10m", *limits
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def alone(demo_kit: DemoKit) -> dict[str, str]:
    """Greedy answers of two adapters through plain mlx-lm, to check the server used the right one."""
    from mlxman.demo.kit import greedy_answer

    return {n: greedy_answer(demo_kit.model, demo_kit.adapters[n]) for n in ("colors", "numbers")}


def ask(server: Server, model: str) -> str:
    response = server.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": DEMO_PROMPT}], max_tokens=24, temperature=0
    )
    return str(response.choices[0].message.content)


def test_status_without_a_server_shows_the_budget() -> None:
    host = f"127.0.0.1:{free_port()}"
    result = run_cli("pool", "status", "--host", host)
    assert result.exit_code == 0
    assert "No mlxman server is running" in result.stderr
    assert "budget" in result.stdout
    data = json.loads(run_cli("pool", "status", "--host", host, "--json").stdout)
    assert data["running"] is False and data["budget"]["limit_bytes"] > 0
    assert (data["limits"]["context_tokens"], data["limits"]["max_models"]) == (4096, 8)
    env = {"MLXMAN_CONTEXT_LENGTH": "8192", "MLXMAN_MAX_MODELS": "2"}
    text = run_cli("pool", "status", "--host", host, env=env).stdout
    assert "8192 tokens per model (from MLXMAN_CONTEXT_LENGTH)" in text
    assert "at most 2 models (from MLXMAN_MAX_MODELS)" in text


def test_status_and_help_do_not_import_heavy_modules() -> None:
    assert imported_heavy_modules("pool", "status", "--host", f"127.0.0.1:{free_port()}") == []
    assert imported_heavy_modules("serve", "--help") == []


def test_estimate_without_a_server(demo_kit: DemoKit) -> None:
    host = f"127.0.0.1:{free_port()}"
    adapters = [a for name in ("colors", "numbers") for a in ("--adapter", str(demo_kit.adapters[name]))]
    result = run_cli("pool", "estimate", str(demo_kit.model), *adapters, "--host", host, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fits"] is True and data["would_evict"] == []
    assert data["weights_bytes"] > 0 and data["adapters_bytes"] > 0 and data["kv_bytes"] > 0
    assert data["needed_bytes"] == data["weights_bytes"] + data["adapters_bytes"] + data["kv_bytes"]
    tight = run_cli("pool", "estimate", str(demo_kit.model), "--memory-limit", "1KiB", "--json")
    assert json.loads(tight.stdout)["fits"] is False
    table = run_cli("pool", "estimate", str(demo_kit.model), "--host", host)
    assert "Fits" in table.stdout and "KV headroom" in table.stdout
    # The KV headroom follows the context: mlx-lm's cache grows in 256-token steps.
    small = run_cli("pool", "estimate", str(demo_kit.model), "--context-length", "256", "--json")
    assert (
        json.loads(small.stdout)["kv_bytes"] * 4
        == json.loads(run_cli("pool", "estimate", str(demo_kit.model), "-c", "1024", "--json").stdout)[
            "kv_bytes"
        ]
    )


def test_only_operator_loaded_entries_may_be_named(
    server: Server, demo_kit: DemoKit, alone: dict[str, str]
) -> None:
    assert ask(server, f"{demo_kit.model}::{demo_kit.adapters['colors']}") == alone["colors"]
    ask(server, str(demo_kit.model))  # the resident base itself
    with pytest.raises(openai.PermissionDeniedError, match="not loaded"):
        ask(server, f"{demo_kit.model}::{demo_kit.adapters['numbers']}")
    with pytest.raises(openai.PermissionDeniedError):
        ask(server, str(demo_kit.embeddings_model))


def test_pool_commands_steer_the_server(
    server: Server, demo_kit: DemoKit, alone: dict[str, str], tmp_path: Path
) -> None:
    host = ["--host", server.host]
    numbers = demo_kit.adapters["numbers"]
    key = f"{demo_kit.model.resolve()}::{numbers.resolve()}"

    loaded = run_cli("pool", "load", str(demo_kit.model), "--adapter", str(numbers), "--pin", *host, "--json")
    assert loaded.exit_code == 0, loaded.stderr
    entry = json.loads(loaded.stdout)
    assert (
        entry["key"] == key and entry["pinned"] is True and entry["parent"] == str(demo_kit.model.resolve())
    )
    assert ask(server, key) == alone["numbers"]

    table = run_cli("pool", "status", *host, env={"COLUMNS": "400"})
    assert table.exit_code == 0
    for header in ("NAME", "KIND", "SIZE", "CONTEXT", "PINNED", "IN USE", "UNTIL"):
        assert header in table.stdout
    assert "text-model::numbers" in table.stdout and "Used" in table.stdout

    assert run_cli("pool", "unpin", "text-model::numbers", *host).exit_code == 0  # the name from the table
    assert not next(e for e in server.pool()["entries"] if e["key"] == key)["pinned"]
    assert run_cli("pool", "pin", key, *host).exit_code == 0
    assert next(e for e in server.pool()["entries"] if e["key"] == key)["pinned"]

    unloaded = run_cli("pool", "unload", key, *host)
    assert unloaded.exit_code == 0 and "Unloaded" in unloaded.stderr
    assert key not in server.pool_keys()
    with pytest.raises(openai.PermissionDeniedError):
        ask(server, key)

    missing = run_cli("pool", "unload", str(tmp_path / "nothing"), *host)
    assert missing.exit_code == 1 and "Error:" in missing.stderr and "not loaded" in missing.stderr

    estimate = json.loads(run_cli("pool", "estimate", str(demo_kit.model), *host, "--json").stdout)
    assert estimate["source"].startswith("server") and str(demo_kit.model.resolve()) in estimate["resident"]
    assert estimate["weights_bytes"] > 0 and estimate["needed_bytes"] == 0
    shown = run_cli("pool", "estimate", str(demo_kit.model), *host).stdout
    assert re.search(r"Weights\s+\d+\.\d KiB \(resident\)", shown), shown
    assert "Weights 0 B" not in " ".join(shown.split())


def test_pool_table_fits_80_columns_without_splitting_a_name(
    server: Server, long_names: tuple[Path, Path]
) -> None:
    host = ["--host", server.host]
    table = run_cli("pool", "status", *host, env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines), table.stdout
    keys = server.pool_keys()
    long_key = f"{long_names[0]}::{long_names[1]}"
    rows = [line for line in lines if "…" in line]
    assert rows and all(line.split()[1] in ("text", "adapter") for line in rows), table.stdout
    # Each entry is one row: a name is shortened in the middle, never folded onto a second line.
    table_lines = lines[: next(i for i, line in enumerate(lines) if line.startswith("Used "))]
    assert len(table_lines) == 1 + len(keys), table.stdout
    name = next(line.split()[0] for line in rows if line.split()[1] == "adapter")
    assert name.endswith(LONG_ADAPTER[-6:]) and "::" in name
    assert run_cli("pool", "unpin", name, *host).exit_code == 0  # the shortened name names its entry
    assert not next(e for e in server.pool()["entries"] if e["key"] == long_key)["pinned"]
    assert run_cli("pool", "pin", name, *host).exit_code == 0
    assert next(e for e in server.pool()["entries"] if e["key"] == long_key)["pinned"]


def test_pool_status_json_and_mlxman_status(server: Server, demo_kit: DemoKit) -> None:
    data = json.loads(run_cli("pool", "status", "--host", server.host, "--json").stdout)
    assert data["running"] is True
    assert (data["context_tokens"], data["max_models"]) == (SERVER_CONTEXT, SERVER_MAX_MODELS)
    assert {e["context_tokens"] for e in data["entries"]} == {SERVER_CONTEXT}
    table = run_cli("pool", "status", "--host", server.host).stdout
    assert f"of at most {SERVER_MAX_MODELS} models; context {SERVER_CONTEXT} tokens per model" in table
    assert str(demo_kit.model.resolve()) in {e["key"] for e in data["entries"]}
    assert data["budget_bytes"] > 0 and data["budget"]["source"]
    status = run_cli("status", "--json", env={"MLXMAN_HOST": server.host})
    assert status.exit_code == 0
    pool = json.loads(status.stdout)["pool"]
    assert pool["running"] is True and pool["entries"]
    assert "Pool of the server" in run_cli("status", env={"MLXMAN_HOST": server.host}).stdout


def test_serve_refuses_a_busy_port_and_an_empty_key_variable(server: Server) -> None:
    busy = run_subprocess("serve", "--port", str(server.port))
    assert busy.returncode == 1 and "Cannot listen" in busy.stderr and "Traceback" not in busy.stderr
    no_key = run_subprocess("serve", "--port", str(free_port()), "--api-key-env", "MLXMAN_TEST_UNSET_KEY")
    assert no_key.returncode == 2 and "MLXMAN_TEST_UNSET_KEY" in no_key.stderr
