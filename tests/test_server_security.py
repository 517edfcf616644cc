"""Roots on every route that takes a path, files linking out of a root, an admin key, auth before the body."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxman.client import check_api_key_text
from mlxman.demo import DemoKit
from mlxman.errors import UsageError
from mlxman.server.security import AccessDenied, PathPolicy, Unauthorized, check_bearer
from tests.helpers import run_cli
from tests.server_harness import Server, free_port, running_server
from tests.test_status_cli import serve_refused

API_KEY = "user-key-5e2a"
ADMIN_KEY = "admin-key-91c4"


# --- PathPolicy, without a server ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (outside / "dir").mkdir()
    (outside / "dir" / "x.json").write_text("{}")
    for name in ("clean", "file-link", "dir-link", "deep-link", "inner-link"):
        (root / name / "sub").mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    (root / "file-link" / "tokenizer.json").symlink_to(outside / "secret.json")
    (root / "dir-link" / "extra").symlink_to(outside / "dir", target_is_directory=True)
    (root / "deep-link" / "sub" / "weights.safetensors").symlink_to(outside / "secret.json")
    # A link that stays inside the root is fine (Hugging Face snapshots link into their blobs).
    (root / "inner-link" / "tokenizer.json").symlink_to(root / "clean" / "config.json")
    return {"root": root, "outside": outside}


def test_a_folder_whose_files_link_out_of_the_root_is_refused(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["root"]])
    assert policy.resolve("clean", set()).model == str(tree["root"].resolve() / "clean")
    assert policy.resolve("inner-link", set()).model == str(tree["root"].resolve() / "inner-link")
    for name in ("file-link", "dir-link", "deep-link"):
        with pytest.raises(AccessDenied, match="outside the server's roots") as caught:
            policy.resolve(name, set())
        # The message names the file in the folder, never where it leads.
        assert str(tree["outside"]) not in str(caught.value)
        with pytest.raises(AccessDenied):
            policy.resolve(f"clean::{name}", set())


def test_an_overlong_path_component_is_a_usage_error(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["root"]])
    for spec in ("a" * 300, f"clean::{'b' * 300}", f"{tree['root']}/{'c' * 256}"):
        with pytest.raises(UsageError, match="255"):
            policy.resolve(spec, set())
    with pytest.raises(UsageError, match="255"):
        PathPolicy().resolve("d" * 300, set())


def test_outside_the_roots_existing_and_missing_paths_get_the_same_answer(tree: dict[str, Path]) -> None:
    policy = PathPolicy([tree["root"]])
    answers = []
    for path in (tree["outside"] / "dir", tree["outside"] / "missing"):
        with pytest.raises(AccessDenied) as caught:
            policy.resolve(str(path), set())
        answers.append(str(caught.value).replace(path.name, "NAME"))
    assert answers[0] == answers[1]


def test_admin_key_and_api_key() -> None:
    assert check_bearer(f"Bearer {ADMIN_KEY}", API_KEY, ADMIN_KEY) is True
    assert check_bearer(f"Bearer {API_KEY}", API_KEY, ADMIN_KEY) is False
    with pytest.raises(Unauthorized):
        check_bearer("Bearer nope", API_KEY, ADMIN_KEY)
    # An admin key without an API key: anyone may call, only the admin key lifts the roots.
    assert check_bearer(None, None, ADMIN_KEY) is False
    assert check_bearer(f"Bearer {ADMIN_KEY}", None, ADMIN_KEY) is True
    assert check_bearer(None, None, None) is False


@pytest.mark.parametrize("key", ["clé-secrète", "with space", "tab\there", "ключ"])
def test_keys_that_http_headers_cannot_carry_are_refused(key: str) -> None:
    with pytest.raises(UsageError, match="API key"):
        check_api_key_text(key, "MLXMAN_API_KEY")
    check_api_key_text("Abc-123_~!", "MLXMAN_API_KEY")


# --- a real server: roots on the admin routes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, demo_kit: DemoKit) -> Path:
    """The server's one root: an adapter, a model whose tokenizer links out, an adapter whose weights do."""
    root = tmp_path_factory.mktemp("security-root")
    shutil.copytree(demo_kit.adapters["numbers"], root / "numbers")
    leaky_model = root / "leaky-model"
    leaky_model.mkdir()
    for item in demo_kit.embeddings_model.iterdir():
        if item.is_file():
            (leaky_model / item.name).symlink_to(item.resolve())
    leaky_adapter = root / "leaky-adapter"
    shutil.copytree(demo_kit.adapters["colors"], leaky_adapter)
    (leaky_adapter / "adapters.safetensors").unlink()
    (leaky_adapter / "adapters.safetensors").symlink_to(demo_kit.adapters["colors"] / "adapters.safetensors")
    return root


@pytest.fixture(scope="module")
def server(demo_kit: DemoKit, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("security-logs")
    env = {"MLXMAN_TEST_ADMIN_KEY": ADMIN_KEY}
    args = ["--adapter-root", str(root), "--preload", str(demo_kit.model)]
    args += ["--admin-key-env", "MLXMAN_TEST_ADMIN_KEY"]
    with running_server(logs, *args, api_key=API_KEY, env=env) as srv:
        yield srv


def post(server: Server, path: str, body: dict[str, Any], key: str = API_KEY) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def test_admin_routes_keep_to_the_roots_without_the_admin_key(
    server: Server, demo_kit: DemoKit, root: Path, tmp_path: Path
) -> None:
    outside_model = str(demo_kit.embeddings_model.resolve())
    refused: list[tuple[str, dict[str, Any]]] = [
        ("/api/pool/load", {"model": outside_model}),
        ("/api/pool/load", {"model": str(demo_kit.model), "adapter": str(demo_kit.adapters["colors"])}),
        ("/api/pool/estimate", {"model": outside_model}),
        (
            "/api/pool/estimate",
            {"model": str(demo_kit.model), "adapters": [str(demo_kit.adapters["colors"])]},
        ),
        ("/api/pool/load", {"model": str(root / "leaky-model")}),
        ("/api/pool/load", {"model": str(demo_kit.model), "adapter": str(root / "leaky-adapter")}),
    ]
    for path, body in refused:
        response = post(server, path, body)
        assert response.status_code == 403, (path, body, response.text)
        assert response.json()["error"]["type"] == "permission_error"
    assert outside_model not in server.pool_keys()

    # Inside the root, and on the loaded base, the key holder may load and estimate.
    numbers = str(root / "numbers")
    estimate = post(server, "/api/pool/estimate", {"model": str(demo_kit.model), "adapters": [numbers]})
    assert estimate.status_code == 200, estimate.text
    loaded = post(server, "/api/pool/load", {"model": str(demo_kit.model), "adapter": "numbers"})
    assert loaded.status_code == 200, loaded.text
    key = loaded.json()["key"]
    assert key == f"{demo_kit.model.resolve()}::{(root / 'numbers').resolve()}"
    for action in ("pin", "unpin", "unload"):
        assert post(server, f"/api/pool/{action}", {"key": key}).status_code == 200, action


def test_the_admin_key_lifts_the_roots(server: Server, demo_kit: DemoKit) -> None:
    model = str(demo_kit.embeddings_model.resolve())
    assert post(server, "/api/pool/estimate", {"model": model}, ADMIN_KEY).status_code == 200
    loaded = post(server, "/api/pool/load", {"model": model}, ADMIN_KEY)
    assert loaded.status_code == 200, loaded.text
    # The admin key is also a key for everything else.
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert model in {m["id"] for m in models.json()["data"]}
    # What the operator loaded, key holders may use and name (here: unpin, a harmless change).
    assert post(server, "/api/pool/unpin", {"key": model}).status_code == 200
    assert post(server, "/api/pool/unload", {"key": model}, ADMIN_KEY).status_code == 200


def test_estimate_and_keys_outside_the_roots_do_not_tell_whether_a_path_exists(
    server: Server, demo_kit: DemoKit, tmp_path: Path
) -> None:
    existing, missing = demo_kit.embeddings_model.resolve(), tmp_path / "no-such-model"
    bodies: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
        ("/api/pool/estimate", lambda p: {"model": str(p)}),
        ("/api/pool/estimate", lambda p: {"model": str(demo_kit.model), "adapters": [str(p)]}),
        ("/api/pool/load", lambda p: {"model": str(p)}),
        ("/api/pool/unload", lambda p: {"key": str(p)}),
        ("/api/pool/pin", lambda p: {"key": f"{demo_kit.model}::{p}"}),
    ]
    for path, body in bodies:
        answers = [post(server, path, body(p)) for p in (existing, missing)]
        assert answers[0].status_code == answers[1].status_code, path
        assert answers[0].status_code in (403, 404), (path, answers[0].text)
        pairs = zip(answers, (existing, missing), strict=True)
        shapes = [a.json()["error"]["message"].replace(str(p), "PATH") for a, p in pairs]
        assert shapes[0] == shapes[1], path


def test_v1_refuses_a_model_folder_whose_files_link_out(
    server: Server, demo_kit: DemoKit, root: Path
) -> None:
    for model in (str(root / "leaky-model"), f"{demo_kit.model}::{root / 'leaky-adapter'}"):
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        response = post(server, "/v1/completions", body)
        assert response.status_code == 403, (model, response.text)


def test_an_unauthenticated_body_is_refused_before_it_is_read(server: Server) -> None:
    """Headers that announce 1 MB, then nothing: the answer must come without the body being read."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(
            b"POST /api/pool/load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n{"
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    # A chunked body, too large and unauthenticated: 401, not 413.
    big = httpx.post(server.url + "/v1/completions", content=iter([b"x" * (17 * 1024 * 1024)]))
    assert big.status_code == 401


def test_pool_cli_sends_the_key_from_api_key_env(server: Server, demo_kit: DemoKit) -> None:
    env = {"MLXMAN_TEST_OPS_KEY": ADMIN_KEY, "MLXMAN_API_KEY": ""}
    host = ["--host", server.host, "--api-key-env", "MLXMAN_TEST_OPS_KEY"]
    model = str(demo_kit.embeddings_model)
    estimate = run_cli("pool", "estimate", model, *host, "--json", env=env)
    assert estimate.exit_code == 0, estimate.stderr
    assert json.loads(estimate.stdout)["source"].startswith("server")
    user = run_cli("pool", "estimate", model, "--host", server.host, env={"MLXMAN_API_KEY": API_KEY})
    assert user.exit_code == 1 and "outside the server's roots" in user.stderr


def test_serve_refuses_an_admin_key_equal_to_the_api_key_or_not_ascii() -> None:
    same = serve_refused(
        "--port",
        str(free_port()),
        "--api-key-env",
        "K1",
        "--admin-key-env",
        "K2",
        env={"K1": "same-key", "K2": "same-key"},
    )
    assert same.returncode == 2 and "admin key" in same.stderr and "Traceback" not in same.stderr
    accented = serve_refused("--port", str(free_port()), "--admin-key-env", "K2", env={"K2": "clé"})
    assert accented.returncode == 2 and "K2" in accented.stderr and "Traceback" not in accented.stderr
