"""Bad input becomes a 4xx that names the problem, and the keep-alive connection stays usable."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxman.client import parse_address
from mlxman.errors import UsageError
from mlxman.server.errors import describe
from tests.helpers import run_cli
from tests.server_harness import Server, running_server, wait_until

API_KEY = "errors-key-3b9d"
LONG = "a" * 300


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("errors-root")
    deep = root / "deep-model"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return root


@pytest.fixture(scope="module")
def server(endless_model: Path, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("errors-logs")
    args = ["--adapter-root", str(root), "--preload", str(endless_model)]
    with running_server(logs, *args, api_key=API_KEY) as srv:
        yield srv


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """One connection, kept alive: every request after an error must travel on it."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, limits=limits, timeout=300) as c:
        yield c


def connection_of(response: httpx.Response) -> Any:
    return response.extensions["network_stream"].get_extra_info("client_addr")


def assert_4xx_and_connection_kept(
    client: httpx.Client, response: httpx.Response, status: int, *words: str
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] != "server_error" and error["code"] != "internal_error", error
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert response.headers.get("connection") != "close"
    following = client.get("/v1/models")
    assert following.status_code == 200
    assert connection_of(following) == connection_of(response), "the connection was not kept"


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_an_out_of_range_seed(client: httpx.Client, endless_model: Path, seed: int) -> None:
    body = {"model": str(endless_model), "prompt": "hi", "max_tokens": 2, "seed": seed}
    response = client.post("/v1/completions", json=body)
    assert_4xx_and_connection_kept(client, response, 400, "seed")
    chat = {"model": str(endless_model), "messages": [{"role": "user", "content": "hi"}], "seed": seed}
    assert_4xx_and_connection_kept(client, client.post("/v1/chat/completions", json=chat), 400, "seed")


def test_a_path_component_over_255_characters(client: httpx.Client, endless_model: Path) -> None:
    for model in (LONG, f"{endless_model}::{LONG}", f"/{LONG}/model"):
        completion = {"model": model, "prompt": "hi", "max_tokens": 2}
        assert_4xx_and_connection_kept(client, client.post("/v1/completions", json=completion), 400, "255")
    bodies: list[tuple[str, dict[str, str]]] = [
        ("/api/pool/load", {"model": LONG}),
        ("/api/pool/load", {"model": str(endless_model), "adapter": LONG}),
        ("/api/pool/estimate", {"model": f"/tmp/{LONG}"}),
        ("/api/pool/unload", {"key": f"/tmp/{LONG}"}),
        ("/api/pool/pin", {"key": f"{endless_model}::{LONG}"}),
    ]
    for path, body in bodies:
        assert_4xx_and_connection_kept(client, client.post(path, json=body), 400, "255")


def test_a_config_nested_100k_deep(client: httpx.Client) -> None:
    for path, body in [
        ("/v1/completions", {"model": "deep-model", "prompt": "hi", "max_tokens": 2}),
        ("/api/pool/load", {"model": "deep-model"}),
        ("/api/pool/estimate", {"model": "deep-model"}),
    ]:
        response = client.post(path, json=body)
        assert 400 <= response.status_code < 500, (path, response.text)
        message = response.json()["error"]["message"]
        assert "config.json" in message or "nest" in message, message
        assert_4xx_and_connection_kept(client, response, response.status_code)


def test_a_malformed_host_header(client: httpx.Client) -> None:
    for host in ("[::1", "[not-an-address]:1", "127.0.0.1:port"):
        response = client.get("/health", headers={"Host": host})
        assert_4xx_and_connection_kept(client, response, 400, "Host")


def test_a_chunked_body_over_the_limit_is_413(server: Server) -> None:
    chunks = iter([b'{"model": "x", "prompt": "', b"a" * (17 * 1024 * 1024), b'"}'])
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    response = httpx.post(server.url + "/v1/completions", content=chunks, headers=headers, timeout=300)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert server.get("/v1/models").status_code == 200


def test_unloading_an_entry_in_use_is_409(server: Server, client: httpx.Client, endless_model: Path) -> None:
    key = str(endless_model.resolve())
    # Nearly the model's whole context (2048): the generation holds the base far longer than one admin call.
    body = {"model": key, "prompt": "red", "max_tokens": 2000, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=server.headers(), timeout=300
    ) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream, and the request ends
        assert next(lines).startswith("data: ")
        response = client.post("/api/pool/unload", json={"key": key})
        assert_4xx_and_connection_kept(client, response, 409, "in use")
        cli = run_cli("pool", "unload", key, "--host", server.host, env={"MLXMAN_API_KEY": API_KEY})
        assert cli.exit_code == 1 and "in use" in cli.stderr and "bug" not in cli.stderr
    wait_until(lambda: all(e["in_use"] == 0 for e in server.pool()["entries"]), 120, "the stream to end")
    assert key in server.pool_keys()


def test_the_pool_cli_names_each_problem(server: Server, root: Path) -> None:
    env = {"MLXMAN_API_KEY": API_KEY}
    host = ["--host", server.host]
    for args in (
        ["pool", "load", f"/tmp/{LONG}"],
        ["pool", "estimate", f"/tmp/{LONG}"],
        ["pool", "unload", f"/tmp/{LONG}"],
        ["pool", "load", str(root / "deep-model")],
        ["pool", "estimate", str(root / "deep-model")],
    ):
        result = run_cli(*args, *host, env=env)
        assert result.exit_code in (1, 2), (args, result.stderr)
        assert result.stderr.startswith("Error:"), (args, result.stderr)
        assert "unexpected" not in result.stderr and "bug" not in result.stderr, (args, result.stderr)


def test_unexpected_errors_from_user_data_map_to_4xx() -> None:
    assert describe(RecursionError("maximum recursion depth exceeded"))[0] == 400
    too_long = OSError(36, "File name too long", "x" * 300)
    status, body = describe(too_long)
    assert status == 400 and "255" in body["error"]["message"]
    assert describe(RuntimeError("a bug"))[0] == 500


def test_an_unknown_route_with_a_body_keeps_the_connection(client: httpx.Client) -> None:
    response = client.post("/v1/nowhere", content=json.dumps({"a": 1}))
    assert_4xx_and_connection_kept(client, response, 404, "/v1/nowhere")


def test_raw_malformed_host_does_not_reset(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        request = (
            b"GET /health HTTP/1.1\r\nHost: [::1\r\n\r\n" + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        sock.sendall(request)
        reply = b""
        while reply.count(b"HTTP/1.1 ") < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"HTTP/1.1 200" in reply, reply[:400]


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_generate_refuses_an_out_of_range_seed_too(endless_model: Path, seed: str) -> None:
    result = run_cli("generate", "--model", str(endless_model), "--prompt", "hi", "--seed", seed)
    assert result.exit_code == 2 and "--seed" in result.stderr and "bug" not in result.stderr


@pytest.mark.parametrize("address", ["[::1", "http://[::1", "[zz]:80", "[::1]:port"])
def test_a_malformed_address_is_a_usage_error(address: str) -> None:
    """The client's own side of the malformed Host: --host and $MLXMAN_HOST."""
    with pytest.raises(UsageError, match=r"address|port"):
        parse_address(address)
    for args, env in ((["pool", "status", "--host", address], {}), (["status"], {"MLXMAN_HOST": address})):
        result = run_cli(*args, env=env)
        assert result.exit_code == 2 and "bug" not in result.stderr, result.stderr
