"""Model resolution: local directories, cached Hugging Face ids (repo and repo@revision), and clear errors."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mlxman.errors import MlxmanError, ModelError, NotFoundError
from mlxman.models.resolve import read_config, resolve_model
from tests.helpers import finishes

LONG_NAME = "n" * 300


def fake_hub_cache(root: Path, repo: str, revision: str) -> Path:
    """The Hugging Face cache layout for one snapshot, as `mlxman pull` or `hf download` leaves it."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def test_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path))
    assert resolved.path == tmp_path.resolve() and resolved.id == str(tmp_path.resolve())


def test_cached_hub_id_and_its_pool_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    revision = "a" * 40
    import huggingface_hub.constants

    # The constant is read when huggingface_hub is imported, which another test may have done already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = fake_hub_cache(tmp_path, "org/tiny", revision)
    resolved = resolve_model("org/tiny")
    assert resolved.path == snapshot and resolved.id == f"org/tiny@{revision}"
    assert resolve_model(resolved.id).path == snapshot


@pytest.mark.parametrize(
    ("spec", "error", "needle"),
    [
        ("", ModelError, "No model given"),
        ("./missing-dir", NotFoundError, "does not exist"),
        ("org/not-cached", NotFoundError, "mlxman pull org/not-cached"),
        # A bare word is most likely a name: the hint names where names and models are listed.
        ("pirate", NotFoundError, "mlxman alias ls"),
    ],
)
def test_errors(spec: str, error: type[Exception], needle: str) -> None:
    with pytest.raises(error) as info:
        resolve_model(spec)
    assert needle in str(info.value)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model(str(tmp_path))


def fifo(path: Path) -> None:
    os.mkfifo(path)


def loop(path: Path) -> None:
    path.symlink_to(path.name + ".other")
    path.with_name(path.name + ".other").symlink_to(path.name)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (fifo, "is a FIFO (named pipe), not a model directory"),
        (loop, "is a symlink loop"),
        (lambda p: p.symlink_to("nowhere"), "is a dangling symlink"),
        (lambda p: p.write_text("{}"), "is a file, not a model directory"),
    ],
)
def test_model_path_wording(tmp_path: Path, make: Callable[[Path], None], words: str) -> None:
    make(tmp_path / "model")
    with pytest.raises(MlxmanError, match=re.escape(words)):
        resolve_model(str(tmp_path / "model"))


def test_config_wording_in_resolve(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ModelError, match=re.escape("has no config.json")):
        resolve_model(str(model))
    os.mkfifo(model / "config.json")
    error = finishes(lambda: resolve_model(str(model)))
    assert isinstance(error, ModelError) and "config.json is a FIFO" in str(error)
    error = finishes(lambda: read_config(model))
    assert isinstance(error, ModelError) and "config.json is a FIFO" in str(error)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "config.json is nested too deeply"),
        (b"\xff{}", "config.json is not UTF-8"),
        (b"[]", "config.json holds a JSON list, not an object"),
        (b"", "config.json is empty"),
    ],
)
def test_config_content(tmp_path: Path, content: bytes, words: str) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ModelError, match=re.escape(words)):
        read_config(tmp_path)


def test_sparse_config_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"{")
    os.truncate(tmp_path / "config.json", 4 * 1024**3)
    with pytest.raises(ModelError, match=re.escape("config.json is 4,294,967,296 bytes, over the")):
        read_config(tmp_path)


def test_path_component_over_255_bytes(tmp_path: Path) -> None:
    for spec in (str(tmp_path / LONG_NAME), f"{tmp_path}/{LONG_NAME}/model", LONG_NAME + "/x"):
        with pytest.raises(ModelError, match=r"name too long.*255"):
            resolve_model(spec)


def test_a_cached_commit_is_found_by_its_short_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `pull ORG/NAME@3e21572` takes a short hash; so must `-m`, or its not-cached hint (pull it) loops.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    revision = "3e2157205fc0376333ba9fa7ffb181eb10d95db5"
    snapshot = fake_hub_cache(tmp_path, "org/tiny", revision)
    (tmp_path / "models--org--tiny" / "snapshots" / ("3e2f" + "0" * 36)).mkdir()
    resolved = resolve_model("org/tiny@3e21572")
    assert resolved.path == snapshot and resolved.id == f"org/tiny@{revision}"
    with pytest.raises(NotFoundError):
        resolve_model("org/tiny@3e2")  # too short to be a commit: a branch or tag name, not cached
    with pytest.raises(NotFoundError):
        resolve_model("org/tiny@abcdef0")


def test_a_cached_adapter_repo_given_as_a_model_says_what_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `pull ORG/LORA` caches an adapter; `-m ORG/LORA` said "not in the cache, pull it" (a loop).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    revision = "e" * 40
    snapshot = fake_hub_cache(tmp_path, "org/lora", revision)
    (snapshot / "config.json").unlink()
    (snapshot / "adapter_config.json").write_text(json.dumps({"model": "org/tiny", "fine_tune_type": "lora"}))
    with pytest.raises(ModelError) as raised:
        resolve_model("org/lora")
    assert "is an adapter" in raised.value.message and "pull" not in str(raised.value.hint)
    assert "--model org/tiny --adapter org/lora" in str(raised.value.hint)


def test_a_cached_adapter_repo_is_an_adapter_by_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `ls` lists a pulled adapter by its id (`└ org/lora`): --adapter takes that id too.
    import huggingface_hub.constants

    from mlxman.pool.keys import resolve_adapter_dir

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    snapshot = fake_hub_cache(tmp_path / "hub", "org/lora", "e" * 40)
    (snapshot / "config.json").unlink()
    (snapshot / "adapter_config.json").write_text(json.dumps({"model": "org/tiny", "fine_tune_type": "lora"}))
    assert resolve_adapter_dir("org/lora") == snapshot.resolve()
    assert resolve_adapter_dir(f"org/lora@{'e' * 7}") == snapshot.resolve()
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_adapter_dir("org/missing")
