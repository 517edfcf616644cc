"""Names (``mlxman alias``) on a real server: requests by name, ``/v1/models`` listing what can be served, and
the roots applying to what a name stands for."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mlxman.demo import DemoKit
from mlxman.demo.kit import DEMO_PROMPT
from mlxman.errors import NotFoundError
from mlxman.library.aliases import remove_alias, set_alias
from mlxman.server.security import AccessDenied, PathPolicy
from tests.helpers import run_cli
from tests.server_harness import Server, running_server

pytestmark = pytest.mark.slow

REVISION = "d" * 40


# --- the path policy, without a server ----------------------------------------------------------------------


def test_without_roots_a_name_is_served_only_when_its_target_is_loaded(demo_kit: DemoKit) -> None:
    set_alias("chat", f"{demo_kit.model}::{demo_kit.adapters['colors']}")
    set_alias("base", str(demo_kit.model))
    policy = PathPolicy()
    base = str(demo_kit.model.resolve())
    pair = f"{base}::{demo_kit.adapters['colors'].resolve()}"
    assert policy.resolve("chat", {pair}).key == pair
    assert policy.resolve("base", {base}).key == base
    assert policy.loaded_key("chat", {base, pair}) == pair
    for loaded in (set(), {base}):
        with pytest.raises(AccessDenied) as refused:
            policy.resolve("chat", loaded)
        assert "'chat'" in str(refused.value) and str(demo_kit.adapters["colors"]) not in str(refused.value)


def test_with_roots_a_name_whose_target_lies_outside_is_refused(demo_kit: DemoKit, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(demo_kit.adapters["numbers"], root / "numbers")
    (root / "leaky").mkdir()
    for item in demo_kit.adapters["colors"].iterdir():
        (root / "leaky" / item.name).symlink_to(item)  # inside the root by path, outside once followed
    policy = PathPolicy([root])
    base = str(demo_kit.model.resolve())
    set_alias("inside", f"{demo_kit.model}::{root / 'numbers'}")
    set_alias("outside", f"{demo_kit.model}::{demo_kit.adapters['colors']}")
    set_alias("leaky", f"{demo_kit.model}::{root / 'leaky'}")
    set_alias("base", str(demo_kit.model))
    assert policy.resolve("inside", {base}).key == f"{base}::{(root / 'numbers').resolve()}"
    for name in ("outside", "leaky", "base"):
        with pytest.raises(AccessDenied) as refused:
            policy.resolve(name, set() if name == "base" else {base})
        assert f"'{name}'" in str(refused.value) and str(demo_kit.adapters["colors"]) not in str(
            refused.value
        )
    # A name whose target went away under the root is "not there", never a way to probe elsewhere.
    shutil.rmtree(root / "numbers")
    with pytest.raises(NotFoundError, match="'inside'"):
        policy.resolve("inside", {base})


# --- a real server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's user directory, where the tests write names while it runs."""
    return tmp_path_factory.mktemp("alias-server-home")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, demo_kit: DemoKit) -> Path:
    """The server's root: a copy of the text model, and an adapter that records the preloaded base."""
    root = tmp_path_factory.mktemp("alias-root")
    shutil.copytree(demo_kit.model, root / "text-copy")
    shutil.copytree(demo_kit.adapters["numbers"], root / "numbers")
    config_path = root / "numbers" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["model"] = str(demo_kit.model)
    config_path.write_text(json.dumps(config))
    # The server's Hugging Face cache lies in the root too: a cached model is served by its id.
    snapshot = root / "hub" / "models--org--tiny" / "snapshots" / REVISION
    shutil.copytree(demo_kit.model, snapshot)
    (root / "hub" / "models--org--tiny" / "refs").mkdir()
    (root / "hub" / "models--org--tiny" / "refs" / "main").write_text(REVISION)
    return root


@pytest.fixture(scope="module")
def server(
    demo_kit: DemoKit, root: Path, home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("alias-logs")
    args = ["--adapter-root", str(root), "--preload", str(demo_kit.model)]
    args += ["--preload", str(demo_kit.embeddings_model)]
    env = {"MLXMAN_HOME": str(home), "HF_HUB_CACHE": str(root / "hub")}
    with running_server(logs, *args, env=env) as srv:
        yield srv


@pytest.fixture
def names_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write names where the running server reads them."""
    monkeypatch.setenv("MLXMAN_HOME", str(home))
    for path in home.glob("aliases.json"):
        path.unlink()
    return home


def models(server: Server) -> dict[str, dict[str, Any]]:
    return {m.id: m.model_dump() for m in server.openai().models.list().data}


def test_requests_by_name(server: Server, demo_kit: DemoKit, root: Path, names_home: Path) -> None:
    # Named after the server started: the server reads names per request.
    set_alias("numbers-chat", f"{demo_kit.model}::{root / 'numbers'}")
    set_alias("emb", str(demo_kit.embeddings_model))
    pair = f"{demo_kit.model.resolve()}::{(root / 'numbers').resolve()}"
    for command in ("estimate", "load"):
        result = run_cli("pool", command, "numbers-chat", "--host", server.host, "--json")
        assert result.exit_code == 0, (command, result.stderr)
        assert json.loads(result.stdout)["key"] == pair, command
    client = server.openai()
    reply = client.chat.completions.create(
        model="numbers-chat",
        messages=[{"role": "user", "content": DEMO_PROMPT}],
        max_tokens=24,
        temperature=0,
    )
    assert reply.choices[0].message.content.startswith(demo_kit.answers["numbers"])
    # Answered as asked, as Ollama and vLLM answer with the served name: a name never shows its target.
    assert reply.model == "numbers-chat"
    text = client.completions.create(model="numbers-chat", prompt="hello", max_tokens=4, stream=False)
    assert text.usage.completion_tokens > 0 and text.model == "numbers-chat"
    streamed = client.chat.completions.create(
        model="numbers-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
    )
    assert {chunk.model for chunk in streamed} == {"numbers-chat"}
    vectors = client.embeddings.create(model="emb", input=["red", "blue"])
    assert len(vectors.data) == 2 and vectors.model == "emb"

    # Pool commands take the name too, and the pool shows it.
    pinned = run_cli("pool", "pin", "numbers-chat", "--host", server.host, "--json")
    assert pinned.exit_code == 0, pinned.stderr
    assert json.loads(pinned.stdout)["key"] == pair
    status = json.loads(run_cli("pool", "status", "--host", server.host, "--json").stdout)
    named = {e["key"]: e["names"] for e in status["entries"]}
    assert named[pair] == ["numbers-chat"] and named[str(demo_kit.embeddings_model.resolve())] == ["emb"]
    table = run_cli("pool", "status", "--host", server.host, env={"COLUMNS": "200"}).stdout
    assert "ALIAS" in table and "numbers-chat" in table
    # A name wins over an entry's short name in the table (the base shows as text-model).
    set_alias("text-model", f"{demo_kit.model}::{root / 'numbers'}")
    unpinned = run_cli("pool", "unpin", "text-model", "--host", server.host, "--json")
    assert unpinned.exit_code == 0 and json.loads(unpinned.stdout)["key"] == pair
    assert run_cli("pool", "unload", "numbers-chat", "--host", server.host).exit_code == 0

    # A name removed is gone at once: the same word is now only a (missing) path under the root.
    remove_alias("numbers-chat")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="numbers-chat", prompt="hello", max_tokens=4)


def test_models_lists_what_can_be_served(
    server: Server, demo_kit: DemoKit, root: Path, names_home: Path
) -> None:
    set_alias("numbers-chat", f"{demo_kit.model}::{root / 'numbers'}")
    set_alias("copy", str(root / "text-copy"))
    set_alias("outside", f"{demo_kit.model}::{demo_kit.adapters['colors']}")
    listed = models(server)
    base = str(demo_kit.model.resolve())
    pair = f"{base}::{(root / 'numbers').resolve()}"
    copy = str((root / "text-copy").resolve())
    assert listed[base]["loaded"] is True and listed[base]["kind"] == "text"
    assert listed[str(demo_kit.embeddings_model.resolve())]["kind"] == "embeddings"
    # Not loaded, but servable: the model under the root, the adapter there on the loaded base, the names.
    assert listed[copy]["loaded"] is False and listed[copy]["kind"] == "text"
    assert listed[pair]["loaded"] is False
    assert listed["numbers-chat"]["target"] == pair and listed["copy"]["target"] == copy
    # The cached model whose snapshot lies in the root, by its id (not also by its snapshot folder).
    assert listed["org/tiny"]["loaded"] is False and listed["org/tiny"]["kind"] == "text"
    assert not any("snapshots" in key for key in listed)
    for entry in listed.values():
        assert entry["object"] == "model" and entry["owned_by"] == "mlxman"
    # A name the roots do not admit is neither listed nor served.
    assert "outside" not in listed
    assert not any(str(demo_kit.adapters["colors"]) in key for key in listed)
    response = server.post("/v1/completions", {"model": "outside", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 403, response.text
    assert str(demo_kit.adapters["colors"]) not in response.text
    # Once used, a name's entry says it is loaded; so does a cached model's.
    server.openai().completions.create(model="copy", prompt="hello", max_tokens=2)
    reply = server.openai().completions.create(model="org/tiny", prompt="hello", max_tokens=2)
    assert reply.model == f"org/tiny@{REVISION}"
    after = models(server)
    assert after["copy"]["loaded"] is True and after["org/tiny"]["loaded"] is True


def test_a_broken_names_file_leaves_the_listing_and_paths_working(
    server: Server, demo_kit: DemoKit, names_home: Path
) -> None:
    (names_home / "aliases.json").write_text("{broken")
    assert str(demo_kit.model.resolve()) in models(server)
    assert server.pool()["entries"]
    response = server.post("/v1/completions", {"model": "anything", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 400 and "names file" in response.json()["error"]["message"]
    reply = server.openai().completions.create(model=str(demo_kit.model), prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens > 0


def test_a_server_without_roots_preloads_and_serves_a_name(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("MLXMAN_HOME", str(home))
    set_alias("chat", f"{demo_kit.model}::{demo_kit.adapters['colors']}")
    set_alias("other", f"{demo_kit.model}::{demo_kit.adapters['animals']}")
    with running_server(tmp_path, "--preload", "chat", env={"MLXMAN_HOME": str(home)}) as srv:
        reply = srv.openai().chat.completions.create(
            model="chat", messages=[{"role": "user", "content": DEMO_PROMPT}], max_tokens=24, temperature=0
        )
        assert reply.choices[0].message.content.startswith(demo_kit.answers["colors"])
        listed = models(srv)
        assert listed["chat"]["loaded"] is True and "other" not in listed
        # Without roots only what is loaded is served: a name for anything else is refused.
        with pytest.raises(openai.PermissionDeniedError, match="'other'"):
            srv.openai().completions.create(model="other", prompt="hi", max_tokens=2)
